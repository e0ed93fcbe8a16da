"""The Anypost-compatible API under ``/v1/``: the paths, shapes, status codes and error envelope
of the official ``anypost`` SDK, so an application written against Anypost moves to the relay
by changing the SDK's ``base_url``.

Keys are the relay's API keys (relay/admin/apikeys.py, the same check as ``/api/v1/``); a
``send_only`` key may only send (:data:`SEND_ONLY_ROUTES`), and nothing under ``/api/v1/``. Errors
are ``{"error": {"type", "message", "errors"?}}``, the envelope the SDK's ``parse_error`` reads,
so it raises its own classes (``ValidationError``, ``AuthenticationError``, ...). Each module in
:data:`OPERATION_MODULES` lists its routes as :class:`~relay.admin.api.Operation` values, which
also make the OpenAPI document at ``/v1/openapi.json``.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from relay.admin.api import Handler, Operation, json_response, openapi_document
from relay.admin.apikeys import FULL, ApiKey, authenticate
from relay.config import Config
from relay.smtp.pipeline import MailPipeline
from relay.store.engine import Store

log = logging.getLogger("relay.api")

PREFIX = "/v1"
# Anypost's gateway limit on a request body (the SDK's PayloadTooLargeError says 5 MB).
MAX_REQUEST_BYTES = 5 * 1024 * 1024
OPERATION_MODULES: tuple[str, ...] = ("relay.admin.send", "relay.admin.v1_events",
                                     "relay.admin.v1_domains", "relay.admin.v1_webhooks")
# The SDK's error types by status, for errors that have no more specific one.
_TYPES = {400: "validation_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found", 405: "validation_error", 409: "conflict",
          413: "payload_too_large", 422: "validation_error", 429: "rate_limit_exceeded"}


@dataclass(frozen=True)
class SendContext:
    config: Config
    store: Store
    pipeline: MailPipeline


CONTEXT = web.AppKey("send_context", SendContext)
KEY = web.RequestKey("api_key", ApiKey)  # the request's key, as authenticated
# What a send_only key may do.
SEND_ONLY_ROUTES = frozenset({("POST", PREFIX + "/email"), ("POST", PREFIX + "/email/batch"),
                              ("GET", PREFIX + "/whoami")})


class AnypostError(Exception):
    """An answer in the SDK's error envelope; ``errors`` maps field paths to problems."""

    def __init__(self, status: int, message: str, error_type: str | None = None,
                 errors: dict[str, list[str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type = error_type or _TYPES.get(status, "internal_error")
        self.errors, self.headers = errors, headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.errors is not None:
            error["errors"] = self.errors
        return {"error": error}

    def response(self) -> web.Response:
        response = json_response(self.body(), self.status)
        response.headers.update(self.headers)
        if self.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="relay"'
        return response


def all_operations() -> list[Operation]:
    operations: list[Operation] = [WHOAMI]
    for name in OPERATION_MODULES:
        operations.extend(importlib.import_module(name).OPERATIONS)
    return operations


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


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, at most :data:`MAX_REQUEST_BYTES`."""
    if (request.content_length or 0) > MAX_REQUEST_BYTES:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise _too_large()
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AnypostError(400, f"the body is not JSON: {exc}") from None


def _too_large() -> AnypostError:
    return AnypostError(413, f"the request body is over {MAX_REQUEST_BYTES} bytes")


@web.middleware
async def _api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == PREFIX + "/openapi.json":
        return await handler(request)
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AnypostError(401, "missing API key: send Authorization: Bearer <key>")
    key = authenticate(request.app[CONTEXT].store.writer, secret.strip())
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
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return AnypostError(exc.status, exc.reason).response()
    except Exception:
        log.exception("API request %s %s failed", request.method, request.path)
        return AnypostError(500, "internal error; see the relay's log").response()


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
