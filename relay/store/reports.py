"""The reads behind the statistics, events and messages API and CLI, as SQL with parameters.

Each function builds a :class:`Query` from a parsed filter (relay/stats/queries.py parses the
request and shapes the rows), so the API (on the store's reader thread) and the CLI (a plain
connection) run the very same SQL. Statistics read the daily counters (relay/store/counters.py);
event listings read ``events`` by its time-ordered id (``evt_<uuid7>``), which is also the
pagination cursor, and message listings ``messages`` by theirs (``email_<uuid7>``), newest
first, the same way. SQLite's dialect remains in two places, each the index a query relies
on: ``json_each`` for an event's tag and ``COLLATE NOCASE`` (PostgreSQL has both,
relay/store/postgres.py SERVER_SETUP).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from relay.ids import PREFIX as EMAIL_PREFIX
from relay.store.counters import COUNTERS
from relay.store.events import COLUMNS as EVENT_COLUMNS
from relay.store.events import EVENT_PREFIX
from relay.store.queue import DELIVERY_EVENT_COLUMNS
from relay.store.sql import placeholders

if TYPE_CHECKING:
    from relay.stats.maths import TrackListQuery
    from relay.stats.queries import EventFilter, MessageFilter, StatsQuery

COLUMNS = ", ".join(EVENT_COLUMNS)
DELIVERY_COLUMNS = ", ".join(DELIVERY_EVENT_COLUMNS)


@dataclass(frozen=True, slots=True)
class Query:
    sql: str
    params: tuple[Any, ...] = ()


def rows(conn: sqlite3.Connection, query: Query) -> list[Any]:
    """Run ``query`` on a plain connection (the CLI); the API runs the same one on the store's
    reader thread (``Store.fetchall``)."""
    return conn.execute(query.sql, query.params).fetchall()


_SUMS = ", ".join(f"sum({c})" for c in COUNTERS)
# group_by value: (table, key column, order)
GROUPS: Mapping[str, tuple[str, str, str]] = {
    "day": ("stats_daily", "day", "key"),
    "tag": ("stats_daily_tags", "tag", "sum(sent) DESC, key"),
    "campaign": ("stats_daily", "campaign", "sum(sent) DESC, key"),
    "sender_domain": ("stats_daily", "sender_domain", "sum(sent) DESC, key"),
    # by the event's device, client, country, OS (relay/stats/breakdown.py): sent is 0 there
    **{name: ("stats_daily_agents_sent", name, "sum(opens) + sum(clicks) DESC, key")
       for name in ("device", "client", "country")},
    "os": ("stats_daily_os_sent", "os", "sum(opens) + sum(clicks) DESC, key"),
}


# Filters of the native statistics: the column of stats_daily each one reads. ``tag`` reads
# stats_daily_tags instead, which has no other dimension, so it goes with no other filter.
FILTERS: Mapping[str, str] = {"sender_domain": "sender_domain", "campaign": "campaign"}
TAG_FILTER = "tag"


# ---- GetTrackList and the native statistics ----

def track_list_query(q: TrackListQuery) -> Query:
    where = ["day BETWEEN ? AND ?"]
    params: list[Any] = [q.start.isoformat(), q.end.isoformat()]
    for column, value in (("sender", q.account_name), ("tag_name", q.tag_name), ("esp", q.esp)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return Query(f"SELECT day, {_SUMS} FROM stats_daily WHERE {' AND '.join(where)} "
                 "GROUP BY day", tuple(params))


def _filtered(q: StatsQuery, table: str, tag_table: str) -> tuple[str, str, list[Any]]:
    """The table to read (``tag_table`` under a tag filter), the WHERE clause of the query's
    window and filters, and its parameters."""
    where = ["day BETWEEN ? AND ?"]
    params: list[Any] = list(q.window().values())
    for name, value in q.filters:
        if name == TAG_FILTER:
            table = tag_table
            where.append("tag = ?")
        else:
            where.append(f"{FILTERS[name]} = ?")
        params.append(value)
    return table, " AND ".join(where), params


def stats_query(q: StatsQuery) -> Query:
    table, key, order = GROUPS[q.group_by]
    table, where, params = _filtered(q, table, "stats_daily_tags")
    return Query(f"SELECT {key} AS key, {_SUMS} FROM {table} WHERE {where} "
                 f"GROUP BY {key} ORDER BY {order} LIMIT ?", (*params, q.limit))


def links_query(q: StatsQuery) -> Query:
    """Clicks per link: of all messages (``stats_daily_links``), or of the filter's sender
    domain and campaign (``stats_daily_links_by``) or tag (``stats_daily_tag_links``)."""
    table, where, params = _filtered(
        q, "stats_daily_links_by" if q.filters else "stats_daily_links", "stats_daily_tag_links")
    return Query(f"SELECT url, sum(clicks), sum(unique_clicks) FROM {table} "
                 f"WHERE {where} GROUP BY url ORDER BY 2 DESC, url LIMIT ?",
                 (*params, q.limit))


# ---- events ----

def id_floor(timestamp: float, prefix: str = EVENT_PREFIX) -> str:
    """A string sorting at or before every id (event or message) made at ``timestamp`` or
    later, and after every id made before it (a uuid7 starts with its Unix milliseconds, in
    hex)."""
    ms = f"{max(0, int(timestamp * 1000)):012x}"
    return f"{prefix}{ms[:8]}-{ms[8:]}"


def events_query(f: EventFilter) -> Query:
    """One page and one row more (to tell whether there is a next page), oldest first."""
    where, params = _event_conditions(f)
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    order = "id DESC" if f.newest_first else "id"
    return Query(f"SELECT {COLUMNS} FROM events {clause}ORDER BY {order} LIMIT ?",
                 (*params, f.limit + 1))


def delivery_events_query(f: EventFilter) -> Query:
    """The queue's delivery events (``delayed``, ``bounced``: relay/store/queue.py) the
    filter matches, one page and one row more in the same order and by the same cursor as
    :func:`events_query`: their ids are ``evt_<uuid7>`` too, so the caller merges both pages
    by id. They are never machine traffic."""
    where, params = _event_conditions(replace(f, include_machine=True))
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    order = "id DESC" if f.newest_first else "id"
    return Query(f"SELECT {DELIVERY_COLUMNS} FROM delivery_events {clause}ORDER BY {order} "
                 "LIMIT ?", (*params, f.limit + 1))


def machine_count_query(f: EventFilter) -> Query:
    """How many machine events (not counted: prefetch, scanner, automation) the filter's
    window holds: what a listing without ``include_machine`` leaves out, cursor aside."""
    where, params = _event_conditions(replace(f, include_machine=True, after=None))
    return Query(f"SELECT count(*) FROM events WHERE {' AND '.join([*where, 'counted = 0'])}",
                 tuple(params))


def _event_conditions(f: EventFilter) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []

    def add(condition: str, *values: Any) -> None:
        where.append(condition)
        params.extend(values)

    if f.since is not None:  # the id bound turns the window into a range of the primary key
        add("id >= ? AND at >= ?", id_floor(f.since), f.since)
    if f.until is not None:
        add("at < ?", f.until)
    for column, value in (("type", f.type), ("recipient", f.recipient),
                          ("email_id", f.email_id)):
        if value is not None:
            add(f"{column} = ?", value)
    if f.tag is not None:
        add("email_id IN (SELECT email_id FROM messages WHERE tag_name = ? OR EXISTS "
            "(SELECT 1 FROM json_each(messages.tags) WHERE value = ?))", f.tag, f.tag)
    if f.any_tags:
        marks = placeholders(f.any_tags)
        add(f"email_id IN (SELECT email_id FROM messages WHERE tag_name IN ({marks}) OR EXISTS "
            f"(SELECT 1 FROM json_each(messages.tags) WHERE value IN ({marks})))",
            *f.any_tags, *f.any_tags)
    for column, value in (("campaign", f.campaign), ("topic", f.topic),
                          ("message_id", f.message_id), ("sender_domain", f.sender_domain)):
        if value is not None:
            add(f"email_id IN (SELECT email_id FROM messages WHERE {column} = ?)", value)
    if not f.include_machine:
        add("counted = 1")
    if f.after is not None:
        add("id < ?" if f.newest_first else "id > ?", f.after)
    return where, params


# ---- messages ----

_MESSAGE_COLUMNS = ("m.email_id, m.message_id, m.sender, m.sender_domain, m.subject, "
                    "m.tag_name, m.tags, m.campaign, m.topic, m.track_opens, m.track_clicks, "
                    "m.decision, m.size, m.created_at, m.links")


def messages_query(f: MessageFilter) -> Query:
    """One page and one row more, newest first. With a recipient or a status the walk goes
    down a recipients index ((recipient, email_id) or (status, email_id)), else down the
    messages' own (email id, sender, Message-ID): newest first in index order, so a page
    reads about its own rows, never the whole store. Walking recipients, the page's email ids
    come first (one per message: a GROUP BY of the walked id) and their messages after them,
    sorted again (a page, no more): PostgreSQL takes no ungrouped column beside the GROUP BY,
    grouping by the message's own key would cost SQLite a sort of every match, and MAX() of
    each column, measured, nearly doubles SQLite's time for a page. A subject (a part of it,
    no index can serve) is checked on the rows of that walk, which stops at the page's end: a
    subject few messages have reads further (bounded by ``since``/``until``, whose email ids
    bound the walk)."""
    by_recipient = f.recipient is not None or f.status is not None
    key = "r.email_id" if by_recipient else "m.email_id"
    where: list[str] = []
    params: list[Any] = []
    if f.since is not None:
        where.append(f"{key} >= ?")
        params.append(id_floor(f.since, EMAIL_PREFIX))
    if f.until is not None:
        where.append(f"{key} < ?")
        params.append(id_floor(f.until, EMAIL_PREFIX))
    if f.before is not None:
        where.append(f"{key} < ?")
        params.append(f.before)
    if f.recipient is not None:
        where.append("r.recipient = ? COLLATE NOCASE")
        params.append(f.recipient)
    if f.status is not None:  # with a recipient, its index leads ("|| ''": not the status's)
        where.append("r.status || '' = ?" if f.recipient is not None else "r.status = ?")
        params.append(f.status)
    if f.sender is not None:
        where.append("m.sender = ? COLLATE NOCASE")
        params.append(f.sender)
    if f.subject is not None:  # a part of it, in any case (ASCII letters only on SQLite)
        where.append("lower(m.subject) LIKE lower(?) ESCAPE '\\'")
        params.append(f"%{like_escape(f.subject)}%")
    if f.message_id is not None:  # as written in the header, with or without its <>
        bare = f.message_id.strip().removeprefix("<").removesuffix(">")
        where.append("m.message_id IN (?, ?)")
        params.extend((f"<{bare}>", bare))
    source = ("recipients r JOIN messages m ON m.email_id = r.email_id" if by_recipient
              else "messages m")
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    if not by_recipient:
        return Query(f"SELECT {_MESSAGE_COLUMNS} FROM {source} {clause}"
                     f"ORDER BY {key} DESC LIMIT ?", (*params, f.limit + 1))
    page = (f"SELECT {key} FROM {source} {clause}GROUP BY {key} "  # one row per message
            f"ORDER BY {key} DESC LIMIT ?")
    return Query(f"SELECT {_MESSAGE_COLUMNS} FROM ({page}) p "
                 "JOIN messages m ON m.email_id = p.email_id ORDER BY m.email_id DESC",
                 (*params, f.limit + 1))


def like_escape(text: str) -> str:
    """``text`` matched literally by ``LIKE ... ESCAPE '\\'``."""
    return re.sub(r"([\\%_])", r"\\\1", text)


def message_facts_query(email_ids: Sequence[str]) -> Query:
    """What events name of their messages: email_id, message_id, sender, sender_domain,
    subject, tag_name, tags (JSON), campaign, topic."""
    marks = placeholders(email_ids)
    return Query("SELECT email_id, message_id, sender, sender_domain, subject, tag_name, tags,"
                 f" campaign, topic FROM messages WHERE email_id IN ({marks})",
                 tuple(email_ids))


def recipients_query(email_ids: Sequence[str]) -> Query:
    """The recipients of the listed messages."""
    marks = placeholders(email_ids)
    return Query("SELECT email_id, recipient, status, reply, at FROM recipients "
                 f"WHERE email_id IN ({marks}) ORDER BY email_id, recipient", tuple(email_ids))


def message_queries(email_id: str) -> tuple[Query, Query, Query]:
    """The message, its recipients, and all its events (machine traffic included)."""
    return (
        Query(f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE email_id = ?", (email_id,)),
        Query("SELECT recipient, status, reply, at FROM recipients WHERE email_id = ? "
              "ORDER BY recipient", (email_id,)),
        Query(f"SELECT {COLUMNS} FROM events WHERE email_id = ? ORDER BY id", (email_id,)),
    )


def message_delivery_events_query(email_id: str) -> Query:
    """All the queue's delivery events of one message, oldest first."""
    return Query(f"SELECT {DELIVERY_COLUMNS} FROM delivery_events WHERE email_id = ? "
                 "ORDER BY id", (email_id,))
