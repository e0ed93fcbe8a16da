"""What the routes of the Anypost-compatible API under ``/v1/`` share (relay/admin/anypost.py
serves them): the context a handler reaches the config, the store and the mail path through,
the key of the request, errors in the ``anypost`` SDK's envelope, and JSON bodies in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from relay.admin.apikeys import ApiKey
from relay.admin.http import json_response
from relay.config import Config
from relay.smtp.pipeline import MailPipeline
from relay.store.engine import Store

PREFIX = "/v1"
# Anypost's gateway limit on a request body (the SDK's PayloadTooLargeError says 5 MB).
MAX_REQUEST_BYTES = 5 * 1024 * 1024
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


class AnypostError(Exception):
    """An answer in the SDK's error envelope, ``{"error": {"type", "message", "errors"?}}``;
    ``errors`` maps field paths to their problems."""

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
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AnypostError(400, f"the body is not JSON: {exc}"[:300]) from None
    try:  # "\ud800" is JSON, but no mail header, no file name, no store can hold it
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise AnypostError(400, "the body holds a lone surrogate (\\ud800-\\udfff), "
                                "which is no character") from None
    return body


def _too_large() -> AnypostError:
    return AnypostError(413, f"the request body is over {MAX_REQUEST_BYTES} bytes")
