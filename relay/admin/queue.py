"""``relay queue list|show|retry|hold|release|delete`` and the same under ``/api/v1/queue``:
what queue mode holds (relay/store/queue.py) and what an operator may do with it.

``retry`` makes a message due now; ``hold`` keeps the workers from it until ``release``;
``delete`` drops it and its recipients still waiting, without a bounce (their record in
``relay messages`` stays as it was). An action that changes nothing says why (:func:`refusal`):
no such message, a held one (retry it once released), or, for ``delete``, one an attempt is
sending: that attempt cannot be called back from the upstream, so the delete is refused
rather than answered while the copies still go out.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from relay.admin.commands import ConfigOption, fail, open_store, output, print_table
from relay.admin.http import CONTEXT, Operation, json_response
from relay.errors import ApiError, InvalidInput
from relay.smtp import delivery
from relay.stats.queries import iso_time
from relay.store import queue
from relay.store.transaction import transaction

DEFAULT_PAGE = 50
MAX_PAGE = 1000


def _limit(text: str | None) -> int:
    if not text:
        return DEFAULT_PAGE
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise InvalidInput(f"limit: a number from 1 to {MAX_PAGE}, got {text!r}")
    return int(text)


def _state(text: str | None) -> str | None:
    if text and text not in queue.MESSAGE_STATES:
        raise InvalidInput(f"state: one of {', '.join(queue.MESSAGE_STATES)}, got {text!r}")
    return text or None


def list_body(conn: sqlite3.Connection, now: float, state: str | None, after: str | None,
              limit: int) -> dict[str, Any]:
    rows = queue.listing(conn, now, state, after, limit + 1)
    page = rows[:limit]
    messages, size = queue.totals(conn)
    return {"messages": [_message_json(row) for row in page],
            "totals": {"messages": messages, "bytes": size},
            "next_cursor": page[-1]["email_id"] if len(rows) > limit else None}


def show_body(conn: sqlite3.Connection, email_id: str, now: float) -> dict[str, Any] | None:
    found = queue.message(conn, email_id, now)
    if found is None:
        return None
    row, recipients = found
    return {**_message_json(row), "recipients": [
        {"recipient": r["recipient"], "state": r["state"], "attempts": r["attempts"],
         "smtp_code": r["smtp_code"], "reply": r["reply"],
         "updated_at": iso_time(r["updated_at"])} for r in recipients]}


# What an operator may do to one queued message (the API below, the dashboard's operations
# page): the change, run in a write; what it returns is false when the message is not queued.
ACTIONS: Mapping[str, Callable[[sqlite3.Connection, str], int | bool]] = {
    "retry": lambda conn, email_id: queue.retry_now(conn, email_id, time.time()),
    "hold": lambda conn, email_id: queue.set_held(conn, email_id, True),
    "release": lambda conn, email_id: queue.set_held(conn, email_id, False),
}


def _message_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"email_id": row["email_id"], "state": row["state"], "sender": row["sender"],
            "size": row["size"], "received_at": iso_time(row["received_at"]),
            "expires_at": iso_time(row["expires_at"]),
            "next_attempt_at": iso_time(row["next_at"]), "attempts": row["attempts"],
            "recipients_waiting": row["waiting"], "last_reply": row["last_reply"]}


def refusal(conn: sqlite3.Connection, email_id: str, now: float) -> tuple[int, str]:
    """Why an action changed nothing: the API's status and the words."""
    state = queue.state(conn, email_id, now)
    if state is None:
        return 404, f"no queued message {email_id!r}"
    if state == "held":
        return 409, f"{email_id} is held: release it first"
    return 409, (f"{email_id} is being sent (its copies may be at the upstream already); "
                 "hold it, and delete it once the attempt ended")


def _delete_now(conn: sqlite3.Connection, email_id: str) -> bool:
    now = time.time()
    delivery.release_dead(conn, now)  # a killed relay's lease holds no attempt
    return queue.delete(conn, email_id, now)


# --- CLI -----------------------------------------------------------------------------------

def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    parser = commands.add_parser("queue", help="queue mode: messages waiting for delivery")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list", help="queued messages, oldest first",
        description="Queued messages, oldest first. States: waiting (not tried yet), "
                    "deferred (tried, to be tried again), sending (an attempt in progress), "
                    "held (relay queue hold).")
    listing.add_argument("--state", choices=queue.MESSAGE_STATES)
    listing.add_argument("--limit", type=int, default=DEFAULT_PAGE, help="at most N")
    listing.add_argument("--cursor", help="next_cursor of a previous page")
    listing.set_defaults(run=_list)
    subs = [listing]
    for name, text, run in (
            ("show", "one queued message and its recipients", _show),
            ("hold", "no delivery attempt until released", _hold),
            ("release", "let a held message be delivered again", _release),
            ("delete", "drop a message from the queue, without a bounce", _delete)):
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument("email_id", metavar="EMAIL_ID")
        sub.set_defaults(run=run)
        subs.append(sub)
    retry = actions.add_parser("retry", help="try a message (or all) now",
                               description="Make a message, or with --all every message not "
                                           "held, due now.")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("email_id", metavar="EMAIL_ID", nargs="?")
    which.add_argument("--all", action="store_true")
    retry.set_defaults(run=_retry)
    subs.append(retry)
    for sub in subs:
        config_option(sub)


def _list(args: argparse.Namespace) -> int:
    try:
        limit = _limit(str(args.limit))
    except InvalidInput as exc:
        return fail(str(exc))
    body = list_body(open_store(args), time.time(), args.state, args.cursor, limit)
    return output(args, body, lambda: _print_list(body))


def _print_list(body: Mapping[str, Any]) -> None:
    totals = body["totals"]
    print(f"{totals['messages']} message(s), {totals['bytes']} bytes queued")
    if body["messages"]:
        print_table(["email id", "state", "received", "attempts", "next attempt", "waiting",
                     "sender", "last reply"],
                    [(m["email_id"], m["state"], m["received_at"], m["attempts"],
                      m["next_attempt_at"], m["recipients_waiting"], m["sender"] or "<>",
                      (m["last_reply"] or "")[:60]) for m in body["messages"]])
    if body["next_cursor"]:
        print(f"more: --cursor {body['next_cursor']}")


def _show(args: argparse.Namespace) -> int:
    body = show_body(open_store(args), args.email_id, time.time())
    if body is None:
        return fail(f"no queued message {args.email_id!r}")
    return output(args, body, lambda: _print_message(body))


def _print_message(m: Mapping[str, Any]) -> None:
    print(f"{m['email_id']}  {m['state']}  from {m['sender'] or '<>'}  {m['size']} bytes")
    print(f"  received {m['received_at']}, attempts {m['attempts']}, next "
          f"{m['next_attempt_at']}, expires {m['expires_at']}")
    print_table(["recipient", "state", "attempts", "reply"],
                [(r["recipient"], r["state"], r["attempts"], r["reply"] or "")
                 for r in m["recipients"]])


def _changed(args: argparse.Namespace, conn: sqlite3.Connection, count: int, what: str
             ) -> int:
    if not count:
        return fail(refusal(conn, args.email_id, time.time())[1])
    return output(args, {"email_id": args.email_id, "changed": count},
                  lambda: print(f"{what}: {count} message(s)"))


def _retry(args: argparse.Namespace) -> int:
    conn = open_store(args)
    count = queue.retry_now(conn, None if args.all else args.email_id, time.time())
    if args.all:
        return output(args, {"changed": count}, lambda: print(f"due now: {count} message(s)"))
    return _changed(args, conn, count, "due now")


def _hold(args: argparse.Namespace) -> int:
    conn = open_store(args)
    return _changed(args, conn, int(queue.set_held(conn, args.email_id, True)), "held")


def _release(args: argparse.Namespace) -> int:
    conn = open_store(args)
    return _changed(args, conn, int(queue.set_held(conn, args.email_id, False)), "released")


def _delete(args: argparse.Namespace) -> int:
    conn = open_store(args)
    with transaction(conn):
        deleted = _delete_now(conn, args.email_id)
    return _changed(args, conn, int(deleted), "deleted")


# --- API -----------------------------------------------------------------------------------

async def _api_list(request: web.Request) -> web.Response:
    limit = _limit(request.query.get("limit"))  # InvalidInput: a 400
    state = _state(request.query.get("state"))
    after = request.query.get("cursor")
    store = request.app[CONTEXT].store
    return json_response(await store.write(
        lambda conn: list_body(conn, time.time(), state, after, limit)))


async def _api_show(request: web.Request) -> web.Response:
    email_id = request.match_info["email_id"]
    body = await request.app[CONTEXT].store.write(
        lambda conn: show_body(conn, email_id, time.time()))
    if body is None:
        raise ApiError(404, f"no queued message {email_id!r}")
    return json_response(body)


def _action(change: Any) -> Any:
    async def handler(request: web.Request) -> web.Response:
        email_id = request.match_info["email_id"]

        def run(conn: sqlite3.Connection) -> tuple[int | bool, tuple[int, str] | None]:
            changed = change(conn, email_id)
            return changed, None if changed else refusal(conn, email_id, time.time())
        changed, refused = await request.app[CONTEXT].store.write(run)
        if refused is not None:
            raise ApiError(*refused)
        return json_response({"email_id": email_id, "changed": int(changed)})
    return handler


async def _api_retry_all(request: web.Request) -> web.Response:
    count = await request.app[CONTEXT].store.write(
        lambda conn: queue.retry_now(conn, None, time.time()))
    return json_response({"changed": count})


_EMAIL_ID = [{"name": "email_id", "in": "path", "required": True, "schema": {"type": "string"}}]

OPERATIONS = [
    Operation("GET", "/queue", _api_list, "Queued messages, oldest first, with the totals",
              "listQueue", tags=["queue"], parameters=[
                  {"name": "state", "in": "query", "schema": {
                      "type": "string", "enum": list(queue.MESSAGE_STATES)}},
                  {"name": "limit", "in": "query", "schema": {
                      "type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
                  {"name": "cursor", "in": "query", "schema": {"type": "string"}}]),
    Operation("POST", "/queue/retry", _api_retry_all, "Make every message not held due now",
              "retryQueue", tags=["queue"]),
    Operation("GET", "/queue/{email_id}", _api_show, "One queued message and its recipients",
              "getQueuedMessage", tags=["queue"], parameters=_EMAIL_ID),
    Operation("POST", "/queue/{email_id}/retry",
              _action(ACTIONS["retry"]),
              "Make a queued message due now", "retryQueuedMessage", tags=["queue"],
              parameters=_EMAIL_ID),
    Operation("POST", "/queue/{email_id}/hold",
              _action(ACTIONS["hold"]),
              "Hold a queued message: no delivery attempt until released", "holdQueuedMessage",
              tags=["queue"], parameters=_EMAIL_ID),
    Operation("POST", "/queue/{email_id}/release",
              _action(ACTIONS["release"]),
              "Release a held message", "releaseQueuedMessage", tags=["queue"],
              parameters=_EMAIL_ID),
    Operation("DELETE", "/queue/{email_id}", _action(_delete_now),
              "Drop a message from the queue, without a bounce", "deleteQueuedMessage",
              tags=["queue"], parameters=_EMAIL_ID),
]
