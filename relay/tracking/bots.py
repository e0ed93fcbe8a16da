"""Who made a hit: a person, a mailbox image proxy, or a machine (pure, no I/O).

Classifications (README, "The tracking service"):

==============  =======  ==================================================================
person          counted  a mail client or browser loading the pixel or following a link
proxy           counted  a mailbox provider's image proxy (Gmail, Yahoo, Outlook.com): it
                         loads the pixel because a person opened the mail; carries ``bot``
prefetch        no       Apple Mail Privacy Protection loads every image on delivery, read or
                         not: stored and flagged, never an ``email.opened``, never in stats
scanner         no       a security gateway checking links (Barracuda, Proofpoint, Mimecast,
                         Microsoft Safe Links, ms-office), a click seconds after sending,
                         several links clicked at once, a ``HEAD`` request
automation      no       headless browsers, HTTP libraries, crawlers, link-preview bots, and
                         floods: more hits from one address and agent than a person makes
==============  =======  ==================================================================

Signals are checked in a fixed order and the first that matches decides: the request method,
the user agent, the client address (:data:`DEFAULT_NETWORKS` plus configured ones), then for
clicks the time since sending and other links clicked in the same second, then the flood rule.
The verdict carries the source (``google``, ``barracuda``, ``curl`` ...) and a human-readable
reason for the audit trail. User agent and address verdicts are cached (bounded), since both
repeat heavily.

The flood rule (``tracking.flood_hits`` per ``tracking.flood_seconds``): a browser-like agent
hammering the tracker from one address (600,000 hits in four minutes were all counted as a
person). Hits that every earlier rule let through as a person are counted per (address, user
agent) over a sliding window (:class:`FloodWindow`); past ``flood_hits`` in the window they are
automation. Every such hit counts towards the rate, so a sustained flood stays automation
throughout, while the first ``flood_hits`` of it are people: the rule cannot tell them apart.
Mailbox proxies are decided before the rule (their agents and addresses) and never reach it.
Per process, like the burst rule.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from relay.addresses import Network, parse_ip

PERSON = "person"
PROXY = "proxy"
PREFETCH = "prefetch"
SCANNER = "scanner"
AUTOMATION = "automation"
COUNTED = frozenset({PERSON, PROXY})

OPEN = "open"
CLICK = "click"



@dataclass(frozen=True, slots=True)
class Verdict:
    classification: str
    source: str | None = None
    reason: str | None = None

    @property
    def counted(self) -> bool:
        """Only people and mailbox proxies enter statistics and webhooks."""
        return self.classification in COUNTED


HUMAN = Verdict(PERSON)


class Signals(NamedTuple):
    """What is known about one hit when it is classified."""

    kind: str  # OPEN or CLICK
    method: str  # "GET" or "HEAD"
    user_agent: str
    ip: str | None
    seconds_since_sent: float | None = None  # None: the message is not in the store
    other_link_within_second: bool = False  # clicks: the same recipient clicked another link
    at: float | None = None  # when the hit arrived (Unix seconds); None: no flood rule


@dataclass(frozen=True, slots=True)
class BotNetwork:
    network: Network
    classification: str
    source: str
    opens_only: bool = False


@dataclass(frozen=True, slots=True)
class _AgentRule:
    pattern: re.Pattern[str]
    classification: str
    source: str | None  # None: the matched text, lower-cased (curl, python-requests ...)


def _rule(pattern: str, classification: str, source: str | None = None) -> _AgentRule:
    return _AgentRule(re.compile(pattern, re.IGNORECASE), classification, source)


# First match wins: mailbox proxies before scanners (Outlook.com's proxy runs in Microsoft's
# network and must not fall to the Microsoft scanner rules), scanners before automation.
AGENT_RULES: tuple[_AgentRule, ...] = (
    _rule(r"GoogleImageProxy", PROXY, "google"),
    _rule(r"YahooMailProxy", PROXY, "yahoo"),
    # Outlook.com / Hotmail's image proxy announces a fixed, long-retired Edge build with a
    # stray "Mozilla/5.0" appended; no real browser sends that.
    _rule(r"Edge/12\.246 Mozilla/5\.0$", PROXY, "microsoft"),
    _rule(r"Barracuda", SCANNER, "barracuda"),
    _rule(r"Proofpoint", SCANNER, "proofpoint"),
    _rule(r"Mimecast", SCANNER, "mimecast"),
    _rule(r"Safe ?Links", SCANNER, "microsoft"),
    _rule(r"ms-office|MSOffice|Microsoft Office Existence Discovery", SCANNER, "microsoft"),
    _rule(r"IronPort|Cisco ?Secure", SCANNER, "cisco"),
    _rule(r"Trend ?Micro", SCANNER, "trendmicro"),
    _rule(r"Symantec", SCANNER, "symantec"),
    _rule(r"Sophos", SCANNER, "sophos"),
    _rule(r"Forcepoint", SCANNER, "forcepoint"),
    _rule(r"Forti(?:Mail|Guard|net)", SCANNER, "fortinet"),
    _rule(r"FireEye", SCANNER, "fireeye"),
    _rule(r"HeadlessChrome|PhantomJS|Puppeteer|Playwright|Selenium|Splash", AUTOMATION),
    _rule(
        r"^(?:curl|Wget|python-requests|python-urllib|python-httpx|aiohttp|Go-http-client|"
        r"Java|okhttp|Apache-HttpClient|libwww-perl|node-fetch|axios|undici|Ruby|PHP|"
        r"GuzzleHttp|HTTPie|Scrapy|PostmanRuntime|Dart|reqwest|http\.rb)\b"
        r"|\baiohttp/",  # aiohttp's own agent is "Python/3.x aiohttp/3.x"
        AUTOMATION,
    ),
    _rule(
        r"facebookexternalhit|Slackbot|Twitterbot|WhatsApp|TelegramBot|Discordbot|"
        r"LinkedInBot|SkypeUriPreview|\bbot\b|bot/|crawler|spider",
        AUTOMATION,
    ),
)

# Apple Mail Privacy Protection fetches with exactly this user agent and nothing more.
APPLE_PREFETCH_AGENT = "Mozilla/5.0"


def _net(cidr: str, classification: str, source: str, opens_only: bool = False) -> BotNetwork:
    return BotNetwork(ipaddress.ip_network(cidr), classification, source, opens_only)


# The shipped list: address ranges of machines that fetch tracked mail on a recipient's
# behalf. Deliberately short (published, stable ranges of the big vendors); operators add
# their own with ``tracking.scanner_networks``.
DEFAULT_NETWORKS: tuple[BotNetwork, ...] = (
    # Apple's own network: Mail Privacy Protection prefetches images from here. Opens only:
    # people at Apple click links from it too.
    _net("17.0.0.0/8", PREFETCH, "apple", opens_only=True),
    # Microsoft Exchange Online Protection, where Safe Links and Defender check links.
    _net("40.92.0.0/15", SCANNER, "microsoft"),
    _net("40.107.0.0/16", SCANNER, "microsoft"),
    _net("52.100.0.0/14", SCANNER, "microsoft"),
    _net("104.47.0.0/17", SCANNER, "microsoft"),
    # Barracuda Email Security Service.
    _net("64.235.144.0/20", SCANNER, "barracuda"),
    _net("209.222.80.0/21", SCANNER, "barracuda"),
    # Mimecast (US data centres).
    _net("205.139.110.0/24", SCANNER, "mimecast"),
    _net("207.211.30.0/24", SCANNER, "mimecast"),
    # Proofpoint hosted gateways.
    _net("148.163.128.0/19", SCANNER, "proofpoint"),
    _net("67.231.144.0/20", SCANNER, "proofpoint"),
)

BURST_SECONDS = 1.0
# (address, user agent) pairs the flood rule remembers at most: about 240 bytes each.
FLOOD_KEYS = 65536


class FloodWindow:
    """Hits per key over a sliding window of ``seconds``, with bounded memory.

    The count is estimated from two fixed windows, the current one and the one before it,
    the latter weighted by how much of it the sliding window still covers (a steady rate is
    counted exactly; more than twice ``limit`` hits within any ``seconds`` always exceeds it).
    Three numbers per key, and at most ``max_keys`` keys: the least recently hit is forgotten
    first. Time is the hits' own (``at``), so the rule needs no clock of its own.
    """

    def __init__(self, limit: int, seconds: float, max_keys: int = FLOOD_KEYS) -> None:
        self.limit = limit
        self.seconds = seconds
        self.max_keys = max_keys
        # hash of the key -> [fixed window number, hits in it, hits in the one before]
        self._keys: OrderedDict[int, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def exceeded(self, key: object, at: float) -> bool:
        """Count a hit at ``at``; True when the window now holds more than ``limit``."""
        position = at / self.seconds
        window = math.floor(position)
        digest = hash(key)  # a user agent can be 1 KB: keep 8 bytes (salted per process)
        state = self._keys.get(digest)
        if state is None:
            state = self._keys[digest] = [window, 0, 0]
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(digest)
            if window > state[0]:
                state[2] = state[1] if window == state[0] + 1 else 0
                state[1] = 0
                state[0] = window
            # a hit a little older than the current window (hits of one batch are written in
            # arrival order, give or take) counts in the current window
        state[1] += 1
        covered = 1.0 - min(max(position - state[0], 0.0), 1.0)
        return state[2] * covered + state[1] > self.limit


class Classifier:
    """Classifies hits; ``scanner_window_seconds`` 0 turns the time-since-sending rule off,
    ``flood_hits`` 0 the flood rule."""

    def __init__(
        self,
        networks: Iterable[BotNetwork] = DEFAULT_NETWORKS,
        scanner_window_seconds: float = 10.0,
        cache_size: int = 8192,
        flood_hits: int = 0,
        flood_seconds: float = 60.0,
    ) -> None:
        self.networks = tuple(networks)
        self.scanner_window_seconds = scanner_window_seconds
        self._by_agent = lru_cache(maxsize=cache_size)(_agent_verdict)
        self._by_ip = lru_cache(maxsize=cache_size)(self._ip_verdict)
        self.flood = FloodWindow(flood_hits, flood_seconds) if flood_hits else None
        self._flooding = Verdict(AUTOMATION, None, f"more than {flood_hits} hits within "
                                                   f"{flood_seconds:g} s from this address and "
                                                   "user agent")

    def classify(self, signals: Signals) -> Verdict:
        if signals.method == "HEAD":
            return Verdict(SCANNER, None, "HEAD request")
        return (
            self._by_agent(signals.kind, signals.user_agent)
            or self._by_ip(signals.kind, signals.ip)
            or (self._click_verdict(signals) if signals.kind == CLICK else None)
            or self._flood_verdict(signals)
            or HUMAN
        )

    def _flood_verdict(self, signals: Signals) -> Verdict | None:
        if self.flood is None or signals.at is None:
            return None
        if self.flood.exceeded((signals.ip, signals.user_agent), signals.at):
            return self._flooding
        return None

    def _ip_verdict(self, kind: str, ip: str | None) -> Verdict | None:
        address = parse_ip(ip)
        if address is None:
            return None
        for entry in self.networks:
            if address in entry.network and (kind == OPEN or not entry.opens_only):
                reason = f"address in {entry.network} ({entry.source})"
                return Verdict(entry.classification, entry.source, reason)
        return None

    def _click_verdict(self, signals: Signals) -> Verdict | None:
        since = signals.seconds_since_sent
        window = self.scanner_window_seconds
        if window > 0 and since is not None and since < window:
            reason = f"clicked {max(since, 0.0):.1f} s after sending (window {window:g} s)"
            return Verdict(SCANNER, None, reason)
        if signals.other_link_within_second:
            return Verdict(SCANNER, None, f"another link clicked within {BURST_SECONDS:g} s")
        return None


# Outlook for Windows fetches images with "Microsoft Outlook 16.0.x; ms-office; MSOffice 16":
# for an open that is the recipient reading; an ms-office agent on a click is Office checking
# the link (a person's click opens their browser, with the browser's agent).
_OUTLOOK_DESKTOP = re.compile(r"Microsoft Outlook \d")


def _agent_verdict(kind: str, user_agent: str) -> Verdict | None:
    agent = user_agent.strip()
    if not agent:
        return Verdict(AUTOMATION, None, "no user agent")
    if agent.lower() == APPLE_PREFETCH_AGENT.lower():
        if kind == OPEN:
            return Verdict(PREFETCH, "apple", "Apple Mail Privacy Protection user agent")
        return Verdict(AUTOMATION, None, "bare user agent 'Mozilla/5.0'")
    if kind == OPEN and _OUTLOOK_DESKTOP.search(agent):
        return None  # Outlook for Windows loads the images a person opens, ms-office and all
    for rule in AGENT_RULES:
        match = rule.pattern.search(agent)
        if match:
            source = rule.source or match.group(0).lower()
            return Verdict(rule.classification, source, f"user agent {match.group(0)!r}")
    return None


def networks_of(cidrs: Iterable[Network], classification: str = SCANNER,
                source: str = "config") -> tuple[BotNetwork, ...]:
    """Configured ranges (``tracking.scanner_networks``) as classifier entries."""
    return tuple(BotNetwork(net, classification, source) for net in cidrs)
