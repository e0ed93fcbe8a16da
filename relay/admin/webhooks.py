"""Managing webhook endpoints and their deliveries: ``relay webhooks ...`` and
``/api/v1/webhooks`` (tables and delivery: relay/webhooks/outbox.py).

Endpoints from the config file are listed beside those added here, and can only be changed in
the file. A secret is shown once, when an endpoint is added; listings never show it.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from relay import config as config_module
from relay.admin.commands import ConfigOption, fail, format_time, open_store, output, print_table
from relay.admin.http import CONTEXT, ERROR_REF, Operation, json_body, json_response
from relay.config import WebhookEndpoint
from relay.errors import ApiError, Conflict, InvalidInput
from relay.store import outbox as stored
from relay.store.transaction import transaction
from relay.webhooks.outbox import sync_endpoints
from relay.webhooks.payloads import EVENT_TYPES, FAILED, PENDING, new_secret

DELIVERY_STATES = ("pending", "delivered", "failed")


# --- storage ------------------------------------------------------------------------------


def add(conn: sqlite3.Connection, endpoint: WebhookEndpoint, now: float) -> None:
    found = endpoint.problem()
    if found:
        raise InvalidInput(found[1], found[0])
    stored.add_endpoint(conn, endpoint.name, endpoint.url, endpoint.secret, endpoint.events,
                        endpoint.allow_private, endpoint.timeout, now)


def remove(conn: sqlite3.Connection, name: str) -> bool:
    source = stored.endpoint_source(conn, name)
    if source == "config":
        raise Conflict(f"{name!r} is defined in the config file; remove it there")
    return source is not None and stored.delete_endpoint(conn, name)


def change(conn: sqlite3.Connection, name: str, url: str, events: Sequence[str]) -> None:
    """Give an added endpoint a new URL and events, checked as when it is added."""
    _, _, secret, allow_private, timeout = _changeable(conn, name)
    found = WebhookEndpoint(name, url, secret, tuple(events), bool(allow_private),
                            timeout).problem()
    if found:
        raise InvalidInput(found[1], found[0])
    stored.change_endpoint(conn, name, url, events)


def rotate(conn: sqlite3.Connection, name: str) -> str:
    """A new signing secret for an added endpoint, in force at once (no grace window: an
    endpoint has one secret); returns it."""
    _changeable(conn, name)
    secret = new_secret()
    stored.set_secret(conn, name, secret)
    return secret


def _changeable(conn: sqlite3.Connection, name: str) -> tuple[str, str, str, int, float]:
    """The stored target of an endpoint added at run time; Conflict for the config file's."""
    if stored.endpoint_source(conn, name) == "config":
        raise Conflict(f"{name!r} is defined in the config file; change it there")
    found = stored.target(conn, name)
    if found is None:
        raise InvalidInput(f"no endpoint named {name!r}", "name")
    return found


def failed_batches(conn: sqlite3.Connection, endpoint: str | None) -> list[str]:
    return [row["id"] for row in stored.deliveries(conn, endpoint, FAILED, limit=None)]


# --- command line -------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    parser = commands.add_parser("webhooks", help="webhook endpoints and their deliveries")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    subs = []
    listing = actions.add_parser("list", help="list endpoints (never their secrets)")
    listing.set_defaults(run=_list)
    adding = actions.add_parser("add", help="add an endpoint; prints its secret once")
    adding.add_argument("name")
    adding.add_argument("url")
    adding.add_argument("--event", action="append", choices=EVENT_TYPES, dest="events",
                        help="subscribe to this event (repeat; default: all)")
    adding.add_argument("--secret-stdin", action="store_true",
                        help="read the whsec_ secret from standard input (default: generate)")
    adding.add_argument("--allow-private", action="store_true",
                        help="allow loopback, private and link-local target addresses")
    adding.add_argument("--timeout", type=float, default=10.0, help="seconds per attempt")
    adding.set_defaults(run=_add)
    for name, run, text in (("remove", _remove, "remove an endpoint and its queue"),
                            ("enable", _enable, "enable an endpoint disabled by a 410")):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("name")
        sub.set_defaults(run=run)
        subs.append(sub)
    shown = actions.add_parser("deliveries", help="list deliveries (batches) and failures")
    shown.add_argument("--endpoint")
    shown.add_argument("--state", choices=DELIVERY_STATES)
    shown.add_argument("--limit", type=int, default=50)
    shown.add_argument("--batch", help="show one batch: its attempts and event ids")
    shown.set_defaults(run=_deliveries)
    again = actions.add_parser("replay", help="send batches again (same batch and event ids)")
    again.add_argument("batch_ids", nargs="*", metavar="BATCH_ID")
    again.add_argument("--failed", action="store_true", help="every failed batch")
    again.add_argument("--endpoint", help="with --failed: only this endpoint's")
    again.set_defaults(run=_replay)
    for sub in (listing, adding, shown, again, *subs):
        config_option(sub)


def _open(args: argparse.Namespace) -> tuple[sqlite3.Connection, config_module.Config]:
    """The store, with the config file's endpoints synced into it."""
    cfg = config_module.load(args.config)
    conn = open_store(args)
    sync_endpoints(conn, cfg.webhooks, time.time())
    return conn, cfg


def _list(args: argparse.Namespace) -> int:
    conn, _ = _open(args)
    found = stored.endpoint_listing(conn)
    return output(args, {"webhooks": found}, lambda: print_table(
        ("NAME", "SOURCE", "URL", "EVENTS", "STATE", "WAITING"), [
            (e["name"], e["source"], e["url"], ",".join(e["events"]),
             f"disabled {format_time(e['disabled_at'])}" if e["disabled_at"] else "enabled",
             e["waiting_events"]) for e in found]))


def _add(args: argparse.Namespace) -> int:
    conn, _ = _open(args)
    secret = sys.stdin.readline().strip() if args.secret_stdin else new_secret()
    endpoint = WebhookEndpoint(args.name, args.url, secret, tuple(args.events or EVENT_TYPES),
                               args.allow_private, args.timeout)
    with transaction(conn):
        add(conn, endpoint, time.time())

    def human() -> None:  # the secret alone on standard output, for scripts
        print(secret)
        print(f"relay: added webhook endpoint {args.name!r}; its signing secret is shown only "
              "this once", file=sys.stderr)

    return output(args, {"name": args.name, "secret": secret}, human)


def _remove(args: argparse.Namespace) -> int:
    conn, _ = _open(args)
    with transaction(conn):
        removed = remove(conn, args.name)
    if not removed:
        return fail(f"no endpoint named {args.name!r}")
    return output(args, {"name": args.name, "removed": True},
                  lambda: print(f"removed {args.name}"))


def _enable(args: argparse.Namespace) -> int:
    conn, _ = _open(args)
    with transaction(conn):
        if not stored.enable_endpoint(conn, args.name):
            return fail(f"no endpoint named {args.name!r}")
    return output(args, {"name": args.name, "enabled": True},
                  lambda: print(f"enabled {args.name}"))


def _deliveries(args: argparse.Namespace) -> int:
    conn, _ = _open(args)
    if args.batch:
        found = stored.batch(conn, args.batch)
        if found is None:
            return fail(f"no batch {args.batch!r}")
        return output(args, found, lambda: _print_batch(found))
    rows = stored.deliveries(conn, args.endpoint, args.state, args.limit)
    return output(args, {"deliveries": rows}, lambda: print_table(
        ("BATCH", "ENDPOINT", "STATE", "EVENTS", "ATTEMPTS", "CREATED", "NEXT", "LAST"), [
            (d["id"], d["endpoint"], d["state"], d["events"], d["attempts"],
             format_time(d["created_at"]),
             format_time(d["next_at"]) if d["state"] == PENDING else "-",
             d["last_error"] or d["last_status"]) for d in rows]))


def _print_batch(found: dict[str, Any]) -> None:
    print(f"{found['id']} to {found['endpoint']}: {found['state']}, "
          f"{found['events']} events: {' '.join(found['event_ids'])}")
    print_table(("ATTEMPT", "AT", "SECONDS", "STATUS", "ERROR"), [
        (a["attempt"], format_time(a["at"]), f"{a['seconds']:.2f}", a["status"], a["error"])
        for a in found["attempt_log"]])


def _replay(args: argparse.Namespace) -> int:
    conn, cfg = _open(args)
    if bool(args.batch_ids) == args.failed:
        return fail("name batch ids, or --failed (optionally with --endpoint)", 2)
    with transaction(conn):
        ids = failed_batches(conn, args.endpoint) if args.failed else args.batch_ids
        count = stored.replay(conn, ids, PENDING, time.time(),
                              cfg.webhook_delivery.retry_hours * 3600)
    output(args, {"replayed": count}, lambda: print(f"{count} batches queued again"))
    return 0 if count == len(ids) else 1


# --- API ----------------------------------------------------------------------------------


async def _list_endpoints(request: web.Request) -> web.Response:
    return json_response({"webhooks": await request.app[CONTEXT].store.read(
        stored.endpoint_listing)})


async def _add_endpoint(request: web.Request) -> web.Response:
    body = await json_body(request)
    endpoint = WebhookEndpoint(
        _typed(body, "name", str, ""), _typed(body, "url", str, ""),
        _typed(body, "secret", str, "") or new_secret(),
        tuple(_typed(body, "events", list, list(EVENT_TYPES))),
        _typed(body, "allow_private", bool, False), _seconds(body, "timeout", 10.0))
    await request.app[CONTEXT].store.write(lambda conn: add(conn, endpoint, time.time()))
    return json_response({"name": endpoint.name, "secret": endpoint.secret}, 201)


def _typed(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidInput(f"{key}: wrong type")
    return value


def _seconds(body: dict[str, Any], key: str, default: float) -> float:
    try:
        return float(_typed(body, key, (int, float), default))
    except OverflowError:  # float() of a huge integer
        raise InvalidInput(f"{key}: int too large to convert to float") from None


async def _remove_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    removed = await request.app[CONTEXT].store.write(lambda conn: remove(conn, name))
    if not removed:
        raise ApiError(404, f"no endpoint named {name!r}")
    return web.Response(status=204)


async def _enable_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    enabled = await request.app[CONTEXT].store.write(
        lambda conn: stored.enable_endpoint(conn, name))
    if not enabled:
        raise ApiError(404, f"no endpoint named {name!r}")
    return json_response({"name": name, "enabled": True})


async def _list_deliveries(request: web.Request) -> web.Response:
    query = request.query
    state = query.get("state")
    if state is not None and state not in DELIVERY_STATES:
        raise InvalidInput(f"state: one of {', '.join(DELIVERY_STATES)}")
    try:
        limit = int(query.get("limit", "50"))
    except ValueError:
        raise InvalidInput("limit: a number") from None
    endpoint, limit = query.get("endpoint"), max(1, min(limit, 1000))
    rows = await request.app[CONTEXT].store.read(
        lambda conn: stored.deliveries(conn, endpoint, state, limit))
    return json_response({"deliveries": rows})


async def _show_delivery(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    found = await request.app[CONTEXT].store.read(lambda conn: stored.batch(conn, batch_id))
    if found is None:
        raise ApiError(404, "no such batch")
    return json_response(found)


async def _replay_deliveries(request: web.Request) -> web.Response:
    body = await json_body(request)
    context = request.app[CONTEXT]
    keep_trying = context.config.webhook_delivery.retry_hours * 3600
    ids = body.get("batch_ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise InvalidInput("batch_ids: a list of batch ids")
    if (ids is None) != (body.get("failed") is True):
        raise InvalidInput('send "batch_ids", or "failed": true (optionally with "endpoint")')
    if not isinstance(body.get("endpoint", ""), str):
        raise InvalidInput("endpoint: the name of a webhook endpoint")

    def write(conn: sqlite3.Connection) -> int:
        chosen = ids if ids is not None else failed_batches(conn, body.get("endpoint"))
        return stored.replay(conn, chosen, PENDING, time.time(), keep_trying)

    return json_response({"replayed": await context.store.write(write)})


_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
_ADD_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["name", "url"], "properties": {
        "name": {"type": "string"}, "url": {"type": "string"},
        "secret": {"type": "string", "description": "whsec_ + base64; generated if absent"},
        "events": {"type": "array", "items": {"type": "string", "enum": list(EVENT_TYPES)}},
        "allow_private": {"type": "boolean"}, "timeout": {"type": "number"}}}}}}
_REPLAY_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {
        "batch_ids": {"type": "array", "items": {"type": "string"}},
        "failed": {"type": "boolean"}, "endpoint": {"type": "string"}}}}}}
_TAGS = ("webhooks",)

OPERATIONS = [
    Operation("GET", "/webhooks", _list_endpoints, "List webhook endpoints", "listWebhooks",
              tags=_TAGS),
    Operation("POST", "/webhooks", _add_endpoint, "Add a webhook endpoint (returns its secret)",
              "addWebhook", request_body=_ADD_BODY, tags=_TAGS, responses={
                  "201": {"description": "Added: its name and secret"},
                  "409": {"description": "An endpoint of that name exists already",
                          **ERROR_REF}}),
    Operation("DELETE", "/webhooks/{name}", _remove_endpoint, "Remove a webhook endpoint",
              "removeWebhook", parameters=_NAME, tags=_TAGS, responses={
                  "204": {"description": "Removed"},
                  "409": {"description": "Defined in the config file: remove it there",
                          **ERROR_REF}}),
    Operation("POST", "/webhooks/{name}/enable", _enable_endpoint,
              "Enable an endpoint disabled by a 410", "enableWebhook", parameters=_NAME,
              tags=_TAGS),
    Operation("GET", "/webhook-deliveries", _list_deliveries, "List webhook deliveries",
              "listWebhookDeliveries", tags=_TAGS, parameters=[
                  {"name": n, "in": "query", "schema": {"type": t}}
                  for n, t in (("endpoint", "string"), ("state", "string"),
                               ("limit", "integer"))]),
    Operation("GET", "/webhook-deliveries/{batch_id}", _show_delivery,
              "A delivery with its attempts", "getWebhookDelivery", tags=_TAGS,
              parameters=[{"name": "batch_id", "in": "path", "required": True,
                           "schema": {"type": "string"}}]),
    Operation("POST", "/webhook-deliveries/replay", _replay_deliveries, "Send deliveries again",
              "replayWebhookDeliveries", request_body=_REPLAY_BODY, tags=_TAGS),
]
