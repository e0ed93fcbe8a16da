"""The statistics and events API: ``GetTrackList`` as Alibaba answers it (README, "Statistics
and events API"), and the native routes: events, messages (a search, and one message),
statistics by group, clicks per link.

Handlers only parse, query (relay/stats/queries.py, on the store's reader thread) and answer; a bad
parameter raises ``InvalidParameter``, which the API answers with a ``400`` whose JSON error
names it (``error.parameter``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from relay.admin.http import CONTEXT, Operation, json_response
from relay.errors import ApiError
from relay.rewrite.splice import LINK_REASONS
from relay.stats import queries
from relay.stats.maths import (
    DEFAULT_PAGE_SIZE,
    ESPS,
    MAX_PAGE_SIZE,
    parse_track_list,
    track_list_body,
)


def _params(request: web.Request) -> dict[str, str]:
    """The query string, first value of each name."""
    return {name: request.query.getone(name) for name in request.query}


def _today() -> date:
    return datetime.now(UTC).date()


async def _rows(request: web.Request, query: queries.Query) -> list[Any]:
    return await request.app[CONTEXT].store.fetchall(query.sql, query.params)


async def get_track_list(request: web.Request) -> web.Response:
    query = parse_track_list(_params(request), _today())
    rows = await _rows(request, queries.track_list_query(query))
    return json_response(track_list_body(query, queries.counts_by_day(rows)))


async def list_events(request: web.Request) -> web.Response:
    event_filter = queries.parse_events(_params(request))
    rows = await _rows(request, queries.events_query(event_filter))
    return json_response(queries.events_body(event_filter, rows))


async def list_messages(request: web.Request) -> web.Response:
    message_filter = queries.parse_messages(_params(request))
    rows = await _rows(request, queries.messages_query(message_filter))
    page = rows[:message_filter.limit]
    recipients = await _rows(request, queries.recipients_query([row[0] for row in page]))
    return json_response(queries.messages_body(message_filter, rows, recipients))


async def get_message(request: web.Request) -> web.Response:
    email_id = request.match_info["email_id"]
    message_q, recipients_q, events_q = queries.message_queries(email_id)
    message = await _rows(request, message_q)
    if not message:
        raise ApiError(404, f"no message {email_id!r}")
    body = queries.message_body(message[0], await _rows(request, recipients_q),
                                await _rows(request, events_q))
    return json_response(body)


async def get_stats(request: web.Request) -> web.Response:
    query = queries.parse_stats(_params(request), _today())
    rows = await _rows(request, queries.stats_query(query))
    return json_response(queries.stats_body(query, rows))


async def get_link_stats(request: web.Request) -> web.Response:
    query = queries.parse_stats(_params(request), _today(), grouped=False)
    rows = await _rows(request, queries.links_query(query))
    return json_response(queries.links_body(query, rows))


# ---- OpenAPI description ----

def _param(name: str, description: str, schema: Mapping[str, Any] | None = None, *,
           required: bool = False, where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": description,
            "schema": dict(schema or {"type": "string"})}


def _ok(schema: Mapping[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description,
                    "content": {"application/json": {"schema": schema}}}}


def _object(properties: Mapping[str, Any], required: Sequence[str] | None = None
            ) -> dict[str, Any]:
    return {"type": "object", "required": list(properties if required is None else required),
            "properties": dict(properties)}


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
BOOLEAN = {"type": "boolean"}
NULLABLE_STRING = {"type": "string", "nullable": True}
RATE = {"type": "number", "nullable": True, "minimum": 0,
        "description": "a fraction (0.25 is 25%), null when the denominator is 0"}
DAY = {"type": "string", "format": "date"}

_TRACK_ROW = _object({name: STRING for name in (
    "RcptClickRate", "RcptUniqueOpenCount", "RcptClickCount", "RcptUniqueClickCount",
    "CreateTime", "RcptUniqueOpenRate", "RcptUniqueClickRate", "TotalNumber", "RcptOpenRate",
    "RcptOpenCount")})
TRACK_LIST = _object({
    "OffsetCreateTimeDesc": STRING, "OffsetCreateTime": STRING, "RequestId": STRING,
    "PageNo": INTEGER, "PageSize": INTEGER, "Total": INTEGER, "TotalPages": INTEGER,
    "data": _object({"stat": {"type": "array", "items": _TRACK_ROW}}),
})
DIGITS = {"type": "string", "pattern": "^[0-9]+$"}
_TRACK_PARAMS = [
    _param("StartTime", "First day, yyyy-MM-dd, within the last 30 days (UTC)", DAY,
           required=True),
    _param("EndTime", "Last day, yyyy-MM-dd, at most 7 days after StartTime", DAY,
           required=True),
    _param("PageSize", f"Days per page, 1-{MAX_PAGE_SIZE} (default {DEFAULT_PAGE_SIZE})",
           DIGITS),
    _param("PageNumber", "Page, from 1 (default 1)", DIGITS),
    _param("AccountName", "Sender address (all senders when omitted)"),
    _param("TagName", "Tag name (the X-AliDM-Trace TagName); requires AccountName"),
    _param("Esp", f"Recipients' provider: {', '.join(ESPS)}, or an alias such as "
                  "googlemail.com, hotmail.com, live.com, msn.com, me.com, ymail.com"),
    *(_param(name, "Deprecated; ignored") for name in
      ("Total", "Offset", "OffsetCreateTime", "OffsetCreateTimeDesc")),
    *(_param(name, "Not supported by the relay: must be empty") for name in
      ("DedicatedIpPoolId", "DedicatedIp", "ConfigSetId")),
]

_COUNTS = {"sent": INTEGER, "opens": INTEGER, "unique_opens": INTEGER, "clicks": INTEGER,
           "unique_clicks": INTEGER, "open_rate": RATE, "unique_open_rate": RATE,
           "click_rate": RATE, "unique_click_rate": RATE, "click_to_open_rate": RATE}
STATS = _object({"group_by": {"type": "string", "enum": list(queries.GROUPS)},
                 "since": DAY, "until": DAY,
                 "rows": {"type": "array", "items": _object({"key": NULLABLE_STRING,
                                                              **_COUNTS})}})
LINKS = _object({"since": DAY, "until": DAY, "links": {"type": "array", "items": _object(
    {"url": STRING, "clicks": INTEGER, "unique_clicks": INTEGER})}})
_WINDOW_PARAMS = [
    _param("since", "First day of the window, UTC (default: 29 days before until)", DAY),
    _param("until", "Last day of the window, UTC (default: today)", DAY),
    _param("limit", f"At most this many rows (default {queries.DEFAULT_ROWS})",
           {"type": "integer", "minimum": 1, "maximum": queries.MAX_ROWS}),
]

EVENT = _object({
    "id": STRING, "type": {"type": "string", "enum": list(queries.EVENT_TYPES)},
    "occurred_at": {"type": "string", "format": "date-time"}, "email_id": STRING,
    "recipient": STRING, "url": NULLABLE_STRING, "ip": NULLABLE_STRING, "user_agent": STRING,
    "method": STRING, "classification": STRING, "bot_source": NULLABLE_STRING,
    "reason": NULLABLE_STRING, "counted": BOOLEAN, "implied": BOOLEAN,
    "first_for_recipient": BOOLEAN, "first_for_link": BOOLEAN,
    # relay/tracking/enrich.py: from the user agent, and the location database when configured
    "device": NULLABLE_STRING, "client": NULLABLE_STRING, "os": NULLABLE_STRING,
    "geo": {**_object({"country": NULLABLE_STRING, "region": NULLABLE_STRING,
                       "city": NULLABLE_STRING}), "nullable": True},
})
EVENTS = _object({"events": {"type": "array", "items": EVENT},
                  "next_cursor": NULLABLE_STRING})
_EVENT_PARAMS = [
    _param("since", "From this instant: yyyy-mm-dd or an ISO 8601 date-time (UTC by default)"),
    _param("until", "Before this instant; a day (yyyy-mm-dd) is included whole"),
    _param("type", "open or click", {"type": "string", "enum": list(queries.EVENT_TYPES)}),
    _param("recipient", "Recipient address, exactly as sent"),
    _param("email_id", "The relay's message id (email_...)"),
    _param("tag", "A tag of the message (its TagName or one of its X-Anypost-Tags)"),
    _param("campaign", "The message's campaign"),
    _param("topic", "The message's topic"),
    _param("include_machine", "Also list machine traffic (prefetch, scanner, automation)",
           BOOLEAN),
    _param("cursor", "next_cursor of the previous page"),
    _param("limit", f"Events per page (default {queries.DEFAULT_PAGE})",
           {"type": "integer", "minimum": 1, "maximum": queries.MAX_PAGE}),
]
_STATUS = {"type": "string", "enum": list(queries.RECIPIENT_STATUSES),
           "description": "; ".join(f"{name}: {meaning}" for name, meaning in
                                    queries.RECIPIENT_STATUSES.items())}
MESSAGE_SUMMARY = _object({
    "email_id": STRING, "message_id": NULLABLE_STRING, "sender": STRING,
    "sender_domain": STRING, "subject": NULLABLE_STRING, "tag_name": NULLABLE_STRING,
    "tags": {"type": "array", "items": STRING}, "campaign": NULLABLE_STRING,
    "topic": NULLABLE_STRING, "size": INTEGER, "created_at": {"type": "string",
                                                              "format": "date-time"},
    "tracking": _object({"opens": BOOLEAN, "clicks": BOOLEAN, "decision": STRING,
                         "links": {**_object({
                             "total": INTEGER, "tracked": INTEGER, "omitted": INTEGER,
                             "untracked": {"type": "array", "items": _object({
                                 "href": STRING, "detail": STRING,
                                 "reason": {"type": "string", "enum": list(LINK_REASONS)}})},
                         }), "nullable": True}}),
    "statuses": {"type": "object", "additionalProperties": INTEGER,
                 "description": "how many recipients have each status"},
    "recipients": {"type": "array", "items": _object({
        "recipient": STRING, "status": _STATUS, "reply": STRING,
        "at": {"type": "string", "format": "date-time"}})},
})
MESSAGE = {**MESSAGE_SUMMARY, "required": [*MESSAGE_SUMMARY["required"], "events"],
           "properties": {**MESSAGE_SUMMARY["properties"],
                          "events": {"type": "array", "items": EVENT}}}
MESSAGES = _object({"messages": {"type": "array", "items": MESSAGE_SUMMARY},
                    "next_cursor": NULLABLE_STRING})
_MESSAGE_PARAMS = [
    _param("recipient", "A recipient's address (ASCII letters in any case)"),
    _param("message_id", "The Message-ID header, with or without its angle brackets"),
    _param("sender", "The envelope sender (MAIL FROM; ASCII letters in any case)"),
    _param("status", "Messages with a recipient in this state (the recipient named by "
                     "recipient, when given)", _STATUS),
    _param("since", "Received from this instant: yyyy-mm-dd or an ISO 8601 date-time (UTC by "
                    "default)"),
    _param("until", "Received before this instant; a day (yyyy-mm-dd) is included whole"),
    _param("cursor", "next_cursor of the previous page"),
    _param("limit", f"Messages per page (default {queries.DEFAULT_PAGE})",
           {"type": "integer", "minimum": 1, "maximum": queries.MAX_PAGE}),
]
_NOT_FOUND = {"404": {"description": "No such message", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Error"}}}}}

OPERATIONS = [
    Operation("GET", "/GetTrackList", get_track_list,
              "Opens and clicks per day, as Alibaba Direct Mail's GetTrackList",
              "GetTrackList", _TRACK_PARAMS, responses=_ok(TRACK_LIST), tags=("statistics",)),
    Operation("GET", "/events", list_events, "Open and click events, oldest first, paged",
              "listEvents", _EVENT_PARAMS, responses=_ok(EVENTS), tags=("events",)),
    Operation("GET", "/messages", list_messages,
              "Messages, newest first, paged: by recipient, Message-ID, sender, recipient "
              "status, time", "listMessages", _MESSAGE_PARAMS, responses=_ok(MESSAGES),
              tags=("messages",)),
    Operation("GET", "/messages/{email_id}", get_message,
              "One message: its tracking decision, recipients and events", "getMessage",
              [_param("email_id", "The relay's message id", required=True, where="path")],
              responses={**_ok(MESSAGE), **_NOT_FOUND}, tags=("events",)),
    Operation("GET", "/stats", get_stats, "Counts and rates grouped by day, tag, campaign, "
              "sender domain, device, client or country", "getStats",
              [*_WINDOW_PARAMS, _param("group_by", "day (default), tag, campaign, "
                                       "sender_domain, device, client, country (these three "
                                       "count opens and clicks: sent is 0)",
                                       {"type": "string", "enum": list(queries.GROUPS)})],
              responses=_ok(STATS), tags=("statistics",)),
    Operation("GET", "/stats/links", get_link_stats, "Clicks per link URL", "getLinkStats",
              _WINDOW_PARAMS, responses=_ok(LINKS), tags=("statistics",)),
]
