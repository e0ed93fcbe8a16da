"""The statistics, events and messages API and CLI: parsing a request into a filter, and
shaping the rows of its query into JSON.

Both are pure functions and the SQL between them is the store's (relay/store/reports.py, which
describes the reads), so the API (on the store's reader thread) and the CLI (a plain
connection) run the very same SQL and print the very same JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from relay.errors import InvalidParameter
from relay.ids import PREFIX as EMAIL_PREFIX
from relay.smtp.processes import SENDING, UNKNOWN
from relay.stats.maths import (
    DAY_FORMAT,
    Counts,
    parse_day,
    parse_int,
)

# The SQL of these reads is the store's; the API and CLI (relay/admin/) call them from here.
from relay.store.counters import COUNTERS
from relay.store.queue import BOUNCED_EVENT, DELAYED_EVENT, DeliveryEvent
from relay.store.reports import FILTERS, GROUPS, TAG_FILTER
from relay.store.reports import Query as Query
from relay.store.reports import delivery_events_query as delivery_events_query
from relay.store.reports import events_query as events_query
from relay.store.reports import links_query as links_query
from relay.store.reports import machine_count_query as machine_count_query
from relay.store.reports import message_delivery_events_query as message_delivery_events_query
from relay.store.reports import message_queries as message_queries
from relay.store.reports import messages_query as messages_query
from relay.store.reports import recipients_query as recipients_query
from relay.store.reports import stats_query as stats_query
from relay.store.reports import track_list_query as track_list_query
from relay.tracking.bots import CLICK, OPEN
from relay.tracking.events import EVENT_PREFIX, Event

Row = Sequence[Any]



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

def counts_by_day(rows: Sequence[Row]) -> dict[str, Counts]:
    return {row[0]: Counts(*row[1:]) for row in rows}


# ---- native statistics ----

MAX_SPAN_DAYS = 366
DEFAULT_SPAN_DAYS = 30
MAX_ROWS = 1000
DEFAULT_ROWS = 100




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
    """``sender_domain``, ``campaign`` (by day, campaign or sender domain, and clicks per link,
    ``group_by`` None) or ``tag`` (by day or tag, and clicks per link, alone): the daily
    counters hold no other combination."""
    filters = tuple((name, params[name].strip().lower() if name == "sender_domain"
                     else params[name].strip())
                    for name in (*FILTERS, TAG_FILTER) if params.get(name, "").strip())
    if not filters:
        return filters
    first = filters[0][0]
    if any(name == TAG_FILTER for name, _ in filters):
        if len(filters) > 1:
            raise InvalidParameter(TAG_FILTER, "goes with no other filter (sender_domain, "
                                               "campaign)")
        if group_by not in ("day", "tag", None):
            raise InvalidParameter(TAG_FILTER, "filters statistics by day or by tag only")
    elif group_by is not None and GROUPS[group_by][0] != "stats_daily":
        raise InvalidParameter(first, f"does not filter statistics by {group_by}")
    return filters


def total(rows: Sequence[Row]) -> Counts:
    """The counts of every row of a statistics query, summed."""
    return Counts(*(sum(row[i] for row in rows) for i in range(1, len(COUNTERS) + 1)))


def stats_body(q: StatsQuery, rows: Sequence[Row]) -> dict[str, Any]:
    return {"group_by": q.group_by, **q.window(), **dict(q.filters),
            "rows": [{"key": row[0] or None, **Counts(*row[1:]).as_dict()} for row in rows]}


def links_body(q: StatsQuery, rows: Sequence[Row]) -> dict[str, Any]:
    return {**q.window(), **dict(q.filters),
            "links": [{"url": url, "clicks": clicks, "unique_clicks": unique}
                      for url, clicks, unique in rows]}


# ---- events ----

# Opens and clicks (``events``), and queue mode's delivery events (``delivery_events``).
EVENT_TYPES = (OPEN, CLICK, DELAYED_EVENT, BOUNCED_EVENT)
MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_SUBJECT_SEARCH = 200  # characters of a subject searched for
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
    message_id: str | None = None
    sender_domain: str | None = None
    any_tags: tuple[str, ...] = ()  # events of messages with any of these tags
    newest_first: bool = False  # as the /v1/ API lists them (relay/admin/v1_events.py)


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


def delivery_event_json(row: Row) -> dict[str, Any]:
    """A delivery event with the fields of its webhook (``smtp_code``, ``attempt``,
    ``reply``; ``next_attempt_at`` for a delay, ``bounce_type`` for a bounce), and those of an
    open or click, null where they do not apply."""
    e = DeliveryEvent(*row)
    fields = {"smtp_code": e.smtp_code, "attempt": e.attempt, "reply": e.reply}
    if e.type == DELAYED_EVENT:
        fields["next_attempt_at"] = iso_time(e.next_attempt_at) if e.next_attempt_at else None
    else:
        fields["bounce_type"] = e.bounce_type
    return {
        "id": e.id, "type": e.type, "occurred_at": iso_time(e.at), "email_id": e.email_id,
        "recipient": e.recipient, "url": None, "ip": None, "user_agent": None, "method": None,
        "classification": None, "bot_source": None, "reason": None, "counted": False,
        "implied": False, "first_for_recipient": False, "first_for_link": False,
        "device": None, "client": None, "os": None, "geo": None, **fields,
    }


def merged_events(rows: Sequence[Row], deliveries: Sequence[Row], newest_first: bool = False
                  ) -> list[dict[str, Any]]:
    """Opens and clicks and delivery events as one list in the order of their ids (time)."""
    listed = [*map(event_json, rows), *map(delivery_event_json, deliveries)]
    return sorted(listed, key=lambda e: e["id"], reverse=newest_first)


def events_body(f: EventFilter, rows: Sequence[Row], deliveries: Sequence[Row] = ()
                ) -> dict[str, Any]:
    """One page of ``events_query`` and ``delivery_events_query`` rows merged (each read one
    row more than a page, so the merge knows whether there is a next one)."""
    listed = merged_events(rows, deliveries, f.newest_first)
    page = listed[:f.limit]
    more = len(listed) > f.limit
    return {"events": page, "next_cursor": encode_cursor(page[-1]["id"]) if more else None}


# ---- messages ----

# What the store records per recipient (recipients.status), in the order a copy goes through:
RECIPIENT_STATUSES: Mapping[str, str] = {
    SENDING: "being sent: the relay is waiting for the upstream's answer",
    "sent": "the upstream accepted the copy (250)",
    "deferred": "the upstream (or the relay) answered 4xx: the client was told to try again "
                "(queue mode: the queue tries again)",
    "failed": "the upstream answered 5xx: the client was told it failed (queue mode: given up, "
              "email.bounced permanent)",
    "expired": "queue mode: still not delivered queue.max_age_hours after it was received; "
               "given up (email.bounced expired)",
    "duplicate": "not sent again: an earlier try of the same Message-ID delivered it",
    UNKNOWN: "the relay process sending it stopped (crash, kill -9) before the upstream's "
             "answer was recorded: it may or may not have been delivered",
}
@dataclass(frozen=True, slots=True)
class MessageFilter:
    since: float | None = None
    until: float | None = None
    recipient: str | None = None
    message_id: str | None = None
    sender: str | None = None
    subject: str | None = None  # a part of the subject
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
    subject = params.get("subject") or None
    if subject is not None and len(subject) > MAX_SUBJECT_SEARCH:
        raise InvalidParameter("subject", f"at most {MAX_SUBJECT_SEARCH} characters")
    return MessageFilter(
        since=since, until=until,
        recipient=params.get("recipient") or None,
        message_id=params.get("message_id") or None,
        sender=params.get("sender") or None,
        subject=subject,
        status=status,
        before=decode_cursor(params["cursor"], EMAIL_PREFIX) if params.get("cursor") else None,
        limit=parse_int("limit", params.get("limit") or str(DEFAULT_PAGE), 1, MAX_PAGE),
    )


def messages_body(f: MessageFilter, rows: Sequence[Row], recipients: Sequence[Row]
                  ) -> dict[str, Any]:
    page = rows[:f.limit]
    by_message: dict[str, list[Row]] = {}
    for email_id, *rest in recipients:
        by_message.setdefault(email_id, []).append(rest)
    return {"messages": [message_json(row, by_message.get(row[0], [])) for row in page],
            "next_cursor": encode_cursor(page[-1][0]) if len(rows) > f.limit else None}


# ---- one message ----

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


def message_body(message: Row, recipients: Sequence[Row], events: Sequence[Row],
                 deliveries: Sequence[Row] = ()) -> dict[str, Any]:
    return {**message_json(message, recipients), "events": merged_events(events, deliveries)}
