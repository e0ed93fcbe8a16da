"""The SMTP listener under attack: AUTH floods, failed-login budgets, connection floods, slow
and endless uploads, floods of errors. Against the running relay with real clients."""

from __future__ import annotations

import base64
import inspect
import logging
import re
import resource
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest

from relay.config import SmtpSettings, load, parse
from relay.errors import ConfigError
from relay.metrics import REGISTRY
from relay.smtp import guard as smtp_guard
from relay.smtp import passwords
from relay.smtp.guard import AuthBudget, peer_key
from relay.throttle import ThrottledLog
from tests.harness import free_port, store_url, wait_until

USER, PASSWORD = "app", "s3cret"
HASH = passwords.hash_password(PASSWORD)


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("smtp", "key", "problem"), [
    ({"auth_max_failures": 0}, "smtp.auth_max_failures", "greater than 0"),
    ({"auth_block_seconds": -1}, "smtp.auth_block_seconds", "greater than 0"),
    ({"auth_failure_delay": -1}, "smtp.auth_failure_delay", "0 (off) or more"),
    ({"auth_failure_delay": "1s"}, "smtp.auth_failure_delay", "expected"),
    ({"max_data_seconds": 0}, "smtp.max_data_seconds", "greater than 0"),
    ({"max_connections": 0}, "smtp.max_connections", "greater than 0"),
    ({"max_connections_per_ip": 1.5}, "smtp.max_connections_per_ip", "expected int"),
])
def test_guard_settings_are_checked(smtp, key, problem):
    with pytest.raises(ConfigError) as info:
        parse({"smtp": smtp}, "relay.toml")
    assert (info.value.file, info.value.key) == ("relay.toml", key)
    assert problem in info.value.problem


def test_the_example_config_shows_the_defaults():
    example, defaults = load(ROOT / "config.example.toml").smtp, SmtpSettings()
    for name in ("auth_max_failures", "auth_block_seconds", "auth_failure_delay",
                 "max_data_seconds", "max_connections", "max_connections_per_ip"):
        assert getattr(example, name) == getattr(defaults, name)


def auth_settings(**smtp: object) -> dict:
    return {"smtp": {"allowed_networks": [], "auth_require_tls": False,
                     "users": [{"name": USER, "password_hash": HASH}], **smtp}}


def login(port: int, name: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN on a new connection: its reply (smtplib raises on 421 and 535)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        blob = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
        return client.docmd("AUTH", f"PLAIN {blob}")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_unknown_users_and_wrong_passwords_cost_the_same_check(make_relay, upstream,
                                                               monkeypatch):
    """A wrong password for a real user cost a scrypt check (~50 ms), an unknown user none
    (~1 ms): user names could be told apart by the time of the reply."""
    checked: list[str] = []
    verify = passwords.verify_password

    def recording(password: str, encoded: str) -> bool:
        checked.append(encoded)
        return verify(password, encoded)

    monkeypatch.setattr(passwords, "verify_password", recording)
    relay = make_relay(auth_settings(auth_failure_delay=0), upstream=upstream)
    assert login(relay.smtp_port, "nobody", "guess")[0] == 535
    assert login(relay.smtp_port, USER, "guess")[0] == 535
    assert len(checked) == 2
    unknown, wrong = (passwords.parse_hash(h) for h in checked)
    assert wrong.digest == passwords.parse_hash(HASH).digest
    assert unknown.digest != wrong.digest  # a dummy hash ...
    assert (unknown.n, unknown.r, unknown.p) == (wrong.n, wrong.r, wrong.p)  # ... as costly
    assert login(relay.smtp_port, USER, PASSWORD)[0] == 235
    assert login(relay.smtp_port, USER, PASSWORD)[0] == 235
    assert len(checked) == 3  # a password that verified is remembered; failures never are


def test_logins_past_the_checks_in_progress_get_454_at_once(make_relay, upstream,
                                                            monkeypatch):
    """The hashing threads are bounded, and so is the queue in front of them: a login that
    would wait behind too many others is told to come back later instead."""
    monkeypatch.setattr(smtp_guard, "MAX_PENDING_CHECKS", 1)
    entered, release = threading.Event(), threading.Event()
    verify = passwords.verify_password

    def held(password: str, encoded: str) -> bool:
        entered.set()
        release.wait(30)
        return verify(password, encoded)

    monkeypatch.setattr(passwords, "verify_password", held)
    relay = make_relay(auth_settings(auth_failure_delay=0), upstream=upstream)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(login, relay.smtp_port, USER, "guess")
        assert entered.wait(30)
        code, text = login(relay.smtp_port, USER, PASSWORD)
        release.set()
        assert first.result()[0] == 535
    assert (code, text[:6]) == (454, b"4.7.0 ")
    assert login(relay.smtp_port, USER, PASSWORD)[0] == 235  # room again


def test_parallel_logins_from_one_address_get_no_more_checks_than_the_budget(
        make_relay, upstream, monkeypatch, caplog):
    """30 connections sending AUTH at once all had their password checked against a budget
    of 3, and the right password sent last got 235; the block was logged once per failure
    in flight, each extending it."""
    checked: list[str] = []
    release = threading.Event()
    verify = passwords.verify_password

    def held(password: str, encoded: str) -> bool:
        checked.append(password)
        release.wait(30)
        return verify(password, encoded)

    monkeypatch.setattr(passwords, "verify_password", held)
    relay = make_relay(auth_settings(auth_max_failures=3, auth_failure_delay=0),
                       upstream=upstream)
    blocks = metric("relay_smtp_auth_blocks_total")
    caplog.set_level(logging.WARNING, logger="relay.smtp")
    with ThreadPoolExecutor(30) as pool:
        guesses = [pool.submit(login, relay.smtp_port, USER, f"guess{n}") for n in range(29)]
        try:  # all but the budget's 3 answered at once, before any check ends
            wait_until(lambda: sum(g.done() for g in guesses) >= 26, timeout=15,
                       what="logins past the budget answered")
            right = login(relay.smtp_port, USER, PASSWORD)
        finally:
            release.set()
        codes = sorted(g.result()[0] for g in guesses)
    assert (right[0], right[1][:6]) == (454, b"4.7.0 ")
    assert codes == [421, *[454] * 26, 535, 535]
    assert len(checked) == 3
    assert login(relay.smtp_port, USER, PASSWORD)[0] == 421  # refused, not checked
    assert len(checked) == 3
    assert metric("relay_smtp_auth_blocks_total") == blocks + 1
    assert len([r for r in caplog.records if "refused for" in r.getMessage()]) == 1


def test_the_failed_login_budget_ends_in_421_and_a_refusal_window(make_relay, upstream):
    relay = make_relay(auth_settings(auth_max_failures=3, auth_failure_delay=0),
                       upstream=upstream)
    blocks = metric("relay_smtp_auth_blocks_total")
    refused = metric("relay_smtp_auth_total", result="refused")
    assert login(relay.smtp_port, USER, "one")[0] == 535
    assert login(relay.smtp_port, USER, "two")[0] == 535
    code, text = login(relay.smtp_port, USER, "three")
    assert (code, text[:6]) == (421, b"4.7.0 ")
    assert b"Too many failed logins" in text
    assert metric("relay_smtp_auth_blocks_total") == blocks + 1
    # refused at once, before any check, even with the right password
    code, _ = login(relay.smtp_port, USER, PASSWORD)
    assert code == 421
    assert metric("relay_smtp_auth_total", result="refused") == refused + 1
    # mail that needs no AUTH is not refused: only logins are
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo()
        assert client.mail("app@shop.example")[0] == 530


def failed(budget: AuthBudget, peer: tuple[str, int]) -> tuple[float, bool]:
    """One failed login, reserved and settled as the SMTP session does."""
    assert budget.reserve(peer)
    return budget.settle(peer, True)


def test_the_budget_delays_then_refuses_and_forgets_on_its_clock(caplog):
    now = [1000.0]
    budget = AuthBudget(max_failures=4, block_seconds=60, delay=1.5, clock=lambda: now[0])
    peer = ("198.51.100.7", 4321)
    with caplog.at_level(logging.INFO, logger="relay.smtp"):
        assert [failed(budget, peer) for _ in range(3)] == [(0, False), (1.5, False),
                                                           (3.0, False)]
        assert failed(budget, peer) == (0, True)
        for _ in range(100):
            assert budget.refused(("198.51.100.7", 1)) == 60
    assert budget.refused(("198.51.100.8", 1)) == 0  # another address
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the block is logged once ...
    assert len([r for r in caplog.records if "auth refused" in r.message]) == 1  # ... refusals
    now[0] += 60  # too
    assert budget.refused(peer) == 0
    assert failed(budget, peer) == (0, False)  # a fresh budget
    now[0] += 59
    assert failed(budget, peer) == (1.5, False)
    now[0] += 60  # failures are forgotten after a quiet window
    assert failed(budget, peer) == (0, False)


def test_attempts_being_checked_count_against_the_budget(caplog):
    """Reserved before the check, settled after: parallel logins get no more checks than
    serial ones, and those still in flight when the budget runs out neither count again nor
    extend the block."""
    now = [1000.0]
    budget = AuthBudget(max_failures=3, block_seconds=60, delay=0, clock=lambda: now[0])
    peer = ("198.51.100.7", 4321)
    with caplog.at_level(logging.WARNING, logger="relay.smtp"):
        assert [budget.reserve(peer) for _ in range(4)] == [True, True, True, False]
        assert budget.settle(peer, False) == (0, False)  # a good password frees its attempt
        assert budget.reserve(peer)
        assert budget.settle(peer, None) == (0, False)  # so does one never answered
        assert budget.reserve(peer)
        assert [budget.settle(peer, True) for _ in range(2)] == [(0, False), (0, False)]
        assert not budget.reserve(peer)  # two failures and one in flight
        assert budget.settle(peer, True) == (0, True)
        assert budget.refused(peer) == 60
    assert len([r for r in caplog.records if "refused for" in r.message]) == 1
    now[0] += 60
    assert budget.reserve(peer)


def test_ipv6_clients_share_a_budget_per_64():
    assert peer_key(("2001:db8:1:2:aaaa::1", 25, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("2001:db8:1:2:bbbb::9", 25, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("::ffff:198.51.100.7", 25, 0, 0)) == "198.51.100.7"
    assert peer_key(("198.51.100.7", 25)) == "198.51.100.7"


def test_throttled_log_holds_back_repeats_and_counts_them(caplog):
    now = [0.0]
    throttled = ThrottledLog(logging.getLogger("relay.test"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="relay.test"):
        logged = [throttled("k", logging.ERROR, "accept failed") for _ in range(1000)]
        now[0] = 10
        throttled("k", logging.ERROR, "accept failed")
    assert logged.count(True) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "accept failed", "accept failed (and 999 more like it held back since the last line)"]


def serve(tmp_path: Path, smtp: str = "", limit_files: int | None = None
          ) -> tuple[subprocess.Popen, int, int]:
    """``relay serve`` in a subprocess (optionally under a descriptor limit); its ports."""
    smtp_port, http_port = free_port(), free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
{smtp}
[upstream]
capture_dir = "outbox"
[http]
listen = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"
[store]
url = "{store_url(tmp_path)}"
""")
    command = [sys.executable, "-m", "relay", "serve", "--config", str(config)]
    if limit_files is not None:
        command = ["prlimit", f"--nofile={limit_files}", "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for port in (smtp_port, http_port):
        wait_until(lambda p=port: _open(p, process), what=f"port {port}")
    return process, smtp_port, http_port


def _open(port: int, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"relay exited: {process.stderr.read()}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    return stderr


def healthz_seconds(http_port: int) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=30) as r:
        assert r.status == 200
    return time.perf_counter() - started


def failed_logins(http_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    line = re.search(r'^relay_smtp_auth_total\{result="failed"\} (\S+)$', text, re.M)
    return float(line.group(1)) if line else 0.0


def test_healthz_answers_quickly_during_an_auth_flood(tmp_path):
    """16 clients trying passwords held the event loop in scrypt: /healthz took 1.5-2.7 s.

    The clients speak raw SMTP (one socket each, a new one when the session's command budget
    ends it), so this process's threads cost little and the relay is kept busy hashing.
    Latency is judged by the 90th percentile of 20 samples: on this shared machine a single
    sample can be slow for reasons of its own."""
    users = f'[[smtp.users]]\nname = "{USER}"\npassword_hash = "{HASH}"\n'
    process, smtp_port, http_port = serve(
        tmp_path, "auth_require_tls = false\nallowed_networks = []\n"
                  "auth_max_failures = 100000\nauth_failure_delay = 0\n" + users)
    blob = base64.b64encode(f"\0{USER}\0wrong".encode())
    try:
        flooding = True

        def flood() -> int:
            tries = 0
            while flooding:
                sock, replies = session(smtp_port)
                with sock:
                    sock.sendall(b"EHLO flood.test\r\n")
                    while not replies.readline().startswith(b"250 "):
                        pass
                    for _ in range(15):  # within the session's budget of AUTH commands
                        sock.sendall(b"AUTH PLAIN " + blob + b"\r\n")
                        assert replies.readline().startswith(b"535 ")
                        tries += 1
                        if not flooding:
                            break
            return tries

        with ThreadPoolExecutor(16) as pool:
            clients = [pool.submit(flood) for _ in range(16)]
            wait_until(lambda: failed_logins(http_port) >= 16, what="the flood under way")
            try:
                samples = sorted(healthz_seconds(http_port) for _ in range(20))
            finally:
                flooding = False
            tries = sum(c.result() for c in clients)
        assert tries >= 16
        assert samples[17] < 0.1, samples
    finally:
        stop(process)


def session(port: int) -> tuple[socket.socket, BinaryIO]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    replies = sock.makefile("rb")
    assert replies.readline().startswith(b"220")
    return sock, replies


def read_to_close(replies: BinaryIO) -> list[bytes]:
    try:
        return replies.read().splitlines()
    except ConnectionResetError:
        return []


def test_a_flood_of_empty_lines_ends_in_421(make_relay, upstream):
    """Every command had a budget but the empty line: 4 connections sent ~100k a second, each
    answered 500, and /healthz went from 2 ms to 340 ms."""
    relay = make_relay(upstream=upstream)
    sock, replies = session(relay.smtp_port)
    with sock:
        sock.sendall(b"\r\n" * 10_000)
        lines = read_to_close(replies)
    assert lines[:19] == [b"500 Error: bad syntax"] * 19
    assert lines[19:] == [b"500 Error: bad syntax",
                          b"421 4.7.0 Too many errors: closing the session"]


def test_errors_of_any_kind_share_the_budget_and_a_delivery_resets_it(make_relay, upstream):
    relay = make_relay({"smtp": {"max_recipients": 1}}, upstream=upstream)
    errors = [b"\r\n", b"BOGUS\r\n", b"MAIL FROM:<no-at-sign\r\n", b"RCPT TO:<x@example.org>\r\n",
              b"DATA\r\n"]
    sock, replies = session(relay.smtp_port)
    with sock:
        sock.sendall(b"EHLO client.test\r\n" + b"".join(errors * 3))  # 15 errors
        sock.sendall(b"MAIL FROM:<app@shop.example>\r\nRCPT TO:<a@example.org>\r\n"
                     + b"RCPT TO:<b@example.org>\r\n" * 30  # 452: not errors
                     + b"DATA\r\n")
        while not replies.readline().startswith(b"354"):
            pass
        sock.sendall(b"Subject: hi\r\n\r\nhi\r\n.\r\n")
        assert replies.readline().startswith(b"250 2.0.0")
        sock.sendall(b"\r\n" * 19 + b"NOOP\r\n")  # a fresh budget: 19 errors are not enough
        for _ in range(19):
            assert replies.readline().startswith(b"500")
        assert replies.readline() == b"250 OK\r\n"
        sock.sendall(b"\r\n")
        assert read_to_close(replies)[-1].startswith(b"421 4.7.0 Too many errors")
    assert len(upstream.received) == 1


def start_data(port: int) -> tuple[socket.socket, BinaryIO]:
    sock, replies = session(port)
    sock.sendall(b"HELO client.test\r\nMAIL FROM:<app@shop.example>\r\n"
                 b"RCPT TO:<a@example.org>\r\nDATA\r\n")
    for expected in (b"250", b"250", b"250", b"354"):
        assert replies.readline().startswith(expected)
    return sock, replies


def trickle(sock: socket.socket, seconds: float, every: float = 0.1) -> int:
    """Send a line of the message every ``every`` seconds for ``seconds`` (real time must
    pass for a slow upload: these sleeps pace the client, they synchronise nothing)."""
    sock.sendall(b"Subject: slow\r\n\r\n")
    lines = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.sendall(b"still sending\r\n")
        lines += 1
        time.sleep(every)
    return lines


def test_an_upload_trickling_for_twice_the_timeout_is_delivered(make_relay, upstream):
    """smtp.timeout capped the whole upload: a client still sending at 1 KB/s was cut off,
    and a message that took longer than 5 minutes to upload could never be sent."""
    relay = make_relay({"smtp": {"timeout": 0.5}}, upstream=upstream)
    sock, replies = start_data(relay.smtp_port)
    with sock:
        lines = trickle(sock, 1.2)
        sock.sendall(b".\r\n")
        assert replies.readline().startswith(b"250 2.0.0 ")
    [received] = upstream.received
    assert received.data.count(b"still sending\r\n") == lines


def test_an_upload_idle_for_the_timeout_is_cut_with_421(make_relay, upstream):
    relay = make_relay({"smtp": {"timeout": 0.5}}, upstream=upstream)
    sock, replies = start_data(relay.smtp_port)
    with sock:
        trickle(sock, 0.6)
        lines = read_to_close(replies)  # then silence
    assert lines == [b"421 4.4.2 relay.test Error: timeout exceeded"]
    assert upstream.received == []


def test_an_upload_longer_than_max_data_seconds_is_cut_with_421(make_relay, upstream):
    relay = make_relay({"smtp": {"timeout": 0.5, "max_data_seconds": 1}}, upstream=upstream)
    cut = metric("relay_smtp_limits_total", limit="data_seconds")
    sock, replies = start_data(relay.smtp_port)
    with sock:
        with pytest.raises(OSError):  # the relay closes the connection while it sends
            trickle(sock, 10)
        lines = read_to_close(replies)
    assert lines == [b"421 4.4.2 relay.test Error: the message took longer than 1 s to send "
                     b"(smtp.max_data_seconds)"]
    assert upstream.received == []
    assert metric("relay_smtp_limits_total", limit="data_seconds") == cut + 1


def test_the_aiosmtpd_privates_the_relay_overrides_are_there():
    """relay/smtp/server.py RelaySMTP overrides or calls these; the tests above show they still
    behave as relied on, this names them."""
    from aiosmtpd.smtp import SMTP
    assert callable(SMTP._timeout_cb)
    assert list(inspect.signature(SMTP._reset_timeout).parameters) == ["self", "duration"]
    assert "_timeout_duration" in inspect.getsource(SMTP.__init__)


@pytest.fixture
def many_files() -> None:
    """This test process holds over a thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def hold(port: int, count: int, source: str) -> list[socket.socket]:
    """``count`` idle connections from ``source`` (a loopback address), greeting unread."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(30)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        held.append(sock)
    return held


def first_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        piece = sock.recv(1000)
        if not piece:
            break
        data += piece
    return data


def greeting_seconds(port: int) -> tuple[bytes, float]:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        return first_line(sock), time.perf_counter() - started


def test_idle_connections_from_one_address_leave_others_a_greeting(tmp_path, many_files):
    """About 1,000 idle connections used up the relay's 1024 descriptors: SMTP and HTTP
    stopped answering. Past smtp.max_connections_per_ip (50) a client's new connections are
    answered 421 and closed."""
    process, smtp_port, _ = serve(tmp_path, 'allowed_networks = ["127.0.0.1/32"]\n',
                                  limit_files=1024)
    held = hold(smtp_port, 1100, "127.0.0.2")
    try:
        greetings = [first_line(sock) for sock in held]
        line, seconds = greeting_seconds(smtp_port)
        assert line.startswith(b"220 ")
        assert seconds < 1
    finally:
        for sock in held:
            sock.close()
        stderr = stop(process)
    assert sum(g.startswith(b"220 ") for g in greetings) == 50
    refused = [g for g in greetings if not g.startswith(b"220 ")]
    assert set(refused) == {b"421 4.7.0 Too many connections from your address, try again "
                            b"later\r\n"}
    assert stderr.count("refusing connections from 127.0.0.2") == 1  # not one per connection


def test_allowed_networks_have_no_per_address_limit(make_relay):
    """An application's connection pool of more than 50 was refused 421 (Postfix exempts
    $mynetworks too); clients elsewhere keep the limit."""
    relay = make_relay({"smtp": {"allowed_networks": ["127.0.0.1/32"],
                                 "max_connections_per_ip": 2}})
    local, other = hold(relay.smtp_port, 5, "127.0.0.1"), hold(relay.smtp_port, 3, "127.0.0.2")
    try:
        assert [first_line(sock)[:4] for sock in local] == [b"220 "] * 5
        assert [first_line(sock)[:4] for sock in other] == [b"220 ", b"220 ", b"421 "]
    finally:
        for sock in local + other:
            sock.close()


def test_past_max_connections_a_new_client_is_told_at_once(tmp_path, many_files):
    process, smtp_port, _ = serve(tmp_path, "max_connections = 900\n"
                                  "max_connections_per_ip = 5000\n", limit_files=1024)
    held = hold(smtp_port, 1000, "127.0.0.2")
    try:
        greetings = [first_line(sock) for sock in held]
        line, seconds = greeting_seconds(smtp_port)
        assert line == b"421 4.7.0 Too many connections, try again later\r\n"
        assert seconds < 1
        for sock in held[:10]:  # room again
            sock.close()
        wait_until(lambda: greeting_seconds(smtp_port)[0].startswith(b"220 "),
                   what="a connection admitted")
    finally:
        for sock in held:
            sock.close()
        stop(process)
    assert sum(g.startswith(b"220 ") for g in greetings) == 900


def test_out_of_descriptors_is_logged_once_per_interval_not_per_accept(tmp_path, many_files):
    """asyncio logged a traceback per failed accept: 207 MB of log in 20 s."""
    process, smtp_port, _ = serve(tmp_path, "max_connections = 5000\n"
                                  "max_connections_per_ip = 5000\n", limit_files=1024)
    held = hold(smtp_port, 1100, "127.0.0.2")
    try:
        # the relay greets what it could accept; the rest wait in the kernel's queue while
        # asyncio tries again every second
        greeted = sum(first_line(sock).startswith(b"220 ") for sock in held[:900])
        assert greeted == 900
        with (socket.create_connection(("127.0.0.1", smtp_port), timeout=3.5) as sock,
              pytest.raises(TimeoutError)):  # three failed accepts at least
            sock.recv(100)
        for sock in held:
            sock.close()
        held = []
        line, _ = greeting_seconds(smtp_port)  # descriptors free again: served
        assert line.startswith(b"220 ")
    finally:
        for sock in held:
            sock.close()
        stderr = stop(process)
    assert stderr.count("cannot accept connections on 127.0.0.1:") == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "socket.accept() out of system resource" not in stderr
