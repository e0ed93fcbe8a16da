"""What every concept's API routes share: the context a handler reaches the config and the
store through, the :class:`Operation` a route is declared as (relay/admin/api.py serves them and
describes them in the OpenAPI document), and JSON in and out.

Handlers report bad input by raising :class:`relay.errors.InvalidInput` (a 400) or
:class:`relay.errors.ApiError` (another status); the API turns either into
``{"error": {"status", "message"}}``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay.config import Config
from relay.errors import InvalidInput
from relay.store.engine import Store
from relay.store.reports import Query

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ApiContext:
    config: Config
    store: Store


CONTEXT = web.AppKey("api_context", ApiContext)


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


def query_params(request: web.Request) -> dict[str, str]:
    """The query string, first value of each name."""
    return {name: request.query.getone(name) for name in request.query}


async def fetch(request: web.Request, query: Query) -> list[Any]:
    """A read of the statistics, events or messages, on the store's reader thread."""
    return await request.app[CONTEXT].store.fetchall(query.sql, query.params)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a 400. JSON is UTF-8 whatever the Content-Type says (an
    unknown charset there made aiohttp raise LookupError), and a string holding a lone
    surrogate (``"\\ud800"``) is refused here, since SQLite cannot store one."""
    try:
        body = json.loads((await request.read()).decode("utf-8"))
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeError:
        raise InvalidInput("the body must be UTF-8 text, without lone surrogates") from None
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than json can parse
        raise InvalidInput("the body must be JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    return body


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


# Pieces of OpenAPI descriptions.

def param(name: str, description: str, schema: Mapping[str, Any] | None = None, *,
           required: bool = False, where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "description": description,
            "schema": dict(schema or {"type": "string"})}


def ok(schema: Mapping[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description,
                    "content": {"application/json": {"schema": schema}}}}


def obj(properties: Mapping[str, Any], required: Sequence[str] | None = None
            ) -> dict[str, Any]:
    return {"type": "object", "required": list(properties if required is None else required),
            "properties": dict(properties)}


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
BOOLEAN = {"type": "boolean"}
NULLABLE_STRING = {"type": "string", "nullable": True}
RATE = {"type": "number", "nullable": True, "minimum": 0,
        "description": "a fraction (0.25 is 25%), null when the denominator is 0"}
DAY = {"type": "string", "format": "date"}
