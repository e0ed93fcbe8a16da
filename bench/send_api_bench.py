"""Send API throughput beside SMTP's, same run, same relay, same message: ``POST /v1/email``
(JSON in, the relay composes the MIME message) against SMTP (the message composed by the same
composer, sent as is), both with opens and clicks on, to ``smtp-sink``.

Run: /work/venv/bin/python bench/send_api_bench.py [--messages N] [--concurrency C]

The relay runs as ``relay serve`` (one process, proxy mode: an answer comes after the upstream
took the copy); the clients in this process keep ``C`` connections busy (aiosmtplib for SMTP,
one aiohttp session for HTTP, the JSON the ``anypost`` SDK sends). The message is the HTML part
of ../shared/bench/newsletter.eml (10 links) with a text part, one recipient. Rounds alternate
SMTP and API; best of each. The machine is shared: compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.headerregistry import Address
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from relay.rewrite.compose import Draft, compose  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def newsletter_html() -> str:
    message = message_from_bytes((SHARED / "bench" / "newsletter.eml").read_bytes(),
                                 policy=policy.default)
    return message.get_body(("html",)).get_content()  # type: ignore[union-attr]


def request_body(html: str, i: int) -> dict[str, Any]:
    return {"from": "Shop <news@shop.example>", "to": [f"reader{i}@example.org"],
            "subject": f"Special sale {i}", "text": "Our special sale starts today.",
            "html": html}


def smtp_message(html: str, i: int) -> bytes:
    draft = Draft(Address("Shop", "news", "shop.example"),
                  (Address("", f"reader{i}", "example.org"),), f"Special sale {i}",
                  text="Our special sale starts today.", html=html)
    return compose(draft, f"bench-{i}-{time.time_ns()}@shop.example", datetime.now(UTC))


async def smtp_round(port: int, messages: list[bytes], concurrency: int) -> float:
    queue = list(enumerate(messages))

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        while queue:
            i, message = queue.pop()
            await smtp.sendmail("news@shop.example", [f"reader{i}@example.org"], message)
        await smtp.quit()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(messages) / (time.perf_counter() - started)


async def api_round(url: str, key: str, bodies: list[dict[str, Any]], concurrency: int
                    ) -> float:
    queue = list(bodies)
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def client() -> None:
            while queue:
                async with session.post(url, json=queue.pop()) as response:
                    assert response.status == 202, await response.text()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - started)


def start_relay(work: Path, sink_port: int, smtp_port: int, http_port: int,
                concurrency: int) -> subprocess.Popen[bytes]:
    config = work / "relay.toml"
    config.write_text(f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "relay.bench"
[upstream]
host = "127.0.0.1"
port = {sink_port}
tls = "none"
pool_size = {concurrency}
[http]
listen = "127.0.0.1:{http_port}"
public_url = "https://track.shop.example"
[store]
url = "sqlite:///{work}/relay.db"
[logging]
level = "WARNING"
[[domains]]
name = "shop.example"
opens = true
clicks = true
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(work / "relay.log", "wb") as log:  # the child keeps its own copy of the file
        relay = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config",
                                  str(config)], env=env, stderr=log)
    if not listening(http_port):
        relay.kill()
        raise SystemExit(f"the relay did not start: {(work / 'relay.log').read_text()}")
    return relay


def listening(port: int, seconds: float = 30) -> bool:
    """Whether something listens on ``port`` within ``seconds`` (a subprocess starting)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)  # waiting for a subprocess to listen, not synchronising a test
    return False


def create_key(work: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "relay", "api-keys", "create", "bench",
                           "--config", str(work / "relay.toml")], capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.stdout.strip()


def tracked(work: Path) -> int:
    import sqlite3

    with sqlite3.connect(work / "relay.db") as db:
        return db.execute("SELECT count(*) FROM messages WHERE track_opens AND track_clicks"
                          ).fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(sink).exists():
        raise SystemExit("smtp-sink (Debian's postfix package) is needed: "
                         "see ../shared/bench/README.md")
    html = newsletter_html()
    sink_port, smtp_port, http_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        as_user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses root
        sink_process = subprocess.Popen([sink, *as_user, f"127.0.0.1:{sink_port}", "1000"])
        if not listening(sink_port):
            raise SystemExit("smtp-sink did not start")
        relay = start_relay(work, sink_port, smtp_port, http_port, args.concurrency)
        try:
            key = create_key(work)
            url = f"http://127.0.0.1:{http_port}/v1/email"
            best = {"smtp": 0.0, "api": 0.0}
            n = args.messages
            warm = min(100, n)
            asyncio.run(smtp_round(smtp_port, [smtp_message(html, i) for i in range(warm)],
                                   args.concurrency))
            asyncio.run(api_round(url, key, [request_body(html, i) for i in range(warm)],
                                  args.concurrency))
            for _ in range(args.rounds):
                messages = [smtp_message(html, i) for i in range(n)]
                best["smtp"] = max(best["smtp"], asyncio.run(
                    smtp_round(smtp_port, messages, args.concurrency)))
                bodies = [request_body(html, i) for i in range(n)]
                best["api"] = max(best["api"], asyncio.run(
                    api_round(url, key, bodies, args.concurrency)))
            count = tracked(work)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(60)
            sink_process.kill()
            sink_process.wait()
    total = 2 * (args.rounds * n + warm)
    print(f"{n} messages per round, {args.concurrency} at a time, best of {args.rounds} rounds,"
          f" one relay process, opens and clicks on ({count} of {total} messages tracked)")
    print(f"{'SMTP (reference)':22s}{best['smtp']:8.0f} msg/s")
    print(f"{'POST /v1/email':22s}{best['api']:8.0f} msg/s")
    print(f"{'API / SMTP':22s}{best['api'] / best['smtp']:8.2f}x")


if __name__ == "__main__":
    main()
