"""Statistics at scale: a store with 10 million events over 30 days, GetTrackList for a week
and the native per-day statistics for a month, timed while events keep being written.

    /work/venv/bin/python bench/stats_bench.py [--events 10000000] [--db /tmp/stats.db]
        [--url postgresql://postgres@127.0.0.1:5432/stats]

The fill is SQL (recursive CTEs, one transaction per table), then relay.stats.rollup.rebuild
computes the daily counters from the raw tables. A reused --db skips the fill. During the
timing a writer thread records hits through relay.tracking.events.Recorder with the rollup listener,
in group-commit sized transactions, as the tracker does; the reads run on their own
connection, as the API's reader does, through the same SQL and answer shaping as the API.

With ``--url`` the same is timed on that PostgreSQL database too, beside SQLite: an empty one is
first filled by copying the SQLite store into it as ``relay store copy`` does
(relay/store/copy.py, one transaction), and the copy is timed.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from relay.config import StoreSettings
from relay.stats import queries, rollup
from relay.stats.maths import parse_track_list, track_list_body
from relay.store import copy
from relay.store import engine as store
from relay.tracking.bots import CLICK, OPEN, Classifier
from relay.tracking.events import Hit, Recorder

DAYS = 30
SENDERS = 20
TAGS = 10
CAMPAIGNS = 5
DOMAINS = ("gmail.com", "hotmail.com", "yahoo.com", "icloud.com", "example.org",
           "googlemail.com", "outlook.com", "me.com", "live.com", "example.net")
EVENTS_PER_MESSAGE = 5  # two recipients each
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0"


def fill(conn, events: int, end: float) -> None:
    messages = events // EVENTS_PER_MESSAGE
    start = end - DAYS * 86400
    step = DAYS * 86400 / messages
    domains = ",".join(f"('{d}')" for d in DOMAINS)
    script = (
        f"""INSERT INTO messages (email_id, message_id, sender, sender_domain, subject, tag_name,
                                  tags, campaign, topic, track_opens, track_clicks, decision,
                                  size, created_at)
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {messages - 1})
        SELECT printf('email_%012d', i), printf('<%d@bench>', i),
               printf('sender%d@shop%d.example', i % {SENDERS}, i % {SENDERS} % 4),
               printf('shop%d.example', i % {SENDERS} % 4), 'Bench',
               CASE WHEN i % 3 THEN printf('tag%d', i % {TAGS}) END,
               CASE WHEN i % 2 THEN '["sale"]' ELSE '[]' END,
               printf('c%d', i % {CAMPAIGNS}), NULL, 1, 1, 'bench', 1000,
               {start} + i * {step} FROM n""",
        "CREATE TEMP TABLE d(k INTEGER PRIMARY KEY, name TEXT)",
        f"INSERT INTO d(name) VALUES {domains}",
        f"""INSERT INTO recipients
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n
                                WHERE i < {2 * messages - 1})
        SELECT printf('email_%012d', i / 2), printf('r%d@', i) || d.name,
               CASE WHEN i % 50 THEN 'sent' ELSE 'failed' END, '250', {start} + i / 2 * {step}
        FROM n JOIN d ON d.k = i % {len(DOMAINS)} + 1""",
        f"""INSERT INTO events (id, type, at, email_id, recipient, url, ip, user_agent, method,
                            classification, bot_source, reason, counted, implied,
                            first_for_recipient, first_for_link)
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {events - 1}),
        e AS (SELECT i, i / {EVENTS_PER_MESSAGE} AS m, (i / {EVENTS_PER_MESSAGE}) * 2 + i % 2 AS r,
                     i % {EVENTS_PER_MESSAGE} AS kind, {start} + i * {step / EVENTS_PER_MESSAGE}
                     + 3600 AS at FROM n)
        SELECT printf('evt_%08x-%04x-7000-8000-%012x', CAST(at * 1000 AS INTEGER) >> 16,
                      CAST(at * 1000 AS INTEGER) & 65535, i),
               CASE WHEN kind < 3 THEN 'open' ELSE 'click' END, at, printf('email_%012d', m),
               printf('r%d@', r) || d.name,
               CASE WHEN kind < 3 THEN NULL ELSE printf('https://shop.example/p%d', i % 40) END,
               '198.51.100.7', 'bench', 'GET',
               CASE WHEN i % 10 = 9 THEN 'scanner' ELSE 'person' END, NULL, NULL,
               i % 10 != 9, 0, kind < 2 AND i % 10 != 9, kind = 3
        FROM e JOIN d ON d.k = e.r % {len(DOMAINS)} + 1""",
        "DROP TABLE temp.d",
    )
    for sql in script:
        began = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute(sql)
        conn.execute("COMMIT")
        print(f"  {' '.join(sql.split()[:3])}: {time.perf_counter() - began:.1f} s")


class Writer(threading.Thread):
    """Records hits on the last day's messages until stopped, 100 hits per transaction."""

    def __init__(self, conn, newest: int) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.recorder = Recorder(None, Classifier(scanner_window_seconds=0),  # type: ignore
                                 listeners=[rollup.Rollup()])
        self.newest = newest
        self.stop = threading.Event()
        self.hits = 0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            batch = []
            for _ in range(100):
                n += 1
                m = self.newest - n % 5000
                kind = OPEN if n % 3 else CLICK
                batch.append(Hit(kind, time.time(), f"email_{m:012d}", f"r{2 * m}@gmail.com",
                                 None if kind == OPEN else "https://shop.example/p1",
                                 "198.51.100.7", BROWSER))
            self.conn.execute("BEGIN IMMEDIATE")
            self.recorder.write(self.conn, batch)
            self.conn.execute("COMMIT")
            self.hits += len(batch)


def timed(label: str, run, repeat: int) -> None:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    print(f"{label}: median {statistics.median(times):.1f} ms, "
          f"p95 {times[int(0.95 * (len(times) - 1))]:.1f} ms, max {times[-1]:.1f} ms")


def measure(engine: str, reader, writer_conn, newest: int, repeat: int) -> None:
    """The statistics queries on ``reader`` while ``writer_conn`` records hits."""
    today = datetime.now(UTC).date()

    def run(query: queries.Query) -> list:
        return reader.execute(query.sql, query.params).fetchall()

    week = parse_track_list({"StartTime": (today - timedelta(days=6)).isoformat(),
                             "EndTime": today.isoformat()}, today)
    filtered = parse_track_list({"StartTime": (today - timedelta(days=6)).isoformat(),
                                 "EndTime": today.isoformat(), "AccountName":
                                 "sender3@shop3.example", "TagName": "tag3",
                                 "Esp": "gmail.com"}, today)
    month = queries.parse_stats({"since": (today - timedelta(days=29)).isoformat(),
                                 "until": today.isoformat()}, today)
    writer = Writer(writer_conn, newest)
    writer.start()
    began = time.perf_counter()
    print(f"{engine}:")
    timed("GetTrackList, one week, all senders",
          lambda: track_list_body(week, queries.counts_by_day(
              run(queries.track_list_query(week)))), repeat)
    timed("GetTrackList, one week, AccountName+TagName+Esp",
          lambda: track_list_body(filtered, queries.counts_by_day(
              run(queries.track_list_query(filtered)))), repeat)
    timed("native stats per day, one month",
          lambda: queries.stats_body(month, run(queries.stats_query(month))), repeat)
    timed("native stats per tag, one month",
          lambda: queries.stats_body(month, run(queries.stats_query(
              queries.parse_stats({"group_by": "tag"}, today)))), repeat)
    writer.stop.set()
    writer.join()
    elapsed = time.perf_counter() - began
    print(f"meanwhile the writer recorded {writer.hits:,} hits "
          f"({writer.hits / elapsed:,.0f}/s, rollup listener on)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--db", type=Path, default=Path("/tmp/relay-stats-bench.db"))
    parser.add_argument("--url", help="a PostgreSQL database to time beside SQLite (filled by "
                                      "copying the SQLite store when empty)")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    now = time.time()
    fresh = not args.db.exists()
    conn = store.connect(args.db)
    store.migrate(conn)
    if fresh:
        print(f"filling {args.db} with {args.events:,} events over {DAYS} days")
        fill(conn, args.events, now)
        began = time.perf_counter()
        rollup.rebuild(conn)
        print(f"  rollup rebuild: {time.perf_counter() - began:.1f} s")
    counts = conn.execute("SELECT (SELECT count(*) FROM events), "
                          "(SELECT count(*) FROM stats_daily)").fetchone()
    print(f"store: {counts[0]:,} events, {counts[1]:,} daily counter rows, "
          f"{args.db.stat().st_size / 1e9:.2f} GB")
    newest = conn.execute("SELECT count(*) FROM messages").fetchone()[0] - 1
    target = None
    if args.url:
        target = store.connect_url(StoreSettings(None, args.url))
        if not copy.not_empty(target):
            print("copying the SQLite store into PostgreSQL (relay store copy)")
            began = time.perf_counter()
            copied = copy.copy(conn, target)
            print(f"  {sum(copied.values()):,} rows in {time.perf_counter() - began:.0f} s")
            target.execute("VACUUM ANALYZE")
    measure("SQLite", store.connect(args.db), store.connect(args.db), newest, args.repeat)
    if args.url:
        measure("PostgreSQL", store.connect_url(StoreSettings(None, args.url)), target, newest,
                args.repeat)


if __name__ == "__main__":
    main()
