"""The Anypost-compatible API under /v1/, driven by the official ``anypost`` SDK (sync and async
clients) with only its ``base_url`` changed, against a running relay and a real upstream."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import smtplib
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import anypost
import pytest
from anypost import AsyncAnypost
from standardwebhooks.webhooks import Webhook

from relay.webhooks.payloads import new_secret
from tests.clients import api_key, call
from tests.clock import ManualClock
from tests.harness import LoopThread, Relay, UpstreamServer, wait_until
from tests.webhooks.test_outbox import FAST, Receiver

DOMAINS = [{"name": "shop.example", "opens": True, "clicks": True},
           {"name": "quiet.example", "opens": False, "clicks": False}]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40


@pytest.fixture
def relay(make_relay: Callable[..., Relay], upstream: UpstreamServer) -> Relay:
    return make_relay({"domains": DOMAINS}, upstream=upstream, http=True)


@pytest.fixture
def client(relay: Relay) -> anypost.Anypost:
    with anypost.Anypost(api_key(relay), base_url=relay.http_url + "/v1",
                         max_retries=0) as client:
        yield client


def parsed(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def structure(part: EmailMessage) -> object:
    if part.is_multipart():
        return (part.get_content_type(), [structure(p) for p in part.iter_parts()])
    return part.get_content_type()


def tracking_urls(data: bytes) -> list[str]:
    """The tracking links and pixel of a delivered copy's HTML (tests.clients' helper undoes
    quoted-printable over the whole message, and the composer's boundaries hold '=' and
    digits)."""
    html = parsed(data).get_body(("html",))
    assert html is not None
    return re.findall(r"https?://[a-z0-9.:-]+/[oc]/[A-Za-z0-9_-]+", html.get_content())


def record(relay: Relay, email_id: str) -> dict[str, Any]:
    with relay.db() as db:
        row = db.execute("SELECT * FROM messages WHERE email_id = ?", (email_id,)).fetchone()
    return dict(row)


def test_send_reaches_the_upstream_as_mime_with_attachments_byte_for_byte(
        relay: Relay, client: anypost.Anypost, upstream: UpstreamServer) -> None:
    result = client.email.send({
        "from": "Jürgen Müller <news@shop.example>",
        "to": ["you@example.org"], "cc": ["Zoë <zoe@example.org>"], "bcc": ["audit@example.org"],
        "reply_to": "help@shop.example",
        "subject": "Grüße aus Köln: Ihre Rechnung für März",
        "text": "Hallo, hier ist Ihre Rechnung.",
        "html": '<p>Hallo <a href="https://shop.example/konto">Konto</a></p>'
                '<img src="cid:logo">',
        "attachments": [
            {"filename": "Rechnung März.pdf", "content": PDF, "content_type": "application/pdf"},
            {"filename": "logo.png", "content": PNG, "content_type": "image/png",
             "content_id": "logo"}],
        "headers": {"X-Order": "A-17"},
        "tags": ["invoice"], "campaign": "billing", "topic": "accounts.invoices",
    })
    assert result["id"].startswith("email_") and result["created_at"].endswith("Z")
    copies = upstream.received
    assert sorted(r for c in copies for r in c.rcpt_tos) == [
        "audit@example.org", "you@example.org", "zoe@example.org"]
    assert len(copies) == 3  # tracked by the domain's default: one copy per recipient
    message = parsed(copies[0].data)
    assert structure(message) == ("multipart/mixed", [
        ("multipart/alternative", ["text/plain", ("multipart/related",
                                                  ["text/html", "image/png"])]),
        "application/pdf"])
    assert str(message["Subject"]) == "Grüße aus Köln: Ihre Rechnung für März"
    assert message["From"].addresses[0].addr_spec == "news@shop.example"
    assert "Bcc" not in message and message["X-Order"] == "A-17"
    assert not any(k.lower().startswith("x-anypost") for k in message)
    (attached,) = message.iter_attachments()
    assert attached.get_filename() == "Rechnung März.pdf"
    assert attached.get_content() == PDF
    image = next(p for p in message.walk() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<logo>" and image.get_content() == PNG
    assert tracking_urls(copies[0].data)  # links rewritten, pixel in
    assert message["Received"] and " with HTTP " in message["Received"]
    row = record(relay, result["id"])
    assert (row["campaign"], row["topic"], json.loads(row["tags"])) == (
        "billing", "accounts.invoices", ["invoice"])
    assert row["message_id"] == message["Message-ID"]


def test_tracking_asked_and_defaulted_as_for_smtp(relay: Relay, client: anypost.Anypost,
                                                  upstream: UpstreamServer) -> None:
    html = '<html><body><a href="https://shop.example/x">x</a></body></html>'
    base = {"from": "news@shop.example", "to": ["you@example.org"], "subject": "s",
            "html": html}
    off = client.email.send({**base, "tracking": {"opens": False, "clicks": False}})
    clicks = client.email.send({**base, "tracking": {"opens": False}})
    quiet = client.email.send({**base, "from": "news@quiet.example",
                               "tracking": {"clicks": True}})
    smtp_reply = _smtp(relay, "news@shop.example", "X-Anypost-Track-Opens: false", html)
    decisions = {name: record(relay, r["id"])["decision"] for name, r in
                 (("off", off), ("clicks", clicks), ("quiet", quiet))}
    assert decisions["off"] == ("opens off by message header X-Anypost-Track-Opens, clicks off "
                                "by message header X-Anypost-Track-Clicks")
    # the request's tracking said opens only: clicks come from the domain, as over SMTP
    smtp_id = smtp_reply.split()[-1]
    assert decisions["clicks"] == record(relay, smtp_id)["decision"]
    assert decisions["clicks"].startswith("clicks tracked by domain shop.example")
    assert decisions["quiet"].startswith("clicks tracked by message header")
    bodies = [c.data for c in upstream.received]
    assert not tracking_urls(bodies[0])
    assert all("/c/" in u for u in tracking_urls(bodies[1]))


def _smtp(relay: Relay, sender: str, header: str, html: str) -> str:
    msg = (f"From: {sender}\r\nTo: you@example.org\r\nSubject: s\r\n{header}\r\n"
           f"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n")
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        smtp.rcpt("you@example.org")
        code, text = smtp.data(msg.encode())
    assert code == 250, text
    return text.decode()


def test_batch_with_defaults(relay: Relay, client: anypost.Anypost,
                             upstream: UpstreamServer) -> None:
    result = client.email.send_batch({
        "defaults": {"from": "news@shop.example", "subject": "Default", "html": "<p>x</p>",
                     "tags": ["all"], "tracking": {"opens": False, "clicks": False}},
        "emails": [
            {"to": ["a@example.org"], "tags": ["first"]},
            {"to": ["b@example.org"], "subject": "Own", "tracking": {"opens": True}},
            {"to": ["c@example.org"], "from": "news@unknown.example"},
            {"to": ["not an address"]},
        ]})
    assert result["summary"] == {"total": 4, "queued": 2, "failed": 2}
    assert [d["index"] for d in result["data"]] == [0, 1, 2, 3]
    first, second, unknown, bad = result["data"]
    assert first["status"] == second["status"] == "queued"
    assert unknown["status"] == bad["status"] == "failed"
    assert unknown["error"]["type"] == "validation_error"
    assert "unknown.example" in unknown["error"]["message"]
    assert json.loads(record(relay, first["id"])["tags"]) == ["all", "first"]
    two = record(relay, second["id"])
    assert (two["subject"], two["track_opens"], two["track_clicks"]) == ("Own", 1, 0)
    assert sorted(r for c in upstream.received for r in c.rcpt_tos) == [
        "a@example.org", "b@example.org"]


def test_idempotent_retries(relay: Relay, client: anypost.Anypost,
                            upstream: UpstreamServer) -> None:
    body = {"from": "news@shop.example", "to": ["you@example.org"], "subject": "s",
            "text": "once"}
    first = client.email.send(body, idempotency_key="order-17")
    again = client.email.send(body, idempotency_key="order-17")
    assert again == first
    assert len(upstream.received) == 1
    with pytest.raises(anypost.IdempotencyMismatchError) as caught:
        client.email.send({**body, "text": "other"}, idempotency_key="order-17")
    assert caught.value.status == 422 and caught.value.type == "idempotency_mismatch"


def test_concurrent_idempotent_request_is_a_conflict(relay: Relay, upstream: UpstreamServer
                                                     ) -> None:
    key = api_key(relay)
    gate = relay.loops.run(_make_gate())
    upstream.handler.gate = gate
    body = {"from": "news@shop.example", "to": ["you@example.org"], "subject": "s",
            "text": "held"}
    results: list[object] = []

    def first() -> None:
        with anypost.Anypost(key, base_url=relay.http_url + "/v1", max_retries=0) as c:
            results.append(c.email.send(body, idempotency_key="held"))

    thread = threading.Thread(target=first)
    thread.start()
    wait_until(lambda: upstream.handler.held, what="the first request at the upstream")
    with (anypost.Anypost(key, base_url=relay.http_url + "/v1", max_retries=0) as c,
          pytest.raises(anypost.ConflictError) as caught):
        c.email.send(body, idempotency_key="held")
    assert caught.value.type == "idempotency_concurrent" and caught.value.status == 409
    relay.loops.loop.call_soon_threadsafe(gate.set)
    thread.join(20)
    assert results and results[0]["id"].startswith("email_")  # type: ignore[index]


async def _make_gate() -> asyncio.Event:
    return asyncio.Event()


def test_error_classes(relay: Relay, client: anypost.Anypost) -> None:
    body = {"from": "news@shop.example", "to": ["you@example.org"], "subject": "s",
            "text": "x"}
    with pytest.raises(anypost.ValidationError) as caught:
        client.email.send({**body, "template_id": "template_1"})
    assert caught.value.status == 422
    assert "template_id" in caught.value.errors
    with pytest.raises(anypost.ValidationError) as caught:
        client.email.send({**body, "to": [f"r{i}@example.org" for i in range(51)]})
    assert "to" in caught.value.errors
    with pytest.raises(anypost.ValidationError) as caught:
        client.email.send({**body, "from": "news@unknown.example"})
    assert "from" in caught.value.errors
    with pytest.raises(anypost.ValidationError):
        client.email.send_batch({"emails": [body] * 101})
    # (the SDK cannot send one: httpx encodes JSON as UTF-8; other clients escape it)
    status, answer = raw_post(relay, client, "/v1/email", json.dumps(
        {**body, "subject": "half a pair \ud800"}).encode())
    assert status == 400 and answer["error"]["type"] == "validation_error"
    assert "surrogate" in answer["error"]["message"]
    with pytest.raises(anypost.PayloadTooLargeError) as too_large:
        client.email.send({**body, "attachments": [
            {"filename": "big.bin", "content": b"x" * (5 * 1024 * 1024)}]})
    assert too_large.value.status == 413
    with (anypost.Anypost("rk_wrong", base_url=relay.http_url + "/v1", max_retries=0) as bad,
          pytest.raises(anypost.AuthenticationError) as denied):
        bad.email.send(body)
    assert denied.value.status == 401
    with pytest.raises(anypost.NotFoundError):
        client._http.request("GET", "/nothing-here")
    assert client.whoami()["api_key"] == {"id": "tests", "permissions": "full"}


def raw_post(relay: Relay, client: anypost.Anypost, path: str, data: bytes
             ) -> tuple[int, Any]:
    request = urllib.request.Request(relay.http_url + path, data=data, method="POST", headers={
        "Authorization": "Bearer " + client._http._api_key,
        "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_upstream_outage_is_a_retryable_503(make_relay: Callable[..., Relay],
                                            upstream: UpstreamServer) -> None:
    relay = make_relay({"domains": DOMAINS}, upstream=upstream, http=True)
    upstream.handler.data_reply = "451 4.3.0 try later"
    key = api_key(relay)
    with (anypost.Anypost(key, base_url=relay.http_url + "/v1",
                          max_retries=0) as client, pytest.raises(anypost.APIError) as caught):
        client.email.send({"from": "news@quiet.example", "to": ["you@example.org"],
                           "subject": "s", "text": "x"}, idempotency_key="k")
    assert caught.value.status == 503
    upstream.handler.data_reply = None
    with anypost.Anypost(key, base_url=relay.http_url + "/v1",
                         max_retries=0) as client:
        sent = client.email.send({"from": "news@quiet.example", "to": ["you@example.org"],
                                  "subject": "s", "text": "x"}, idempotency_key="k")
    assert sent["id"].startswith("email_")  # the failure was not remembered for the key


def test_a_full_queue_is_a_rate_limit_with_retry_after(make_relay: Callable[..., Relay],
                                                        upstream: UpstreamServer) -> None:
    relay = make_relay({"domains": DOMAINS, "smtp": {"mode": "queue"},
                        "queue": {"max_messages": 1}},
                       upstream=upstream, http=True, clock=ManualClock())
    upstream.handler.data_reply = "451 4.3.0 upstream busy"  # the first message stays queued
    body = {"from": "news@quiet.example", "to": ["you@example.org"], "subject": "s",
            "text": "x"}
    with anypost.Anypost(api_key(relay), base_url=relay.http_url + "/v1",
                         max_retries=0) as client:
        assert client.email.send(body)["id"].startswith("email_")
        with pytest.raises(anypost.RateLimitError) as caught:
            client.email.send(body)
    assert caught.value.status == 429
    assert caught.value.retry_after and caught.value.retry_after > 0


def test_async_client(relay: Relay, upstream: UpstreamServer) -> None:
    key = api_key(relay)

    async def main() -> tuple[Any, Any]:
        async with AsyncAnypost(key, base_url=relay.http_url + "/v1", max_retries=0) as c:
            one = await c.email.send({"from": "news@quiet.example", "to": ["a@example.org"],
                                      "subject": "async", "text": "x"})
            with pytest.raises(anypost.ValidationError):
                await c.email.send({"from": "news@quiet.example", "to": [], "subject": "s",
                                    "text": "x"})
            return one, await c.whoami()

    one, who = asyncio.run(main())
    assert one["id"].startswith("email_") and who["api_key"]["id"] == "tests"
    assert upstream.received[0].rcpt_tos == ["a@example.org"]


def test_openapi_lists_the_routes(relay: Relay) -> None:
    import urllib.request

    with urllib.request.urlopen(relay.http_url + "/v1/openapi.json", timeout=10) as response:
        document = json.loads(response.read())
    assert set(document["paths"]) == {
        "/email", "/email/batch", "/whoami", "/events", "/domains", "/domains/{id}",
        "/domains/{id}/verify", "/webhooks", "/webhooks/{id}", "/webhooks/{id}/test",
        "/webhooks/{id}/rotate-secret"}
    assert document["servers"][0]["url"].endswith("/v1")


def test_inline_base64_strings_pass_as_sent(relay: Relay, client: anypost.Anypost,
                                            upstream: UpstreamServer) -> None:
    client.email.send({"from": "news@quiet.example", "to": ["you@example.org"], "subject": "s",
                       "text": "x", "attachments": [
                           {"filename": "a.txt", "content": base64.b64encode(b"abc").decode()}]})
    (attached,) = parsed(upstream.received[0].data).iter_attachments()
    assert attached.get_content() == b"abc"


BROWSER = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like "
           "Gecko) Version/17.4 Safari/605.1.15")
GMAIL_PROXY = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
               "(via ggpht.com GoogleImageProxy)")


def hit(relay: Relay, url: str, agent: str) -> int:
    """A request on the tracker for a tracking URL of a delivered copy (track.test is the
    relay's public name: the path goes to the relay itself)."""
    conn = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(relay.http_url).port,
                                      timeout=10)
    conn.request("GET", urllib.parse.urlsplit(url).path, headers={"User-Agent": agent})
    status = conn.getresponse().status
    conn.close()
    return status


def test_events_after_real_pixel_and_click_requests(make_relay: Callable[..., Relay],
                                                    upstream: UpstreamServer) -> None:
    relay = make_relay({"domains": DOMAINS, "tracking": {"scanner_window_seconds": 0}},
                       upstream=upstream, http=True)
    key = api_key(relay)
    with anypost.Anypost(key, base_url=relay.http_url + "/v1", max_retries=0) as client:
        sent = client.email.send({
            "from": "Shop <news@shop.example>", "to": ["you@example.org"], "subject": "Sale",
            "html": '<html><body><a href="https://shop.example/sale">Sale</a></body></html>',
            "tags": ["spring"], "campaign": "c1", "topic": "news.weekly"})
        other = client.email.send({"from": "news@shop.example", "to": ["me@example.org"],
                                   "subject": "x", "html": "<p>x</p>"})
        (copy,) = [c for c in upstream.received if c.rcpt_tos == ["you@example.org"]]
        urls = tracking_urls(copy.data)
        pixel = next(u for u in urls if "/o/" in u)
        click = next(u for u in urls if "/c/" in u)
        assert hit(relay, pixel, BROWSER) == 200
        assert hit(relay, pixel, GMAIL_PROXY) == 200
        assert hit(relay, click, BROWSER) == 302
        assert hit(relay, click, "curl/8.5.0") == 302  # automation: never an event
        events = list(client.events.list({"email_id": sent["id"]}))
        assert [e["type"] for e in events] == ["email.clicked", "email.opened", "email.opened"]
        clicked, proxied, opened = events
        assert set(clicked) == set(anypost.types.event.Event.__annotations__)
        assert clicked["email_id"] == sent["id"] and clicked["recipient"] == "you@example.org"
        assert (clicked["from"], clicked["from_domain"], clicked["subject"]) == (
            "news@shop.example", "shop.example", "Sale")
        assert (clicked["tags"], clicked["campaign"], clicked["topic"]) == (
            ["spring"], "c1", "news.weekly")
        assert clicked["message_id"].startswith("<") and clicked["template_id"] is None
        assert proxied["tracking"] == {"bot": {"source": "google", "kind": "proxy"}}
        assert opened["tracking"] is None and clicked["tracking"] is None
        # filters and pages
        assert [e["type"] for e in client.events.list({"event_type": "email.clicked"})] == [
            "email.clicked"]
        assert list(client.events.list({"event_type": "email.bounced"})) == []
        assert len(list(client.events.list({"tags": ["spring", "other"]}))) == 3
        assert list(client.events.list({"email_id": other["id"]})) == []
        assert list(client.events.list({"template_id": "template_x"})) == []
        first = client.events.list({"limit": 2})
        assert len(first.data) == 2 and first.has_more
        rest = first.get_next_page()
        assert rest is not None and [e["id"] for e in rest.data] == [opened["id"]]
        with pytest.raises(anypost.ValidationError) as caught:
            client.events.list({"domain": "unknown.example"})
        assert "domain" in caught.value.errors
        with pytest.raises(anypost.ValidationError):
            client.events.list({"event_type": "email.exploded"})  # type: ignore[typeddict-item]

    async def async_list() -> list[Any]:
        async with AsyncAnypost(key, base_url=relay.http_url + "/v1", max_retries=0) as c:
            return [e async for e in await c.events.list({"limit": 1})]

    assert [e["id"] for e in asyncio.run(async_list())] == [e["id"] for e in events]


def test_domains_round_trip_through_either_api(make_relay: Callable[..., Relay],
                                               upstream: UpstreamServer, dns_server) -> None:
    relay = make_relay({"domains": DOMAINS, "dns": {"nameservers": [dns_server.address]}},
                       upstream=upstream, http=True)
    key = api_key(relay)
    with anypost.Anypost(key, base_url=relay.http_url + "/v1", max_retries=0) as client:
        listed = {d["name"]: d for d in client.domains.list()}
        assert set(listed) == {"shop.example", "quiet.example"}
        shop = listed["shop.example"]
        assert (shop["id"], shop["status"], shop["tracking"]["status"]) == (
            "domain_shop.example", "verified", "verified")  # the relay's own tracking host
        assert listed["quiet.example"]["tracking"]["status"] == "disabled"
        new = client.domains.create({"name": "News.Example"})
        assert new["name"] == "news.example" and new["tracking"]["subdomain"] is None
        with pytest.raises(anypost.ValidationError):
            client.domains.create({"name": "not a domain"})
        with pytest.raises(anypost.NotFoundError):
            client.domains.get("domain_nowhere.example")
        updated = client.domains.update(new["id"], {"tracking": {
            "opens_enabled": True, "clicks_enabled": True, "subdomain": "track"}})
        tracking = updated["tracking"]
        assert tracking["status"] == "pending" and tracking["subdomain"] == "track"
        assert tracking["dns_records"] == [{"type": "CNAME", "name": "track",
                                            "value": "track.test", "purpose": "tracking"}]
        # the same tracking domain through the native API, and mail from it untracked
        status, native = call(relay, key, "GET", "/tracking-domains/track.news.example")
        assert status == 200 and native["state"] == "pending"
        sent = client.email.send({"from": "news@news.example", "to": ["you@example.org"],
                                  "subject": "s", "html": '<a href="https://news.example/">x</a>'})
        assert "delivered untracked" in record(relay, sent["id"])["decision"]
        dns_server.cname("track.news.example", "track.test.")
        verified = client.domains.verify("news.example")
        assert verified["tracking"]["status"] == "verified"
        assert verified["tracking"]["verified_at"] is not None
        sent = client.email.send({"from": "news@news.example", "to": ["you@example.org"],
                                  "subject": "s", "html": '<a href="https://news.example/">x</a>'})
        assert tracking_urls(upstream.received[-1].data)[0].startswith("http://track.news.example/")
        # a domain added through the native API is one the send API takes
        call(relay, key, "PUT", "/settings/domains/other.example", {"opens": False})
        assert client.domains.get("other.example")["tracking"]["opens_enabled"] is False
        client.email.send({"from": "a@other.example", "to": ["you@example.org"],
                           "subject": "s", "text": "x"})
        client.domains.update("news.example", {"tracking": {"subdomain": None}})
        assert call(relay, key, "GET", "/tracking-domains/track.news.example")[0] == 404
        client.domains.delete("news.example")
        with pytest.raises(anypost.ValidationError):
            client.email.send({"from": "news@news.example", "to": ["you@example.org"],
                               "subject": "s", "text": "x"})


def test_webhooks_round_trip_through_either_api(relay: Relay, client: anypost.Anypost) -> None:
    created = client.webhooks.create({"name": "orders", "url": "https://hooks.example/in",
                                      "events": ["email.opened", "email.clicked"]})
    assert created["signing_secret"].startswith("whsec_")
    assert created["signing_secret_prefix"] == created["signing_secret"][:12]
    assert (created["id"], created["status"]) == ("orders", "active")
    # the same endpoint through the native API
    key = api_key_named(relay, "native")
    status, native = call(relay, key, "GET", "/webhooks")
    assert status == 200
    assert [(w["name"], w["url"], w["events"]) for w in native["webhooks"]] == [
        ("orders", "https://hooks.example/in", ["email.opened", "email.clicked"])]
    call(relay, key, "POST", "/webhooks", {"name": "native", "url": "https://hooks.example/n"})
    listed = list(client.webhooks.list())
    assert [w["id"] for w in listed] == ["native", "orders"]
    assert "signing_secret" not in listed[0]
    assert client.webhooks.get("orders")["url"] == "https://hooks.example/in"
    with pytest.raises(anypost.ValidationError) as caught:
        client.webhooks.create({"name": "bad", "url": "ftp://x.example", "events": ["email.sent"]})
    assert "url" in caught.value.errors
    with pytest.raises(anypost.ValidationError) as caught:
        client.webhooks.update("orders", {"name": "renamed", "url": "https://hooks.example/in",
                                          "events": ["email.opened"], "status": "active"})
    assert set(caught.value.errors) == {"name"}
    with pytest.raises(anypost.ConflictError):
        client.webhooks.create({"name": "orders", "url": "https://hooks.example/in",
                                "events": ["email.opened"]})
    client.webhooks.delete("orders")
    with pytest.raises(anypost.NotFoundError):
        client.webhooks.get("orders")
    assert [w["name"] for w in call(relay, key, "GET", "/webhooks")[1]["webhooks"]] == ["native"]


def test_webhook_changed_paused_rotated_and_tested_through_the_sdk(
        make_relay: Callable[..., Relay], upstream: UpstreamServer) -> None:
    receiver = Receiver(LoopThread()).start()
    try:
        filed = {"name": "filed", "url": "https://hooks.example/f", "secret": new_secret(),
                 "events": ["email.opened"]}
        relay = make_relay({"domains": DOMAINS, "webhook_delivery": FAST, "webhooks": [filed]},
                           upstream=upstream, http=True)
        key = api_key_named(relay, "native")
        # added natively: the receiver listens on loopback, which only allow_private reaches
        assert call(relay, key, "POST", "/webhooks", {
            "name": "crm", "url": "https://hooks.example/old", "events": ["email.opened"],
            "allow_private": True, "timeout": 5})[0] == 201
        with anypost.Anypost(key, base_url=relay.http_url + "/v1", max_retries=0) as client:
            _change_pause_enable(relay, key, client, receiver.url)
            for refused in (lambda: client.webhooks.update("filed", {"events": ["email.sent"]}),
                            lambda: client.webhooks.rotate_secret("filed")):
                with pytest.raises(anypost.ConflictError):  # changed in the config file only
                    refused()
            rotated = client.webhooks.rotate_secret("crm")
            secret = rotated["signing_secret"]
            assert rotated["signing_secret_prefix"] == secret[:12]
            assert client.webhooks.get("crm")["signing_secret_prefix"] == secret[:12]
            tested = client.webhooks.test("crm")
            assert (tested["delivered"], tested["status_code"], tested["error"]) == (
                True, 200, None)
            body, headers, _ = receiver.requests[0]
            Webhook(secret).verify(body, headers)
            assert [e["type"] for e in json.loads(body)["events"]] == ["webhook.test"]
            assert call(relay, key, "GET", "/webhook-deliveries")[1]["deliveries"] == []
            client.email.send({"from": "news@shop.example", "to": ["you@example.org"],
                               "subject": "s", "text": "x"})
            wait_until(lambda: len(receiver.requests) == 2, what="a real delivery")
            body, headers, _ = receiver.requests[1]
            Webhook(secret).verify(body, headers)
            assert [e["type"] for e in json.loads(body)["events"]] == ["email.sent"]
    finally:
        receiver.stop()
        receiver.loops.close()


def _change_pause_enable(relay: Relay, key: str, client: anypost.Anypost, url: str) -> None:
    changed = client.webhooks.update("crm", {"url": url, "events": ["email.sent"]})
    assert (changed["url"], changed["events"], changed["status"]) == (
        url, ["email.sent"], "active")
    for field, value in (("url", "ftp://x.example"), ("events", ["email.nope"]),
                         ("name", "other"), ("status", "circuit_disabled")):
        with pytest.raises(anypost.ValidationError) as caught:
            client.webhooks.update("crm", {field: value})
        assert field in caught.value.errors
    assert client.webhooks.update("crm", {"status": "disabled"})["status"] == "disabled"
    native = call(relay, key, "GET", "/webhooks")[1]["webhooks"]
    assert [(w["url"], w["events"], w["disabled_at"] is not None) for w in native
            if w["name"] == "crm"] == [(url, ["email.sent"], True)]
    assert client.webhooks.update("crm", {"status": "active"})["status"] == "active"
    assert [w["disabled_at"] for w in call(relay, key, "GET", "/webhooks")[1]["webhooks"]] == [
        None, None]


def api_key_named(relay: Relay, name: str) -> str:
    from relay.admin import apikeys
    from relay.store import engine

    return apikeys.create(engine.connect_url(relay.config.store), name)


def test_send_only_keys_may_only_send(relay: Relay, upstream: UpstreamServer) -> None:
    from relay.admin import apikeys
    from relay.store import engine

    key = apikeys.create(engine.connect_url(relay.config.store), "app", apikeys.SEND_ONLY)
    with anypost.Anypost(key, base_url=relay.http_url + "/v1", max_retries=0) as client:
        assert client.whoami()["api_key"] == {"id": "app", "permissions": "send_only"}
        client.email.send({"from": "news@quiet.example", "to": ["you@example.org"],
                           "subject": "s", "text": "x"})
        client.email.send_batch({"emails": [{"from": "news@quiet.example",
                                             "to": ["b@example.org"], "subject": "s",
                                             "text": "x"}]})
        for forbidden in (client.domains.list, client.webhooks.list, client.events.list):
            with pytest.raises(anypost.PermissionError) as caught:
                forbidden()
            assert caught.value.status == 403
    assert call(relay, key, "GET", "/settings")[0] == 403
    assert len(upstream.received) == 2
