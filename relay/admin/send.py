"""``POST /v1/email`` and ``POST /v1/email/batch``: a JSON request becomes a MIME message
(relay/policy/sending.py reads it, relay/rewrite/compose.py writes it) that enters the mail path
where the SMTP server hands it over (:meth:`MailPipeline.process`), so tracking is decided, the
message rewritten, forwarded (or queued) and recorded exactly as for mail that came by SMTP.

``202`` comes when the mail path answered ``250``: the upstream took every copy (proxy mode) or
the message is stored (queue mode). What the mail path answers otherwise:

- some recipients got it (proxy mode): ``202`` too, the others' answers are in the message's
  record (``GET /api/v1/messages/{id}``): a retry would send it to them all again;
- a temporary failure for every recipient (``4xx``): ``503`` with ``Retry-After``, nothing sent
  (``452``, a full queue: ``429``);
- a permanent one (``5xx``): ``422``, with the upstream's reply.

``Idempotency-Key`` (as Anypost): a retry with the same key and body gets the first answer; with
another body, ``422 idempotency_mismatch``; while the first is carried out,
``409 idempotency_concurrent``. Answers are kept :data:`IDEMPOTENCY_TTL` seconds; temporary
failures are not kept, so the retry is carried out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from relay.admin.http import Operation, json_response
from relay.admin.v1_http import CONTEXT, KEY, AnypostError, SendContext, read_json
from relay.errors import InvalidRequest
from relay.ids import PREFIX as EMAIL_PREFIX
from relay.ids import new_email_id
from relay.policy.sending import Submission, read_batch, read_email
from relay.rewrite.compose import compose
from relay.smtp.pipeline import Incoming, delivered_some
from relay.stats.queries import iso_time
from relay.store import idempotency

IDEMPOTENCY_TTL = 24 * 3600.0
# An unanswered claim older than this was left by a process that died: a retry takes it over.
IDEMPOTENCY_STALE = 900.0
MAX_IDEMPOTENCY_KEY = 255
# Batch entries handed to the mail path at once.
BATCH_CONCURRENCY = 10
RETRY_AFTER = "30"  # seconds, after a temporary failure
QUEUE_FULL_RETRY_AFTER = "60"


async def send_email(request: web.Request) -> web.Response:
    return await _idempotent(request, _send_one)


async def send_batch(request: web.Request) -> web.Response:
    return await _idempotent(request, _send_batch)


async def _send_one(request: web.Request, body: Any) -> tuple[int, dict[str, Any]]:
    try:
        submission = read_email(body)
    except InvalidRequest as exc:
        raise AnypostError(422, exc.message, errors=exc.errors) from None
    return 202, await _send(request, submission)


async def _send_batch(request: web.Request, body: Any) -> tuple[int, dict[str, Any]]:
    try:
        entries = read_batch(body)
    except InvalidRequest as exc:
        raise AnypostError(422, exc.message, errors=exc.errors) from None
    running = asyncio.Semaphore(BATCH_CONCURRENCY)

    async def one(index: int, entry: dict[str, Any] | InvalidRequest) -> dict[str, Any]:
        try:
            if isinstance(entry, InvalidRequest):
                raise entry
            submission = read_email(entry)
            async with running:
                return {"status": "queued", "index": index, **await _send(request, submission)}
        except InvalidRequest as exc:
            error = {"type": "validation_error", "message": exc.message}
        except AnypostError as exc:  # the SDK's BatchItemGenericError has three types
            kind = exc.type if exc.type in ("validation_error", "permission_error") else (
                "internal_error" if exc.status >= 500 or exc.status == 429
                else "validation_error")
            error = {"type": kind, "message": exc.message}
        return {"status": "failed", "index": index, "error": error}

    data = await asyncio.gather(*(one(i, e) for i, e in enumerate(entries)))
    queued = sum(item["status"] == "queued" for item in data)
    summary = {"total": len(data), "queued": queued, "failed": len(data) - queued}
    return (202 if queued == len(data) else 207), {"summary": summary, "data": data}


async def _send(request: web.Request, submission: Submission) -> dict[str, Any]:
    """Compose and hand over one message; its ``id`` and ``created_at``, else AnypostError."""
    context = request.app[CONTEXT]
    await _check_sender(context, submission.sender_domain)
    email_id = new_email_id()
    now = time.time()
    message_id = f"{email_id.removeprefix(EMAIL_PREFIX)}@{context.config.smtp.server_name}"
    raw = compose(submission.draft, message_id, datetime.fromtimestamp(now, UTC))
    limit = context.config.smtp.max_message_size
    if len(raw) > limit:
        raise AnypostError(413, f"the message is {len(raw)} bytes, over the relay's limit of "
                                f"{limit} (smtp.max_message_size)")
    incoming = Incoming(sender=submission.sender, recipients=submission.recipients,
                        message=raw, peer=request.remote or "", helo="",
                        protocol="HTTP")
    # Shielded, as the SMTP server's delivery: a client that hangs up loses only the answer.
    reply = await asyncio.shield(context.pipeline.process(incoming, email_id))
    _check_reply(reply)
    return {"id": email_id, "created_at": iso_time(now)}


async def _check_sender(context: SendContext, domain: str) -> None:
    """The sender's domain must be one the relay knows: a ``[[domains]]`` entry, a domain
    setting or a tracking domain added at run time."""
    rules = await context.pipeline.rules.current()
    if domain not in rules.domains and domain not in rules.tracking:
        raise AnypostError(
            422, f"{domain} is not a sending domain of this relay",
            errors={"from": [f"the domain {domain} is unknown to the relay: add it as a "
                             "[[domains]] entry, with relay settings, or relay domains add"]})


def _check_reply(reply: str) -> None:
    """Nothing when the mail path took the message (see the module's docstring)."""
    if reply.startswith("2") or delivered_some(reply):
        return
    if reply.startswith("452"):
        raise AnypostError(429, f"the relay's queue is full: {reply}",
                           headers={"Retry-After": QUEUE_FULL_RETRY_AFTER})
    if reply.startswith("4"):
        raise AnypostError(503, f"not sent, try again later: {reply}", "service_unavailable",
                           headers={"Retry-After": RETRY_AFTER})
    raise AnypostError(422, f"refused: {reply}")


Work = Any  # (request, body) -> (status, JSON body)


async def _idempotent(request: web.Request, work: Work) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    body = await read_json(request)
    if key is None:
        return await _answer(request, work, body)
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise AnypostError(400, f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable "
                                "characters")
    store = request.app[CONTEXT].store
    api_key = request[KEY].name
    fingerprint = hashlib.sha256(
        f"{request.method} {request.path}\n".encode() + json.dumps(
            body, sort_keys=True, ensure_ascii=False).encode()).digest()
    earlier = await store.write(lambda conn: idempotency.claim(
        conn, api_key, key, fingerprint, time.time(), IDEMPOTENCY_TTL, IDEMPOTENCY_STALE))
    if earlier is not None:
        if earlier.fingerprint != fingerprint:
            raise AnypostError(422, "this Idempotency-Key was used with another request",
                               "idempotency_mismatch")
        if earlier.status is None:
            raise AnypostError(409, "a request with this Idempotency-Key is being carried out",
                               "idempotency_concurrent")
        response = web.Response(body=(earlier.response or "").encode(), status=earlier.status,
                                content_type="application/json")
        response.headers["Idempotent-Replayed"] = "true"
        return response
    try:
        response = await _answer(request, work, body)
    except BaseException:
        await store.write(lambda conn: idempotency.release(conn, api_key, key))
        raise
    if response.status >= 500 or response.status == 429:
        await store.write(lambda conn: idempotency.release(conn, api_key, key))
    else:
        text = response.body.decode() if isinstance(response.body, bytes) else ""
        await store.write(lambda conn: idempotency.answer(conn, api_key, key, response.status,
                                                          text))
    return response


async def _answer(request: web.Request, work: Work, body: Any) -> web.Response:
    try:
        status, answer = await work(request, body)
    except AnypostError as exc:
        return exc.response()
    return json_response(answer, status)


_SEND_RESPONSE = {"type": "object", "required": ["id", "created_at"], "properties": {
    "id": {"type": "string", "example": "email_01890a5d-ac96-774b-bcce-b302099a8057"},
    "created_at": {"type": "string", "format": "date-time"}}}
_EMAIL_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["from", "to", "subject"],
    "description": "The fields of the anypost SDK's EmailSendParams; template_id, variables, "
                   "ip_pool and unsubscribe are refused (not supported by this relay)."}}}}
_IDEMPOTENCY = [{"name": "Idempotency-Key", "in": "header", "required": False,
                 "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY}}]
_ERRORS = {
    "413": {"description": "Request or message too large"},
    "422": {"description": "Invalid request, unknown sender domain, refused by the upstream"},
    "429": {"description": "Queue full; see Retry-After"},
    "503": {"description": "Temporary failure, nothing sent; see Retry-After"},
}

OPERATIONS = [
    Operation("POST", "/email", send_email, "Send one message", "sendEmail", _IDEMPOTENCY,
              request_body=_EMAIL_BODY, tags=("email",), responses={
                  "202": {"description": "Accepted", "content": {"application/json": {
                      "schema": _SEND_RESPONSE}}}, **_ERRORS}),
    Operation("POST", "/email/batch", send_batch, "Send 1-100 messages with shared defaults",
              "sendBatch", _IDEMPOTENCY, tags=("email",), request_body={
                  "required": True, "content": {"application/json": {"schema": {
                      "type": "object", "required": ["emails"], "properties": {
                          "emails": {"type": "array", "minItems": 1, "maxItems": 100,
                                     "items": {"type": "object"}},
                          "defaults": {"type": "object"}}}}}},
              responses={"202": {"description": "Every entry queued"},
                         "207": {"description": "Mixed outcomes: see each entry's status"},
                         **_ERRORS}),
]
