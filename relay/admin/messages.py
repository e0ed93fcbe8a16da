"""Messages: find them and see what became of each recipient, with ``relay messages
list|show`` and ``GET /api/v1/messages[/{email_id}]``, over the same queries
(relay/stats/queries.py). Before the CLI reads, the ``sending`` recipients of relay processes
that stopped are marked ``unknown`` (relay/smtp/processes.py), as a relay does at start.
"""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from relay.admin.commands import ConfigOption, fail, open_store, output, print_table
from relay.admin.http import (
    BOOLEAN,
    CONTEXT,
    INTEGER,
    NULLABLE_STRING,
    STRING,
    Operation,
    fetch,
    json_response,
    obj,
    ok,
    param,
    query_params,
)
from relay.admin.stats import EVENT, print_events
from relay.errors import ApiError
from relay.rewrite.splice import LINK_REASONS
from relay.smtp import processes
from relay.stats import queries
from relay.store import reports
from relay.store.engine import Store


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    parser = commands.add_parser("messages", help="find messages and their recipients' outcome")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    statuses = "; ".join(f"{name}: {meaning}" for name, meaning in
                         queries.RECIPIENT_STATUSES.items())
    listing = actions.add_parser(
        "list", help="messages, newest first",
        description="Messages, newest first. A recipient's status is one of: " + statuses)
    listing.add_argument("--recipient", help="a recipient's address")
    listing.add_argument("--message-id", help="the Message-ID header, <> optional")
    listing.add_argument("--sender", help="the envelope sender")
    listing.add_argument("--subject", help="a part of the subject (any case)")
    listing.add_argument("--status", choices=list(queries.RECIPIENT_STATUSES),
                         help="with a recipient (--recipient's, if given) in this state")
    listing.add_argument("--since", help="yyyy-mm-dd or ISO 8601 date-time")
    listing.add_argument("--until", help="yyyy-mm-dd (included) or ISO 8601 date-time")
    listing.add_argument("--limit", type=int, default=queries.DEFAULT_PAGE, help="at most N")
    listing.add_argument("--cursor", help="next_cursor of a previous page")
    listing.set_defaults(run=_list)
    show = actions.add_parser("show", help="one message: recipients and events")
    show.add_argument("email_id", metavar="EMAIL_ID")
    show.set_defaults(run=_show)
    for sub in (listing, show):
        config_option(sub)


def _open(args: argparse.Namespace) -> sqlite3.Connection:
    conn = open_store(args)
    processes.sweep(conn)
    return conn


def _list(args: argparse.Namespace) -> int:
    params = {"recipient": args.recipient or "", "message_id": args.message_id or "",
              "sender": args.sender or "", "subject": args.subject or "",
              "status": args.status or "",
              "since": args.since or "", "until": args.until or "",
              "limit": str(args.limit), "cursor": args.cursor or ""}
    message_filter = queries.parse_messages(params)
    conn = _open(args)
    query = queries.messages_query(message_filter)
    rows = reports.rows(conn, query)
    page = [row[0] for row in rows[:message_filter.limit]]
    recipients = queries.recipients_query(page)
    body = queries.messages_body(message_filter, rows,
                                 reports.rows(conn, recipients))
    return output(args, body, lambda: _print_list(body))


def _print_list(body: Mapping[str, Any]) -> None:
    if not body["messages"]:
        print("no messages")
    else:
        print_table(["received", "email id", "sender", "recipients", "status", "subject"], [
            (m["created_at"], m["email_id"], m["sender"], _recipients(m), _statuses(m),
             m["subject"]) for m in body["messages"]])
    if body["next_cursor"]:
        print(f"more: --cursor {body['next_cursor']}")


def _recipients(message: Mapping[str, Any]) -> str:
    recipients = message["recipients"]
    if not recipients:
        return "-"
    more = f" +{len(recipients) - 1}" if len(recipients) > 1 else ""
    return recipients[0]["recipient"] + more


def _statuses(message: Mapping[str, Any]) -> str:
    return ", ".join(f"{status} {count}" if len(message["statuses"]) > 1 else status
                     for status, count in sorted(message["statuses"].items())) or "-"


def _show(args: argparse.Namespace) -> int:
    conn = _open(args)
    message_q, recipients_q, events_q = queries.message_queries(args.email_id)
    found = reports.rows(conn, message_q)
    if not found:
        return fail(f"no message {args.email_id!r}")
    body = queries.message_body(
        found[0], reports.rows(conn, recipients_q),
        reports.rows(conn, events_q),
        reports.rows(conn, queries.message_delivery_events_query(args.email_id)))
    return output(args, body, lambda: _print_message(body))


def _print_message(m: Mapping[str, Any]) -> None:
    print(f"{m['email_id']}  received {m['created_at']}  from {m['sender']}")
    for label, value in (("Message-ID", m["message_id"]), ("subject", m["subject"]),
                         ("tag", m["tag_name"]), ("tags", ", ".join(m["tags"])),
                         ("campaign", m["campaign"]), ("topic", m["topic"]),
                         ("tracking", m["tracking"]["decision"])):
        if value:
            print(f"  {label}: {value}")
    print()
    print_table(["recipient", "status", "at", "reply"],
                [(r["recipient"], r["status"], r["at"], r["reply"]) for r in m["recipients"]])
    print()
    if m["events"]:
        print_events(m["events"])
    else:
        print("no opens or clicks")


# ---- API ----

async def list_messages(request: web.Request) -> web.Response:
    message_filter = queries.parse_messages(query_params(request))
    rows = await fetch(request, queries.messages_query(message_filter))
    page = rows[:message_filter.limit]
    recipients = await fetch(request, queries.recipients_query([row[0] for row in page]))
    return json_response(queries.messages_body(message_filter, rows, recipients))


async def message_view(store: Store, email_id: str) -> dict[str, Any] | None:
    """One message as ``GET /api/v1/messages/{email_id}`` and the dashboard's message page
    show it: its recipients and their outcome, and every event, opens and clicks and queue
    mode's delivery events (``delayed``, ``bounced``) merged oldest first; None when the
    store has no such message. Read on the store's reader thread."""
    message_q, recipients_q, events_q = queries.message_queries(email_id)
    deliveries_q = queries.message_delivery_events_query(email_id)
    message = await store.fetchall(message_q.sql, message_q.params)
    if not message:
        return None
    return queries.message_body(
        message[0], *[await store.fetchall(q.sql, q.params)
                      for q in (recipients_q, events_q, deliveries_q)])


async def get_message(request: web.Request) -> web.Response:
    email_id = request.match_info["email_id"]
    body = await message_view(request.app[CONTEXT].store, email_id)
    if body is None:
        raise ApiError(404, f"no message {email_id!r}")
    return json_response(body)


_STATUS = {"type": "string", "enum": list(queries.RECIPIENT_STATUSES),
           "description": "; ".join(f"{name}: {meaning}" for name, meaning in
                                    queries.RECIPIENT_STATUSES.items())}
MESSAGE_SUMMARY = obj({
    "email_id": STRING, "message_id": NULLABLE_STRING, "sender": STRING,
    "sender_domain": STRING, "subject": NULLABLE_STRING, "tag_name": NULLABLE_STRING,
    "tags": {"type": "array", "items": STRING}, "campaign": NULLABLE_STRING,
    "topic": NULLABLE_STRING, "size": INTEGER, "created_at": {"type": "string",
                                                              "format": "date-time"},
    "tracking": obj({"opens": BOOLEAN, "clicks": BOOLEAN, "decision": STRING,
                         "links": {**obj({
                             "total": INTEGER, "tracked": INTEGER, "omitted": INTEGER,
                             "untracked": {"type": "array", "items": obj({
                                 "href": STRING, "detail": STRING,
                                 "reason": {"type": "string", "enum": list(LINK_REASONS)}})},
                         }), "nullable": True}}),
    "statuses": {"type": "object", "additionalProperties": INTEGER,
                 "description": "how many recipients have each status"},
    "recipients": {"type": "array", "items": obj({
        "recipient": STRING, "status": _STATUS, "reply": STRING,
        "at": {"type": "string", "format": "date-time"}})},
})
MESSAGE = {**MESSAGE_SUMMARY, "required": [*MESSAGE_SUMMARY["required"], "events"],
           "properties": {**MESSAGE_SUMMARY["properties"],
                          "events": {"type": "array", "items": EVENT}}}
MESSAGES = obj({"messages": {"type": "array", "items": MESSAGE_SUMMARY},
                    "next_cursor": NULLABLE_STRING})
_MESSAGE_PARAMS = [
    param("recipient", "A recipient's address (ASCII letters in any case)"),
    param("message_id", "The Message-ID header, with or without its angle brackets"),
    param("sender", "The envelope sender (MAIL FROM; ASCII letters in any case)"),
    param("subject", "A part of the subject, in any case (ASCII letters on SQLite; at most "
                     f"{queries.MAX_SUBJECT_SEARCH} characters)"),
    param("status", "Messages with a recipient in this state (the recipient named by "
                     "recipient, when given)", _STATUS),
    param("since", "Received from this instant: yyyy-mm-dd or an ISO 8601 date-time (UTC by "
                    "default)"),
    param("until", "Received before this instant; a day (yyyy-mm-dd) is included whole"),
    param("cursor", "next_cursor of the previous page"),
    param("limit", f"Messages per page (default {queries.DEFAULT_PAGE})",
           {"type": "integer", "minimum": 1, "maximum": queries.MAX_PAGE}),
]
_NOT_FOUND = {"404": {"description": "No such message", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Error"}}}}}

OPERATIONS = [
    Operation("GET", "/messages", list_messages,
              "Messages, newest first, paged: by recipient, Message-ID, sender, recipient "
              "status, time", "listMessages", _MESSAGE_PARAMS, responses=ok(MESSAGES),
              tags=("messages",)),
    Operation("GET", "/messages/{email_id}", get_message,
              "One message: its tracking decision, recipients and events", "getMessage",
              [param("email_id", "The relay's message id", required=True, where="path")],
              responses={**ok(MESSAGE), **_NOT_FOUND}, tags=("events",)),
]
