"""``GET /v1/events``: the relay's events (relay/store/reports.py, the reads of ``GET
/api/v1/events``) in the ``anypost`` SDK's ``Event`` shape, newest first, with its filters and
cursor.

As Anypost does, only what counts is listed: opens and clicks of people and of mailbox image
proxies (``tracking.bot``), never the machine traffic kept for audit. Every field of ``Event``
is present, ``null`` where it does not apply (``template_id`` and ``ip_pool`` always: the relay
has neither).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from relay.admin.http import Operation, json_response
from relay.admin.v1_http import CONTEXT, AnypostError
from relay.errors import InvalidParameter
from relay.stats import queries
from relay.stats.maths import parse_int
from relay.store import reports
from relay.tracking.bots import CLICK, OPEN
from relay.tracking.events import Event
from relay.webhooks.payloads import all_tags

DEFAULT_WINDOW = 24 * 3600.0
DEFAULT_LIMIT, MAX_LIMIT = 20, 100
MAX_TAGS = 10
# The SDK's event types, and the relay's stored type of each it has.
TYPES = {"email.opened": OPEN, "email.clicked": CLICK}
SDK_TYPES = ("email.sent", "email.delivered", "email.delayed", "email.bounced",
             "email.complained", "email.suppressed", "email.unsubscribed", "email.opened",
             "email.clicked")
NAMES = {stored: name for name, stored in TYPES.items()}


async def list_events(request: web.Request) -> web.Response:
    try:
        event_filter, empty = parse(request.query, time.time())
    except InvalidParameter as exc:
        raise AnypostError(400, str(exc), errors={exc.parameter: [str(exc)]}) from None
    if empty:  # a filter on something the relay never records matches nothing
        return json_response({"data": [], "has_more": False, "next_cursor": None})
    store = request.app[CONTEXT].store
    if event_filter.sender_domain is not None:
        rules = await request.app[CONTEXT].pipeline.rules.current()
        domain = event_filter.sender_domain
        if domain not in rules.domains and domain not in rules.tracking:
            raise AnypostError(400, f"unknown domain {domain!r}",
                               errors={"domain": ["not a sending domain of this relay"]})
    query = reports.events_query(event_filter)
    rows = await store.fetchall(query.sql, query.params)
    page = rows[:event_filter.limit]
    facts_query = reports.message_facts_query(sorted({row[3] for row in page}))
    facts = {row[0]: row for row in await store.fetchall(facts_query.sql, facts_query.params)
             } if page else {}
    more = len(rows) > event_filter.limit
    return json_response({
        "data": [event_json(Event._make(row), facts.get(row[3])) for row in page],
        "has_more": more,
        "next_cursor": queries.encode_cursor(page[-1][0]) if more else None,
    })


def parse(params: Mapping[str, str], now: float) -> tuple[queries.EventFilter, bool]:
    """The filter the SDK's parameters ask for, and whether it can match nothing at all."""
    end = queries.parse_instant("end", params["end"]) if params.get("end") else now
    start = (queries.parse_instant("start", params["start"]) if params.get("start")
             else end - DEFAULT_WINDOW)
    if start >= end:
        raise InvalidParameter("start", "must be before end")
    kind = params.get("event_type") or None
    if kind is not None and kind not in SDK_TYPES:
        raise InvalidParameter("event_type", f"{kind!r} is not one of {', '.join(SDK_TYPES)}")
    tags = tuple(t for t in (params.get("tags") or "").split(",") if t)
    if len(tags) > MAX_TAGS:
        raise InvalidParameter("tags", f"at most {MAX_TAGS} tags")
    recipient = params.get("recipient") or None
    f = queries.EventFilter(
        since=start, until=end, type=TYPES.get(kind or ""),
        recipient=recipient.lower() if recipient else None,
        email_id=params.get("email_id") or None, campaign=params.get("campaign") or None,
        topic=params.get("topic") or None, message_id=params.get("message_id") or None,
        sender_domain=(params.get("domain") or "").lower() or None, any_tags=tags,
        after=queries.decode_cursor(params["after"]) if params.get("after") else None,
        limit=parse_int("limit", params.get("limit") or str(DEFAULT_LIMIT), 1, MAX_LIMIT),
        newest_first=True)
    empty = (kind is not None and kind not in TYPES) or bool(
        params.get("template_id") or params.get("ip_pool"))
    return f, empty


def event_json(event: Event, message: Sequence[Any] | None) -> dict[str, Any]:
    """One event as the SDK's ``Event``: every field, ``null`` where it does not apply."""
    _, message_id, sender, domain, subject, tag_name, tags, campaign, topic = (
        message if message is not None else (None,) * 9)
    bot = event.bot
    return {
        "id": event.id, "type": NAMES.get(event.type, event.type),
        "occurred_at": queries.iso_time(event.at), "email_id": event.email_id,
        "message_id": message_id, "from": sender, "from_domain": domain,
        "recipient": event.recipient, "subject": subject, "campaign": campaign,
        "template_id": None, "topic": topic,
        "tags": list(all_tags(tag_name, json.loads(tags) if tags else [])),
        "ip_pool": None, "smtp_code": None, "bounce_type": None,
        "bounce_classification": None, "attempt": None,
        "tracking": {"bot": bot} if bot else None,
    }


_PARAMETERS = [
    {"name": name, "in": "query", "required": False, "schema": {"type": kind}}
    for name, kind in (("limit", "integer"), ("after", "string"), ("start", "string"),
                       ("end", "string"), ("event_type", "string"), ("recipient", "string"),
                       ("email_id", "string"), ("message_id", "string"), ("domain", "string"),
                       ("topic", "string"), ("campaign", "string"), ("template_id", "string"),
                       ("ip_pool", "string"), ("tags", "string"))]

OPERATIONS = [
    Operation("GET", "/events", list_events, "Opens and clicks, newest first, paged",
              "listEvents", _PARAMETERS, tags=("events",)),
]
