"""The reads behind the statistics and events API and CLI, as SQL with parameters.

Building a query and shaping its rows are pure functions, so the API (aiosqlite, on the
reader's thread) and the CLI (a plain sqlite3 connection) run the very same SQL and print
the very same JSON. Statistics read the daily counters of relay/stats/rollup.py; event listings read
``events`` by its time-ordered id (``evt_<uuid7>``), which is also the pagination cursor, and
message listings ``messages`` by theirs (``email_<uuid7>``), newest first, the same way.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from relay.errors import InvalidParameter
from relay.ids import PREFIX as EMAIL_PREFIX
from relay.smtp.processes import SENDING, UNKNOWN
from relay.stats.maths import (
    DAY_FORMAT,
    Counts,
    TrackListQuery,
    parse_day,
    parse_int,
)
from relay.store import events as events_table
from relay.store.counters import COUNTERS
from relay.tracking.bots import CLICK, OPEN
from relay.tracking.events import EVENT_PREFIX, Event

COLUMNS = ", ".join(events_table.COLUMNS)


@dataclass(frozen=True, slots=True)
class Query:
    sql: str
    params: tuple[Any, ...] = ()


Row = Sequence[Any]
_SUMS = ", ".join(f"sum({c})" for c in COUNTERS)


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds"
                                                           ).replace("+00:00", "Z")


def parse_instant(parameter: str, value: str, *, end: bool = False) -> float:
    """A date (``yyyy-mm-dd``: its first instant, or with ``end`` the first instant of the
    next day, so an ``until`` day is included) or an ISO 8601 date-time (UTC when it names no
    offset), as Unix seconds."""
    text = value.strip()
    try:
        if len(text) == 10:
            day = datetime.strptime(text, DAY_FORMAT).replace(tzinfo=UTC)
            return (day + timedelta(days=1 if end else 0)).timestamp()
        moment = datetime.fromisoformat(text)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        raise InvalidParameter(parameter, f"{value!r} is not a date (yyyy-mm-dd) or an ISO 8601 "
                                          "date-time") from None


# ---- GetTrackList ----

def track_list_query(q: TrackListQuery) -> Query:
    where = ["day BETWEEN ? AND ?"]
    params: list[Any] = [q.start.isoformat(), q.end.isoformat()]
    for column, value in (("sender", q.account_name), ("tag_name", q.tag_name), ("esp", q.esp)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return Query(f"SELECT day, {_SUMS} FROM stats_daily WHERE {' AND '.join(where)} "
                 "GROUP BY day", tuple(params))


def counts_by_day(rows: Sequence[Row]) -> dict[str, Counts]:
    return {row[0]: Counts(*row[1:]) for row in rows}


# ---- native statistics ----

# group_by value: (table, key column, order)
GROUPS: Mapping[str, tuple[str, str, str]] = {
    "day": ("stats_daily", "day", "key"),
    "tag": ("stats_daily_tags", "tag", "sum(sent) DESC, key"),
    "campaign": ("stats_daily", "campaign", "sum(sent) DESC, key"),
    "sender_domain": ("stats_daily", "sender_domain", "sum(sent) DESC, key"),
    # by the event's device, client, country (relay/stats/breakdown.py): sent is 0 there
    **{name: ("stats_daily_agents_sent", name, "sum(opens) + sum(clicks) DESC, key")
       for name in ("device", "client", "country")},
}
MAX_SPAN_DAYS = 366
DEFAULT_SPAN_DAYS = 30
MAX_ROWS = 1000
DEFAULT_ROWS = 100


# Filters of the native statistics: the column of stats_daily each one reads. ``tag`` reads
# stats_daily_tags instead, which has no other dimension, so it goes with no other filter.
FILTERS: Mapping[str, str] = {"sender_domain": "sender_domain", "campaign": "campaign"}
TAG_FILTER = "tag"


@dataclass(frozen=True, slots=True)
class StatsQuery:
    since: date
    until: date
    group_by: str = "day"
    limit: int = DEFAULT_ROWS
    filters: tuple[tuple[str, str], ...] = ()  # (name, value) of FILTERS, or (TAG_FILTER, tag)

    def window(self) -> dict[str, str]:
        return {"since": self.since.isoformat(), "until": self.until.isoformat()}


def parse_stats(params: Mapping[str, str], today: date, *, grouped: bool = True) -> StatsQuery:
    """``since``/``until`` (days, both included; default the last 30 days), ``group_by``,
    ``limit``."""
    until = parse_day("until", params["until"]) if params.get("until") else today
    if params.get("since"):
        since = parse_day("since", params["since"])
    elif until.toordinal() > DEFAULT_SPAN_DAYS:
        since = until - timedelta(days=DEFAULT_SPAN_DAYS - 1)
    else:
        raise InvalidParameter("until", "too early for a default since: give since")
    if since > until:
        raise InvalidParameter("since", "must not be after until")
    if (until - since).days >= MAX_SPAN_DAYS:
        raise InvalidParameter("since", f"the window spans at most {MAX_SPAN_DAYS} days")
    group_by = params.get("group_by") or "day"
    if grouped and group_by not in GROUPS:
        raise InvalidParameter("group_by", f"{group_by!r} is not one of {', '.join(GROUPS)}")
    limit = parse_int("limit", params.get("limit") or str(DEFAULT_ROWS), 1, MAX_ROWS)
    return StatsQuery(since, until, group_by, limit,
                      _filters(params, group_by if grouped else None))


def _filters(params: Mapping[str, str], group_by: str | None) -> tuple[tuple[str, str], ...]:
    """``sender_domain``, ``campaign`` (by day, campaign or sender domain) or ``tag`` (by day
    or tag, alone): the daily counters hold no other combination (and clicks per link,
    ``group_by`` None, none)."""
    filters = tuple((name, params[name].strip().lower() if name == "sender_domain"
                     else params[name].strip())
                    for name in (*FILTERS, TAG_FILTER) if params.get(name, "").strip())
    if not filters:
        return filters
    first = filters[0][0]
    if group_by is None:
        raise InvalidParameter(first, "clicks per link are counted for all messages only")
    if any(name == TAG_FILTER for name, _ in filters):
        if len(filters) > 1:
            raise InvalidParameter(TAG_FILTER, "goes with no other filter (sender_domain, "
                                               "campaign)")
        if group_by not in ("day", "tag"):
            raise InvalidParameter(TAG_FILTER, "filters statistics by day or by tag only")
    elif GROUPS[group_by][0] != "stats_daily":
        raise InvalidParameter(first, f"does not filter statistics by {group_by}")
    return filters


def stats_query(q: StatsQuery) -> Query:
    table, key, order = GROUPS[q.group_by]
    where = ["day BETWEEN ? AND ?"]
    params: list[Any] = list(q.window().values())
    for name, value in q.filters:
        if name == TAG_FILTER:
            table = "stats_daily_tags"
            where.append("tag = ?")
        else:
            where.append(f"{FILTERS[name]} = ?")
        params.append(value)
    return Query(f"SELECT {key} AS key, {_SUMS} FROM {table} WHERE {' AND '.join(where)} "
                 f"GROUP BY {key} ORDER BY {order} LIMIT ?", (*params, q.limit))


def total(rows: Sequence[Row]) -> Counts:
    """The counts of every row of a statistics query, summed."""
    return Counts(*(sum(row[i] for row in rows) for i in range(1, len(COUNTERS) + 1)))


def stats_body(q: StatsQuery, rows: Sequence[Row]) -> dict[str, Any]:
    return {"group_by": q.group_by, **q.window(), **dict(q.filters),
            "rows": [{"key": row[0] or None, **Counts(*row[1:]).as_dict()} for row in rows]}


def links_query(q: StatsQuery) -> Query:
    return Query("SELECT url, sum(clicks), sum(unique_clicks) FROM stats_daily_links "
                 "WHERE day BETWEEN ? AND ? GROUP BY url ORDER BY 2 DESC, url LIMIT ?",
                 (*q.window().values(), q.limit))


def links_body(q: StatsQuery, rows: Sequence[Row]) -> dict[str, Any]:
    return {**q.window(), "links": [{"url": url, "clicks": clicks, "unique_clicks": unique}
                                    for url, clicks, unique in rows]}


# ---- events ----

EVENT_TYPES = (OPEN, CLICK)
MAX_PAGE = 1000
DEFAULT_PAGE = 100
_UUID = r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}"


@dataclass(frozen=True, slots=True)
class EventFilter:
    since: float | None = None
    until: float | None = None
    type: str | None = None
    recipient: str | None = None
    email_id: str | None = None
    tag: str | None = None
    campaign: str | None = None
    topic: str | None = None
    include_machine: bool = False  # bots (prefetch, scanner, automation) too
    after: str | None = None  # the last event id of the previous page
    limit: int = DEFAULT_PAGE


def encode_cursor(row_id: str) -> str:
    """A page's cursor: the last row's time-ordered id (``evt_...``, ``email_...``)."""
    return base64.urlsafe_b64encode(row_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, prefix: str = EVENT_PREFIX) -> str:
    try:
        row_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        row_id = ""
    if not re.fullmatch(re.escape(prefix) + _UUID, row_id):
        raise InvalidParameter("cursor", "not a cursor this API returned")
    return row_id


def parse_bool(parameter: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise InvalidParameter(parameter, f"{value!r} is not true or false")


def parse_events(params: Mapping[str, str]) -> EventFilter:
    kind = params.get("type") or None
    if kind is not None and kind not in EVENT_TYPES:
        raise InvalidParameter("type", f"{kind!r} is not one of {', '.join(EVENT_TYPES)}")
    since = parse_instant("since", params["since"]) if params.get("since") else None
    until = parse_instant("until", params["until"], end=True) if params.get("until") else None
    if since is not None and until is not None and since >= until:
        raise InvalidParameter("since", "must be before until")
    return EventFilter(
        since=since, until=until, type=kind,
        recipient=params.get("recipient") or None,
        email_id=params.get("email_id") or None,
        tag=params.get("tag") or None,
        campaign=params.get("campaign") or None,
        topic=params.get("topic") or None,
        include_machine=parse_bool("include_machine", params.get("include_machine", "")),
        after=decode_cursor(params["cursor"]) if params.get("cursor") else None,
        limit=parse_int("limit", params.get("limit") or str(DEFAULT_PAGE), 1, MAX_PAGE),
    )


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
    return Query(f"SELECT {COLUMNS} FROM events {clause}ORDER BY id LIMIT ?",
                 (*params, f.limit + 1))


def machine_count_query(f: EventFilter) -> Query:
    """How many machine events (not counted: prefetch, scanner, automation) the filter's
    window holds: what a listing without ``include_machine`` leaves out, cursor aside."""
    where, params = _event_conditions(replace(f, include_machine=True, after=None))
    return Query(f"SELECT count(*) FROM events WHERE {' AND '.join([*where, 'NOT counted'])}",
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
    for column, value in (("campaign", f.campaign), ("topic", f.topic)):
        if value is not None:
            add(f"email_id IN (SELECT email_id FROM messages WHERE {column} = ?)", value)
    if not f.include_machine:
        add("counted")
    if f.after is not None:
        add("id > ?", f.after)
    return where, params


def event_json(row: Row) -> dict[str, Any]:
    e = Event._make(row)
    return {
        "id": e.id, "type": e.type, "occurred_at": iso_time(e.at), "email_id": e.email_id,
        "recipient": e.recipient, "url": e.url, "ip": e.ip, "user_agent": e.user_agent,
        "method": e.method, "classification": e.classification, "bot_source": e.bot_source,
        "reason": e.reason, "counted": bool(e.counted), "implied": bool(e.implied),
        "first_for_recipient": bool(e.first_for_recipient),
        "first_for_link": bool(e.first_for_link), **e.details,
    }


def events_body(f: EventFilter, rows: Sequence[Row]) -> dict[str, Any]:
    page = rows[:f.limit]
    more = len(rows) > f.limit
    return {"events": [event_json(row) for row in page],
            "next_cursor": encode_cursor(page[-1][0]) if more else None}


# ---- messages ----

# What the store records per recipient (recipients.status), in the order a copy goes through:
RECIPIENT_STATUSES: Mapping[str, str] = {
    SENDING: "being sent: the relay is waiting for the upstream's answer",
    "sent": "the upstream accepted the copy (250)",
    "deferred": "the upstream (or the relay) answered 4xx: the client was told to try again",
    "failed": "the upstream answered 5xx: the client was told it failed",
    "duplicate": "not sent again: an earlier try of the same Message-ID delivered it",
    UNKNOWN: "the relay process sending it stopped (crash, kill -9) before the upstream's "
             "answer was recorded: it may or may not have been delivered",
}
_MESSAGE_COLUMNS = ("m.email_id, m.message_id, m.sender, m.sender_domain, m.subject, "
                    "m.tag_name, m.tags, m.campaign, m.topic, m.track_opens, m.track_clicks, "
                    "m.decision, m.size, m.created_at, m.links")


@dataclass(frozen=True, slots=True)
class MessageFilter:
    since: float | None = None
    until: float | None = None
    recipient: str | None = None
    message_id: str | None = None
    sender: str | None = None
    status: str | None = None
    before: str | None = None  # the last email id of the previous page
    limit: int = DEFAULT_PAGE


def parse_messages(params: Mapping[str, str]) -> MessageFilter:
    status = params.get("status") or None
    if status is not None and status not in RECIPIENT_STATUSES:
        raise InvalidParameter("status", f"{status!r} is not one of "
                                         f"{', '.join(RECIPIENT_STATUSES)}")
    since = parse_instant("since", params["since"]) if params.get("since") else None
    until = parse_instant("until", params["until"], end=True) if params.get("until") else None
    if since is not None and until is not None and since >= until:
        raise InvalidParameter("since", "must be before until")
    return MessageFilter(
        since=since, until=until,
        recipient=params.get("recipient") or None,
        message_id=params.get("message_id") or None,
        sender=params.get("sender") or None,
        status=status,
        before=decode_cursor(params["cursor"], EMAIL_PREFIX) if params.get("cursor") else None,
        limit=parse_int("limit", params.get("limit") or str(DEFAULT_PAGE), 1, MAX_PAGE),
    )


def messages_query(f: MessageFilter) -> Query:
    """One page and one row more, newest first. With a recipient or a status the walk goes
    down a recipients index ((recipient, email_id) or (status, email_id)), else down the
    messages' own (email id, sender, Message-ID): newest first in index order, so a page
    reads about its own rows, never the whole store."""
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
    if f.status is not None:  # with a recipient, its index leads ('+': not the status's)
        where.append("+r.status = ?" if f.recipient is not None else "r.status = ?")
        params.append(f.status)
    if f.sender is not None:
        where.append("m.sender = ? COLLATE NOCASE")
        params.append(f.sender)
    if f.message_id is not None:  # as written in the header, with or without its <>
        bare = f.message_id.strip().removeprefix("<").removesuffix(">")
        where.append("m.message_id IN (?, ?)")
        params.extend((f"<{bare}>", bare))
    source = ("recipients r JOIN messages m ON m.email_id = r.email_id" if by_recipient
              else "messages m")
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    group = f"GROUP BY {key} " if by_recipient else ""  # one row per message
    return Query(f"SELECT {_MESSAGE_COLUMNS} FROM {source} {clause}{group}"
                 f"ORDER BY {key} DESC LIMIT ?", (*params, f.limit + 1))


def recipients_query(email_ids: Sequence[str]) -> Query:
    """The recipients of the listed messages."""
    marks = ", ".join("?" * len(email_ids))
    return Query("SELECT email_id, recipient, status, reply, at FROM recipients "
                 f"WHERE email_id IN ({marks}) ORDER BY email_id, recipient", tuple(email_ids))


def messages_body(f: MessageFilter, rows: Sequence[Row], recipients: Sequence[Row]
                  ) -> dict[str, Any]:
    page = rows[:f.limit]
    by_message: dict[str, list[Row]] = {}
    for email_id, *rest in recipients:
        by_message.setdefault(email_id, []).append(rest)
    return {"messages": [message_json(row, by_message.get(row[0], [])) for row in page],
            "next_cursor": encode_cursor(page[-1][0]) if len(rows) > f.limit else None}


# ---- one message ----

def message_queries(email_id: str) -> tuple[Query, Query, Query]:
    """The message, its recipients, and all its events (machine traffic included)."""
    return (
        Query(f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE email_id = ?", (email_id,)),
        Query("SELECT recipient, status, reply, at FROM recipients WHERE email_id = ? "
              "ORDER BY recipient", (email_id,)),
        Query(f"SELECT {COLUMNS} FROM events WHERE email_id = ? ORDER BY id", (email_id,)),
    )


def message_json(message: Row, recipients: Sequence[Row]) -> dict[str, Any]:
    """A message with its recipients and their outcome, and how many recipients have each
    status (``statuses``)."""
    (email_id, message_id, sender, sender_domain, subject, tag_name, tags, campaign, topic,
     opens, clicks, decision, size, created_at, links) = message
    statuses: dict[str, int] = {}
    for _, status, _, _ in recipients:
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "email_id": email_id, "message_id": message_id, "sender": sender,
        "sender_domain": sender_domain, "subject": subject, "tag_name": tag_name,
        "tags": json.loads(tags), "campaign": campaign, "topic": topic, "size": size,
        "created_at": iso_time(created_at),
        "tracking": {"opens": bool(opens), "clicks": bool(clicks), "decision": decision,
                     "links": json.loads(links) if links is not None else None},
        "statuses": statuses,
        "recipients": [{"recipient": r, "status": status, "reply": reply, "at": iso_time(at)}
                       for r, status, reply, at in recipients],
    }


def message_body(message: Row, recipients: Sequence[Row], events: Sequence[Row]
                 ) -> dict[str, Any]:
    return {**message_json(message, recipients),
            "events": [event_json(row) for row in events]}
