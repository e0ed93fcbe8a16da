"""The webhook outbox against a real HTTP receiver (aiohttp, started by each test): events
recorded with the mail and the hits, signed deliveries, retries on 500s, timeouts and a dead
receiver, Retry-After, 410, private targets, the CLI and API, and kill -9 of ``relay serve``.
Every signature is checked by the ``anypost`` SDK and ``standardwebhooks``; ordering is never
assumed."""

from __future__ import annotations

import asyncio
import json
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from anypost import verify_webhook_signature
from standardwebhooks.webhooks import Webhook

from relay.config import WebhookDelivery, WebhookEndpoint
from relay.store.engine import Store
from relay.tracking.events import Event
from relay.tracking.tokens import Keyring, sign_click, sign_open
from relay.webhooks.outbox import DeliveryWorker, Outbox, sync_endpoints
from relay.webhooks.payloads import new_secret
from tests.e2e.test_app import free_port, start, wait_for_port
from tests.harness import LoopThread, Relay, wait_until

SECRET = new_secret()
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
GMAIL_PROXY = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
               "(via ggpht.com GoogleImageProxy)")
FAST = {"poll_seconds": 0.05, "retry_base_seconds": 0.05, "retry_max_seconds": 0.2}


@dataclass
class Receiver:
    """An aiohttp webhook receiver. ``script`` answers the next requests in turn (a status,
    ``(status, headers)``, or ``"hang"``); then 200. Every request is kept, verified or not."""

    loops: LoopThread
    script: list[Any] = field(default_factory=list)
    requests: list[tuple[bytes, dict[str, str], int | str]] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None
    released: asyncio.Event | None = None  # ends the hanging requests

    def start(self, port: int = 0) -> Receiver:
        async def start() -> web.AppRunner:
            self.released = asyncio.Event()
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            return runner
        self.runner = self.loops.run(start())
        self.port = self.runner.addresses[0][1]
        return self

    def stop(self) -> None:
        if self.runner is not None:
            assert self.released is not None
            self.loops.loop.call_soon_threadsafe(self.released.set)
            self.loops.run(self.runner.cleanup())
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        answer = self.script.pop(0) if self.script else 200
        self.requests.append((body, dict(request.headers), answer))
        if answer == "hang":
            assert self.released is not None
            await self.released.wait()
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return web.Response(status=status, headers=headers)

    def delivered(self) -> list[dict[str, Any]]:
        """The events of the requests answered 200, each signature checked by both SDKs."""
        events = []
        for body, headers, answer in self.requests:
            verify_webhook_signature(body, headers["Anypost-Signature"], SECRET)
            Webhook(SECRET).verify(body, headers)
            if answer == 200:
                events.extend(json.loads(body)["events"])
        return events


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(LoopThread())
    yield server
    server.stop()
    server.loops.close()


def hook(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "crm", "url": url, "secret": SECRET, "allow_private": True,
            "timeout": 2, **extra}


def settings(url: str, delivery: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"webhooks": [hook(url, **extra)], "webhook_delivery": {**FAST, **(delivery or {})},
            "tracking": {"scanner_window_seconds": 0}}


def send(port: int, recipients: list[str], subject: str = "Spring sale") -> None:
    message = (f"From: News <news@shop.example>\r\nTo: {', '.join(recipients)}\r\n"
               f"Subject: {subject}\r\nMessage-ID: <{time.time_ns()}@shop.example>\r\n"
               "X-Anypost-Tags: spring,promo\r\nX-Anypost-Campaign: spring-2026\r\n"
               "Content-Type: text/html\r\n\r\n<p>hello</p>\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("news@shop.example", recipients, message)


def get(url: str, agent: str, method: str = "GET") -> int:
    request = urllib.request.Request(url, headers={"User-Agent": agent}, method=method)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def email_id(relay_db: sqlite3.Connection) -> str:
    return relay_db.execute("SELECT email_id FROM messages ORDER BY created_at DESC"
                            ).fetchone()[0]


def by_type(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        grouped.setdefault(event["type"], []).append(event)
    return grouped


def test_sent_opened_and_clicked_arrive_signed_and_scanners_send_nothing(
        make_relay, upstream, receiver):
    receiver.start()
    relay: Relay = make_relay(settings(receiver.url), upstream=upstream, http=True)
    send(relay.smtp_port, ["a@example.org", "b@example.org"])
    email = email_id(relay.db())
    keys = relay.services.keyring
    base = relay.http_url
    assert get(f"{base}/o/{sign_open(keys, email, 'a@example.org')}", FIREFOX) == 200
    assert get(f"{base}/o/{sign_open(keys, email, 'b@example.org')}", GMAIL_PROXY) == 200
    click = sign_click(keys, email, "b@example.org", "https://shop.example/sale")
    assert get(f"{base}/c/{click}", FIREFOX) == 302
    assert get(f"{base}/c/{click}", FIREFOX, method="HEAD") == 302  # a scanner: no event
    assert get(f"{base}/o/{sign_open(keys, email, 'a@example.org')}",
               "Barracuda Sentinel (EE)") == 200

    events = wait_until(lambda: len(receiver.delivered()) >= 5 and receiver.delivered(),
                        what="five events")
    time.sleep(0.3)  # a scanner's event would be queued by now: make sure none arrives
    events = receiver.delivered()
    grouped = by_type(events)
    assert sorted(grouped) == ["email.clicked", "email.opened", "email.sent"]
    assert len(grouped["email.sent"]) == 2 and len(grouped["email.opened"]) == 2
    assert len(events) == 5 and len({e["id"] for e in events}) == 5
    sent = {e["data"]["recipient"]: e["data"] for e in grouped["email.sent"]}
    assert sent["a@example.org"]["tags"] == ["spring", "promo"]
    assert sent["a@example.org"]["campaign"] == "spring-2026"
    assert sent["a@example.org"]["from"] == "news@shop.example"
    assert sent["a@example.org"]["subject"] == "Spring sale"
    opens = {e["data"]["recipient"]: e["data"] for e in grouped["email.opened"]}
    assert "tracking" not in opens["a@example.org"]
    assert opens["a@example.org"]["user_agent"] == FIREFOX
    assert opens["b@example.org"]["tracking"] == {"bot": {"source": "google", "kind": "proxy"}}
    clicked = grouped["email.clicked"][0]["data"]
    assert clicked["url"] == "https://shop.example/sale" and clicked["ip"] == "127.0.0.1"
    assert clicked["email_id"] == email
    stored = {row[0] for row in relay.db().execute(
        "SELECT id FROM events WHERE counted = 1 AND type IN ('open', 'click')")}
    assert stored == {e["id"] for e in events if e["type"] != "email.sent"}


def test_a_dead_receiver_then_500s_then_up_everything_arrives_once_per_id(
        make_relay, upstream, receiver):
    port = free_port()
    relay = make_relay(settings(f"http://127.0.0.1:{port}/hook"), upstream=upstream)
    for n in range(3):
        send(relay.smtp_port, [f"r{n}@example.org"])  # the relay answers; nothing waits
    wait_until(lambda: relay.db().execute(
        "SELECT count(*) FROM webhook_attempts WHERE error LIKE 'ClientConnector%'"
        ).fetchone()[0] >= 2, what="failed attempts while the receiver is down")
    receiver.script = [500, 503]
    receiver.start(port)
    for n in range(3, 5):
        send(relay.smtp_port, [f"r{n}@example.org"])
    wait_until(lambda: {e["data"]["recipient"] for e in receiver.delivered()}
               == {f"r{n}@example.org" for n in range(5)}, what="all five recipients")
    first_batch = json.loads(receiver.requests[0][0])
    retried = [json.loads(body) for body, _, _ in receiver.requests[1:]
               if json.loads(body)["batch_id"] == first_batch["batch_id"]]
    assert retried, "the batch answered 500 is retried"
    assert all([e["id"] for e in r["events"]] == [e["id"] for e in first_batch["events"]]
               for r in retried)
    # the receiver records a request before the relay records its answer: wait for both
    wait_until(lambda: relay.db().execute(
        "SELECT count(*) FROM webhook_batches WHERE state != 'delivered'").fetchone()[0] == 0,
        what="every batch recorded as delivered")


def test_a_hanging_receiver_times_out_and_never_holds_up_the_mail(
        make_relay, upstream, receiver):
    receiver.start()
    receiver.script = ["hang"]
    relay = make_relay(settings(receiver.url, timeout=0.5), upstream=upstream)
    send(relay.smtp_port, ["a@example.org"])
    wait_until(lambda: receiver.requests, what="the first request")
    started = time.monotonic()
    send(relay.smtp_port, ["b@example.org"])  # answered while the receiver hangs
    assert time.monotonic() - started < 0.5
    wait_until(lambda: {e["data"]["recipient"] for e in receiver.delivered()}
               == {"a@example.org", "b@example.org"}, what="both events")
    errors = [row[0] for row in relay.db().execute("SELECT error FROM webhook_attempts")]
    assert "timed out after 0.5 s" in errors


def test_410_disables_the_endpoint(make_relay, upstream, receiver):
    receiver.start()
    receiver.script = [410]
    relay = make_relay(settings(receiver.url), upstream=upstream)
    send(relay.smtp_port, ["a@example.org"])
    db = relay.db()
    wait_until(lambda: db.execute("SELECT disabled_at FROM webhook_endpoints").fetchone()[0],
               what="the endpoint disabled")
    assert db.execute("SELECT state, last_status FROM webhook_batches").fetchone()[:] == (
        "failed", 410)
    send(relay.smtp_port, ["b@example.org"])
    assert db.execute("SELECT count(*) FROM webhook_outbox").fetchone()[0] == 1
    assert len(receiver.requests) == 1


def test_private_targets_are_refused_unless_allowed(make_relay, upstream, receiver):
    receiver.start()
    relay = make_relay(settings(f"http://localhost:{receiver.port}/hook",
                                allow_private=False), upstream=upstream)
    send(relay.smtp_port, ["a@example.org"])
    error = wait_until(lambda: relay.db().execute(
        "SELECT error FROM webhook_attempts").fetchone(), what="a refused attempt")[0]
    assert "not a public address" in error
    assert receiver.requests == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def one_event_queued(tmp_path: Path, receiver: Receiver, clock: FakeClock
                           ) -> tuple[Store, DeliveryWorker]:
    """A store with one open event queued for the receiver, and a worker (not started) on
    ``clock`` whose backoff takes the low end of its jitter."""
    store = await Store.open(tmp_path / "relay.db")
    sync_endpoints(store.writer, [WebhookEndpoint("crm", receiver.url, SECRET,
                                                  allow_private=True)], clock())
    outbox = Outbox(clock)
    worker = DeliveryWorker(store, WebhookDelivery(poll_seconds=0.02), outbox.wake,
                            clock=clock, random=lambda: 0.0)
    event = Event("evt_1", "open", clock(), "email_1", "a@example.org", None, "127.0.0.1",
                  FIREFOX, "GET", "person", None, None, True, False, True, False)
    await store.write(lambda conn: outbox(conn, [event], {}))
    return store, worker


async def test_retry_after_is_honoured_on_an_injected_clock(tmp_path, receiver):
    receiver.start()
    receiver.script = [(503, {"Retry-After": "120"})]
    clock = FakeClock()
    store, worker = await one_event_queued(tmp_path, receiver, clock)
    worker.start()
    try:
        async def batch() -> tuple[Any, ...]:
            return tuple(store.execute_now(
                "SELECT state, attempts, next_at FROM webhook_batches")[0])
        await wait_async(lambda: receiver.requests)
        await wait_async(lambda: store.execute_now("SELECT 1 FROM webhook_attempts"))
        assert await batch() == ("pending", 1, clock.now + 120)
        clock.now += 119
        await asyncio.sleep(0.1)  # several polls: not due yet
        assert len(receiver.requests) == 1
        clock.now += 1
        await wait_async(lambda: len(receiver.requests) == 2)
        await wait_async(lambda: store.execute_now(
            "SELECT 1 FROM webhook_batches WHERE state = 'delivered'"))
    finally:
        await worker.stop()
        await store.close()


async def test_an_unforeseen_error_while_sending_is_a_failed_attempt(tmp_path, receiver):
    """It escaped the worker without a record: the batch was claimed again at every lease
    expiry, with no backoff and past its deadline."""
    receiver.start()
    clock = FakeClock()
    store, worker = await one_event_queued(tmp_path, receiver, clock)
    send = worker.sender.send

    async def broken_once(*args: Any) -> Any:
        worker.sender.send = send  # the next attempt goes out for real
        raise RuntimeError("a bug in sending")

    worker.sender.send = broken_once
    worker.start()
    try:
        await wait_async(lambda: store.execute_now("SELECT 1 FROM webhook_attempts"))
        [(state, attempts, next_at, error)] = store.execute_now(
            "SELECT state, attempts, next_at, last_error FROM webhook_batches")
        assert (state, attempts, error) == ("pending", 1, "RuntimeError: a bug in sending")
        assert next_at == clock.now + 15  # the backoff: 30 s times the random factor, 0.5
        clock.now = next_at
        await wait_async(lambda: store.execute_now(
            "SELECT 1 FROM webhook_batches WHERE state = 'delivered'"))
        assert len(receiver.requests) == 1
    finally:
        await worker.stop()
        await store.close()


async def test_stop_ends_the_worker_even_when_woken_in_the_same_turn(tmp_path):
    """Python 3.11's ``asyncio.wait_for`` returns normally when the task is cancelled just as
    the awaited event fires: a worker idling in it would swallow ``stop()``'s cancel and run
    on, and ``stop()`` would wait for it forever."""
    store = await Store.open(tmp_path / "relay.db")
    outbox = Outbox()
    worker = DeliveryWorker(store, WebhookDelivery(poll_seconds=30), outbox.wake)
    worker.start()
    try:
        await wait_async(lambda: store.batches >= 1)  # the first turn's claim is committed
        for _ in range(3):
            await asyncio.sleep(0)  # the worker goes idle, waiting to be woken
        outbox.wake.set()
        async with asyncio.timeout(5):
            await worker.stop()
    finally:
        await store.close()


async def wait_async(condition: Callable[[], Any], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def write_config(tmp_path: Path, receiver_url: str, **ports: int) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(f"""
[smtp]
listen = "127.0.0.1:{ports.get('smtp', 0)}"
[upstream]
capture_dir = "outbox"
[http]
listen = "127.0.0.1:{ports.get('http', 0)}"
[store]
url = "sqlite:///relay.db"
[tracking]
keys = {{ k1 = "{'k' * 32}" }}
scanner_window_seconds = 0
[[webhooks]]
name = "crm"
url = "{receiver_url}"
secret = "{SECRET}"
allow_private = true
timeout = 1
[webhook_delivery]
poll_seconds = 0.05
retry_base_seconds = 0.05
retry_max_seconds = 0.2
""")
    return config


def test_kill_9_mid_delivery_loses_nothing(tmp_path, receiver):
    receiver.start()
    receiver.script = ["hang"]
    smtp, http = free_port(), free_port()
    config = write_config(tmp_path, receiver.url, smtp=smtp, http=http)
    process = start("serve", config)
    try:
        wait_for_port(smtp, process)
        wait_for_port(http, process)
        for n in range(3):
            send(smtp, [f"r{n}@example.org"])
        db = sqlite3.connect(tmp_path / "relay.db")
        keyring = Keyring({"k1": b"k" * 32}, "k1")
        for email, recipient in db.execute("SELECT email_id, recipient FROM recipients"):
            assert get(f"http://127.0.0.1:{http}/o/{sign_open(keyring, email, recipient)}",
                       FIREFOX) == 200
        wait_until(lambda: receiver.requests, what="a delivery in flight")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        process = start("serve", config)  # the receiver answers 200 from now on
        wait_for_port(smtp, process)
        stored = {row[0] for row in db.execute("SELECT id FROM webhook_events")}
        assert len(stored) == 6  # three sent, three opened: all queued before the kill
        wait_until(lambda: {e["id"] for e in receiver.delivered()} >= stored, timeout=30,
                   what="every queued event delivered after the restart")
        types = {e["id"]: e["type"] for e in receiver.delivered()}
        assert sorted(types.values()).count("email.opened") == 3
        assert sorted(types.values()).count("email.sent") == 3
    finally:
        process.kill()
        process.wait(10)


def relay_cli(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "webhooks", *args, "--config",
                           str(config)], input=stdin, capture_output=True, text=True,
                          timeout=30)


def test_cli_lists_adds_replays_and_removes(tmp_path, receiver):
    receiver.start()
    config = write_config(tmp_path, receiver.url)
    added = relay_cli(config, "add", "ops", "https://hooks.example.com/x", "--event",
                      "email.clicked")
    assert added.returncode == 0 and added.stdout.startswith("whsec_")
    listing = relay_cli(config, "list").stdout
    assert "crm" in listing and "config" in listing and "ops" in listing
    assert added.stdout.strip() not in listing and SECRET not in listing
    refused = relay_cli(config, "remove", "crm")
    assert refused.returncode == 1 and "config file" in refused.stderr
    assert relay_cli(config, "remove", "ops").returncode == 0
    db = sqlite3.connect(tmp_path / "relay.db")
    with db:
        db.execute("INSERT INTO webhook_events VALUES ('evt_1', 'email.sent', 0, '{}')")
        db.execute("INSERT INTO webhook_outbox (endpoint, event_id, batch_id)"
                   " VALUES ('crm', 'evt_1', 'bat_1')")
        db.execute("INSERT INTO webhook_batches (id, endpoint, state, events, attempts,"
                   " next_at, deadline, created_at, last_status, last_error) VALUES"
                   " ('bat_1', 'crm', 'failed', 1, 16, 0, 0, 0, 500, 'HTTP 500')")
    shown = relay_cli(config, "deliveries", "--state", "failed").stdout
    assert "bat_1" in shown and "HTTP 500" in shown
    assert relay_cli(config, "replay", "--failed").stdout.startswith("1 batches")
    assert db.execute("SELECT state FROM webhook_batches").fetchone()[0] == "pending"


def test_an_outbox_write_lets_a_serialization_failure_through():
    """A failed outbox write is rolled back alone, except a failure that aborts the whole
    transaction (PostgreSQL's serialization failure, marked with its SQLSTATE as the engine
    marks it): swallowed, the rest would commit without the webhook event; raised, the engine
    runs the whole transaction again."""
    from relay.webhooks.outbox import _safely

    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("BEGIN")

    def fail(code: str | None):
        def write(conn: sqlite3.Connection) -> None:
            error = sqlite3.OperationalError("could not serialize access")
            error.sqlstate = code  # type: ignore[attr-defined]
            raise error
        return write

    _safely(conn, fail(None), "evt_1")  # logged, rolled back alone
    with pytest.raises(sqlite3.OperationalError):
        _safely(conn, fail("40001"), "evt_2")
