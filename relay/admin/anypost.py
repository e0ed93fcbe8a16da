"""The Anypost-compatible API under ``/v1/``: the paths, shapes, status codes and error envelope
of the official ``anypost`` SDK, so an application written against Anypost moves to the relay
by changing the SDK's ``base_url``.

Keys are the relay's API keys (relay/admin/apikeys.py, the same check as ``/api/v1/``); a
``send_only`` key may only send (:data:`SEND_ONLY_ROUTES`), and nothing under ``/api/v1/``.
Errors are ``{"error": {"type", "message", "errors"?}}`` (relay/admin/v1_http.py), the envelope
the SDK's ``parse_error`` reads, so it raises its own classes (``ValidationError``,
``AuthenticationError``, ...). The routes of each module in :data:`MODULES` also make the
OpenAPI document at ``/v1/openapi.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from functools import partial

from aiohttp import web

from relay.admin import send, v1_domains, v1_events, v1_webhooks
from relay.admin.api import openapi_document
from relay.admin.apikeys import FULL, authenticate
from relay.admin.http import Handler, Operation, json_response
from relay.admin.v1_http import CONTEXT, KEY, PREFIX, AnypostError, SendContext
from relay.config import Config
from relay.errors import Conflict, InvalidInput
from relay.smtp.pipeline import MailPipeline
from relay.store.engine import Store

log = logging.getLogger("relay.api")

# What a send_only key may do.
SEND_ONLY_ROUTES = frozenset({("POST", PREFIX + "/email"), ("POST", PREFIX + "/email/batch"),
                              ("GET", PREFIX + "/whoami")})


async def whoami(request: web.Request) -> web.Response:
    """The key behind the request. The relay has one team (itself) and no sending quotas."""
    config = request.app[CONTEXT].config
    return json_response({
        "team": {"id": "relay", "name": config.smtp.server_name},
        "api_key": {"id": request[KEY].name, "permissions": request[KEY].permissions},
        "limits": None,
    })


WHOAMI = Operation("GET", "/whoami", whoami, "The API key behind the request", "whoami",
                   tags=("identity",))
MODULES = (send, v1_events, v1_domains, v1_webhooks)


def all_operations() -> list[Operation]:
    return [WHOAMI, *(op for module in MODULES for op in module.OPERATIONS)]


def build_v1(config: Config, store: Store, pipeline: MailPipeline,
             operations: Iterable[Operation] | None = None) -> web.Application:
    """The API as an aiohttp sub-application, to mount at :data:`PREFIX`."""
    ops = list(all_operations() if operations is None else operations)
    app = web.Application(middlewares=[_errors, _api_key])
    app[CONTEXT] = SendContext(config, store, pipeline)
    document = openapi_document(ops, config.http.public_url)
    document["servers"] = [{"url": config.http.public_url.rstrip("/") + PREFIX}]
    document["info"]["title"] = "Tracking relay: Anypost-compatible API"
    body = json.dumps(document).encode()

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
    for op in ops:
        app.router.add_route(op.method.upper(), op.path, op.handler)
    return app


@web.middleware
async def _api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == PREFIX + "/openapi.json":
        return await handler(request)
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AnypostError(401, "missing API key: send Authorization: Bearer <key>")
    key = await request.app[CONTEXT].store.read(partial(authenticate, secret=secret.strip()))
    if key is None:
        raise AnypostError(401, "invalid or revoked API key")
    if key.permissions != FULL and (request.method, request.path) not in SEND_ONLY_ROUTES:
        raise AnypostError(403, f"the key {key.name!r} may only send (send_only)")
    request[KEY] = key
    return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AnypostError as exc:
        return exc.response()
    except Conflict as exc:
        return AnypostError(409, str(exc)).response()
    except InvalidInput as exc:  # the relay's own checks, as the native API makes them
        field = exc.key or str(exc).partition(":")[0]
        return AnypostError(422, str(exc), errors={field: [str(exc)]}).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return AnypostError(exc.status, exc.reason).response()
    except Exception:
        log.exception("API request %s %s failed", request.method, request.path)
        return AnypostError(500, "internal error; see the relay's log").response()
