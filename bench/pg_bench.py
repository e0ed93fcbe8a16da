"""The tracker's write path on SQLite beside PostgreSQL, and the PostgreSQL driver choice.

Run by hand (PostgreSQL on 127.0.0.1:5432 with trust authentication, as .ci/run starts it)::

    /work/venv/bin/python bench/pg_bench.py [--hits 20000] [--concurrency 200]

In this process, without HTTP: ``--concurrency`` tasks each record hits one after the other,
as the tracker's requests do, and every hit returns only after its event is committed.

1. The tracker's write path (relay/tracking/events.py Recorder.record, with the listeners
   ``relay http`` runs: daily counters, breakdown, webhook outbox) on the SQLite engine and on
   the PostgreSQL engine (relay/store/postgres.py: psycopg 3 in a writer thread), events/s.
2. The driver: the same events group-committed (one transaction per loop turn, one
   ``executemany`` of event rows and one of engagement upserts, no listeners) through psycopg 3
   in a writer thread (what relay/store/postgres.py does) and through asyncpg on the loop.

Each PostgreSQL run uses a database of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.app import running  # noqa: E402
from relay.config import parse  # noqa: E402
from relay.ids import new_email_id  # noqa: E402
from relay.store.engine import connect_url  # noqa: E402
from relay.store.postgres import PgStore  # noqa: E402
from relay.tracking.bots import CLICK  # noqa: E402
from relay.tracking.events import Hit  # noqa: E402
from relay.tracking.tracker import RECORDER, build_app  # noqa: E402

AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
SERVER = "postgresql://postgres@127.0.0.1:5432"
EVENT = ("INSERT INTO events (id, type, at, email_id, recipient, url, ip, user_agent, method, "
         "classification, counted, implied, first_for_recipient, first_for_link) "
         "VALUES (?, 'click', ?, ?, ?, ?, '10.1.2.3', ?, 'GET', 'human', 1, 0, 0, 0)")
ENGAGE = ("INSERT INTO engagement AS cur VALUES (?, ?, ?, 1, 1, ?) ON CONFLICT "
          "(email_id, recipient, target) DO UPDATE SET hits = cur.hits + 1, "
          "last_at = excluded.last_at")


def create_database() -> str:
    name = f"relay_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settings(url: str) -> dict[str, object]:
    return {"store": {"url": url}, "http": {"listen": "127.0.0.1:0"},
            "tracking": {"keys": {"b1": "b" * 32}, "current_key": "b1", "flood_hits": 0,
                         "scanner_window_seconds": 0},
            "logging": {"level": "WARNING"}}


def targets(messages: int, per_message: int) -> list[tuple[str, str, str]]:
    return [(email_id, f"reader{r}@example.net", f"https://shop.example/item/{r % 5}")
            for email_id in (new_email_id() for _ in range(messages))
            for r in range(per_message)]


def add_messages(url: str, found: list[tuple[str, str, str]]) -> None:
    from relay.config import store_settings

    conn = connect_url(store_settings(url, "bench", "url", Path.cwd()))
    sent = time.time() - 86400
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO messages (email_id, sender, sender_domain, track_opens, track_clicks, "
        "decision, size, created_at) VALUES (?, 'news@shop.example', 'shop.example', 1, 1, "
        "'bench', 0, ?)", sorted({(email_id, sent) for email_id, _, _ in found}))
    conn.execute("COMMIT")
    conn.close()


async def drive(record, found: list[tuple[str, str, str]], hits: int, concurrency: int
                ) -> float:
    """Events committed per second with ``concurrency`` tasks recording one hit at a time."""
    todo = iter(range(hits))

    async def worker() -> None:
        for i in todo:
            await record(found[i % len(found)])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return hits / (time.perf_counter() - started)


async def tracker_rate(url: str, found: list[tuple[str, str, str]], args: argparse.Namespace
                       ) -> float:
    config = parse(settings(url), "bench.toml", Path.cwd())
    async with running(config, smtp=False, http=False) as services:
        recorder = build_app(config, services.store, services.keyring,
                             listeners=services.event_listeners)[RECORDER]

        async def record(target: tuple[str, str, str]) -> None:
            email_id, recipient, link = target
            await recorder.record(Hit(CLICK, time.time(), email_id, recipient, link,
                                      "10.1.2.3", AGENT))

        return await drive(record, found, args.hits, args.concurrency)


def event_row(target: tuple[str, str, str]) -> tuple[object, ...]:
    email_id, recipient, link = target
    return (str(uuid.uuid4()), time.time(), email_id, recipient, link, AGENT)


async def psycopg_rate(url: str, found: list[tuple[str, str, str]], args: argparse.Namespace
                       ) -> float:
    """Group commit through relay/store/postgres.py (psycopg 3, writer thread)."""
    store = await PgStore.open(url)
    pending: list[tuple[object, ...]] = []
    batch: asyncio.Future[None] | None = None

    def write(rows: list[tuple[object, ...]], conn) -> None:
        conn.executemany(EVENT, rows)
        conn.executemany(ENGAGE, [(r[2], r[3], r[4], r[1]) for r in rows])

    def close_batch() -> None:
        nonlocal pending
        pending = []

    store.on_flush(close_batch)

    async def record(target: tuple[str, str, str]) -> None:
        nonlocal batch
        if not pending:
            batch = store.write(lambda conn, rows=pending: write(rows, conn))
        pending.append(event_row(target))
        assert batch is not None
        await asyncio.shield(batch)

    try:
        return await drive(record, found, args.hits, args.concurrency)
    finally:
        await store.close()


async def asyncpg_rate(url: str, found: list[tuple[str, str, str]], args: argparse.Namespace
                       ) -> float:
    """The same group commit with asyncpg on the loop: one connection, a transaction per
    batch, the batch that queues while one commits is the next one."""
    conn = await asyncpg.connect(url)
    event = EVENT.replace("?", "${}").format(*range(1, 7))
    engage = ENGAGE.replace("?", "${}").format(*range(1, 5))
    pending: list[tuple[object, ...]] = []
    waiting: list[asyncio.Future[None]] = []
    lock = asyncio.Lock()

    async def flush() -> None:
        nonlocal pending, waiting
        async with lock:
            rows, futures = pending, waiting
            pending, waiting = [], []
            if not rows:
                return
            try:
                async with conn.transaction(isolation="serializable"):
                    await conn.executemany(event, rows)
                    await conn.executemany(engage, [(r[2], r[3], r[4], r[1]) for r in rows])
            except Exception as exc:
                for future in futures:
                    future.set_exception(exc)
                return
            for future in futures:
                future.set_result(None)

    async def record(target: tuple[str, str, str]) -> None:
        future = asyncio.get_running_loop().create_future()
        if not pending:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(flush()))
        pending.append(event_row(target))
        waiting.append(future)
        await future

    try:
        return await drive(record, found, args.hits, args.concurrency)
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--messages", type=int, default=500)
    args = parser.parse_args()
    found = targets(args.messages, 10)
    print(f"{args.hits} hits, {args.concurrency} at a time, {len(found)} recipients x links; "
          f"every hit answered after its COMMIT")
    with tempfile.TemporaryDirectory(prefix="pg-bench-") as tmp:
        sqlite_url = f"sqlite:///{tmp}/relay.db"
        add_messages(sqlite_url, found)
        sqlite = asyncio.run(tracker_rate(sqlite_url, found, args))
    names = [create_database() for _ in range(3)]
    try:
        urls = [f"{SERVER}/{name}" for name in names]
        for url in urls:
            add_messages(url, found)
        postgres = asyncio.run(tracker_rate(urls[0], found, args))
        via_psycopg = asyncio.run(psycopg_rate(urls[1], found, args))
        via_asyncpg = asyncio.run(asyncpg_rate(urls[2], found, args))
    finally:
        for name in names:
            drop_database(name)
    print("1. the tracker's write path (Recorder.record with relay http's listeners)")
    print(f"  {'SQLite (WAL, group commit on the loop)':<48} {sqlite:9,.0f} events/s")
    print(f"  {'PostgreSQL (psycopg 3, writer thread)':<48} {postgres:9,.0f} events/s  "
          f"({postgres / sqlite:.0%} of SQLite)")
    print("2. the driver: bare event rows + engagement upserts, group-committed, SERIALIZABLE")
    print(f"  {'psycopg 3, sync, writer thread (relay/store)':<48} {via_psycopg:9,.0f} events/s")
    print(f"  {'asyncpg on the loop':<48} {via_asyncpg:9,.0f} events/s  "
          f"({via_asyncpg / via_psycopg:.0%} of psycopg)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
