"""Finding messages on a large store: one page (100) of ``GET /api/v1/messages`` per filter,
through the same SQL and answer shaping as the API, beside the same filter run with SQLite
told to use no index for it (``NOT INDEXED``: a walk of the table), measured in the same run.

    /work/venv/bin/python bench/messages_bench.py [--messages 1000000] [--db /tmp/m.db]

The fill is SQL (recursive CTEs): messages over 30 days with time-ordered email ids, two
recipients each (one in 50 failed, one in 10,000 unknown), 20 senders. A reused --db skips it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from relay.stats import queries
from relay.store import engine as store

DAYS = 30
SENDERS = 20


def fill(conn, messages: int, end: float) -> None:
    start_ms = int((end - DAYS * 86400) * 1000)
    step_ms = DAYS * 86400 * 1000 // messages
    for sql in (
        f"""INSERT INTO messages (email_id, message_id, sender, sender_domain, subject, tags,
                                  track_opens, track_clicks, decision, size, created_at)
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {messages - 1}),
        t(i, ms) AS (SELECT i, {start_ms} + i * {step_ms} FROM n)
        SELECT printf('email_%08x-%04x-7000-8000-%012x', ms >> 16, ms & 65535, i),
               printf('<%d@bench>', i), printf('sender%d@shop.example', i % {SENDERS}),
               'shop.example', 'Bench', '[]', 1, 1, 'bench', 1000, ms / 1000.0 FROM t""",
        """INSERT INTO recipients
        SELECT m.email_id, printf('r%d@example.org', (m.rowid * 2 + k) % 200000),
               CASE WHEN m.rowid % 10000 = 0 THEN 'unknown'
                    WHEN (m.rowid * 2 + k) % 50 = 0 THEN 'failed' ELSE 'sent' END,
               '250', m.created_at
        FROM messages m, (SELECT 0 AS k UNION ALL SELECT 1)""",
    ):
        began = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute(sql)
        conn.execute("COMMIT")
        print(f"  {' '.join(sql.split()[:3])}: {time.perf_counter() - began:.1f} s")


def page(conn, params: dict[str, str], *, indexed: bool = True) -> int:
    f = queries.parse_messages(params)
    query = queries.messages_query(f)
    sql = query.sql
    if not indexed:  # the reference: the table the filter starts from, walked without index
        table = "FROM recipients r" if "FROM recipients r" in sql else "FROM messages m"
        sql = sql.replace(table, f"{table} NOT INDEXED", 1)
    rows = conn.execute(sql, query.params).fetchall()
    found = queries.recipients_query([row[0] for row in rows[:f.limit]])
    body = queries.messages_body(f, rows, conn.execute(found.sql, found.params).fetchall())
    return len(body["messages"])


def timed(run, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=Path("/tmp/relay-messages-bench.db"))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--reference-repeat", type=int, default=3)
    args = parser.parse_args()
    fresh = not args.db.exists()
    conn = store.connect(args.db)
    store.migrate(conn)
    if fresh:
        print(f"filling {args.db} with {args.messages:,} messages over {DAYS} days")
        fill(conn, args.messages, time.time())
    [(messages,)] = conn.execute("SELECT count(*) FROM messages").fetchall()
    [(recipients,)] = conn.execute("SELECT count(*) FROM recipients").fetchall()
    print(f"store: {messages:,} messages, {recipients:,} recipients "
          "(shared 2-core machine, other jobs running: figures vary)")
    recent = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 3 * 86400))
    filters = {
        "newest": {},
        "recipient": {"recipient": "r4242@example.org"},
        "Message-ID": {"message_id": "<4242@bench>"},
        "sender": {"sender": "sender7@shop.example"},
        "status=failed": {"status": "failed"},
        "status=unknown": {"status": "unknown"},
        "recipient+status=sent": {"recipient": "r4242@example.org", "status": "sent"},
        "since 3 days ago": {"since": recent},
    }
    for label, params in filters.items():
        count = page(conn, params)
        median, worst = timed(lambda p=params: page(conn, p), args.repeat)
        ref_median, _ = timed(lambda p=params: page(conn, p, indexed=False),
                              args.reference_repeat)
        print(f"{label}: {count} messages, median {median:.2f} ms (max {worst:.2f}); "
              f"without its index {ref_median:.1f} ms")


if __name__ == "__main__":
    main()
