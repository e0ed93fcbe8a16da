"""relay.webhooks.payloads: envelopes and signatures (checked by the official anypost SDK and the
standardwebhooks package, not by our code), the retry schedule and the address rules."""

from __future__ import annotations

import ipaddress
import json
from email.utils import formatdate

import pytest
from anypost import WebhookVerificationError as AnypostError
from anypost import verify_webhook_signature
from standardwebhooks.webhooks import Webhook

from relay.webhooks.payloads import (
    DELIVERED,
    FAILED,
    PENDING,
    MessageFacts,
    Result,
    Schedule,
    StoredEvent,
    all_tags,
    envelope,
    event_data,
    iso_time,
    new_secret,
    next_step,
    parse_retry_after,
    refused_address,
    secret_problem,
    signature_headers,
    url_problem,
)

FACTS = MessageFacts("email_1", "<m1@shop.example>", "news@shop.example", "Sale ✓",
                     ("Promo", "spring"), "spring-2026", "offers")
EVENTS = [
    StoredEvent("evt_1", "email.opened", 1767225600.25, json.dumps(event_data(
        FACTS, "a@example.org", ip="203.0.113.9", user_agent="GoogleImageProxy",
        bot={"source": "google", "kind": "proxy"}))),
    StoredEvent("evt_2", "email.clicked", 1767225601.0, json.dumps(event_data(
        FACTS, "b@example.org", ip=None, user_agent="Firefox", url="https://shop.example/x"))),
]


def test_both_official_verifiers_accept_the_signatures():
    secret = new_secret()
    now = 1_767_225_700
    body = envelope("bat_1", now, EVENTS)
    headers = signature_headers(secret, "bat_1", now, body)
    verify_webhook_signature(body, headers["Anypost-Signature"], secret, now=now)
    with pytest.raises(AnypostError):
        verify_webhook_signature(body + b" ", headers["Anypost-Signature"], secret, now=now)
    with pytest.raises(AnypostError):
        verify_webhook_signature(body, headers["Anypost-Signature"], new_secret(), now=now)
    assert headers["webhook-id"] == "bat_1"
    assert headers["webhook-timestamp"] == str(now)


def test_standard_webhooks_verifier_accepts_a_fresh_delivery():
    import time

    secret = new_secret()
    now = int(time.time())
    body = envelope("bat_2", now, EVENTS)
    headers = signature_headers(secret, "bat_2", now, body)
    assert Webhook(secret).verify(body, headers)["batch_id"] == "bat_2"
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)


def test_envelope_is_anypost_shaped():
    body = json.loads(envelope("bat_1", 1767225700, EVENTS))
    assert body["batch_id"] == "bat_1" and body["timestamp"] == 1767225700
    opened, clicked = body["events"]
    assert opened == {"id": "evt_1", "type": "email.opened",
                      "occurred_at": "2026-01-01T00:00:00.250Z", "data": {
                          "email_id": "email_1", "message_id": "<m1@shop.example>",
                          "from": "news@shop.example", "recipient": "a@example.org",
                          "subject": "Sale ✓", "tags": ["Promo", "spring"],
                          "campaign": "spring-2026", "topic": "offers", "ip": "203.0.113.9",
                          "user_agent": "GoogleImageProxy",
                          "tracking": {"bot": {"source": "google", "kind": "proxy"}}}}
    assert clicked["data"]["url"] == "https://shop.example/x"
    assert "tracking" not in clicked["data"]
    sent = event_data(FACTS, "c@example.org")
    assert "ip" not in sent and "url" not in sent and sent["recipient"] == "c@example.org"


def test_tags_join_tag_name_and_anypost_tags():
    assert all_tags("Promo", ("a", "Promo", "b")) == ("Promo", "a", "b")
    assert all_tags(None, ()) == ()


def test_iso_time_is_utc_with_milliseconds():
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize("secret, ok", [
    (new_secret(), True),
    ("whsec_" + "QUFB" * 8, True),  # 24 bytes
    ("whsec_QUFB", False),  # too short
    ("whsec_not base64!", False),
    ("QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB", False),  # no prefix
])
def test_secret_format(secret, ok):
    assert (secret_problem(secret) is None) is ok


@pytest.mark.parametrize("url, ok", [
    ("https://hooks.example.com/relay", True),
    ("http://127.0.0.1:9000/x", True),  # addresses are checked when sending
    ("ftp://hooks.example.com/", False),
    ("https://user:pw@hooks.example.com/", False),
    ("hooks.example.com/relay", False),
    ("http://hooks.example.com:99999/", False),  # it failed every attempt for a day
    ("http://hooks.example.com:x/", False),
    ("http://hooks example.com/", False),
    ("https://bücher.example/in", True),
    ("http://[2001:db8::1]:8080/in", True),
])
def test_url_format(url, ok):
    assert (url_problem(url) is None) is ok


@pytest.mark.parametrize("address, refused", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True),
    ("::1", True), ("fe80::1", True), ("fc00::1", True), ("::ffff:127.0.0.1", True),
    ("93.184.216.34", False), ("2606:4700::1111", False),
    # IPv6 that reaches an IPv4 address: NAT64, 6to4, Teredo, IPv4-compatible; site-local
    ("64:ff9b::a9fe:a9fe", True), ("2002:a00:1::1", True), ("::a9fe:a9fe", True),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", True), ("64:ff9b:1::808:808", True),
    ("fec0::1", True), ("64:ff9b::808:808", False), ("2002:808:808::1", False),
])
def test_private_loopback_and_link_local_addresses_are_refused(address, refused):
    assert refused_address(ipaddress.ip_address(address)) is refused


def test_backoff_doubles_with_jitter_up_to_the_cap():
    schedule = Schedule(base=30, cap=3 * 3600, deadline=24 * 3600)
    assert [schedule.delay(n, lambda: 1.0) for n in (1, 2, 3)] == [30, 60, 120]
    assert [schedule.delay(n, lambda: 0.0) for n in (1, 2, 3)] == [15, 30, 60]
    assert schedule.delay(30, lambda: 1.0) == 3 * 3600


def test_the_schedule_spans_about_a_day():
    schedule = Schedule()
    for jitter in (0.0, 0.5, 1.0):
        now, attempts = 0.0, 1
        while True:
            state, next_at = next_step(Result(500, "HTTP 500"), attempts, now,
                                       schedule.deadline, schedule, lambda j=jitter: j)
            if state == FAILED:
                break
            assert state == PENDING and next_at is not None
            now, attempts = next_at, attempts + 1
        assert 20 * 3600 <= now <= 24 * 3600
        assert 10 <= attempts <= 25


def test_next_step_outcomes():
    schedule = Schedule(base=10, cap=100, deadline=1000)
    one = lambda: 1.0  # noqa: E731
    assert next_step(Result(204), 1, 0, 1000, schedule, one) == (DELIVERED, None)
    assert next_step(Result(410, "HTTP 410"), 1, 0, 1000, schedule, one) == (FAILED, None)
    assert next_step(Result(None, "timed out"), 2, 0, 1000, schedule, one) == (PENDING, 20)
    assert next_step(Result(503, "x", 70), 1, 0, 1000, schedule, one) == (PENDING, 70)
    assert next_step(Result(503, "x", 5000), 1, 0, 1000, schedule, one) == (PENDING, 100)
    assert next_step(Result(503, "x", 0), 1, 0, 1000, schedule, one) == (PENDING, 10)  # no loop
    assert next_step(Result(500, "x"), 1, 995, 1000, schedule, one) == (FAILED, None)


def test_retry_after_seconds_and_dates():
    assert parse_retry_after("120", 0) == 120
    assert parse_retry_after(formatdate(1000 + 30, usegmt=True), 1000) == 30
    assert parse_retry_after(formatdate(900, usegmt=True), 1000) == 0
    assert parse_retry_after("soon", 0) is None
    assert parse_retry_after("\u00b2", 0) is None  # a digit to str.isdigit, not to float()
    assert parse_retry_after(None, 0) is None
