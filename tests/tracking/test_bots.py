"""relay.tracking.bots: the classification table, case by case (pure, no I/O)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import parse
from relay.errors import ConfigError
from relay.tracking.bots import (
    AUTOMATION,
    CLICK,
    OPEN,
    PERSON,
    PREFETCH,
    PROXY,
    SCANNER,
    Classifier,
    FloodWindow,
    Signals,
    networks_of,
)

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Mobile/15E148")
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
OUTLOOK_PROXY = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like "
                 "Gecko) Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0")
HOME = "203.0.113.7"
OUTLOOK_DESKTOP = ("Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 10.0; WOW64; Trident/7.0; "
                   "Microsoft Outlook 16.0.4266; ms-office; MSOffice 16)")

# (kind, method, user agent, ip) -> (classification, source, counted)
CASES = [
    (OPEN, "GET", FIREFOX, HOME, PERSON, None, True),
    (CLICK, "GET", IPHONE, HOME, PERSON, None, True),
    (OPEN, "GET", GMAIL, "66.249.84.1", PROXY, "google", True),
    (OPEN, "GET", YAHOO, HOME, PROXY, "yahoo", True),
    (OPEN, "GET", OUTLOOK_PROXY, "40.92.1.1", PROXY, "microsoft", True),
    (OPEN, "GET", "Mozilla/5.0", HOME, PREFETCH, "apple", False),
    (OPEN, "GET", "mozilla/5.0", HOME, PREFETCH, "apple", False),  # case does not matter
    (OPEN, "GET", IPHONE, "17.58.1.2", PREFETCH, "apple", False),
    (CLICK, "GET", IPHONE, "17.58.1.2", PERSON, None, True),  # Apple range: opens only
    (CLICK, "GET", "Mozilla/5.0", HOME, AUTOMATION, None, False),
    (CLICK, "GET", "Barracuda Sentinel (EE)", HOME, SCANNER, "barracuda", False),
    (CLICK, "GET", "Mozilla/5.0 Proofpoint URL Defense", HOME, SCANNER, "proofpoint", False),
    (OPEN, "GET", "Mimecast-Scanner/1.0", HOME, SCANNER, "mimecast", False),
    (CLICK, "GET", "Microsoft Safe Links", HOME, SCANNER, "microsoft", False),
    (CLICK, "GET", "Mozilla/4.0 (compatible; ms-office; MSOffice 16)", HOME, SCANNER,
     "microsoft", False),
    (CLICK, "GET", "Microsoft Office Existence Discovery", HOME, SCANNER, "microsoft", False),
    (OPEN, "GET", OUTLOOK_DESKTOP, HOME, PERSON, None, True),
    (CLICK, "GET", OUTLOOK_DESKTOP, HOME, SCANNER, "microsoft", False),
    (CLICK, "GET", FIREFOX, "40.107.22.5", SCANNER, "microsoft", False),
    (CLICK, "GET", FIREFOX, "209.222.82.9", SCANNER, "barracuda", False),
    (CLICK, "GET", FIREFOX, "205.139.110.20", SCANNER, "mimecast", False),
    (CLICK, "GET", FIREFOX, "148.163.130.1", SCANNER, "proofpoint", False),
    (CLICK, "GET", "Mozilla/5.0 (X11; Linux x86_64) HeadlessChrome/120.0", HOME, AUTOMATION,
     "headlesschrome", False),
    (CLICK, "GET", "curl/8.5.0", HOME, AUTOMATION, "curl", False),
    (CLICK, "GET", "python-requests/2.31.0", HOME, AUTOMATION, "python-requests", False),
    (OPEN, "GET", "Go-http-client/1.1", HOME, AUTOMATION, "go-http-client", False),
    (CLICK, "GET", "Python/3.11 aiohttp/3.14.5", HOME, AUTOMATION, "aiohttp/", False),
    (CLICK, "GET", "Mozilla/5.0 (compatible; Googlebot/2.1)", HOME, AUTOMATION, "bot/", False),
    (CLICK, "GET", "Slackbot-LinkExpanding 1.0", HOME, AUTOMATION, "slackbot", False),
    (CLICK, "GET", "", HOME, AUTOMATION, None, False),
    (CLICK, "GET", "Mozilla/5.0 (Linux; Android 9; CUBOT P30) Mobile", HOME, PERSON, None, True),
    (OPEN, "HEAD", FIREFOX, HOME, SCANNER, None, False),
    (CLICK, "HEAD", GMAIL, HOME, SCANNER, None, False),  # HEAD first, whatever the agent
    (OPEN, "GET", FIREFOX, "::ffff:17.1.2.3", PREFETCH, "apple", False),  # mapped IPv4
    (OPEN, "GET", FIREFOX, None, PERSON, None, True),
]


@pytest.mark.parametrize(("kind", "method", "agent", "ip", "classification", "source",
                          "counted"), CASES)
def test_table(kind: str, method: str, agent: str, ip: str | None, classification: str,
               source: str | None, counted: bool) -> None:
    verdict = Classifier().classify(Signals(kind, method, agent, ip))
    assert (verdict.classification, verdict.source, verdict.counted) == (
        classification, source, counted)
    assert (verdict.reason is None) == (classification == PERSON)


@pytest.mark.parametrize(("since", "window", "expected"), [
    (2.0, 10.0, SCANNER),
    (9.99, 10.0, SCANNER),
    (10.0, 10.0, PERSON),
    (-1.0, 10.0, SCANNER),  # clock skew between hosts: still "just sent"
    (2.0, 0.0, PERSON),  # 0 turns the rule off
    (None, 10.0, PERSON),  # message unknown to the store
])
def test_click_seconds_after_sending(since: float | None, window: float, expected: str) -> None:
    classifier = Classifier(scanner_window_seconds=window)
    verdict = classifier.classify(Signals(CLICK, "GET", FIREFOX, HOME, since))
    assert verdict.classification == expected
    if expected == SCANNER:
        assert "after sending" in (verdict.reason or "")


def test_open_seconds_after_sending_is_a_person() -> None:
    """A person whose client is open sees new mail at once: the window is for clicks."""
    verdict = Classifier().classify(Signals(OPEN, "GET", FIREFOX, HOME, 0.5))
    assert verdict.classification == PERSON


def test_another_link_in_the_same_second() -> None:
    verdict = Classifier().classify(Signals(CLICK, "GET", FIREFOX, HOME, 3600.0, True))
    assert (verdict.classification, verdict.counted) == (SCANNER, False)
    assert "another link" in (verdict.reason or "")


def test_configured_networks_extend_the_defaults() -> None:
    extra = networks_of([ipaddress.ip_network("198.51.100.0/24")])
    classifier = Classifier(extra)
    verdict = classifier.classify(Signals(CLICK, "GET", FIREFOX, "198.51.100.9"))
    assert (verdict.classification, verdict.source) == (SCANNER, "config")
    assert classifier.classify(Signals(CLICK, "GET", FIREFOX, HOME)).classification == PERSON


def test_configured_ipv4_mapped_ranges_match_ipv4_clients() -> None:
    """Clients are compared unwrapped; a range written ::ffff:a.b.c.d/1xx never matched."""
    config = parse({"tracking": {"scanner_networks": ["::ffff:198.51.100.0/120"]}})
    classifier = Classifier(networks_of(config.tracking.scanner_networks))
    for client in ("198.51.100.9", "::ffff:198.51.100.9"):
        assert classifier.classify(Signals(CLICK, "GET", FIREFOX, client)).classification == SCANNER


def test_proxy_agent_wins_over_scanner_network() -> None:
    """Outlook.com's proxy fetches from Microsoft's network: the agent decides first."""
    verdict = Classifier().classify(Signals(OPEN, "GET", OUTLOOK_PROXY, "40.107.1.1"))
    assert verdict.classification == PROXY


# --- the flood rule: hits from one address and agent past a rate (the hits' own times) ---

T0 = 1_700_000_000.0


def flood_verdicts(classifier: Classifier, times: list[float], agent: str = FIREFOX,
                   ip: str = HOME) -> list[str]:
    return [classifier.classify(Signals(OPEN, "GET", agent, ip, 60.0, False, at)).classification
            for at in times]


def test_the_issues_flood_is_automation_after_its_first_hits() -> None:
    """600,000 hits in four minutes from one address and browser string: all counted as a
    person before; now the first 300 (the limit) are, the rest are automation, with a reason."""
    classifier = Classifier(flood_hits=300, flood_seconds=60)
    verdicts = flood_verdicts(classifier, [T0 + i * 240 / 600_000 for i in range(600_000)])
    assert verdicts.count(PERSON) == 300
    assert verdicts[:300] == [PERSON] * 300
    verdict = classifier.classify(Signals(OPEN, "GET", FIREFOX, HOME, 60.0, False, T0 + 240))
    assert (verdict.classification, verdict.counted) == (AUTOMATION, False)
    assert verdict.reason == ("more than 300 hits within 60 s from this address and user "
                              "agent")


def test_the_flood_rule_is_per_address_and_agent() -> None:
    classifier = Classifier(flood_hits=3, flood_seconds=60)
    assert flood_verdicts(classifier, [T0] * 5) == [PERSON] * 3 + [AUTOMATION] * 2
    assert flood_verdicts(classifier, [T0], ip="198.51.100.1") == [PERSON]
    assert flood_verdicts(classifier, [T0], agent=IPHONE) == [PERSON]


def test_a_steady_rate_under_the_limit_is_never_a_flood() -> None:
    """240 hits a minute for an hour against a limit of 300 a minute: a busy office NAT."""
    classifier = Classifier(flood_hits=300, flood_seconds=60)
    assert set(flood_verdicts(classifier, [T0 + i * 0.25 for i in range(4 * 3600)])) == {PERSON}


def test_proxies_and_earlier_rules_are_not_subject_to_the_flood_rule() -> None:
    classifier = Classifier(flood_hits=2, flood_seconds=60)
    gmail = {classifier.classify(Signals(OPEN, "GET", GMAIL, "66.249.84.1", 60.0, False, T0))
             .classification for _ in range(10)}
    assert gmail == {PROXY}
    assert flood_verdicts(classifier, [T0] * 3) == [PERSON, PERSON, AUTOMATION]


def test_flood_rule_off() -> None:
    classifier = Classifier(flood_hits=0)
    assert set(flood_verdicts(classifier, [T0] * 1000)) == {PERSON}
    assert classifier.flood is None


@given(limit=st.integers(1, 20), seconds=st.sampled_from([1.0, 10.0, 60.0]),
       gaps=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                               st.floats(0, 30, allow_nan=False)), max_size=300))
def test_flood_window_bounds(limit: int, seconds: float, gaps: list[tuple[str, float]]) -> None:
    """Whatever the timing: a key with at most ``limit`` hits in all is never flagged; a key
    with more than twice ``limit`` hits within some ``seconds`` is flagged at least once."""
    window = FloodWindow(limit, seconds)
    at = T0
    hits: dict[str, list[tuple[float, bool]]] = {}
    for key, gap in gaps:
        at += gap
        hits.setdefault(key, []).append((at, window.exceeded(key, at)))
    for key_hits in hits.values():
        times = [t for t, _ in key_hits]
        flagged = any(f for _, f in key_hits)
        if len(times) <= limit:
            assert not flagged
        if any(sum(start <= t < start + seconds for t in times) > 2 * limit for start in times):
            assert flagged


def test_flood_window_memory_is_bounded() -> None:
    window = FloodWindow(5, 60.0, max_keys=1000)
    for n in range(5000):
        window.exceeded(("198.51.100.1", f"agent {n}"), T0 + n)
    assert len(window) == 1000
    # the most recent keys are the ones kept: the newest is still counted
    assert [window.exceeded(("198.51.100.1", "agent 4999"), T0 + 5000) for _ in range(5)] == [
        False, False, False, False, True]


@pytest.mark.parametrize(("document", "key", "problem"), [
    ({"flood_hits": -1}, "tracking.flood_hits", "0 (off) or more"),
    ({"flood_hits": 2.5}, "tracking.flood_hits", "expected int"),
    ({"flood_seconds": 0}, "tracking.flood_seconds", "greater than 0"),
])
def test_flood_settings_are_checked(document: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"tracking": document}, "relay.toml")
    assert (info.value.key, problem in info.value.problem) == (key, True)
