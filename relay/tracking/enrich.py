"""Who opened or clicked, on what, from where: device, client, OS and location of a hit.

Pure apart from reading the location database. The recorder (relay/tracking/events.py) asks
:meth:`Enricher.describe` once per hit, inside the event write, and stores what it returns.

User agents are parsed by ``ua-parser`` with its bundled rule set (``ua-parser-builtins``,
matched natively by ``ua-parser-rs``), behind a bounded LRU cache since user agents repeat
heavily. Its answer becomes three fields:

``device``  ``desktop``, ``mobile``, ``tablet``, ``bot`` (crawlers the rule set knows), or
            ``proxy`` for a mailbox image proxy (Gmail, Yahoo, Outlook.com: relay/tracking/bots.py),
            the mail client's class when the device behind it cannot be known
``client``  the browser or mail client with its major version: ``Chrome 126``, ``Thunderbird
            128``, ``Outlook 2016``; ``Apple Mail`` and ``New Outlook`` carry no version (theirs
            is an engine or build number, not the product's)
``os``      the operating system with its version: ``iOS 17.5``, ``Windows 10``, ``Android 14``

A field the user agent does not tell is ``None`` on the stored event (``""`` in :class:`Agent`).

The rule set lacks a few mail clients; :data:`MAIL_CLIENT_RULES` adds them in its own format,
tried before the shipped rules. Outlook for Windows reports ``16.0.<build>`` for every release
since 2016; :func:`outlook_release` names the release from the build.

Location comes from a MaxMind-format database (GeoLite2 or DB-IP Lite, City or Country
edition) named by ``[geo] database``, memory-mapped, no network: ``country`` (ISO 3166 code),
``region`` (first subdivision, English name) and ``city`` (English name). Without a database,
or for an address it does not know, they are ``None``.

Privacy: with ``[privacy] anonymize_ip`` the stored address is :func:`anonymize_ip` of the real
one (IPv4 /24, IPv6 /48). The real address is used first: by the bot rules and the location
lookup.

Enrichment never fails a hit: a parser or database error leaves the fields empty and is logged.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import maxminddb
from ua_parser import OS, Device, Domain, Result, UserAgent, load_lazy_builtins
from ua_parser.lazy import UserAgentMatcher
from ua_parser.regex import Resolver

from relay.config import GeoSettings, PrivacySettings
from relay.errors import ConfigError
from relay.tracking.bots import PROXY

log = logging.getLogger("relay.enrich")

DESKTOP = "desktop"
MOBILE = "mobile"
TABLET = "tablet"
BOT = "bot"

# Tried before the shipped rules, in ua-parser's format: regex, then family (``$1`` or fixed);
# major, minor, patch come from groups 2, 3, 4.
MAIL_CLIENT_RULES: tuple[UserAgentMatcher, ...] = (
    # Outlook for Mac renders in WebKit and appends its own version; the shipped rules see a
    # WebKit user agent without a browser token and say Apple Mail.
    UserAgentMatcher(r"Macintosh.{0,200}(Microsoft Outlook) (\d+)\.(\d+)", "Outlook for Mac"),
    # Outlook for Windows 2016 and later: keep the build, which tells the release apart.
    UserAgentMatcher(r"(Microsoft Outlook) (16)\.(0)\.(\d+)", "Outlook"),
    # The new Outlook for Windows (a WebView2 app): an Edge user agent with its own token.
    UserAgentMatcher(r"(OneOutlook)/(\d+)", "New Outlook"),
    # Mail on iOS and iPadOS: a bare WebKit user agent, no browser or app token after Mobile/.
    UserAgentMatcher(
        r"^Mozilla/5\.0 \((iPhone|iPad|iPod); CPU (?:iPhone )?OS [\d_]+ like Mac OS X\) "
        r"AppleWebKit/[\d.]+ \(KHTML, like Gecko\) Mobile/\w+$",
        "Apple Mail",
    ),
)
_VERSIONLESS = frozenset({"Apple Mail", "New Outlook"})

# Outlook for Windows 16.0 builds: 2016 (MSI) below 16.0.6000; the volume-licensed releases
# stay on fixed build lines; every other build is click-to-run (Microsoft 365, and retail
# 2016-2024, which update alongside it and cannot be told apart).
_OUTLOOK_LINES = ((10000, 11000, "2019"), (14332, 14333, "2021"), (17932, 17933, "2024"))

_MOBILE_OS = frozenset({"Android", "iOS", "Windows Phone", "BlackBerry OS", "KaiOS",
                        "Symbian OS", "Firefox OS", "Tizen", "HarmonyOS"})
_PHONES = frozenset({"iPhone", "iPod", "Generic Smartphone", "Generic Feature Phone"})


class Agent(NamedTuple):
    """What a user agent says about the device and software."""

    device: str
    client: str
    os: str


class Place(NamedTuple):
    """Where an address is, as far as the location database knows."""

    country: str | None = None
    region: str | None = None
    city: str | None = None

    def as_dict(self) -> dict[str, str] | None:
        """The webhook's ``geo``: None when nothing is known."""
        return None if self == NOWHERE else self._asdict()


UNKNOWN_AGENT = Agent("", "", "")
NOWHERE = Place()


class Details(NamedTuple):
    """The enrichment of one hit, as stored on its events."""

    device: str | None  # None: unknown
    client: str | None
    os: str | None
    country: str | None
    region: str | None
    city: str | None
    ip: str | None  # the address to store: anonymized when configured


def outlook_release(build: int) -> str:
    """The Outlook release name of a Windows ``16.0.<build>``."""
    if build < 6000:
        return "2016"
    return next((name for low, high, name in _OUTLOOK_LINES if low <= build < high), "365")


def client_name(agent: UserAgent | None) -> str:
    """``Chrome 126``, ``Outlook 2019``, ``Apple Mail``; ``""`` when the parser knows nothing."""
    if agent is None:
        return ""
    if agent.family == "Outlook" and agent.major == "16" and agent.patch:
        return f"Outlook {outlook_release(int(agent.patch))}"
    if agent.family in _VERSIONLESS or not agent.major:
        return agent.family
    return f"{agent.family} {agent.major}"


def os_name(os: OS | None) -> str:
    if os is None:
        return ""
    version = ".".join(part for part in (os.major, os.minor) if part)
    return f"{os.family} {version}" if version else os.family


def device_class(device: Device | None, os: OS | None) -> str:
    family = device.family if device else ""
    brand = (device.brand or "") if device else ""
    if family == "Spider":
        return BOT
    if family == "iPad" or "Tablet" in family or "Tablet" in brand or family.startswith("Kindle"):
        return TABLET
    if family in _PHONES or (os is not None and os.family in _MOBILE_OS):
        return MOBILE
    return DESKTOP if os is not None else ""


def agent_of(result: Result) -> Agent:
    return Agent(device_class(result.device, result.os), client_name(result.user_agent),
                 os_name(result.os))


class AgentParser:
    """User agent -> :class:`Agent`, with a bounded LRU of parsed user agents."""

    def __init__(self, cache_size: int = 8192) -> None:
        shipped_agents, shipped_os, shipped_devices = load_lazy_builtins()
        self._resolver = Resolver(([*MAIL_CLIENT_RULES, *shipped_agents], shipped_os,
                                   shipped_devices))
        self.parse = lru_cache(maxsize=cache_size)(self.parse_uncached)

    def parse_uncached(self, user_agent: str) -> Agent:
        if not user_agent:
            return UNKNOWN_AGENT
        return agent_of(self._resolver(user_agent, Domain.ALL).complete())


def place_of(record: Mapping[str, Any] | None) -> Place:
    """A GeoLite2 / DB-IP record (City or Country edition) -> :class:`Place`."""
    if not record:
        return NOWHERE
    country = record.get("country") or record.get("registered_country") or {}
    subdivisions = record.get("subdivisions") or [{}]
    return Place(country.get("iso_code"), _english(subdivisions[0]),
                 _english(record.get("city") or {}))


def _english(entry: Mapping[str, Any]) -> str | None:
    return (entry.get("names") or {}).get("en")


_MAPPED = "::ffff:"
_V4_MAPPED = bytes(10) + b"\xff\xff"


class GeoDatabase:
    """A memory-mapped MaxMind-format database (C extension when installed), with a bounded
    LRU of answers by address: a recipient's opens and clicks tend to come from one address,
    and decoding a City record (names in eight languages) costs more than the tree walk."""

    def __init__(self, path: Path, cache_size: int = 65536) -> None:
        self.path = path
        self._reader = maxminddb.open_database(str(path), maxminddb.MODE_AUTO)
        self.locate = lru_cache(maxsize=cache_size)(self.locate_uncached)

    def locate_uncached(self, ip: str | None) -> Place:
        if not ip:
            return NOWHERE
        if ip[:7].lower() == _MAPPED and "." in ip:  # a dual-stack socket's IPv4 client
            ip = ip[7:]
        try:
            return place_of(self._reader.get(ip))  # type: ignore[arg-type]
        except ValueError:  # not an address (InvalidDatabaseError is a ValueError too)
            return NOWHERE

    def close(self) -> None:
        self._reader.close()


def anonymize_ip(ip: str | None) -> str | None:
    """IPv4 with the last octet zeroed, IPv6 cut to its /48 (an IPv4-mapped IPv6 address as
    IPv4); text that is no address is not stored at all. Parsed by the C socket functions:
    this runs on every hit."""
    if not ip:
        return ip
    try:
        if ":" not in ip:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, ip)[:3]
                                    + b"\0")
        packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    except OSError:
        return None
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:15] + b"\0")
    return socket.inet_ntop(socket.AF_INET6, packed[:6] + bytes(10))


class Enricher:
    """Describes hits: cached user agent parse, one location lookup, the address to store."""

    def __init__(self, agents: AgentParser | None = None, geo: GeoDatabase | None = None, *,
                 anonymize: bool = False) -> None:
        self.agents = agents or AgentParser()
        self.geo = geo
        self.anonymize = anonymize

    def describe(self, user_agent: str, ip: str | None, classification: str) -> Details:
        agent = self._agent(user_agent)
        place = self._place(ip)
        device = PROXY if classification == PROXY else agent.device
        return Details(device or None, agent.client or None, agent.os or None, *place,
                       anonymize_ip(ip) if self.anonymize else ip)

    def _agent(self, user_agent: str) -> Agent:
        try:
            return self.agents.parse(user_agent)
        except Exception:  # enrichment must never cost the event
            log.exception("user agent not parsed: %r", user_agent[:200])
            return UNKNOWN_AGENT

    def _place(self, ip: str | None) -> Place:
        if self.geo is None:
            return NOWHERE
        try:
            return self.geo.locate(ip)
        except Exception:  # enrichment must never cost the event
            log.exception("location of %s not read from %s", ip, self.geo.path)
            return NOWHERE

    def close(self) -> None:
        if self.geo is not None:
            self.geo.close()


def open_enricher(geo: GeoSettings, privacy: PrivacySettings, source: str) -> Enricher:
    """The tracker's enricher from ``[geo]`` and ``[privacy]``. A database that cannot be read
    fails start-up with an error naming the config file and key."""
    try:
        database = None if geo.database is None else GeoDatabase(geo.database)
    except (OSError, maxminddb.InvalidDatabaseError) as exc:
        raise ConfigError(source, "geo.database", f"not a MaxMind database: {exc}") from None
    return Enricher(geo=database, anonymize=privacy.anonymize_ip)
