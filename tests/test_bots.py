"""relay.bots: the classification table, case by case (pure, no I/O)."""

from __future__ import annotations

import ipaddress

import pytest

from relay.bots import (
    AUTOMATION,
    CLICK,
    OPEN,
    PERSON,
    PREFETCH,
    PROXY,
    SCANNER,
    Classifier,
    Signals,
    networks_of,
)
from relay.config import parse

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
