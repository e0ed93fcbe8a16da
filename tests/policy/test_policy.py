"""Control headers and the tracking decision, tested directly (pure functions)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import ControlHeaderError
from relay.policy.decide import Controls, Https, decide, read_controls, tracking_base
from relay.policy.domains import VERIFIED, TrackingDomain
from relay.policy.rules import Rules
from relay.policy.settings import Account, Domain
from relay.rewrite.headers import parse_header_block

SEED_EXAMPLE = "eyJUYWdOYW1lIjoiVGVzdCIsIk9wZW5UcmFjZSI6IjEiLCJMaW5rVHJhY2UiOiIxIn0="


def controls_of(*lines: str) -> Controls:
    raw = ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()
    return read_controls(raw, parse_header_block(raw))


def trace(obj: object) -> str:
    return "X-AliDM-Trace: " + base64.b64encode(json.dumps(obj).encode()).decode()


def test_seed_example_header():
    c = controls_of("X-AliDM-Trace: " + SEED_EXAMPLE)
    assert (c.opens, c.clicks, c.tag_name) == (True, True, "Test")


def test_alidm_omitted_key_means_off_and_any_order():
    c = controls_of(trace({"LinkTrace": "1", "TagName": "t"}))
    assert (c.opens, c.clicks) == (False, True)


def test_folded_base64_header_is_unfolded():
    value = base64.b64encode(b'{"OpenTrace": "1"}').decode()
    c = controls_of(f"X-AliDM-Trace: {value[:10]}\r\n {value[10:]}")
    assert c.opens is True


@pytest.mark.parametrize(("word", "expected"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
    ("false", False), ("0", False), ("no", False), ("NO", False),
])
def test_anypost_toggle_words(word, expected):
    c = controls_of(f"X-Anypost-Track-Opens: {word}")
    assert c.opens is expected
    assert c.clicks is None


def test_anypost_header_wins_over_alidm_for_its_toggle():
    c = controls_of(trace({"OpenTrace": "1", "LinkTrace": "1"}), "X-Anypost-Track-Clicks: no")
    assert (c.opens, c.clicks) == (True, False)


def test_tags_campaign_topic():
    c = controls_of("X-Anypost-Tags: a, b-2 ,a", "X-Anypost-Campaign: Spring_26",
                    "x-anypost-topic: news.weekly")
    assert c.tags == ("a", "b-2")
    assert (c.campaign, c.topic) == ("Spring_26", "news.weekly")
    assert len(c.headers) == 3


def test_duplicate_control_header_is_refused_when_the_values_differ():
    with pytest.raises(ControlHeaderError, match="more than once, with different values"):
        controls_of("X-Anypost-Track-Opens: true", "X-Anypost-Track-Opens: false")
    c = controls_of("X-Anypost-Track-Opens: true", "x-anypost-track-opens:  true")
    assert (c.opens, len(c.headers)) == (True, 2)  # both are removed before forwarding


def test_encoded_words_in_control_headers_are_decoded():
    c = controls_of("X-Anypost-Track-Opens: =?utf-8?q?true?=", "X-Anypost-Tags: =?utf-8?B?YSxi?=")
    assert (c.opens, c.tags) == (True, ("a", "b"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_alidm_value_parses_or_names_the_header(blob):
    value = base64.b64encode(blob).decode()
    try:
        controls_of(f"X-AliDM-Trace: {value}")
    except ControlHeaderError as exc:
        assert "X-AliDM-Trace" in str(exc)
        assert exc.code >= 500


def rules(account, *domains):
    return Rules(0, account, {d.name: d for d in domains})


def test_decision_order_account_domain_message():
    r = rules(Account(opens=True, clicks=False), Domain("shop.example", clicks=True))
    assert decide(Controls(), "other.example", r, "http://t.example").label == "opens"
    domain = decide(Controls(), "shop.example", r, "http://t.example")
    assert domain.label == "opens+clicks"
    assert "domain shop.example" in domain.reason
    message = decide(Controls(opens=False), "shop.example", r, "http://t.example")
    assert message.label == "clicks"
    assert message.reason == "clicks tracked by domain shop.example, opens off by message headers"


@pytest.mark.parametrize(("headers", "reason"), [
    ((), "opens tracked by account default, clicks off by domain shop.example"),
    (("X-Anypost-Track-Opens: false",),
     "opens off by message header X-Anypost-Track-Opens, clicks off by domain shop.example"),
    (("X-Anypost-Track-Clicks: yes",),
     "opens tracked by account default, clicks tracked by message header "
     "X-Anypost-Track-Clicks"),
    ((trace({"OpenTrace": "1"}),), "opens tracked by message header X-AliDM-Trace"),
    ((trace({"OpenTrace": "1"}), "X-Anypost-Track-Clicks: true"),
     "opens tracked by message header X-AliDM-Trace, clicks tracked by message header "
     "X-Anypost-Track-Clicks"),
])
def test_the_reason_names_what_decided_each_toggle(headers, reason):
    r = rules(Account(opens=True, clicks=True), Domain("shop.example", clicks=False))
    decision = decide(controls_of("Subject: x", *headers), "shop.example", r, "http://t.example")
    assert decision.reason == reason


def test_decision_carries_excluded_hosts_and_base_url():
    r = rules(Account(), Domain("shop.example", exclude_hosts=("pay.example",)))
    d = decide(Controls(opens=True), "shop.example", r, "https://t.example")
    assert d.excluded_hosts == frozenset({"pay.example"})
    assert d.base_url == "https://t.example"


@pytest.mark.parametrize(("base", "secure", "https", "expected"), [
    ("http://t.example:8080/x", {"t.example"}, Https(8443), "https://t.example:8443/x"),
    ("http://t.example", {"t.example"}, Https(443), "https://t.example"),
    ("http://t.example", set(), Https(443, frozenset({"t.example"})), "https://t.example"),
    ("http://t.example", set(), Https(443), "http://t.example"),  # no certificate yet
    ("http://t.example", {"t.example"}, None, "http://t.example"),  # no TLS listener
    ("https://t.example:9443", {"t.example"}, Https(443), "https://t.example:9443"),  # as it is
])
def test_links_use_https_where_the_host_has_a_certificate(base, secure, https, expected):
    assert tracking_base(base, frozenset(secure), https) == expected


def test_a_verified_tracking_domain_with_a_certificate_gets_https_links():
    tracking = {"shop.example": TrackingDomain("track.shop.example", "shop.example", VERIFIED)}
    r = Rules(0, Account(opens=True), {}, tracking, frozenset(),
              frozenset({"track.shop.example"}))
    assert decide(Controls(), "shop.example", r, "http://t.example:80", Https(443)).base_url == \
        "https://track.shop.example"
    assert decide(Controls(), "other.example", r, "http://t.example", Https(443)).base_url == \
        "http://t.example"
