"""HTTPS tracking links with certificates from ACME, against Pebble (tests/acmeserver.py):
issuance for the default host and a verified tracking domain, the certificate a real TLS
client gets per SNI, links switching to https while old http links keep working, a refused
order shown and retried, renewal on the manager's clock without dropping connections, and two
processes on one store ordering once."""

from __future__ import annotations

import http.client
import json
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from relay import config as config_module
from relay.certs.plan import DAY
from tests.acmeserver import PEBBLE, Pebble
from tests.dnsserver import DnsServer
from tests.harness import LoopThread, Relay, UpstreamServer, free_port, store_url, wait_until

pytestmark = pytest.mark.skipif(PEBBLE is None, reason="pebble is not installed (apt-get install "
                                                       "pebble)")

HOST = "track.relay.test"  # the host of http.public_url
BRANDED = "track.shop.test"  # a tracking domain of shop.test
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"


def order(loops: LoopThread, relay: Relay, host: str) -> dict[str, Any]:
    """One round of the manager now (after any round of its own in progress), then ``host``'s
    certificate as stored: a round the manager ran by itself in between may have ordered it."""
    assert relay.services.acme is not None
    loops.run(relay.services.acme.run_once(), timeout=120)
    found = certificate(relay, host)
    assert found is not None
    return found


class Clock:
    """The certificate manager's clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()  # plain http (Pebble checks HTTP-01 there), https


@pytest.fixture
def pebble(tmp_path: Path, dns_server: DnsServer, ports: tuple[int, int]) -> Iterator[Pebble]:
    server = Pebble(tmp_path / "pebble", ports[0], dns_server.address)
    yield server
    server.close()


def write_config(tmp_path: Path, ports: tuple[int, int], pebble: Pebble, dns: DnsServer,
                 upstream: UpstreamServer | None = None, **extra: dict[str, Any]) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "smtp": {"listen": "127.0.0.1:0", "hostname": "relay.test"},
        "http": {"listen": f"127.0.0.1:{ports[0]}", "public_url": f"http://{HOST}:{ports[0]}",
                 "tls_listen": f"127.0.0.1:{ports[1]}"},
        "acme": {"directory": pebble.directory, "email": "ops@relay.test",
                 "ca_bundle": str(pebble.ca_file)},
        "dns": {"nameservers": [dns.address], "recheck_interval": 0},
        "store": {"url": store_url(tmp_path)},
        "tracking": {"keys": {"k1": "k" * 32}, "current_key": "k1", "opens": True,
                     "clicks": True, "scanner_window_seconds": 0},
        "upstream": ({"host": "127.0.0.1", "port": upstream.port, "tls": "none"}
                     if upstream else {"capture_dir": str(tmp_path / "outbox")}),
    }
    for table, values in extra.items():
        tables.setdefault(table, {}).update(values)
    path = tmp_path / "relay.toml"
    path.write_text("".join(f"[{table}]\n" + "".join(f"{k} = {_toml(v)}\n"
                                                    for k, v in values.items())
                            for table, values in tables.items()))
    return path


def _toml(value: Any) -> str:
    """A value in TOML: JSON's spelling, but for tables."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def client_context(pebble: Pebble) -> ssl.SSLContext:
    """A client that trusts only the root of the certificates this Pebble issues."""
    return ssl.create_default_context(cadata=pebble.root_pem())


class Https(http.client.HTTPSConnection):
    """HTTPS to the relay's TLS port on loopback, naming ``name`` in SNI (and Host)."""

    def __init__(self, name: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(name, port, context=context, timeout=10)

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        """The DNS names of the certificate the server presented."""
        return [v for k, v in self.sock.getpeercert()["subjectAltName"] if k == "DNS"]

    def serial(self) -> str:
        return self.sock.getpeercert()["serialNumber"]


def get(conn: http.client.HTTPConnection, url: str) -> http.client.HTTPResponse:
    path = re.sub(r"^https?://[^/]+", "", url)
    conn.request("GET", path, headers={"User-Agent": BROWSER})
    response = conn.getresponse()
    response.read()
    return response


def send(relay: Relay, sender: str) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, "you@example.org", "sale"
    msg["Message-ID"] = make_msgid()  # each its own message, not a retry of the one before
    msg.set_content('<html><body><a href="https://shop.example/sale">Sale</a></body></html>',
                    subtype="html")
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
        client.send_message(msg)


def links(upstream: UpstreamServer) -> tuple[str, str]:
    """The click link and the pixel of the latest delivered copy."""
    body = upstream.received[-1].data.replace(b"=\r\n", b"").replace(b"=3D", b"=").decode()
    click = re.search(r'href="(https?://[^"]+/c/[^"]+)"', body)
    pixel = re.search(r'src="(https?://[^"]+/o/[^"]+)"', body)
    assert click and pixel, body
    return click.group(1), pixel.group(1)


def certificate(relay: Relay, host: str) -> dict[str, Any] | None:
    with relay.db() as conn:
        row = conn.execute("SELECT * FROM certificates WHERE host = ?", (host,)).fetchone()
    return dict(row) if row else None


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)



def test_certificates_per_sni_https_links_and_old_http_links(
        tmp_path, loops: LoopThread, upstream, dns_server, pebble, ports):
    # the host does not resolve yet: Pebble refuses the first order
    config_file = write_config(tmp_path, ports, pebble, dns_server, upstream)
    relay = Relay(loops, config_module.load(config_file), http=True)
    try:
        manager = relay.services.acme
        assert manager is not None
        failed = wait_until(lambda: (c := certificate(relay, HOST)) and c["state"] == "failed"
                            and c, timeout=60, what="the first order to fail")
        assert "could not resolve" in failed["reason"], failed
        clock = Clock(failed["updated_at"])
        manager.clock = clock
        listed = json.loads(cli(config_file, "domains", "list", "--json").stdout)
        assert listed["default_host"]["certificate"]["state"] == "failed"
        assert listed["default_host"]["certificate"]["reason"] == failed["reason"]

        send(relay, "news@other.test")  # no certificate: http links
        old_click, old_pixel = links(upstream)
        assert old_click.startswith(f"http://{HOST}:{ports[0]}/c/")

        # the retry waits for its backoff, on the manager's clock
        dns_server.a(HOST, "127.0.0.1")
        assert loops.run(manager.run_once(), timeout=120) == []
        clock.now = failed["next_try"]
        issued = order(loops, relay, HOST)
        assert issued["state"] == "valid" and issued["reason"] is None
        assert issued["not_after"] > clock.now + 30 * DAY

        send(relay, "news@other.test")
        click, pixel = links(upstream)
        assert click.startswith(f"https://{HOST}:{ports[1]}/c/")
        context = client_context(pebble)
        tls = Https(HOST, ports[1], context)
        answer = get(tls, click)
        assert (answer.status, answer.headers["Location"]) == (302, "https://shop.example/sale")
        assert tls.names() == [HOST]
        assert get(tls, pixel).status == 200
        assert tls.sock.version() in ("TLSv1.2", "TLSv1.3")

        # links sent with http keep working over http
        plain = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=10)
        assert get(plain, old_click).status == 302
        assert get(plain, old_pixel).status == 200

        # a tracking domain gets its own certificate once verified
        dns_server.cname(BRANDED, HOST)
        assert cli(config_file, "domains", "add", BRANDED).returncode == 0
        assert cli(config_file, "domains", "verify", BRANDED).returncode == 0
        assert order(loops, relay, BRANDED)["state"] == "valid"
        send(relay, "news@shop.test")
        click, _ = links(upstream)
        assert click.startswith(f"https://{BRANDED}:{ports[1]}/c/")
        branded = Https(BRANDED, ports[1], context)
        assert get(branded, click).status == 302
        assert branded.names() == [BRANDED]
        again = Https(HOST, ports[1], context)  # each name its own certificate
        assert get(again, "/healthz").status == 200 and again.names() == [HOST]
        unknown = ssl.create_default_context(cadata=pebble.root_pem())
        unknown.check_hostname = False
        odd = Https("unknown.test", ports[1], unknown)  # a name without one: the default host's
        assert get(odd, "/healthz").status == 200 and odd.names() == [HOST]

        [shown] = json.loads(cli(config_file, "domains", "list", "--json").stdout)["domains"]
        assert shown["certificate"]["state"] == "valid"
        assert shown["certificate"]["expires_at"] == certificate(relay, BRANDED)["not_after"]
        assert "valid, expires" in cli(config_file, "domains", "list").stdout
        key = cli(config_file, "api-keys", "create", "ops").stdout.strip()
        api = urllib.request.Request(f"http://127.0.0.1:{ports[0]}/api/v1/tracking-domains",
                                     headers={"Authorization": f"Bearer {key}"})
        [listed] = json.loads(urllib.request.urlopen(api).read())["domains"]
        assert listed["certificate"] == shown["certificate"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics").read().decode()
        assert re.search(rf'relay_certificate_days_left{{host="{BRANDED}"}} \d+', metrics)
    finally:
        relay.close()


def test_renewal_replaces_the_certificate_without_dropping_connections(
        tmp_path, loops: LoopThread, dns_server, pebble, ports):
    dns_server.a(HOST, "127.0.0.1")
    relay = Relay(loops, config_module.load(write_config(tmp_path, ports, pebble, dns_server)),
                  http=True)
    try:
        manager = relay.services.acme
        assert manager is not None
        # stored first, then loaded by the manager's refresh: a handshake in between is refused
        first = wait_until(lambda: (c := certificate(relay, HOST)) and c["state"] == "valid"
                           and manager.certs.has(HOST) and c,
                           timeout=60, what="the certificate, loaded")
        context = client_context(pebble)
        before = Https(HOST, ports[1], context)
        assert get(before, "/healthz").status == 200
        old_serial = before.serial()

        clock = Clock(first["not_after"] - 31 * DAY)
        manager.clock = clock
        assert loops.run(manager.run_once(), timeout=120) == []  # not due yet
        clock.now = first["not_after"] - 29 * DAY
        assert order(loops, relay, HOST)["cert_pem"] != first["cert_pem"]

        assert get(before, "/healthz").status == 200  # the open connection goes on
        assert before.serial() == old_serial
        after = Https(HOST, ports[1], context)
        assert get(after, "/healthz").status == 200
        assert after.serial() != old_serial and after.names() == [HOST]
    finally:
        relay.close()


def test_two_processes_on_one_store_order_one_certificate(tmp_path, dns_server, pebble, ports):
    dns_server.a(HOST, "127.0.0.1")
    config = write_config(tmp_path, ports, pebble, dns_server, http={"workers": 2})
    log = tmp_path / "relay.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "relay", "http", "--config",
                                    str(config)], stdout=output, stderr=subprocess.STDOUT)
    try:
        context = client_context(pebble)

        def served() -> bool:
            try:
                conn = Https(HOST, ports[1], context)
                return get(conn, "/healthz").status == 200 and conn.names() == [HOST]
            except OSError:
                return False

        wait_until(served, timeout=60, what="https with the issued certificate")
        # every process serves it (SO_REUSEPORT spreads new connections over both): the one
        # that did not order loads it from the store within its 5 s tick
        wait_until(lambda: all(served() for _ in range(10)), timeout=30,
                   what="both processes serving the certificate")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    text = log.read_text()
    assert text.count(f"certificate for {HOST} issued") == 1, text
    assert len(re.findall(r"Issued certificate serial", pebble.log.read_text())) == 1


def test_smtp_starttls_uses_the_acme_certificate_and_takes_its_renewal(
        tmp_path, loops: LoopThread, dns_server, pebble, ports):
    mail_host = "mail.relay.test"
    dns_server.a(HOST, "127.0.0.1")  # the mail host does not resolve yet: its order fails
    config = write_config(tmp_path, ports, pebble, dns_server,
                          smtp={"hostname": mail_host, "tls_acme": True})
    relay = Relay(loops, config_module.load(config), http=True)
    try:
        manager = relay.services.acme
        assert manager is not None
        failed = wait_until(lambda: (c := certificate(relay, mail_host)) and c["state"] == "failed"
                            and c, timeout=60, what="the mail host's order to fail")
        clock = Clock(failed["updated_at"])
        manager.clock = clock
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("starttls")  # no certificate: not offered

        dns_server.a(mail_host, "127.0.0.1")
        clock.now = failed["next_try"]
        assert order(loops, relay, mail_host)["state"] == "valid"
        context = client_context(pebble)

        def starttls() -> tuple[list[str], str]:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port) as smtp:
                smtp._host = mail_host  # the name the certificate is checked against
                smtp.starttls(context=context)
                cert = smtp.sock.getpeercert()
                smtp.noop()
                return [v for k, v in cert["subjectAltName"]], cert["serialNumber"]

        names, serial = starttls()
        assert names == [mail_host]
        first = certificate(relay, mail_host)
        clock.now = first["not_after"] - 29 * DAY
        assert order(loops, relay, mail_host)["cert_pem"] != first["cert_pem"]
        renewed_names, renewed = starttls()  # no restart
        assert renewed_names == [mail_host] and renewed != serial
    finally:
        relay.close()
