"""Enrichment: user agents -> device, client, OS; addresses -> location; anonymized addresses.

The location database is built with ``mmdb-writer`` in the GeoLite2-City layout (one network in
the Country layout: tests/geodb.py), then read back through
:class:`relay.tracking.enrich.GeoDatabase`. """

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from relay.config import parse
from relay.errors import ConfigError
from relay.tracking.bots import PERSON, PROXY, SCANNER
from relay.tracking.enrich import (
    NOWHERE,
    Agent,
    AgentParser,
    Details,
    Enricher,
    GeoDatabase,
    Place,
    anonymize_ip,
    open_enricher,
    outlook_release,
    place_of,
)
from tests.geodb import write_database

# Real user agents as mail clients and browsers send them when loading a pixel or a link.
AGENTS = [
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
     Agent("desktop", "Apple Mail", "Mac OS X 10.15")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) Mobile/15E148",
     Agent("mobile", "Apple Mail", "iOS 17.5")),
    ("Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Mobile/15E148",
     Agent("tablet", "Apple Mail", "iOS 16.6")),
    ("Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 6.1; Trident/4.0; Microsoft Outlook "
     "14.0.7113; ms-office; MSOffice 14)",
     Agent("desktop", "Outlook 2010", "Windows 7")),
    ("Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 6.1; Trident/7.0; Microsoft Outlook "
     "15.0.4569; ms-office; MSOffice 15)",
     Agent("desktop", "Outlook 2013", "Windows 7")),
    ("Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 10.0; WOW64; Trident/7.0; .NET4.0C; "
     ".NET4.0E; Microsoft Outlook 16.0.4266; ms-office; MSOffice 16)",
     Agent("desktop", "Outlook 2016", "Windows 10")),
    ("Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.10827; Pro)",
     Agent("desktop", "Outlook 2019", "Windows 10")),
    ("Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)",
     Agent("desktop", "Outlook 365", "Windows 10")),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0 OneOutlook/1.2024.611.100",
     Agent("desktop", "New Outlook", "Windows 10")),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Microsoft Outlook 16.84",
     Agent("desktop", "Outlook for Mac 16", "Mac OS X 10.15")),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 Thunderbird/115.12.2",
     Agent("desktop", "Thunderbird 115", "Windows 10")),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.3.1",
     Agent("desktop", "Thunderbird 128", "Linux")),
    # The Gmail app on Android opens links in an Android WebView.
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8 Build/UD1A.230803.041; wv) AppleWebKit/537.36 "
     "(KHTML, like Gecko) Version/4.0 Chrome/126.0.6478.71 Mobile Safari/537.36",
     Agent("mobile", "Chrome Mobile WebView 126", "Android 14")),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
     Agent("mobile", "Mobile Safari 17", "iOS 17.5")),
    ("Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/16.6 Mobile/15E148 Safari/604.1",
     Agent("tablet", "Mobile Safari 16", "iOS 16.6")),
    ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0.0.0 Mobile Safari/537.36",
     Agent("mobile", "Chrome Mobile 126", "Android 10")),
    ("Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0.6478.122 Safari/537.36",
     Agent("tablet", "Chrome 126", "Android 13")),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0.0.0 Safari/537.36",
     Agent("desktop", "Chrome 126", "Windows 10")),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.2592.87",
     Agent("desktop", "Edge 126", "Windows 10")),
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
     Agent("desktop", "Firefox 127", "Ubuntu")),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.5 Safari/605.1.15",
     Agent("desktop", "Safari 17", "Mac OS X 10.15")),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
     Agent("bot", "Googlebot 2", "")),
    ("curl/8.5.0", Agent("", "curl 8", "")),
    ("", Agent("", "", "")),
]


@pytest.fixture(scope="module")
def agents() -> AgentParser:
    return AgentParser(cache_size=64)


@pytest.mark.parametrize(("user_agent", "expected"), AGENTS,
                         ids=[f"{a.client or 'empty'}-{a.device}" for _, a in AGENTS])
def test_user_agent_table(agents: AgentParser, user_agent: str, expected: Agent) -> None:
    assert agents.parse(user_agent) == expected


def test_parsed_user_agents_are_cached_and_the_cache_is_bounded() -> None:
    parser = AgentParser(cache_size=2)
    first = parser.parse(AGENTS[0][0])
    assert parser.parse(AGENTS[0][0]) is first
    for user_agent, _ in AGENTS[1:6]:
        parser.parse(user_agent)
    info = parser.parse.cache_info()  # type: ignore[attr-defined]
    assert (info.hits, info.currsize, info.maxsize) == (1, 2, 2)


@pytest.mark.parametrize(("build", "release"), [
    (4266, "2016"), (5444, "2016"), (10417, "2019"), (10827, "2019"), (14332, "2021"),
    (17932, "2024"), (6001, "365"), (17928, "365"), (18000, "365"),
])
def test_outlook_release_from_the_build(build: int, release: str) -> None:
    assert outlook_release(build) == release


# --- location -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def geo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_database(tmp_path_factory.mktemp("geo") / "test-city.mmdb")


@pytest.fixture
def geo(geo_path: Path):
    database = GeoDatabase(geo_path)
    yield database
    database.close()


@pytest.mark.parametrize(("ip", "place"), [
    ("203.0.113.9", Place("DE", "Berlin", "Berlin")),
    ("203.0.113.200", Place("FR", "Normandy", "Rouen")),
    ("198.51.100.77", Place("JP", None, None)),  # a Country-edition record
    ("2001:db8:1:ffff::1", Place("US", "Oregon", "Portland")),
    ("::ffff:203.0.113.9", Place("DE", "Berlin", "Berlin")),
    ("192.0.2.1", NOWHERE),  # not in the database
    ("2001:db8:2::1", NOWHERE),
    ("not an address", NOWHERE),
    (None, NOWHERE),
    ("", NOWHERE),
])
def test_location_lookup(geo: GeoDatabase, ip: str | None, place: Place) -> None:
    assert geo.locate(ip) == place


def test_locations_are_cached_by_address(geo_path: Path) -> None:
    database = GeoDatabase(geo_path, cache_size=1)
    try:
        assert database.locate("203.0.113.9") is database.locate("203.0.113.9")
        database.locate("2001:db8:1::5")
        info = database.locate.cache_info()  # type: ignore[attr-defined]
        assert (info.hits, info.misses, info.currsize) == (1, 2, 1)
    finally:
        database.close()


def test_place_of_registered_country_and_empty_records() -> None:
    assert place_of({"registered_country": {"iso_code": "NL"}}) == Place("NL", None, None)
    assert place_of({"subdivisions": []}) == NOWHERE
    assert place_of(None) == NOWHERE
    assert NOWHERE.as_dict() is None
    assert Place("DE", None, "Berlin").as_dict() == {
        "country": "DE", "region": None, "city": "Berlin"}


# --- anonymization ------------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "stored"), [
    ("203.0.113.77", "203.0.113.0"),
    ("10.1.2.255", "10.1.2.0"),
    ("2001:db8:abcd:1234:5678::1", "2001:db8:abcd::"),
    ("2001:db8:abcd::", "2001:db8:abcd::"),
    ("fe80::1%eth0", "fe80::"),
    ("::ffff:198.51.100.9", "198.51.100.0"),
    ("garbage", None),
    (None, None),
])
def test_anonymize_ip(ip: str | None, stored: str | None) -> None:
    assert anonymize_ip(ip) == stored


# --- the enricher as the recorder uses it -------------------------------------------------

CHROME = AGENTS[17][0]


def test_describe_with_location_and_anonymized_address(agents: AgentParser,
                                                       geo: GeoDatabase) -> None:
    enricher = Enricher(agents, geo, anonymize=True)
    # 203.0.113.130 is in Rouen; its anonymized 203.0.113.0 would be Berlin: the lookup must
    # use the full address.
    assert enricher.describe(CHROME, "203.0.113.130", PERSON) == Details(
        "desktop", "Chrome 126", "Windows 10", "FR", "Normandy", "Rouen", "203.0.113.0")


def test_describe_without_database_or_anonymization(agents: AgentParser) -> None:
    assert Enricher(agents).describe(CHROME, "203.0.113.130", SCANNER) == Details(
        "desktop", "Chrome 126", "Windows 10", None, None, None, "203.0.113.130")


def test_mailbox_proxy_is_the_device_class(agents: AgentParser) -> None:
    proxy = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com " \
            "GoogleImageProxy)"
    details = Enricher(agents).describe(proxy, "66.249.84.1", PROXY)
    assert (details.device, details.client) == ("proxy", "GmailImageProxy")


class _Broken:
    def parse(self, user_agent: str) -> Agent:
        raise RuntimeError("parser bug")

    path = Path("broken.mmdb")

    def locate(self, ip: str | None) -> Place:
        raise RuntimeError("database bug")


def test_enrichment_failures_leave_fields_empty_and_are_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    enricher = Enricher(_Broken(), _Broken())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, "relay.enrich"):
        details = enricher.describe("Thunderbird", "203.0.113.1", PERSON)
    assert details == Details(None, None, None, None, None, None, "203.0.113.1")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "user agent not parsed", "location of 203.0.113.1 not read from broken.mmdb"]


# --- configuration ------------------------------------------------------------------------

def test_config_geo_and_privacy(geo_path: Path) -> None:
    config = parse({"geo": {"database": geo_path.name}, "privacy": {"anonymize_ip": True}},
                   "relay.toml", geo_path.parent)
    assert config.geo.database == geo_path
    assert config.privacy.anonymize_ip is True
    defaults = parse({})
    assert (defaults.geo.database, defaults.privacy.anonymize_ip) == (None, False)


@pytest.mark.parametrize(("document", "key", "problem"), [
    ({"geo": {"database": "/nonexistent/City.mmdb"}}, "geo.database", "no such file"),
    ({"geo": {"database": 5}}, "geo.database", "expected str"),
    ({"geo": {"path": "x"}}, "geo.path", "unknown setting"),
    ({"privacy": {"anonymize_ip": "yes"}}, "privacy.anonymize_ip", "expected bool"),
])
def test_config_errors_name_file_and_key(document: dict, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(document, "relay.toml")
    assert (caught.value.file, caught.value.key) == ("relay.toml", key)
    assert problem in caught.value.problem


def test_open_enricher_from_the_config(geo_path: Path) -> None:
    config = parse({"geo": {"database": str(geo_path)}, "privacy": {"anonymize_ip": True}})
    enricher = open_enricher(config.geo, config.privacy, "relay.toml")
    try:
        assert enricher.describe(CHROME, "2001:db8:1::9", PERSON)[3:] == (
            "US", "Oregon", "Portland", "2001:db8:1::")
    finally:
        enricher.close()
    assert open_enricher(parse({}).geo, parse({}).privacy, "relay.toml").geo is None


def test_a_database_that_is_no_mmdb_fails_naming_the_key(tmp_path: Path) -> None:
    bogus = tmp_path / "City.mmdb"
    bogus.write_bytes(b"not a database")
    config = parse({"geo": {"database": str(bogus)}})
    with pytest.raises(ConfigError) as caught:
        open_enricher(config.geo, config.privacy, "relay.toml")
    assert (caught.value.file, caught.value.key) == ("relay.toml", "geo.database")
    assert "not a MaxMind database" in caught.value.problem
