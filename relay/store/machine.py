"""Machine traffic by day: ``stats_daily_machine``, day (the message's send day, as every
daily counter, relay/stats/maths.py) × classification (prefetch, scanner, automation;
relay/tracking/bots.py) × source (``apple``, ``barracuda``... ``''`` when none): opens and
clicks that statistics and webhooks leave out. Kept on write by relay/stats/machine.py."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

_ADD = """INSERT INTO stats_daily_machine (day, classification, source, opens, clicks)
    VALUES (?, ?, ?, ?, ?) ON CONFLICT (day, classification, source) DO UPDATE SET
    opens = stats_daily_machine.opens + excluded.opens,
    clicks = stats_daily_machine.clicks + excluded.clicks"""

# classification, source, opens, clicks over a window of days (both included), most first
WINDOW = """SELECT classification, source, sum(opens), sum(clicks) FROM stats_daily_machine
    WHERE day BETWEEN ? AND ? GROUP BY classification, source
    ORDER BY sum(opens) + sum(clicks) DESC, classification, source"""


def add(conn: sqlite3.Connection, rows: Iterable[tuple[str, str, str, int, int]]) -> None:
    """Add (day, classification, source, opens, clicks) rows."""
    conn.executemany(_ADD, list(rows))


def window(conn: sqlite3.Connection, since: str, until: str
           ) -> list[tuple[str, str, int, int]]:
    return [tuple(row) for row in conn.execute(WINDOW, (since, until))]  # type: ignore[misc]
