"""The daily counters: ``stats_daily``, ``stats_daily_tags``, ``stats_daily_links`` (relay/stats/
rollup.py) and ``stats_daily_agents`` (relay/stats/breakdown.py), added to on write and
recomputed from the raw tables.

The recomputations (:func:`rebuild_rollup`, :func:`rebuild_agents`) are the tests' oracle and
the benchmarks' bulk fill, written set-based. :func:`rebuild_agents` runs on both engines;
:func:`rebuild_rollup` is SQLite's still (``json_insert``, a temporary table, and the
``relay_esp`` function the caller registers).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

COUNTERS = ("sent", "opens", "unique_opens", "clicks", "unique_clicks")


def _add(table: str, counters: Sequence[str]) -> str:
    return ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in counters)


_DAILY = f"""INSERT INTO stats_daily VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (day, sender, tag_name, esp, sender_domain, campaign)
    DO UPDATE SET {_add("stats_daily", COUNTERS)}"""
_TAGS = f"""INSERT INTO stats_daily_tags VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (day, tag) DO UPDATE SET {_add("stats_daily_tags", COUNTERS)}"""
_LINKS = f"""INSERT INTO stats_daily_links VALUES (?, ?, ?, ?)
    ON CONFLICT (day, url) DO UPDATE SET {_add("stats_daily_links", COUNTERS[3:])}"""
_AGENTS = f"""INSERT INTO stats_daily_agents VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (day, device, client, country)
    DO UPDATE SET {_add("stats_daily_agents", COUNTERS[1:])}"""

Row = Sequence[object]


def add_daily(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """(day, sender, tag_name, esp, sender_domain, campaign, *COUNTERS) each."""
    conn.executemany(_DAILY, rows)


def add_tags(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """(day, tag, *COUNTERS) each."""
    conn.executemany(_TAGS, rows)


def add_links(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """(day, url, clicks, unique_clicks) each."""
    conn.executemany(_LINKS, rows)


def add_agents(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """(day, device, client, country, opens, unique_opens, clicks, unique_clicks) each."""
    conn.executemany(_AGENTS, rows)


# ---- recomputing from the raw tables ----

_ROLLUP_TABLES = ("stats_daily", "stats_daily_tags", "stats_daily_links")
_SUMS = ", ".join(f"sum({c})" for c in COUNTERS)
_DAY = "date(m.created_at, 'unixepoch')"
# Set-based on purpose: an implementation independent of the listener's, so each checks the
# other. First the counts per message and provider, then filed under the message's dimensions.
_ROLLUP = (
    "DROP TABLE IF EXISTS temp.rollup_pm",
    """CREATE TEMP TABLE rollup_pm AS
    SELECT email_id, esp, sum(sent) AS sent, sum(opens) AS opens,
           sum(unique_opens) AS unique_opens, sum(clicks) AS clicks,
           sum(unique_clicks) AS unique_clicks
    FROM (SELECT email_id, relay_esp(recipient) AS esp, 1 AS sent, 0 AS opens,
                 0 AS unique_opens, 0 AS clicks, 0 AS unique_clicks
          FROM recipients WHERE status = 'sent'
          UNION ALL
          SELECT email_id, relay_esp(recipient), 0, type = 'open',
                 type = 'open' AND first_for_recipient, type = 'click',
                 type = 'click' AND first_for_recipient
          FROM events WHERE counted)
    GROUP BY email_id, esp""",
    f"""INSERT INTO stats_daily
    SELECT {_DAY}, relay_lower(m.sender), coalesce(m.tag_name, ''), pm.esp,
           relay_lower(m.sender_domain), coalesce(m.campaign, ''), {_SUMS}
    FROM rollup_pm pm JOIN messages m ON m.email_id = pm.email_id
    GROUP BY 1, 2, 3, 4, 5, 6""",
    f"""INSERT INTO stats_daily_tags
    SELECT day, tag, {_SUMS} FROM (
        SELECT DISTINCT pm.rowid, {_DAY} AS day, t.value AS tag, pm.sent, pm.opens,
               pm.unique_opens, pm.clicks, pm.unique_clicks
        FROM rollup_pm pm JOIN messages m ON m.email_id = pm.email_id,
             json_each(json_insert(m.tags, '$[#]', m.tag_name)) t
        WHERE t.value IS NOT NULL)
    GROUP BY day, tag""",
    f"""INSERT INTO stats_daily_links
    SELECT {_DAY}, e.url, count(*), sum(e.first_for_link)
    FROM events e JOIN messages m ON m.email_id = e.email_id
    WHERE e.counted AND e.type = 'click' GROUP BY 1, 2""",
    "DROP TABLE temp.rollup_pm",
)


def rebuild_rollup(conn: sqlite3.Connection) -> None:
    """Recompute the three tables of relay/stats/rollup.py from messages, recipients and
    events (``relay_esp`` and ``relay_lower`` registered on ``conn``)."""
    for table in _ROLLUP_TABLES:
        conn.execute(f"DELETE FROM {table}")
    for statement in _ROLLUP:
        conn.execute(statement)


# In the dialect both engines share (date() is PostgreSQL's too: relay/store/postgres.py).
_AGENTS_REBUILD = """INSERT INTO stats_daily_agents
    SELECT date(m.created_at, 'unixepoch'), coalesce(e.device, ''), coalesce(e.client, ''),
           coalesce(e.country, ''), count(*) FILTER (WHERE e.type = 'open'),
           count(*) FILTER (WHERE e.type = 'open' AND e.first_for_recipient = 1),
           count(*) FILTER (WHERE e.type = 'click'),
           count(*) FILTER (WHERE e.type = 'click' AND e.first_for_recipient = 1)
    FROM events e JOIN messages m ON m.email_id = e.email_id
    WHERE e.counted = 1 GROUP BY 1, 2, 3, 4"""


def rebuild_agents(conn: sqlite3.Connection) -> None:
    """Recompute ``stats_daily_agents`` from events and messages."""
    conn.execute("DELETE FROM stats_daily_agents")
    conn.execute(_AGENTS_REBUILD)
