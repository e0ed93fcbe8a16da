"""The JSON API under ``/api/v1/``: API keys, JSON errors, and an OpenAPI document made from
the same table of operations that routes the requests, so the two cannot drift apart.

Each concept with an API (statistics, settings, webhooks, ...) lists its operations in its
own module as :class:`Operation` values; :data:`OPERATION_MODULES` names those modules.
Handlers reach the config and the store through ``request.app[CONTEXT]`` and report bad input
by raising :class:`ApiError`, which becomes ``{"error": {"status", "message"}}``.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay import __version__
from relay.admin.apikeys import authenticate
from relay.config import Config
from relay.store.engine import Store

log = logging.getLogger("relay.api")

PREFIX = "/api/v1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Modules with an ``OPERATIONS`` list; each adds its own line.
OPERATION_MODULES: tuple[str, ...] = (
    "relay.admin.settings", "relay.admin.domains", "relay.admin.tags", "relay.admin.stats_api",
    "relay.admin.webhooks", "relay.admin.retention")


@dataclass(frozen=True)
class ApiContext:
    config: Config
    store: Store


CONTEXT = web.AppKey("api_context", ApiContext)


class ApiError(Exception):
    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, details


@dataclass(frozen=True)
class Operation:
    """One route and its OpenAPI description (parameters and responses as OpenAPI objects)."""

    method: str
    path: str  # below /api/v1, OpenAPI style: "/messages/{email_id}"
    handler: Handler
    summary: str
    operation_id: str
    parameters: Sequence[Mapping[str, Any]] = ()
    request_body: Mapping[str, Any] | None = None
    responses: Mapping[str, Any] = field(default_factory=lambda: {
        "200": {"description": "OK", "content": {"application/json": {"schema": {
            "type": "object"}}}}})
    tags: Sequence[str] = ()


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, ensure_ascii=False).encode(), status=status,
                        content_type="application/json")


def error_body(status: int, message: str, **details: Any) -> dict[str, Any]:
    return {"error": {"status": status, "message": message, **details}}


def all_operations() -> list[Operation]:
    operations: list[Operation] = []
    for name in OPERATION_MODULES:
        operations.extend(importlib.import_module(name).OPERATIONS)
    return operations


def build_api(config: Config, store: Store,
              operations: Iterable[Operation] | None = None) -> web.Application:
    """The API as an aiohttp sub-application, to mount at :data:`PREFIX`."""
    ops = list(all_operations() if operations is None else operations)
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
    if authenticate(context.store.writer, secret.strip()) is None:
        raise ApiError(401, "invalid or revoked API key")
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


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["status", "message"],
        "properties": {"status": {"type": "integer"}, "message": {"type": "string"}},
    }},
}
ERROR_REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _not_found(path: str) -> dict[str, Any]:
    """A path naming something (``/tags/{name}``) answers 404 when there is no such thing."""
    return {"404": {"description": "Not found", **ERROR_REF}} if "{" in path else {}


_ERROR_RESPONSES = {
    "400": {"description": "Bad input", **ERROR_REF},
    "401": {"description": "Missing, invalid or revoked API key", **ERROR_REF},
}
