"""The daily counters: ``stats_daily``, ``stats_daily_tags``, ``stats_daily_links``,
``stats_daily_links_by``, ``stats_daily_tag_links`` (relay/stats/rollup.py),
``stats_daily_agents`` and ``stats_daily_os`` (relay/stats/breakdown.py), added to on write and
recomputed from the raw tables.

The recomputations (:func:`rebuild_rollup`, :func:`rebuild_agents`) are the tests' oracle and
the benchmarks' bulk fill, written set-based, in the dialect both engines share.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence

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
_LINKS_BY = f"""INSERT INTO stats_daily_links_by VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (day, sender_domain, campaign, url)
    DO UPDATE SET {_add("stats_daily_links_by", COUNTERS[3:])}"""
_TAG_LINKS = f"""INSERT INTO stats_daily_tag_links VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (day, tag, url) DO UPDATE SET {_add("stats_daily_tag_links", COUNTERS[3:])}"""
_AGENTS = f"""INSERT INTO stats_daily_agents VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (day, device, client, country)
    DO UPDATE SET {_add("stats_daily_agents", COUNTERS[1:])}"""
_OS = f"""INSERT INTO stats_daily_os VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (day, os) DO UPDATE SET {_add("stats_daily_os", COUNTERS[1:])}"""

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


def add_links_by(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """(day, sender_domain, campaign, url, clicks, unique_clicks) each."""
    conn.executemany(_LINKS_BY, rows)


def add_tag_links(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """(day, tag, url, clicks, unique_clicks) each."""
    conn.executemany(_TAG_LINKS, rows)


def add_agents(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """(day, device, client, country, opens, unique_opens, clicks, unique_clicks) each."""
    conn.executemany(_AGENTS, rows)


def add_os(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """(day, os, opens, unique_opens, clicks, unique_clicks) each."""
    conn.executemany(_OS, rows)


# ---- recomputing from the raw tables ----

_ROLLUP_TABLES = ("stats_daily", "stats_daily_tags", "stats_daily_links",
                  "stats_daily_links_by", "stats_daily_tag_links")
_SUMS = ", ".join(f"sum({c})" for c in COUNTERS)
_DAY = "date(m.created_at, 'unixepoch')"
# Set-based on purpose: an implementation independent of the listener's, so each checks the
# other. First the counts per message and provider (NULL: none of temp.rollup_esp's, filed
# under the caller's ``others``), then filed under the message's dimensions. The provider is
# found by the recipient's domain (``relay_domain()``, registered by the caller on SQLite and
# defined on PostgreSQL's server: relay/store/postgres.py) in temp.rollup_esp, which the caller's
# mapping fills.
_ROLLUP_ESP = (
    "DROP TABLE IF EXISTS temp.rollup_esp",
    "CREATE TEMP TABLE rollup_esp (domain TEXT PRIMARY KEY, esp TEXT NOT NULL)",
)
_ROLLUP = (
    "DROP TABLE IF EXISTS temp.rollup_pm",
    """CREATE TEMP TABLE rollup_pm AS
    SELECT u.email_id AS email_id, x.esp AS esp, sum(u.sent) AS sent, sum(u.opens) AS opens,
           sum(u.unique_opens) AS unique_opens, sum(u.clicks) AS clicks,
           sum(u.unique_clicks) AS unique_clicks
    FROM (SELECT email_id, recipient, 1 AS sent, 0 AS opens, 0 AS unique_opens, 0 AS clicks,
                 0 AS unique_clicks
          FROM recipients WHERE status = 'sent'
          UNION ALL
          SELECT email_id, recipient, 0, CASE WHEN type = 'open' THEN 1 ELSE 0 END,
                 CASE WHEN type = 'open' AND first_for_recipient = 1 THEN 1 ELSE 0 END,
                 CASE WHEN type = 'click' THEN 1 ELSE 0 END,
                 CASE WHEN type = 'click' AND first_for_recipient = 1 THEN 1 ELSE 0 END
          FROM events WHERE counted = 1) u
    LEFT JOIN temp.rollup_esp x ON x.domain = relay_domain(u.recipient)
    GROUP BY u.email_id, x.esp""",
    f"""INSERT INTO stats_daily
    SELECT {_DAY}, relay_lower(m.sender), coalesce(m.tag_name, ''), coalesce(pm.esp, :others),
           relay_lower(m.sender_domain), coalesce(m.campaign, ''), {_SUMS}
    FROM temp.rollup_pm pm JOIN messages m ON m.email_id = pm.email_id
    GROUP BY 1, 2, 3, 4, 5, 6""",
    # A message's tags and its tag_name, each once (UNION: the tag_name may be a tag too).
    f"""INSERT INTO stats_daily_tags
    SELECT day, tag, {_SUMS} FROM (
        SELECT pm.email_id, pm.esp, {_DAY} AS day, t.value AS tag, pm.sent, pm.opens,
               pm.unique_opens, pm.clicks, pm.unique_clicks
        FROM temp.rollup_pm pm JOIN messages m ON m.email_id = pm.email_id,
             json_each(m.tags) t
        UNION
        SELECT pm.email_id, pm.esp, {_DAY}, m.tag_name, pm.sent, pm.opens, pm.unique_opens,
               pm.clicks, pm.unique_clicks
        FROM temp.rollup_pm pm JOIN messages m ON m.email_id = pm.email_id) u
    WHERE tag IS NOT NULL
    GROUP BY day, tag""",
    f"""INSERT INTO stats_daily_links
    SELECT {_DAY}, e.url, count(*), sum(e.first_for_link)
    FROM events e JOIN messages m ON m.email_id = e.email_id
    WHERE e.counted = 1 AND e.type = 'click' GROUP BY 1, 2""",
    f"""INSERT INTO stats_daily_links_by
    SELECT {_DAY}, relay_lower(m.sender_domain), coalesce(m.campaign, ''), e.url, count(*),
           sum(e.first_for_link)
    FROM events e JOIN messages m ON m.email_id = e.email_id
    WHERE e.counted = 1 AND e.type = 'click' GROUP BY 1, 2, 3, 4""",
    f"""INSERT INTO stats_daily_tag_links
    SELECT day, tag, url, count(*), sum(first_for_link) FROM (
        SELECT e.id, {_DAY} AS day, t.value AS tag, e.url, e.first_for_link
        FROM events e JOIN messages m ON m.email_id = e.email_id, json_each(m.tags) t
        WHERE e.counted = 1 AND e.type = 'click'
        UNION
        SELECT e.id, {_DAY}, m.tag_name, e.url, e.first_for_link
        FROM events e JOIN messages m ON m.email_id = e.email_id
        WHERE e.counted = 1 AND e.type = 'click') u
    WHERE tag IS NOT NULL
    GROUP BY day, tag, url""",
    "DROP TABLE temp.rollup_pm",
    "DROP TABLE temp.rollup_esp",
)


def rebuild_rollup(conn: sqlite3.Connection, esp_by_domain: Mapping[str, str],
                   others: str) -> None:
    """Recompute the tables of relay/stats/rollup.py from messages, recipients and
    events: each recipient's provider is ``esp_by_domain`` of its domain, else ``others``
    (``relay_domain`` and ``relay_lower`` registered on ``conn``)."""
    for table in _ROLLUP_TABLES:
        conn.execute(f"DELETE FROM {table}")
    for statement in _ROLLUP_ESP:
        conn.execute(statement)
    conn.executemany("INSERT INTO temp.rollup_esp VALUES (?, ?)", esp_by_domain.items())
    for statement in _ROLLUP:
        conn.execute(statement, {"others": others} if ":others" in statement else ())


# In the dialect both engines share (date() is PostgreSQL's too: relay/store/postgres.py).
_BY_AGENT = """SELECT date(m.created_at, 'unixepoch'), {keys},
           count(*) FILTER (WHERE e.type = 'open'),
           count(*) FILTER (WHERE e.type = 'open' AND e.first_for_recipient = 1),
           count(*) FILTER (WHERE e.type = 'click'),
           count(*) FILTER (WHERE e.type = 'click' AND e.first_for_recipient = 1)
    FROM events e JOIN messages m ON m.email_id = e.email_id
    WHERE e.counted = 1 GROUP BY {groups}"""
_AGENTS_REBUILD = "INSERT INTO stats_daily_agents " + _BY_AGENT.format(
    keys="coalesce(e.device, ''), coalesce(e.client, ''), coalesce(e.country, '')",
    groups="1, 2, 3, 4")
_OS_REBUILD = "INSERT INTO stats_daily_os " + _BY_AGENT.format(keys="coalesce(e.os, '')",
                                                               groups="1, 2")


def rebuild_agents(conn: sqlite3.Connection) -> None:
    """Recompute ``stats_daily_agents`` and ``stats_daily_os`` from events and messages."""
    for table, rebuild in (("stats_daily_agents", _AGENTS_REBUILD),
                           ("stats_daily_os", _OS_REBUILD)):
        conn.execute(f"DELETE FROM {table}")
        conn.execute(rebuild)
