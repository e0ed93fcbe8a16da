"""The HTTP listener under abuse, against the running relay: connection limits, idle and
trickling connections, malformed requests, who may read /metrics, and a relay out of file
descriptors (``relay serve`` in a subprocess under a 1024-descriptor limit)."""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Relay, free_port, store_url, wait_until

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


def port_of(relay: Relay) -> int:
    return int(relay.http_url.rsplit(":", 1)[1])


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the relay closes the connection (or the socket's timeout)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def get(port: int, path: str, source: str = "127.0.0.1", headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"User-Agent": FIREFOX, **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def metric(port: int, name: str) -> float:
    status, _, body = get(port, "/metrics")
    assert status == 200
    found = re.findall(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
    return float(found[0]) if found else 0.0


def others_open(port: int) -> int:
    """Open connections, not counting the one asking."""
    return int(metric(port, "relay_http_connections")) - 1


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_past_the_per_address_limit_a_connection_gets_503_and_others_still_get_in(
        make_relay: Callable[..., Relay], sockets: list[socket.socket]) -> None:
    relay = make_relay({"http": {"max_connections_per_ip": 3}}, http=True)
    port = port_of(relay)
    sockets += [connect(port, "127.0.0.2") for _ in range(3)]
    wait_until(lambda: others_open(port) == 3, what="3 admitted")
    per_ip = 'relay_http_connections_refused_total{limit="per_ip"}'
    before = metric(port, per_ip)  # counted per process: other tests' refusals included
    refused = connect(port, "127.0.0.2")
    answer = read_all(refused)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 5\r\n" in answer
    assert answer.endswith(b'{"error": "too many connections"}')
    # another address is not held back by that one, and a slot freed is a slot again
    assert get(port, "/healthz")[0] == 200
    sockets.pop().close()
    wait_until(lambda: others_open(port) == 2, what="slot freed")
    assert get(port, "/healthz", source="127.0.0.2")[0] == 200
    assert metric(port, per_ip) == before + 1


def test_past_the_total_limit_every_address_gets_503(
        make_relay: Callable[..., Relay], sockets: list[socket.socket]) -> None:
    relay = make_relay({"http": {"max_connections": 2}}, http=True)
    port = port_of(relay)
    sockets += [connect(port, "127.0.0.2"), connect(port, "127.0.0.3")]
    assert read_all(connect(port, "127.0.0.4")).startswith(b"HTTP/1.1 503 ")
    assert read_all(connect(port)).startswith(b"HTTP/1.1 503 ")


def test_trusted_proxies_have_no_per_address_limit(
        make_relay: Callable[..., Relay], sockets: list[socket.socket]) -> None:
    relay = make_relay({"http": {"max_connections_per_ip": 2,
                                 "trusted_proxies": ["127.0.0.2/32"]}}, http=True)
    port = port_of(relay)
    sockets += [connect(port, "127.0.0.2") for _ in range(4)]
    assert get(port, "/healthz", source="127.0.0.2")[0] == 200


def test_a_silent_connection_is_closed_after_the_header_timeout(
        make_relay: Callable[..., Relay]) -> None:
    relay = make_relay({"http": {"header_timeout": 0.5}}, http=True)
    before = metric(port_of(relay), "relay_http_header_timeouts_total")  # of this process
    with connect(relay_port := port_of(relay)) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""  # closed without an answer
        assert 0.4 < time.monotonic() - started < 5
    assert metric(relay_port, "relay_http_header_timeouts_total") == before + 1


def trickle_until_closed(sock: socket.socket) -> float:
    """Send a header line every 0.2 s until the relay closes the connection (at most 10 s);
    the seconds it took."""
    sock.settimeout(0.2)
    started = time.monotonic()
    while time.monotonic() - started < 10:
        try:
            sock.sendall(b"X-Slow: 1\r\n")
            if sock.recv(1) == b"":
                break
        except TimeoutError:
            continue  # still open: the next line
        except (BrokenPipeError, ConnectionResetError):
            break
    return time.monotonic() - started


def test_a_trickled_request_head_is_closed_though_bytes_keep_coming(
        make_relay: Callable[..., Relay]) -> None:
    relay = make_relay({"http": {"header_timeout": 1.0}}, http=True)
    with connect(port_of(relay)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert trickle_until_closed(sock) < 5


def test_a_trickled_second_request_is_closed_at_the_keepalive_timeout(
        make_relay: Callable[..., Relay]) -> None:
    """After a first request, aiohttp's keep-alive timer is the deadline, and the bytes of an
    unfinished head do not restart it."""
    relay = make_relay({"http": {"keepalive_timeout": 1.0}}, http=True)
    with connect(port_of(relay)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert trickle_until_closed(sock) < 5


def test_an_idle_kept_alive_connection_is_closed_after_keepalive_timeout(
        make_relay: Callable[..., Relay]) -> None:
    relay = make_relay({"http": {"keepalive_timeout": 0.5}}, http=True)
    conn = http.client.HTTPConnection("127.0.0.1", port_of(relay), timeout=10)
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Connection") != "close"
    response.read()
    started = time.monotonic()
    assert conn.sock.recv(1) == b""  # the relay closed it
    assert time.monotonic() - started < 5
    conn.close()


def test_malformed_requests_are_counted_not_logged_as_tracebacks(
        make_relay: Callable[..., Relay], caplog: pytest.LogCaptureFixture) -> None:
    relay = make_relay(http=True)
    port = port_of(relay)
    with caplog.at_level(logging.DEBUG, "aiohttp.server"):
        for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
                        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
                        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"):
            with connect(port) as sock:
                sock.sendall(garbage)
                assert re.match(rb"HTTP/1\.[01] 400 ", read_all(sock))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info]
    _, _, body = get(port, "/metrics")
    counts = re.findall(rb'^relay_http_malformed_requests_total\{kind="(\w+)"\} (\S+)$', body,
                        re.MULTILINE)
    assert sum(float(n) for _, n in counts) == 3, counts


def test_metrics_only_for_allowed_networks(make_relay: Callable[..., Relay]) -> None:
    port = port_of(make_relay(http=True))
    assert get(port, "/metrics")[0] == 200  # loopback, the default
    port = port_of(make_relay({"http": {"metrics_allowed_networks": ["10.0.0.0/8"]}},
                              http=True))
    status, _, body = get(port, "/metrics")
    assert status == 403 and b"metrics_allowed_networks" in body
    assert get(port, "/healthz")[0] == 200  # the rest of the service is not affected


def test_metrics_follow_the_trusted_proxies_rule(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay({"http": {"metrics_allowed_networks": ["10.0.0.0/8"],
                                 "trusted_proxies": ["127.0.0.2/32"]}}, http=True)
    port = port_of(relay)
    via_proxy = {"X-Forwarded-For": "10.1.2.3"}
    assert get(port, "/metrics", source="127.0.0.2", headers=via_proxy)[0] == 200
    assert get(port, "/metrics", source="127.0.0.2",
               headers={"X-Forwarded-For": "198.51.100.7"})[0] == 403
    assert get(port, "/metrics", source="127.0.0.3", headers=via_proxy)[0] == 403  # untrusted


# --- a relay out of descriptors, as systemd's default LimitNOFILE of 1024 left it ---------

DESCRIPTORS = 1024
FLOOD = 1100
HEADER_TIMEOUT = 3


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str], tuple[subprocess.Popen, int, int]]]:
    """``serve(extra_http_settings)``: ``relay serve`` under 1024 descriptors; its ports."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FLOOD + 200
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the test itself needs {needed} descriptors (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    processes: list[subprocess.Popen] = []

    def start(http_settings: str) -> tuple[subprocess.Popen, int, int]:
        smtp_port, http_port = free_port(), free_port()
        config = tmp_path / "relay.toml"
        config.write_text(f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
[upstream]
capture_dir = "outbox"
[http]
listen = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"
{http_settings}
[store]
url = "{store_url(tmp_path)}"
""")
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_limit_descriptors)
        processes.append(process)
        for port in (smtp_port, http_port):
            wait_until(lambda p=port: _accepts(p), what=f"port {port}")
        return process, smtp_port, http_port

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def smtp_greeting_seconds(port: int) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert sock.recv(512).startswith(b"220 ")
    return time.monotonic() - started


def healthz_seconds(port: int) -> float:
    started = time.monotonic()
    assert get(port, "/healthz")[0] == 200
    return time.monotonic() - started


def flood(port: int, sources: list[str], sockets: list[socket.socket], timeout: float) -> None:
    """FLOOD idle connections, spread over ``sources``; those the kernel cannot complete
    within ``timeout`` (the relay no longer accepts, its backlog is full) are given up."""
    for index in range(FLOOD):
        with contextlib.suppress(OSError):
            sockets.append(connect(port, sources[index % len(sources)], timeout=timeout))


def test_idle_connections_from_one_address_leave_smtp_and_http_answering(
        serve: Callable[[str], tuple[subprocess.Popen, int, int]],
        sockets: list[socket.socket]) -> None:
    """The issue's attack with the default limits: 1,100 idle connections from one address.
    200 are admitted (then closed at the header timeout), the rest get 503 at once."""
    process, smtp_port, http_port = serve(f"header_timeout = {HEADER_TIMEOUT}")
    started = time.monotonic()
    flood(http_port, ["127.0.0.2"], sockets, timeout=10)
    flood_seconds = time.monotonic() - started
    assert len(sockets) == FLOOD
    assert smtp_greeting_seconds(smtp_port) < 1
    assert healthz_seconds(http_port) < 1
    answers = [read_all(sock) for sock in sockets]  # each until the relay closes it
    refused = sum(a.startswith(b"HTTP/1.1 503 ") for a in answers)
    admitted = answers.count(b"")  # closed at the header timeout, without an answer
    assert refused + admitted == FLOOD
    # 200 at a time: a slot is freed at the header timeout, then taken again
    assert 200 <= admitted <= 200 * (1 + int(flood_seconds // HEADER_TIMEOUT))
    assert process.poll() is None


def test_out_of_descriptors_the_relay_logs_once_and_recovers(
        serve: Callable[[str], tuple[subprocess.Popen, int, int]],
        sockets: list[socket.socket]) -> None:
    """Limits set above what the process may open (max_connections 10,000 under 1,024
    descriptors) and 1,100 idle connections from eleven addresses: accept() fails with
    EMFILE. That is a log line a minute, not a traceback per attempt; the idle connections are
    closed at the header timeout and SMTP and HTTP answer again."""
    process, smtp_port, http_port = serve("header_timeout = 10")  # longer than the flood
    flood(http_port, [f"127.0.0.{n}" for n in range(2, 13)], sockets, timeout=1)
    for sock in sockets:
        sock.settimeout(20)
        assert read_all(sock) == b""  # closed at the header timeout, or never accepted
    wait_until(lambda: _answers(smtp_port, http_port), what="SMTP and HTTP answering again")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    failures = [line for line in stderr.splitlines() if b"cannot accept connections" in line]
    assert 1 <= len(failures) <= 2, stderr[-2000:]  # a line per listener at most
    assert b"Too many open files" in failures[0]
    assert b"Traceback" not in stderr and b"out of system resource" not in stderr


def _answers(smtp_port: int, http_port: int) -> bool:
    try:
        return smtp_greeting_seconds(smtp_port) < 1 and healthz_seconds(http_port) < 1
    except (OSError, AssertionError):
        return False
