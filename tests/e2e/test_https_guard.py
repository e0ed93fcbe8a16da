"""The TLS listener (``http.tls_listen``) under the same guard as the plain one: connection
limits counted from the moment a connection is accepted, before its handshake, and
``http.header_timeout`` covering handshake and request head; TLS 1.2 at least; with a
certificate of the operator's own (``http.tls_cert``), new links on https."""

from __future__ import annotations

import http.client
import re
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.e2e.test_http_guard import connect, metric, read_all
from tests.harness import Relay, UpstreamServer, free_port, wait_until


@pytest.fixture
def tls_relay(make_relay: Callable[..., Relay], certificate: tuple[Path, Path],
              upstream: UpstreamServer) -> Callable[..., tuple[Relay, int, int]]:
    """A relay with http.tls_listen and the test certificate (CN=localhost); (relay, plain
    port, TLS port)."""
    def make(**http: object) -> tuple[Relay, int, int]:
        plain, tls = free_port(), free_port()
        cert, key = certificate
        relay = make_relay({"http": {"listen": f"127.0.0.1:{plain}",
                                     "public_url": f"http://localhost:{plain}",
                                     "tls_listen": f"127.0.0.1:{tls}", "tls_cert": str(cert),
                                     "tls_key": str(key), **http},
                            "tracking": {"opens": True, "clicks": True}},
                           upstream=upstream, http=True)
        return relay, plain, tls
    return make


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def client(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def https_get(port: int, context: ssl.SSLContext, path: str = "/healthz") -> int:
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_tls_serves_the_tracker_with_the_configured_certificate_tls_12_or_later(
        tls_relay, certificate) -> None:
    _, plain, tls = tls_relay()
    failures = metric(plain, "relay_http_tls_handshake_failures_total")  # of this process
    assert https_get(tls, client(certificate[0])) == 200
    for version, accepted in (("-tls1_1", False), ("-tls1_2", True), ("-tls1_3", True)):
        # openssl's own client, told to offer only that version (and allowed to, at SECLEVEL 0)
        done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{tls}", version,
                               "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "localhost"],
                              input="", capture_output=True, text=True, timeout=30)
        assert (done.returncode == 0) == accepted, (version, done.stdout, done.stderr)
    wait_until(lambda: metric(plain, "relay_http_tls_handshake_failures_total") == failures + 1,
               what="the TLS 1.1 handshake counted")


def test_connections_in_their_handshake_count_against_the_limits(
        tls_relay, certificate, sockets: list[socket.socket]) -> None:
    _, plain, tls = tls_relay(max_connections_per_ip=3)
    sockets += [connect(tls, "127.0.0.2") for _ in range(3)]  # never start a handshake
    wait_until(lambda: metric(plain, "relay_http_connections") == 4, what="3 admitted")
    refused = 'relay_http_connections_refused_total{limit="per_ip"}'
    before = metric(plain, refused)  # counted per process, across tests
    assert read_all(connect(tls, "127.0.0.2")) == b""  # closed at once
    assert metric(plain, refused) == before + 1
    assert https_get(tls, client(certificate[0])) == 200  # another address gets in
    sockets.pop().close()
    wait_until(lambda: metric(plain, "relay_http_connections") == 3, what="slot freed")


def test_a_handshake_never_finished_is_closed_after_the_header_timeout(tls_relay) -> None:
    _, plain, tls = tls_relay(header_timeout=0.5)
    with connect(tls) as sock:
        sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
        started = time.monotonic()
        assert read_all(sock) == b""
        assert 0.4 < time.monotonic() - started < 5
    wait_until(lambda: metric(plain, "relay_http_connections") == 1, what="its slot freed")


def test_a_request_head_after_the_handshake_has_the_rest_of_the_header_timeout(
        tls_relay, certificate) -> None:
    _, _, tls = tls_relay(header_timeout=0.5)
    raw = socket.create_connection(("127.0.0.1", tls), timeout=10)
    with client(certificate[0]).wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the head never ends
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert time.monotonic() - started < 5


def test_links_use_https_for_the_host_of_the_configured_certificate(
        tls_relay, upstream: UpstreamServer) -> None:
    relay, plain, tls = tls_relay()
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@shop.example", "b@example.org", "hi"
    msg.set_content('<a href="https://shop.example/x">x</a>', subtype="html")
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as smtp:
        smtp.send_message(msg)
    body = upstream.received[-1].data.replace(b"=\r\n", b"").decode()
    assert re.search(rf'href=3D"https://localhost:{tls}/c/', body), body
    assert f"http://localhost:{plain}" not in body
