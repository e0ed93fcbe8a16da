"""relay.tracking.tracker over real HTTP: the service runs on its own loop thread with a real SQLite
file; tests talk to it with http.client (redirects are never followed). The durability test runs
``relay http`` as a subprocess and kills it with SIGKILL under load."""

from __future__ import annotations

import asyncio
import base64
import http.client
import ipaddress
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import config as config_module
from relay.ids import new_email_id
from relay.store.engine import Store
from relay.tracking.tokens import Keyring, sign_click, sign_open
from relay.tracking.tracker import PIXEL, build_app, client_ip
from tests.harness import free_port
from tests.legacy_tokens import sign_v1

SECRET = "s" * 40
KEYRING = Keyring({"k1": SECRET.encode()}, "k1")
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
URL = "https://shop.example/sale?id=7&utm=mail"


class Service:
    """build_app on a loop in a background thread, listening on a free loopback port."""

    def __init__(self, db: Path, tracking: dict[str, Any], http: dict[str, Any]) -> None:
        self.db = db
        self.config = config_module.parse({
            "http": {"listen": "127.0.0.1:0", **http},
            "store": {"url": f"sqlite:///{self.db}"},
            "tracking": {"keys": {"k1": SECRET}, "current_key": "k1", **tracking},
        })
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store, self.runner, self.port = self.run(self._start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> tuple[Store, web.AppRunner, int]:
        store = await Store.open(self.db)
        runner = web.AppRunner(build_app(self.config, store, KEYRING), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return store, runner, runner.addresses[0][1]

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.store.close()

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def get(self, path: str, method: str = "GET", headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers={"User-Agent": FIREFOX, **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def rows(self, sql: str = "SELECT type, classification, counted, ip, url FROM events",
             params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql, params).fetchall()

    def add_message(self, created_at: float) -> str:
        email_id = new_email_id()
        self.store.writer.execute(
            "INSERT INTO messages (email_id, sender, sender_domain, track_opens, track_clicks, "
            "decision, size, created_at) VALUES (?, 'n@shop.example', 'shop.example', 1, 1, "
            "'test', 0, ?)", (email_id, created_at))
        return email_id


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def make(tracking: dict[str, Any] | None = None, http: dict[str, Any] | None = None
             ) -> Service:
        db = tmp_path / f"relay-{len(started)}.db"
        started.append(Service(db, tracking or {"scanner_window_seconds": 0}, http or {}))
        return started[-1]

    yield make
    for item in started:
        item.close()


def test_pixel(service: Callable[..., Service]) -> None:
    svc = service()
    email_id = new_email_id()
    status, headers, body = svc.get("/o/" + sign_open(KEYRING, email_id, "ann@example.net"))
    assert (status, body, len(body)) == (200, PIXEL, 43)
    assert body.startswith(b"GIF89a") and body.endswith(b";")
    assert headers["Content-Type"] == "image/gif"
    assert headers["Cache-Control"] == "no-store, private"
    assert svc.rows("SELECT type, email_id, recipient, user_agent, counted FROM events") == [
        ("open", email_id, "ann@example.net", FIREFOX, 1)]


def test_bad_pixel_token_still_answers_and_records_nothing(service: Callable[..., Service]
                                                           ) -> None:
    svc = service()
    click_token = sign_click(KEYRING, new_email_id(), "ann@example.net", URL)
    for token in ("nope", "A" * 60, click_token):
        status, headers, body = svc.get("/o/" + token)
        assert (status, body, headers["Cache-Control"]) == (200, PIXEL, "no-store, private")
    assert svc.rows() == []


def test_click_redirects(service: Callable[..., Service]) -> None:
    svc = service()
    status, headers, _ = svc.get("/c/" + sign_click(KEYRING, new_email_id(), "ann@x.net", URL))
    assert (status, headers["Location"]) == (302, URL)
    assert sorted(svc.rows(), key=repr) == sorted([("open", "person", 1, "127.0.0.1", None),
                                                   ("click", "person", 1, "127.0.0.1", URL)],
                                                  key=repr)


def test_bad_click_token_is_404_json(service: Callable[..., Service]) -> None:
    svc = service()
    open_token = sign_open(KEYRING, new_email_id(), "ann@example.net")
    other_key = Keyring({"k1": b"x" * 40}, "k1")
    forged = sign_click(other_key, new_email_id(), "ann@example.net", URL)
    for token in ("nope", open_token, forged):
        status, headers, body = svc.get("/c/" + token)
        assert status == 404 and "Location" not in headers
        assert headers["Content-Type"].startswith("application/json")
        assert "error" in json.loads(body)
    assert svc.rows() == []


def test_version_1_tokens_still_count_and_redirect(service: Callable[..., Service]) -> None:
    """Links sent before tokens were encrypted keep working: the same answers, the same events."""
    svc = service()
    email_id = new_email_id()
    status, _, body = svc.get("/o/" + sign_v1(KEYRING, email_id, "ann@example.net"))
    assert (status, body) == (200, PIXEL)
    status, headers, _ = svc.get("/c/" + sign_v1(KEYRING, email_id, "ann@example.net", URL))
    assert (status, headers["Location"]) == (302, URL)
    assert svc.rows("SELECT type, email_id, recipient, url FROM events WHERE NOT implied "
                    "ORDER BY type") == [("click", email_id, "ann@example.net", URL),
                                         ("open", email_id, "ann@example.net", None)]


def test_every_changed_byte_is_404_and_records_nothing(service: Callable[..., Service]) -> None:
    svc = service()
    for valid in (sign_click(KEYRING, new_email_id(), "ann@example.net", URL),
                  sign_v1(KEYRING, new_email_id(), "ann@example.net", URL)):
        data = base64.urlsafe_b64decode(valid + "=" * (-len(valid) % 4))
        for i in range(len(data)):
            changed = data[:i] + bytes((data[i] ^ 0xFF,)) + data[i + 1:]
            token = base64.urlsafe_b64encode(changed).rstrip(b"=").decode()
            status, headers, _ = svc.get("/c/" + token)
            assert (status, headers.get("Location")) == (404, None), i
            assert svc.get("/o/" + token)[0] == 200
    assert svc.rows() == []


def test_signed_url_a_browser_would_not_follow_is_404(service: Callable[..., Service]) -> None:
    svc = service()
    for url in ("javascript:alert(1)", "https://shop.example:99999/", "https://", "http:x"):
        status, headers, _ = svc.get("/c/" + sign_click(KEYRING, new_email_id(), "a@x.net", url))
        assert status == 404 and "Location" not in headers


def test_location_is_the_ascii_form_a_browser_goes_to(service: Callable[..., Service]) -> None:
    """IDNA for the host, UTF-8 percent-encoding elsewhere; line breaks dropped as browsers
    drop them, so nothing a token carries can add a header. The event keeps the URL as
    written."""
    svc = service()
    for url, where in (
        ("https://例え.jp/größe?q=鞋|[1]#teil 2",
         "https://xn--r8jz45g.jp/gr%C3%B6%C3%9Fe?q=%E9%9E%8B|[1]#teil%202"),
        ("HTTPS://Shop.Example:443/sale", "https://shop.example/sale"),
        ("https://shop.example/\r\nSet-Cookie: x=1", "https://shop.example/Set-Cookie:%20x=1"),
    ):
        email_id = new_email_id()
        status, headers, _ = svc.get("/c/" + sign_click(KEYRING, email_id, "a@x.net", url))
        assert (status, headers.get("Location")) == (302, where)
        assert "Set-Cookie" not in headers
        assert svc.rows("SELECT url FROM events WHERE email_id = ? AND type = 'click'",
                        (email_id,)) == [(url,)]


def test_errors_outside_tokens_are_json(service: Callable[..., Service]) -> None:
    svc = service()
    for path, method, expected in (("/c/", "GET", 404), ("/c/a/b", "GET", 404),
                                   ("/nothing", "GET", 404), ("/o/x", "POST", 405)):
        status, headers, body = svc.get(path, method)
        assert status == expected, path
        assert headers["Content-Type"].startswith("application/json"), path
        assert json.loads(body)["error"], path
    assert "GET" in svc.get("/o/x", "POST")[1]["Allow"]
    status, headers, body = svc.get("/o/" + sign_open(KEYRING, new_email_id(), "a@x.net") + "/")
    assert (status, body, headers["Content-Type"]) == (200, PIXEL, "image/gif")


def test_a_user_agent_that_is_not_utf8_spoils_no_other_hit(service: Callable[..., Service]
                                                          ) -> None:
    """Bytes that are not UTF-8 in User-Agent reach the handler as lone surrogates, which
    SQLite refused, failing every hit of the same group commit with it."""
    svc = service()
    email_id = new_email_id()
    tokens = [sign_open(KEYRING, email_id, f"r{i}@x.net") for i in range(20)]
    agent = b"Mozilla/5.0 caf\xe9 " + b"x" * 5000  # Latin-1, as some old clients send

    async def raw_hit(token: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"GET /o/%s HTTP/1.1\r\nHost: t\r\nUser-Agent: %s\r\n"
                     b"Connection: close\r\n\r\n" % (token.encode(), agent))
        answer = await reader.read()
        writer.close()
        return answer

    async def hits() -> None:
        async with aiohttp.ClientSession(headers={"User-Agent": FIREFOX}) as session:
            async def hit(token: str) -> int:
                async with session.get(f"http://127.0.0.1:{svc.port}/o/{token}") as response:
                    return response.status
            answers = await asyncio.gather(raw_hit(tokens[0]), *map(hit, tokens[1:]))
        assert answers[0].startswith(b"HTTP/1.1 200") and set(answers[1:]) == {200}

    asyncio.run(hits())
    agents = dict(svc.rows("SELECT recipient, user_agent FROM events"))
    assert sorted(agents) == sorted(f"r{i}@x.net" for i in range(20))
    assert agents["r0@x.net"] == ("Mozilla/5.0 caf\ufffd " + "x" * 5000)[:1024]


def test_head_answers_without_counting(service: Callable[..., Service]) -> None:
    svc = service()
    email_id = new_email_id()
    status, headers, body = svc.get("/o/" + sign_open(KEYRING, email_id, "a@x.net"), "HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", "43")
    status, headers, _ = svc.get("/c/" + sign_click(KEYRING, email_id, "a@x.net", URL), "HEAD")
    assert (status, headers["Location"]) == (302, URL)
    assert svc.rows("SELECT type, classification, counted, method, reason FROM events "
                    "ORDER BY type DESC") == [
        ("open", "scanner", 0, "HEAD", "HEAD request"),
        ("click", "scanner", 0, "HEAD", "HEAD request")]


def test_classification_and_proxy_bot(service: Callable[..., Service]) -> None:
    svc = service()
    email_id = new_email_id()
    gmail = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko (via ggpht.com GoogleImageProxy)"
    svc.get("/o/" + sign_open(KEYRING, email_id, "a@gmail.com"), headers={"User-Agent": gmail})
    svc.get("/c/" + sign_click(KEYRING, email_id, "b@corp.example", URL),
            headers={"User-Agent": "Barracuda Sentinel (EE)"})
    assert svc.rows("SELECT recipient, classification, bot_source, counted FROM events "
                    "ORDER BY recipient") == [
        ("a@gmail.com", "proxy", "google", 1), ("b@corp.example", "scanner", "barracuda", 0)]


def test_scanner_window_over_http(service: Callable[..., Service]) -> None:
    svc = service({"scanner_window_seconds": 3600})
    fresh = svc.add_message(time.time())
    old = svc.add_message(time.time() - 7200)
    svc.get("/c/" + sign_click(KEYRING, fresh, "a@x.net", URL))
    svc.get("/c/" + sign_click(KEYRING, old, "a@x.net", URL))
    rows = svc.rows("SELECT email_id, classification FROM events WHERE type = 'click'")
    assert sorted(rows) == sorted([(fresh, "scanner"), (old, "person")])


def test_a_flood_from_one_address_and_agent_is_automation(service: Callable[..., Service]
                                                          ) -> None:
    """Past tracking.flood_hits within tracking.flood_seconds, one address with one agent is
    automation, whichever recipients' pixels it loads; another agent still counts."""
    svc = service({"scanner_window_seconds": 0, "flood_hits": 3, "flood_seconds": 3600})
    email_id = new_email_id()
    for n in range(5):
        assert svc.get("/o/" + sign_open(KEYRING, email_id, f"r{n}@x.net"))[0] == 200
    svc.get("/o/" + sign_open(KEYRING, email_id, "r0@x.net"), headers={"User-Agent": "Other/1"})
    rows = svc.rows("SELECT recipient, user_agent, classification, counted, reason FROM events "
                    "ORDER BY at")
    reason = "more than 3 hits within 3600 s from this address and user agent"
    assert rows == [*[(f"r{n}@x.net", FIREFOX, "person", 1, None) for n in range(3)],
                    ("r3@x.net", FIREFOX, "automation", 0, reason),
                    ("r4@x.net", FIREFOX, "automation", 0, reason),
                    ("r0@x.net", "Other/1", "person", 1, None)]


def test_forwarded_for_only_from_trusted_proxies(service: Callable[..., Service]) -> None:
    untrusted = service()
    token = sign_open(KEYRING, new_email_id(), "a@x.net")
    untrusted.get("/o/" + token, headers={"X-Forwarded-For": "17.1.1.1"})
    assert untrusted.rows("SELECT ip, classification FROM events") == [("127.0.0.1", "person")]
    trusted = service(http={"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]})
    trusted.get("/o/" + token, headers={"X-Forwarded-For": "192.0.2.1, 17.1.1.1, 10.1.1.1"})
    assert trusted.rows("SELECT ip, classification FROM events") == [("17.1.1.1", "prefetch")]


@pytest.mark.parametrize(("peer", "header", "expected"), [
    ("127.0.0.1", "", "127.0.0.1"),
    ("198.51.100.1", "203.0.113.9", "198.51.100.1"),  # peer not trusted: header ignored
    ("10.0.0.1", "203.0.113.9", "203.0.113.9"),
    ("10.0.0.1", "203.0.113.9, 10.0.0.2", "203.0.113.9"),  # trusted hops skipped
    ("10.0.0.1", "1.1.1.1, 203.0.113.9, 10.0.0.2", "203.0.113.9"),  # left of it: spoofable
    ("10.0.0.1", "10.0.0.3, 10.0.0.2", "10.0.0.3"),  # all trusted: the farthest
    ("10.0.0.1", "203.0.113.9, garbage", "10.0.0.1"),  # unparseable: stop at last known hop
    ("10.0.0.1", " 2001:db8::1 ", "2001:db8::1"),
])
def test_client_ip(peer: str, header: str, expected: str) -> None:
    net = ipaddress.ip_network("10.0.0.0/8")
    assert client_ip(peer, header, lambda ip: ipaddress.ip_address(ip) in net) == expected


def test_healthz_and_metrics(service: Callable[..., Service]) -> None:
    svc = service()
    svc.get("/c/" + sign_click(KEYRING, new_email_id(), "a@x.net", URL))
    status, _, body = svc.get("/healthz")
    assert (status, json.loads(body)["status"]) == (200, "ok")
    status, headers, body = svc.get("/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ('relay_http_requests_total{route="click",status="302"}',
                 'relay_tracking_events_total{classification="person",type="click"}',
                 "relay_tracking_write_seconds_bucket", "relay_store_commits"):
        assert name in text


_FORGERY = Keyring({"k1": b"f" * 40}, "k1")
_VALID = sign_click(KEYRING, new_email_id(), "ann@example.net", URL)
_VALID_V1 = sign_v1(KEYRING, new_email_id(), "ann@example.net", URL)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("tracker") / "relay.db", {}, {})
    yield svc
    svc.close()


def _mutations() -> st.SearchStrategy[str]:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

    def changes(valid: str) -> st.SearchStrategy[str]:
        flip = st.tuples(st.integers(0, len(valid) - 1), st.sampled_from(alphabet)).map(
            lambda p: valid[:p[0]] + p[1] + valid[p[0] + 1:])
        cut = st.integers(1, len(valid) - 1).map(lambda n: valid[:n])
        grow = st.text(alphabet, min_size=1, max_size=8).map(lambda extra: valid + extra)
        return st.one_of(flip, cut, grow)

    forged = st.tuples(st.emails(), st.sampled_from(["https://evil.example/", URL]),
                       st.sampled_from([sign_click, sign_v1])).map(
        lambda p: p[2](_FORGERY, new_email_id(), p[0], p[1]))
    return st.one_of(st.sampled_from([_VALID, _VALID_V1]).flatmap(changes), forged,
                     st.text(alphabet, min_size=1, max_size=300))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=_mutations())
def test_mutated_and_forged_tokens_never_redirect(shared: Service, token: str) -> None:
    status, headers, _ = shared.get("/c/" + token)
    if token in (_VALID, _VALID_V1):
        assert status == 302
    else:
        assert status == 404 and "Location" not in headers
        status, _, body = shared.get("/o/" + token)
        assert (status, body) == (200, PIXEL)


async def test_kill_9_keeps_every_answered_event(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "relay.db"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[http]\nlisten = "127.0.0.1:{port}"\n[store]\nurl = "sqlite:///{db}"\n'
        f'[tracking]\ncurrent_key = "k1"\n[tracking.keys]\nk1 = "{SECRET}"\n')
    process = subprocess.Popen([sys.executable, "-m", "relay", "http", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    email_id = new_email_id()
    answered: list[str] = []
    killed = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, start: int) -> None:
        for n in range(start, 100_000, 50):
            url = f"https://shop.example/item/{n}"
            token = sign_click(KEYRING, email_id, f"r{n}@example.net", url)
            try:
                async with session.get(f"{base}/c/{token}", allow_redirects=False) as response:
                    if response.status == 302:
                        answered.append(url)
            except aiohttp.ClientError:
                return
            if len(answered) >= 1500 and not killed.is_set():
                killed.set()
                os.kill(process.pid, signal.SIGKILL)

    try:
        async with aiohttp.ClientSession(headers={"User-Agent": FIREFOX}) as session:
            for _ in range(200):  # readiness: the port answers
                try:
                    async with session.get(f"{base}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            await asyncio.gather(*(worker(session, i) for i in range(50)))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert len(answered) >= 1500
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT url FROM events WHERE type = 'click'")}
    missing = [url for url in answered if url not in stored]
    assert missing == []
