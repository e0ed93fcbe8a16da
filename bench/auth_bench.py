"""AUTH floods: does scrypt leave the event loop alone, and how fast does /healthz answer
while 16 clients try passwords?

Run by hand::

    /work/venv/bin/python bench/auth_bench.py [--clients 16] [--samples 200]

1. scrypt (the relay's parameters) in threads: hashes a second with one thread and two, and
   how fast a pure-Python loop runs in the main thread alone and beside two hashing threads
   (near 100%: hashlib.scrypt releases the GIL).
2. ``relay serve`` in a subprocess with one AUTH user: /healthz latency (median, 99th
   percentile, max) with no load (the reference), then during a flood of wrong passwords
   (one AUTH PLAIN per connection, as a password guesser does), with the logins per second
   the relay answered.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.smtp.passwords import hash_password  # noqa: E402


def scrypt_once() -> None:
    hashlib.scrypt(b"guess", salt=b"s" * 16, n=2**14, r=8, p=1, maxmem=32 << 20, dklen=32)


def hashes_per_second(threads: int, seconds: float = 2.0) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    def work() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            scrypt_once()
            done += 1

    with ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):
            pool.submit(work)
    return done / seconds


def python_loop_rate(seconds: float = 1.0) -> float:
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        count += 1
    return count / seconds


def gil() -> None:
    one, two = hashes_per_second(1), hashes_per_second(2)
    print(f"scrypt: {one:.1f} hashes/s with 1 thread, {two:.1f} with 2 ({two / one:.2f}x)")
    alone = python_loop_rate()
    stop = threading.Event()

    def hash_until_stopped() -> None:
        while not stop.is_set():
            scrypt_once()

    hashers = [threading.Thread(target=hash_until_stopped) for _ in range(2)]
    for thread in hashers:
        thread.start()
    beside = python_loop_rate()
    stop.set()
    for thread in hashers:
        thread.join()
    print(f"main-thread Python loop beside 2 hashing threads: {beside / alone:.0%} of its "
          f"speed alone")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthz(port: int, samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as r:
            r.read()
        times.append(time.perf_counter() - started)
        time.sleep(0.01)  # pacing the samples
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"median {statistics.median(ordered) * 1000:6.1f} ms, p99 {p99 * 1000:6.1f} ms, "
            f"max {ordered[-1] * 1000:6.1f} ms")


def flood_bench(clients: int, samples: int) -> None:
    smtp_port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "relay.toml"
        config.write_text(f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
allowed_networks = []
auth_require_tls = false
auth_max_failures = 1000000
auth_failure_delay = 0
[[smtp.users]]
name = "app"
password_hash = "{hash_password('s3cret')}"
[upstream]
capture_dir = "outbox"
[http]
listen = "127.0.0.1:{http_port}"
[store]
url = "sqlite:///relay.db"
[logging]
level = "WARNING"
""")
        process = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config",
                                    str(config)], cwd=ROOT)
        try:
            for _ in range(400):
                try:
                    with socket.create_connection(("127.0.0.1", http_port), timeout=1):
                        break
                except OSError:
                    time.sleep(0.05)  # waiting for the port
            print(f"/healthz, no load (reference):   {summary(healthz(http_port, samples))}")
            flooding = True
            tries = 0

            def flood() -> None:
                nonlocal tries
                blob = base64.b64encode(b"\0app\0wrong").decode()
                while flooding:
                    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as client:
                        client.ehlo()
                        client.docmd("AUTH", f"PLAIN {blob}")
                    tries += 1

            with ThreadPoolExecutor(clients) as pool:
                for _ in range(clients):
                    pool.submit(flood)
                time.sleep(1)  # the flood gets going
                started, before = time.perf_counter(), tries
                times = healthz(http_port, samples)
                rate = (tries - before) / (time.perf_counter() - started)
                flooding = False
            print(f"/healthz, {clients} clients flooding AUTH: {summary(times)} "
                  f"({rate:.0f} failed logins/s answered)")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    print("(a shared, loaded machine: compare the lines of one run with each other)")
    gil()
    flood_bench(args.clients, args.samples)


if __name__ == "__main__":
    main()
