"""The durable webhook outbox: rows written with the event they report, and the worker that
delivers them (payloads and signatures: relay/webhooks/payloads.py).

Tables (migration ``0020_webhooks`` in relay/store/engine.py):

=====================  ===================================================================
webhook_endpoints      one per endpoint: ``[[webhooks]]`` tables (source ``config``, synced at
                       start-up) and those added through the API or CLI (source ``api``);
                       ``disabled_at`` is set when the receiver answers ``410``
webhook_events         one per reported event: id (``evt_``), type, time, the ``data`` JSON
webhook_outbox         one per (endpoint, event); ``batch_id`` NULL until the worker batches it
webhook_batches        one per POST body: state (pending, delivered, failed), attempts,
                       ``next_at``, the give-up ``deadline``, and the lease of the process
                       sending it
webhook_attempts       one per finished attempt: HTTP status or error, duration
=====================  ===================================================================

Enqueueing: :class:`Outbox` gives the tracker's event listener (relay/tracking/events.py) and the
mail pipeline's message listener; both write inside the transaction of the event or the message
rows, so a stored event always has its outbox rows. A listener never raises: its writes sit in
a savepoint of their own, and a failure is logged and rolled back alone, leaving the event or
the message stored (a bug in webhooks must not cost a recipient a redirect or a sender a
duplicate).

Delivery: every process that records events or mail runs a :class:`DeliveryWorker`. Each turn
it forms batches of waiting rows, and claims due batches by setting a lease (owner, until)
in one write transaction, so two processes never send the same attempt at once; a process
that dies mid-attempt leaves a lease that expires (the endpoint's timeout plus
:data:`LEASE_MARGIN`), and the batch is sent again: at-least-once, with the same ``batch_id``
and event ids. While one of an endpoint's batches waits for a retry, no new batch is formed
for it: new events wait, and go out in full batches once the receiver answers again.

The worker is a task of its own with bounded concurrency; the request paths never wait for
it, and whatever fails inside it is logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from relay.config import WebhookDelivery, WebhookEndpoint
from relay.errors import RefusedAddress
from relay.ids import uuid7
from relay.queue import schedule
from relay.smtp.delivery import Judged
from relay.smtp.pipeline import MessageRecord, Outcome
from relay.store import messages
from relay.store import outbox as tables
from relay.store.engine import Store
from relay.store.messages import StoredMessage
from relay.store.queue import Queued
from relay.store.transaction import must_rerun, savepoint, transaction
from relay.tracking.bots import CLICK
from relay.tracking.events import EVENT_PREFIX, Event
from relay.webhooks.payloads import (
    BATCH_PREFIX,
    BOUNCED,
    CLICKED,
    DELAYED,
    FAILED,
    OPENED,
    PENDING,
    SENT,
    MessageFacts,
    Result,
    Schedule,
    StoredEvent,
    all_tags,
    delivery_fields,
    envelope,
    event_data,
    literal_address,
    next_step,
    parse_retry_after,
    refused_address,
    signature_headers,
)

log = logging.getLogger("relay.webhooks")

LEASE_MARGIN = 5.0  # seconds a lease outlives the attempt's timeout
Clock = Callable[[], float]

# --- endpoints ----------------------------------------------------------------------------


def sync_endpoints(conn: sqlite3.Connection, endpoints: Sequence[WebhookEndpoint],
                   now: float) -> None:
    """Make the stored ``config`` endpoints those of the config file. An endpoint whose URL
    changed is enabled again; one no longer in the file is deleted with its queue."""
    with transaction(conn):
        for e in endpoints:
            tables.put_config_endpoint(conn, e.name, e.url, e.secret, e.events, e.allow_private,
                                       e.timeout, now)
        names = {e.name for e in endpoints}
        for name in tables.config_endpoints(conn):
            if name not in names:
                tables.delete_endpoint(conn, name)


# --- enqueueing ---------------------------------------------------------------------------


class Outbox:
    """The listeners that queue webhook events; ``wake`` is set when something was queued."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self.wake = asyncio.Event()
        # the listeners run in PostgreSQL's writer thread (relay/store/postgres.py): the event
        # is set from the loop's thread
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # made outside a loop (tests): the listeners run on the caller's
            self._loop = None
        self._loop_thread = threading.get_ident()

    def __call__(self, conn: sqlite3.Connection, events: Sequence[Event],
                 sent: Mapping[str, StoredMessage]) -> None:
        """relay/tracking/events.py listener: counted opens and clicks (proxies carry their
        bot). The subscribers are looked up once per write, and an event nobody subscribes
        to costs no savepoint."""
        try:
            endpoints = {kind: tables.subscribers(conn, kind) for kind in (OPENED, CLICKED)}
        except sqlite3.Error:  # let each event fail (and be logged) on its own
            endpoints = {}
        for event in events:
            kind = CLICKED if event.type == CLICK else OPENED
            if event.counted and endpoints.get(kind, True):
                _safely(conn, partial(self._event, event=event, kind=kind,
                                      message=sent.get(event.email_id)), event.id)

    def on_message(self, conn: sqlite3.Connection, record: MessageRecord,
                   outcome: Outcome) -> None:
        """relay/smtp/pipeline.py listener: ``email.sent`` per recipient the upstream accepted."""
        if outcome.sent:
            _safely(conn, partial(self._message, record=record, sent=outcome.sent),
                    record.email_id)

    def on_attempt(self, conn: sqlite3.Connection, message: Queued,
                   judged: Sequence[Judged]) -> None:
        """relay/smtp/delivery.py listener: ``email.delayed`` per recipient tried again
        later, ``email.bounced`` per recipient given up."""
        if any(j.verdict.state != schedule.SENT for j in judged):
            _safely(conn, partial(self._attempt, email_id=message.email_id, judged=judged),
                    message.email_id)

    def _attempt(self, conn: sqlite3.Connection, email_id: str,
                 judged: Sequence[Judged]) -> None:
        now = self.clock()
        facts: MessageFacts | None = None
        for j in judged:
            if j.verdict.state == schedule.SENT:
                continue
            kind = DELAYED if j.verdict.state == schedule.RETRY else BOUNCED
            endpoints = tables.subscribers(conn, kind)
            if not endpoints:
                continue
            facts = facts or _facts(email_id, messages.stored(conn, email_id))
            fields = delivery_fields(j.code, j.attempt, j.reply,
                                     next_attempt_at=j.verdict.next_at,
                                     bounce_type=j.verdict.bounce_type)
            self._enqueue(conn, endpoints, EVENT_PREFIX + str(uuid7()), kind, now,
                          event_data(facts, j.recipient, delivery=fields))

    def _event(self, conn: sqlite3.Connection, event: Event, kind: str,
               message: StoredMessage | None) -> None:
        endpoints = tables.subscribers(conn, kind)
        if not endpoints:
            return
        data = event_data(_facts(event.email_id, message), event.recipient, ip=event.ip,
                          user_agent=event.user_agent, url=event.url, bot=event.bot,
                          details=event.details)
        self._enqueue(conn, endpoints, event.id, kind, event.at, data)

    def _message(self, conn: sqlite3.Connection, record: MessageRecord,
                 sent: Sequence[str]) -> None:
        endpoints = tables.subscribers(conn, SENT)
        if not endpoints:
            return
        c = record.controls
        facts = MessageFacts(record.email_id, record.message_id, record.sender, record.subject,
                             all_tags(c.tag_name, c.tags), c.campaign, c.topic)
        now = self.clock()
        for recipient in sent:
            self._enqueue(conn, endpoints, EVENT_PREFIX + uuid7(), SENT, now,
                          event_data(facts, recipient))

    def _enqueue(self, conn: sqlite3.Connection, endpoints: Sequence[str], event_id: str,
                 kind: str, at: float, data: dict[str, Any]) -> None:
        encoded = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        tables.enqueue(conn, endpoints, event_id, kind, at, encoded)
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self.wake.set()
        else:
            self._loop.call_soon_threadsafe(self.wake.set)


def _facts(email_id: str, message: StoredMessage | None) -> MessageFacts:
    if message is None:  # deleted since: the event still names its message
        return MessageFacts(email_id, None, None, None, (), None, None)
    return MessageFacts(email_id, message.message_id, message.sender, message.subject,
                        all_tags(message.tag_name, json.loads(message.tags)), message.campaign,
                        message.topic)


def _safely(conn: sqlite3.Connection, write: Callable[[sqlite3.Connection], None],
            about: str) -> None:
    """Run ``write`` in a savepoint of its own; a failure is rolled back alone and logged,
    except one that aborts the whole transaction (PostgreSQL runs it again, events and all)."""
    try:
        with savepoint(conn, "outbox"):
            write(conn)
    except Exception as exc:
        if must_rerun(exc):
            raise
        log.exception("webhook events for %s not queued", about)


# --- claiming and finishing ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str
    secret: str
    allow_private: bool
    timeout: float


@dataclass(frozen=True, slots=True)
class Claim:
    batch_id: str
    attempt: int
    deadline: float
    target: Target
    events: list[StoredEvent]


def form_batches(conn: sqlite3.Connection, now: float, size: int, keep_trying: float) -> None:
    """One batch of up to ``size`` waiting events for each endpoint that is not in backoff."""
    for endpoint in tables.ready_endpoints(conn):
        tables.add_batch(conn, BATCH_PREFIX + uuid7(), endpoint, size, PENDING, now,
                         now + keep_trying)


def claim(conn: sqlite3.Connection, owner: str, now: float, limit: int, size: int,
          keep_trying: float) -> list[Claim]:
    """Form batches, then lease up to ``limit`` due ones to ``owner``."""
    form_batches(conn, now, size, keep_trying)
    claimed = tables.lease_due(conn, owner, now, LEASE_MARGIN, limit)
    return [Claim(batch_id, attempts, deadline, Target(*tables.target(conn, endpoint)),
                  [StoredEvent(*row) for row in tables.batch_events(conn, batch_id)])
            for batch_id, endpoint, attempts, deadline in claimed]


def finish(conn: sqlite3.Connection, claimed: Claim, owner: str, result: Result, at: float,
           seconds: float, state: str, next_at: float | None) -> bool:
    """Record an attempt and the batch's new state; False if the lease was lost meanwhile."""
    tables.add_attempt(conn, claimed.batch_id, claimed.attempt, at, seconds, result.status,
                       result.error)
    kept = tables.end_attempt(conn, claimed.batch_id, owner, state, next_at, result.status,
                              result.error, None if state == PENDING else at)
    if result.gone:
        tables.disable_endpoint(conn, claimed.target.name, at, "the receiver answered 410 Gone")
    return kept


def release(conn: sqlite3.Connection, owner: str) -> None:
    """Give up the leases of batches in flight (a clean stop): due again at once."""
    tables.release_leases(conn, owner, PENDING)


# --- the network edge ---------------------------------------------------------------------


class PublicResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, but refuses a host when any of its addresses
    is not public; aiohttp connects to the addresses checked here, so a second lookup cannot
    swap them."""

    def __init__(self) -> None:
        self.inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            address = literal_address(result["host"])
            if address is None or refused_address(address):
                raise RefusedAddress(errno.EACCES, f"{host} resolves to {result['host']}, "
                                     "not a public address (allow_private is off)")
        return results

    async def close(self) -> None:
        await self.inner.close()


class Sender:
    """POSTs signed batches: one connection pool for public targets (resolved through
    :class:`PublicResolver`), one for endpoints with ``allow_private``. Redirects are not
    followed and proxies from the environment are not used."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._sessions: dict[bool, aiohttp.ClientSession] = {}

    async def send(self, batch_id: str, target: Target, events: Sequence[StoredEvent]
                   ) -> Result:
        host = urlsplit(target.url).hostname or ""
        literal = literal_address(host)
        if not target.allow_private and literal is not None and refused_address(literal):
            return Result(None, f"refused: {host} is not a public address (allow_private is off)")
        now = self.clock()
        body = envelope(batch_id, int(now), events)
        headers = signature_headers(target.secret, batch_id, int(now), body)
        try:
            async with self._session(target.allow_private).post(
                    target.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=target.timeout)) as response:
                retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
                error = None if 200 <= response.status < 300 else (
                    f"HTTP {response.status} {response.reason or ''}".rstrip())
                return Result(response.status, error, retry_after)
        except TimeoutError:
            return Result(None, f"timed out after {target.timeout:g} s")
        except aiohttp.ClientError as exc:
            return Result(None, f"{type(exc).__name__}: {exc}")

    def _session(self, allow_private: bool) -> aiohttp.ClientSession:
        session = self._sessions.get(allow_private)
        if session is None:
            resolver = None if allow_private else PublicResolver()
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=resolver), trust_env=False)
            self._sessions[allow_private] = session
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


# --- the worker ---------------------------------------------------------------------------


class DeliveryWorker:
    """Claims due batches and sends them, at most ``settings.concurrency`` at a time."""

    def __init__(self, store: Store, settings: WebhookDelivery, wake: asyncio.Event, *,
                 clock: Clock = time.time, random: Callable[[], float] = random.random
                 ) -> None:
        self.store = store
        self.settings = settings
        self.wake = wake
        self.clock = clock
        self.random = random
        self.schedule = Schedule(settings.retry_base_seconds, settings.retry_max_seconds,
                                 settings.retry_hours * 3600)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.sender = Sender(clock)
        self.inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        """Stop claiming, abandon the attempts in flight and hand their batches back."""
        tasks = [t for t in (self._task, *self.inflight) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.store.write(partial(release, owner=self.owner))
        await self.sender.close()

    async def _run(self) -> None:
        while True:
            self.wake.clear()
            try:
                await self._turn()
            except Exception:
                log.exception("webhook delivery turn failed; trying again")
            # Not asyncio.wait_for: on Python 3.11 it returns normally when the task is
            # cancelled just as the event fires, and the worker would outlive stop().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_seconds):
                    await self.wake.wait()

    async def _turn(self) -> None:
        free = self.settings.concurrency - len(self.inflight)
        if free <= 0:
            return
        s = self.settings
        claims = await self.store.write(partial(
            claim, owner=self.owner, now=self.clock(), limit=free, size=s.batch_size,
            keep_trying=self.schedule.deadline))
        for claimed in claims:
            task = asyncio.get_running_loop().create_task(self._deliver(claimed))
            self.inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        self.wake.set()

    async def _deliver(self, claimed: Claim) -> None:
        try:
            started = self.clock()
            result = await self._attempt(claimed)
            now = self.clock()
            state, next_at = next_step(result, claimed.attempt, now, claimed.deadline,
                                       self.schedule, self.random)
            kept = await self.store.write(partial(
                finish, claimed=claimed, owner=self.owner, result=result, at=started,
                seconds=now - started, state=state, next_at=next_at))
        except Exception:
            log.exception("webhook batch %s to %s: delivery failed", claimed.batch_id,
                          claimed.target.name)
            return
        _log(claimed, result, state, next_at, now, kept)

    async def _attempt(self, claimed: Claim) -> Result:
        """The attempt's result, whatever goes wrong: an error nobody foresaw still counts as
        a failed attempt, with its backoff and deadline, rather than a batch claimed again
        at every lease expiry."""
        try:
            return await self.sender.send(claimed.batch_id, claimed.target, claimed.events)
        except Exception as exc:
            log.exception("webhook batch %s to %s: sending failed", claimed.batch_id,
                          claimed.target.name)
            return Result(None, f"{type(exc).__name__}: {exc}")


def _log(claimed: Claim, result: Result, state: str, next_at: float | None, now: float,
         kept: bool) -> None:
    what = (f"webhook batch {claimed.batch_id} ({len(claimed.events)} events) to "
            f"{claimed.target.name}, attempt {claimed.attempt}")
    if not kept:
        log.warning("%s: lease lost while sending (%s)", what, result.error or result.status)
    elif result.ok:
        log.debug("%s: delivered (HTTP %s)", what, result.status)
    elif result.gone:
        log.warning("%s: receiver answered 410; endpoint disabled", what)
    elif state == FAILED:
        log.warning("%s: %s; given up", what, result.error)
    else:
        assert next_at is not None
        log.info("%s: %s; next try in %.0f s", what, result.error, next_at - now)
