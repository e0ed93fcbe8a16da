"""The dashboard's pages on a large store: each page fetched over HTTP from the running relay
(signed in, as a browser would), beside the API's ``/api/v1/stats`` for the same window (the
reference: the same daily counters, answered as JSON), timed in the same run.

    /work/venv/bin/python bench/dashboard_bench.py [--events 10000000] [--db PATH] [--repeat 20]

The store is filled as bench/stats_bench.py fills it (a reused --db skips the fill; that
benchmark's default store is this one's). Target (issue 19): every page under 200 ms at 10
million events, since the pages read the daily counters and never scan events.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stats_bench import DAYS, fill  # noqa: E402
from relay import config as config_module  # noqa: E402
from relay.admin import apikeys  # noqa: E402
from relay.app import http_port, running  # noqa: E402
from relay.smtp.passwords import hash_password  # noqa: E402
from relay.stats import breakdown, rollup  # noqa: E402
from relay.store import engine as store  # noqa: E402
from relay.store import users  # noqa: E402
from relay.store.transaction import transaction  # noqa: E402

PASSWORD = "bench password"


def serve(db: Path, ready: threading.Event, stop: threading.Event, port: list[int]) -> None:
    config = config_module.parse({
        "smtp": {"listen": "127.0.0.1:0", "hostname": "relay.bench"},
        "http": {"listen": "127.0.0.1:0", "public_url": "http://track.bench"},
        "store": {"url": f"sqlite:///{db}"},
        "tracking": {"keys": {"k1": "k" * 32}, "current_key": "k1"},
    }, "bench.toml", db.parent)

    async def main() -> None:
        async with running(config, smtp=False, http=True) as services:
            assert services.http is not None
            port.append(http_port(services.http))
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.1)

    asyncio.run(main())


def timed(label: str, get, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        answer = get()
        times.append((time.perf_counter() - began) * 1000)
        assert answer.status_code == 200, (label, answer.status_code, answer.text[:300])
    times.sort()
    median = statistics.median(times)
    print(f"{label:<44} median {median:7.1f} ms  p95 {times[int(0.95 * (len(times) - 1))]:7.1f}"
          f" ms  max {times[-1]:7.1f} ms")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--db", type=Path, default=Path("/tmp/relay-stats-bench.db"))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    conn = store.connect(args.db)
    fresh = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    store.migrate(conn)
    if fresh:
        print(f"filling {args.db} with {args.events:,} events over {DAYS} days")
        fill(conn, args.events, time.time())
        rollup.rebuild(conn)
        breakdown.rebuild(conn)
    with transaction(conn):
        users.set_user(conn, "bench", hash_password(PASSWORD), time.time())
    key = apikeys.create(conn, f"bench{time.time_ns()}")
    events, newest = conn.execute("SELECT (SELECT count(*) FROM events), "
                                  "(SELECT max(email_id) FROM messages)").fetchone()
    print(f"store: {events:,} events, {args.db.stat().st_size / 1e9:.2f} GB")
    ready, stop, port = threading.Event(), threading.Event(), []
    server = threading.Thread(target=serve, args=(args.db, ready, stop, port), daemon=True)
    server.start()
    assert ready.wait(120), "the relay did not start"
    base = f"http://127.0.0.1:{port[0]}"
    browser = requests.Session()
    form = browser.get(f"{base}/ui/login", timeout=30).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    signed = browser.post(f"{base}/ui/login", data={"name": "bench", "password": PASSWORD,
                                                    "csrf": csrf}, allow_redirects=False)
    assert signed.status_code == 303, signed.text[:300]
    try:
        reference = timed("reference: GET /api/v1/stats (30 days, JSON)", lambda: requests.get(
            f"{base}/api/v1/stats", headers={"Authorization": f"Bearer {key}"}, timeout=30),
            args.repeat)
        pages = [("/ui/overview", "overview, 30 days"),
                 ("/ui/overview?tag=tag3", "overview, tag filter"),
                 ("/ui/overview?campaign=c1&sender_domain=shop1.example",
                  "overview, campaign and domain"),
                 ("/ui/links", "links"), ("/ui/links?tag=tag3", "links, tag filter"),
                 ("/ui/links?campaign=c1&sender_domain=shop1.example",
                  "links, campaign and domain"),
                 ("/ui/audience", "where and how (device, client, OS, country)"),
                 ("/ui/messages", "messages, newest 50"),
                 ("/ui/messages?recipient=r1%40hotmail.com", "messages by recipient"),
                 (f"/ui/messages/{newest}", "one message with its events"),
                 ("/ui/operations", "operations")]
        slowest = max(timed(f"{label}", lambda p=path: browser.get(base + p, timeout=30,
                                                          allow_redirects=False),
                            args.repeat) for path, label in pages)
        print(f"slowest page median {slowest:.1f} ms (target < 200 ms), reference "
              f"{reference:.1f} ms")
    finally:
        stop.set()
        server.join(30)


if __name__ == "__main__":
    main()
