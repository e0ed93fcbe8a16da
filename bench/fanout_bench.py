"""Fan-out benchmark: one large tracked message to many recipients through a real relay.

Run: /work/venv/bin/python bench/fanout_bench.py [--recipients 100] [--links 100000]
         [--size-mb 4.6] [--dkim] [--json]
(with the project on PYTHONPATH: the relay runs as ``python -m relay serve`` in a subprocess).

The message is multipart/alternative with a quoted-printable HTML part of ``--size-mb`` MB
holding ``--links`` links, opens and clicks on by header; the relay forwards one copy per
recipient to a sink (a minimal SMTP server in another process that hashes and drops what it
gets). Meanwhile a client polls the relay's ``/healthz`` every 10 ms on one keep-alive
connection: the longest request is how long the relay's event loop stalled at worst.

Printed per phase (idle, one recipient, all recipients): the time, the CPU time the relay used
(all its threads) and the machine's load average (with the CPU time, they tell how much of the
wall time the relay could run at all), the longest and the 99th percentile ``/healthz``
request, the relay's resident memory after the phase and its peak so far (``VmHWM`` from
/proc), and what the sink received. The idle and one-recipient phases are the reference for
the fan-out, measured in the same run. ``--json`` prints one JSON object instead (for
tests/e2e/test_fanout.py). The machine is shared: compare figures within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import contextlib
import hashlib
import http.client
import json
import os
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_message(links: int, size: int, message_id: str) -> bytes:
    """A newsletter-like message: ``links`` links in about ``size`` bytes of HTML, QP-encoded."""
    rows = [f'<a href="https://shop.example/{i:x}">{i:x}</a>\n' for i in range(links)]
    # QP writes each "=" of href= as "=3D": two more bytes a row once encoded
    filler = max(0, size - sum(map(len, rows)) - 2 * links - 200) // max(1, links)
    pad = ("<p>" + "x" * (filler - 8) + "</p>\n") if filler > 8 else ""
    html = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"></head><body>\n"
            + "".join(row + pad for row in rows) + "</body></html>\n")
    body = binascii.b2a_qp(html.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
    return b"\r\n".join([
        b"From: Shop <news@shop.example>",
        b"To: undisclosed-recipients:;",
        b"Subject: fan-out benchmark",
        b"Message-ID: " + message_id.encode(),
        b"MIME-Version: 1.0",
        b"X-Anypost-Track-Opens: true",
        b"X-Anypost-Track-Clicks: true",
        b'Content-Type: multipart/alternative; boundary="b"',
        b"",
        b"--b",
        b"Content-Type: text/plain; charset=utf-8",
        b"",
        b"Plain text version.",
        b"--b",
        b"Content-Type: text/html; charset=utf-8",
        b"Content-Transfer-Encoding: quoted-printable",
        b"",
        body,
        b"--b--",
        b"",
    ])


# --- the sink: a minimal SMTP server that hashes each message and reports it on stdout ---

class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.data: hashlib._Hash | None = None
        self.size = 0
        self.tail = b""
        self.rcpts: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        if self.data is not None:
            return self._body(chunk)
        self.buffer += chunk
        while self.data is None and b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self._command(line)
        if self.data is not None and self.buffer:
            rest, self.buffer = self.buffer, b""
            self._body(rest)

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.transport.write(b"250-sink\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                                 b"250 SIZE 200000000\r\n")
        elif verb == b"MAIL":
            self.rcpts = []
            self.transport.write(b"250 OK\r\n")
        elif verb == b"RCPT":
            self.rcpts.append(line[8:].strip(b"<>").decode())
            self.transport.write(b"250 OK\r\n")
        elif verb == b"DATA":
            self.data, self.size, self.tail = hashlib.sha256(), 0, b"\r\n"
            self.transport.write(b"354 go\r\n")
        elif verb == b"QUIT":
            self.transport.write(b"221 bye\r\n")
            self.transport.close()
        else:
            self.transport.write(b"250 OK\r\n")

    def _body(self, chunk: bytes) -> None:
        assert self.data is not None
        joined = self.tail + chunk
        end = joined.find(b"\r\n.\r\n")
        if end < 0:
            self.data.update(chunk)
            self.size += len(chunk)
            self.tail = joined[-4:]
            return
        body_end = end + 2 - len(self.tail)  # offset of the terminator's "." in chunk
        if body_end > 0:
            self.data.update(chunk[:body_end])
        self.size += body_end
        report = {"rcpts": self.rcpts, "size": self.size, "sha256": self.data.hexdigest()}
        print(json.dumps(report), flush=True)
        self.data = None
        self.transport.write(b"250 OK sunk\r\n")
        rest = chunk[body_end + 3:]
        if rest:
            self.data_received(rest)


async def _run_sink() -> None:
    server = await asyncio.get_running_loop().create_server(_Sink, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


# --- the bench ---

class Poller(threading.Thread):
    """GET /healthz every 10 ms on one keep-alive connection; keeps each request's duration."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.times: list[float] = []
        self.running = True
        self.failures = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while self.running:
            start = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                conn.getresponse().read()
            except OSError:
                self.failures += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.times.append(time.perf_counter() - start)
            time.sleep(0.01)

    def take(self) -> list[float]:
        times, self.times = self.times, []
        return times


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"relay exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"relay not listening on {port}")


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(value.split()[0]) * 1024
    return values


def _dkim_settings(work: Path) -> str:
    key = work / "dkim.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(key)], check=True, capture_output=True)
    return f'[[dkim]]\ndomain = "shop.example"\nselector = "s1"\nprivate_key_file = "{key}"\n'


def _sign(raw: bytes, work: Path) -> bytes:
    """``raw`` with a DKIM-Signature of shop.example's key, so the relay re-signs each copy."""
    from relay.rewrite.dkim import DkimSigner

    return DkimSigner("shop.example", "s1", (work / "dkim.pem").read_bytes()).sign(raw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=100)
    parser.add_argument("--links", type=int, default=100_000)
    parser.add_argument("--size-mb", type=float, default=4.6)
    parser.add_argument("--dkim", action="store_true", help="signed message, re-signed per copy")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        asyncio.run(_run_sink())
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), args)
    if args.json:
        print(json.dumps(result))
    else:
        report(result)


def run(work: Path, args: argparse.Namespace) -> dict[str, object]:
    sink = subprocess.Popen([sys.executable, __file__, "--sink"], stdout=subprocess.PIPE)
    assert sink.stdout is not None
    sink_port = int(sink.stdout.readline())
    received: list[dict[str, object]] = []
    reader = threading.Thread(target=lambda: received.extend(
        json.loads(line) for line in sink.stdout), daemon=True)  # type: ignore[union-attr]
    reader.start()
    smtp_port, http_port = _free_port(), _free_port()
    (work / "relay.toml").write_text(f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
[upstream]
host = "127.0.0.1"
port = {sink_port}
tls = "none"
timeout = 120
[http]
listen = "127.0.0.1:{http_port}"
public_url = "https://track.shop.example"
[store]
url = "sqlite:///{work / 'relay.db'}"
[tracking]
current_key = "k1"
[tracking.keys]
k1 = "{'k' * 32}"
[logging]
level = "WARNING"
{_dkim_settings(work) if args.dkim else ''}""")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    relay = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config",
                              str(work / "relay.toml")], env=env, stderr=subprocess.PIPE)
    poller = Poller(http_port)
    try:
        _wait_port(smtp_port, relay)
        _wait_port(http_port, relay)
        poller.start()
        size = int(args.size_mb * 1024 * 1024)
        recipients = [f"reader{i}@example.org" for i in range(args.recipients)]
        phases = [("idle", []), ("1 recipient", recipients[:1]),
                  (f"{len(recipients)} recipients", recipients)]
        result: dict[str, object] = {"links": args.links, "recipients": len(recipients),
                                     "dkim": args.dkim, "phases": []}
        for n, (name, to) in enumerate(phases):
            raw = make_message(args.links, size, f"<fanout-{n}@shop.example>")
            if args.dkim:
                raw = _sign(raw, work)
            result["size"] = len(raw)
            poller.take()
            before = len(received)
            cpu = _cpu_seconds(relay.pid)
            start = time.perf_counter()
            reply = ""
            if to:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=600) as client:
                    client.ehlo()
                    client.docmd("MAIL FROM:<news@shop.example>")
                    for rcpt in to:
                        client.docmd(f"RCPT TO:<{rcpt}>")
                    try:
                        code, text = client.data(raw)
                    except smtplib.SMTPResponseException as exc:
                        code, text = exc.smtp_code, exc.smtp_error
                    reply = f"{code} {text.decode(errors='replace')}"
            else:
                time.sleep(2)
            elapsed = time.perf_counter() - start
            deadline = time.monotonic() + 30
            while len(received) < before + len(to) and time.monotonic() < deadline:
                time.sleep(0.05)
            times = sorted(poller.take())
            copies = received[before:]
            result["phases"].append({  # type: ignore[union-attr]
                "phase": name, "seconds": elapsed, "reply": reply[:200],
                "relay_cpu_seconds": _cpu_seconds(relay.pid) - cpu,
                "load_average": os.getloadavg()[0],
                "healthz_max_ms": times[-1] * 1000 if times else None,
                "healthz_p99_ms": times[int(len(times) * 0.99)] * 1000 if times else None,
                "healthz_requests": len(times),
                "copies": len(copies),
                "distinct_copies": len({c["sha256"] for c in copies}),
                "copy_mb": sum(c["size"] for c in copies) / max(1, len(copies)) / 2**20,
                **{k.lower(): v for k, v in _status(relay.pid).items()},
            })
        result["healthz_failures"] = poller.failures
        return result
    finally:
        poller.running = False
        relay.terminate()
        relay.wait(60)
        sink.terminate()
        sink.wait(10)


def report(result: dict[str, object]) -> None:
    print(f"message: {result['size'] / 2**20:.1f} MB, {result['links']:,} links, opens and "
          f"clicks on{', DKIM re-signed per copy' if result['dkim'] else ''}; relay: "
          f"python -m relay serve, upstream: a sink in another process; shared, loaded machine")
    print(f"{'phase':<16}{'seconds':>9}{'relay CPU s':>12}{'load':>6}{'healthz max ms':>16}"
          f"{'p99 ms':>8}{'RSS MB':>8}{'peak MB':>9}{'copies':>8}{'copy MB':>9}  reply")
    for p in result["phases"]:  # type: ignore[attr-defined]
        print(f"{p['phase']:<16}{p['seconds']:>9.1f}{p['relay_cpu_seconds']:>12.1f}"
              f"{p['load_average']:>6.1f}{p['healthz_max_ms']:>16.0f}"
              f"{p['healthz_p99_ms']:>8.0f}{p['vmrss'] / 2**20:>8.0f}{p['vmhwm'] / 2**20:>9.0f}"
              f"{p['copies']:>8}{p['copy_mb']:>9.1f}  {p['reply'][:60]}")
    if result["healthz_failures"]:
        print(f"/healthz requests that failed: {result['healthz_failures']}")


if __name__ == "__main__":
    main()
