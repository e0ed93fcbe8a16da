"""``/v1/webhooks``: the ``anypost`` SDK's webhooks, mapped onto the relay's webhook endpoints
(relay/admin/webhooks.py, ``[[webhooks]]``), so one set of endpoints is managed through either
API or ``relay webhooks``.

A webhook's ``id`` and ``name`` are the endpoint's name (1-64 letters, digits, ``-``, ``_``).
Its ``status`` is ``active``, or ``disabled`` once the relay disabled it (a ``410``); ``PATCH``
with ``status: active`` enables it again. What the relay's endpoints cannot do is refused by
name: changing the name, URL or events of an endpoint (remove it and add it again), pausing one,
``test`` and ``rotate-secret``.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from relay.admin import webhooks
from relay.admin.http import Operation, json_response
from relay.admin.v1_http import CONTEXT, AnypostError, read_json
from relay.config import WebhookEndpoint
from relay.stats.queries import iso_time
from relay.store import outbox as stored
from relay.webhooks.payloads import new_secret

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
    problems = {key: [f"this relay cannot change a webhook's {key}: remove it and add it again"]
                for key in ("name", "url", "events") if key in body and body[key] != webhook[key]}
    problems.update({key: ["unknown field"] for key in set(body) - {
        "name", "url", "events", "status"}})
    status = body.get("status", webhook["status"])
    if status not in ("active", "disabled"):
        problems["status"] = ["active or disabled"]
    elif status == "disabled" and webhook["status"] != "disabled":
        problems["status"] = ["this relay cannot pause a webhook: remove it"]
    if problems:
        raise AnypostError(422, next(iter(problems.values()))[0], errors=problems)
    if status == "active" and webhook["status"] == "disabled":
        name = webhook["id"]
        await request.app[CONTEXT].store.write(lambda conn: stored.enable_endpoint(conn, name))
    return json_response(await _one(request))


async def delete_webhook(request: web.Request) -> web.Response:
    name = (await _one(request))["id"]  # one of the config file's: Conflict, a 409
    await request.app[CONTEXT].store.write(lambda conn: webhooks.remove(conn, name))
    return web.Response(status=204)


async def not_supported(request: web.Request) -> web.Response:
    await _one(request)
    action = request.path.rpartition("/")[2]
    raise AnypostError(422, f"{action} is not supported by this relay",
                       errors={action: ["not supported by this relay"]})


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_TAGS = ("webhooks",)

OPERATIONS = [
    Operation("GET", "/webhooks", list_webhooks, "Webhook endpoints", "listWebhooks",
              tags=_TAGS),
    Operation("POST", "/webhooks", create_webhook, "Add a webhook (returns its secret once)",
              "createWebhook", tags=_TAGS, responses={"201": {"description": "Added"}}),
    Operation("GET", "/webhooks/{id}", get_webhook, "One webhook", "getWebhook", _ID,
              tags=_TAGS),
    Operation("PATCH", "/webhooks/{id}", update_webhook, "Enable a disabled webhook",
              "updateWebhook", _ID, tags=_TAGS),
    Operation("DELETE", "/webhooks/{id}", delete_webhook, "Remove a webhook", "deleteWebhook",
              _ID, tags=_TAGS, responses={"204": {"description": "Removed"}}),
    Operation("POST", "/webhooks/{id}/test", not_supported, "Not supported (422)",
              "testWebhook", _ID, tags=_TAGS),
    Operation("POST", "/webhooks/{id}/rotate-secret", not_supported, "Not supported (422)",
              "rotateWebhookSecret", _ID, tags=_TAGS),
]
