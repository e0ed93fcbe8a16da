"""The JSON API under ``/api/v1/``: API keys, JSON errors, and an OpenAPI document made from
the same table of operations that routes the requests, so the two cannot drift apart.

Each concept with an API (statistics, settings, webhooks, ...) lists its operations in its
own module as :class:`~relay.admin.http.Operation` values, and relay/admin/concepts.py lists
the concepts. Handlers reach the config and the store through ``request.app[CONTEXT]`` and
report bad input by raising :class:`~relay.errors.InvalidInput` (answered ``400``;
``Conflict``: ``409``) or another status with :class:`~relay.errors.ApiError`; either becomes
``{"error": {"status", "message"}}``. This is the one place that maps them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from functools import partial
from typing import Any

from aiohttp import web

from relay import __version__
from relay.admin import concepts
from relay.admin.apikeys import FULL, authenticate
from relay.admin.http import (
    CONTEXT,
    ERROR_REF,
    ERROR_SCHEMA,
    ApiContext,
    Handler,
    Operation,
    error_body,
    json_response,
)
from relay.config import Config
from relay.errors import ApiError, Conflict, InvalidInput, InvalidParameter
from relay.store.engine import Store

log = logging.getLogger("relay.api")

PREFIX = "/api/v1"

def build_api(config: Config, store: Store,
              operations: Iterable[Operation] | None = None) -> web.Application:
    """The API as an aiohttp sub-application, to mount at :data:`PREFIX`."""
    ops = list(concepts.operations() if operations is None else operations)
    api = web.Application(middlewares=[_errors, _api_key])
    api[CONTEXT] = ApiContext(config, store)
    document = openapi_document(ops, config.http.public_url)
    body = json.dumps(document).encode()

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    api.router.add_get("/openapi.json", openapi)
    for op in ops:
        api.router.add_route(op.method.upper(), op.path, op.handler)  # {name} works in both
    return api


@web.middleware
async def _api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "missing API key: send Authorization: Bearer <key>")
    context = request.app[CONTEXT]
    key = await context.store.read(partial(authenticate, secret=secret.strip()))
    if key is None:
        raise ApiError(401, "invalid or revoked API key")
    if key.permissions != FULL:
        raise ApiError(403, f"the key {key.name!r} may only send mail (through /v1/)")
    return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = json_response(error_body(exc.status, exc.message, **exc.details), exc.status)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="relay"'
        return response
    except InvalidInput as exc:
        status = 409 if isinstance(exc, Conflict) else 400
        details = {"parameter": exc.parameter} if isinstance(exc, InvalidParameter) else {}
        return json_response(error_body(status, str(exc), **details), status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response(error_body(exc.status, exc.reason), exc.status)
    except Exception:
        log.exception("API request %s %s failed", request.method, request.path)
        return json_response(error_body(500, "internal error; see the relay's log"), 500)


def openapi_document(operations: Iterable[Operation], server_url: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "parameters": list(op.parameters),
            "responses": {**_not_found(op.path), **op.responses, **_ERROR_RESPONSES},
        }
        if op.tags:
            entry["tags"] = list(op.tags)
        if op.request_body is not None:
            entry["requestBody"] = op.request_body
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.0.3",
        "info": {"title": "Tracking relay API", "version": __version__},
        "servers": [{"url": server_url.rstrip("/") + PREFIX}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": ERROR_SCHEMA},
        },
        "paths": paths,
    }


def _not_found(path: str) -> dict[str, Any]:
    """A path naming something (``/tags/{name}``) answers 404 when there is no such thing."""
    return {"404": {"description": "Not found", **ERROR_REF}} if "{" in path else {}


_ERROR_RESPONSES = {
    "400": {"description": "Bad input", **ERROR_REF},
    "401": {"description": "Missing, invalid or revoked API key", **ERROR_REF},
}
