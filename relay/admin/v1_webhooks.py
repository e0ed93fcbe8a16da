"""``/v1/webhooks``: the ``anypost`` SDK's webhooks, mapped onto the relay's webhook endpoints
(relay/admin/webhooks.py, ``[[webhooks]]``), so one set of endpoints is managed through either
API or ``relay webhooks``.

A webhook's ``id`` and ``name`` are the endpoint's name (1-64 letters, digits, ``-``, ``_``).
Its ``status`` is ``active``, or ``disabled`` once paused (``PATCH`` with ``status: disabled``)
or disabled by the relay (a ``410``); ``PATCH`` with ``status: active`` enables it again.
``PATCH`` changes the URL and events of an endpoint added at run time (the config file's are
changed in the file: a ``409``), checked as ``relay webhooks add`` checks them.
``rotate-secret`` puts a new secret in force at once: an endpoint has one secret, so there is no
grace window (``signing_secret_previous_prefix`` stays ``null``). What the relay's endpoints
cannot do is refused by name: renaming a webhook. ``test`` sends one ``webhook.test`` event
at once, signed with the current secret, and answers what the receiver said.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from aiohttp import web

from relay.admin import webhooks
from relay.admin.http import Operation, json_response
from relay.admin.v1_http import CONTEXT, AnypostError, read_json
from relay.config import WebhookEndpoint
from relay.ids import uuid7
from relay.stats.queries import iso_time
from relay.store import outbox as stored
from relay.tracking.events import EVENT_PREFIX
from relay.webhooks.outbox import Sender, Target
from relay.webhooks.payloads import BATCH_PREFIX, StoredEvent, new_secret

DEFAULT_LIMIT, MAX_LIMIT = 20, 100


def webhook_json(endpoint: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {
        "id": endpoint["name"], "name": endpoint["name"], "url": endpoint["url"],
        "events": endpoint["events"],
        "status": "disabled" if endpoint["disabled_at"] else "active",
        "signing_secret_prefix": prefix, "signing_secret_previous_prefix": None,
        "signing_secret_grace_expires_at": None, "last_delivery_at": None,
        "created_at": iso_time(endpoint["created_at"]),
    }


async def _all(request: web.Request) -> list[dict[str, Any]]:
    shown, found = await request.app[CONTEXT].store.read(
        lambda conn: (stored.secret_prefixes(conn), stored.endpoint_listing(conn)))
    return [webhook_json(e, shown.get(e["name"], "")) for e in found]


async def _one(request: web.Request, name: str | None = None) -> dict[str, Any]:
    name = name or request.match_info["id"]
    for webhook in await _all(request):
        if webhook["id"] == name:
            return webhook
    raise AnypostError(404, f"no webhook {name!r}")


async def list_webhooks(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit") or DEFAULT_LIMIT)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise AnypostError(400, f"limit must be 1-{MAX_LIMIT}",
                           errors={"limit": [f"a whole number from 1 to {MAX_LIMIT}"]})
    after = request.query.get("after", "")
    left = [w for w in await _all(request) if w["id"] > after]
    page, more = left[:limit], len(left) > limit
    return json_response({"data": page, "has_more": more,
                          "next_cursor": page[-1]["id"] if more else None})


async def create_webhook(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise AnypostError(422, "expected an object with name, url and events")
    values = {key: body.get(key) for key in ("name", "url", "events")}
    problems = {key: ["required"] for key, value in values.items() if value is None}
    problems.update({key: ["unknown field"] for key in set(body) - set(values)})
    if not isinstance(values["events"], list | None) or not all(
            isinstance(e, str) for e in values["events"] or []):
        problems["events"] = ["a list of event types"]
    if problems:
        raise AnypostError(422, next(iter(problems.values()))[0], errors=problems)
    endpoint = WebhookEndpoint(str(values["name"]), str(values["url"]), new_secret(),
                               tuple(values["events"]))
    # a bad field is InvalidInput naming it (422), a name taken Conflict (409): relay/admin/
    # anypost.py answers both
    await request.app[CONTEXT].store.write(lambda conn: webhooks.add(conn, endpoint, time.time()))
    created = await _one(request, endpoint.name)
    return json_response({**created, "signing_secret": endpoint.secret}, 201)


async def get_webhook(request: web.Request) -> web.Response:
    return json_response(await _one(request))


async def update_webhook(request: web.Request) -> web.Response:
    webhook = await _one(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise AnypostError(422, "expected an object")
    problems = {key: ["unknown field"] for key in set(body) - {"name", "url", "events", "status"}}
    if body.get("name", webhook["name"]) != webhook["name"]:
        problems["name"] = ["this relay cannot rename a webhook: remove it and add it again"]
    url, events = body.get("url", webhook["url"]), body.get("events", webhook["events"])
    if not isinstance(url, str):
        problems["url"] = ["a URL"]
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        problems["events"] = ["a list of event types"]
    status = body.get("status", webhook["status"])
    if status not in ("active", "disabled"):
        problems["status"] = ["active or disabled"]
    if problems:
        raise AnypostError(422, next(iter(problems.values()))[0], errors=problems)
    name, now = webhook["id"], time.time()

    def write(conn: sqlite3.Connection) -> None:
        # InvalidInput naming the field (422), Conflict for the config file's (409): anypost.py
        if (url, events) != (webhook["url"], webhook["events"]):
            webhooks.change(conn, name, url, events)
        if status == "active" and webhook["status"] == "disabled":
            stored.enable_endpoint(conn, name)
        elif status == "disabled":
            stored.disable_endpoint(conn, name, now, "paused through the API")

    await request.app[CONTEXT].store.write(write)
    return json_response(await _one(request))


async def rotate_secret(request: web.Request) -> web.Response:
    name = (await _one(request))["id"]
    secret = await request.app[CONTEXT].store.write(lambda conn: webhooks.rotate(conn, name))
    return json_response({**await _one(request, name), "signing_secret": secret})


async def delete_webhook(request: web.Request) -> web.Response:
    name = (await _one(request))["id"]  # one of the config file's: Conflict, a 409
    await request.app[CONTEXT].store.write(lambda conn: webhooks.remove(conn, name))
    return web.Response(status=204)


async def test_webhook(request: web.Request) -> web.Response:
    """One synthetic ``webhook.test`` event, sent and signed as the outbox worker sends (its
    address checks included), once and outside the delivery history."""
    name = (await _one(request))["id"]
    _, url, secret, allow_private, timeout = await request.app[CONTEXT].store.read(
        lambda conn: stored.target(conn, name))
    event = StoredEvent(EVENT_PREFIX + str(uuid7()), "webhook.test", time.time(),
                        json.dumps({"webhook_id": name}))
    sender, started = Sender(time.time), time.monotonic()
    try:
        result = await sender.send(BATCH_PREFIX + str(uuid7()),
                                   Target(name, url, secret, bool(allow_private), timeout),
                                   [event])
    finally:
        await sender.close()
    return json_response({"delivered": result.ok, "status_code": result.status,
                          "latency_ms": round((time.monotonic() - started) * 1000),
                          "error": result.error, "response_body_preview": None})


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_TAGS = ("webhooks",)

OPERATIONS = [
    Operation("GET", "/webhooks", list_webhooks, "Webhook endpoints", "listWebhooks",
              tags=_TAGS),
    Operation("POST", "/webhooks", create_webhook, "Add a webhook (returns its secret once)",
              "createWebhook", tags=_TAGS, responses={"201": {"description": "Added"}}),
    Operation("GET", "/webhooks/{id}", get_webhook, "One webhook", "getWebhook", _ID,
              tags=_TAGS),
    Operation("PATCH", "/webhooks/{id}", update_webhook, "Change URL or events; pause, enable",
              "updateWebhook", _ID, tags=_TAGS),
    Operation("DELETE", "/webhooks/{id}", delete_webhook, "Remove a webhook", "deleteWebhook",
              _ID, tags=_TAGS, responses={"204": {"description": "Removed"}}),
    Operation("POST", "/webhooks/{id}/test", test_webhook,
              "Send one webhook.test event now (not retried, not in the history)",
              "testWebhook", _ID, tags=_TAGS),
    Operation("POST", "/webhooks/{id}/rotate-secret", rotate_secret,
              "A new signing secret, in force at once (returned once)", "rotateWebhookSecret",
              _ID, tags=_TAGS),
]
