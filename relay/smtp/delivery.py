"""Queue mode's delivery worker: takes due messages from the queue (leased to this process),
sends each through the pipeline as proxy mode would, and records per recipient what the
upstream said (relay/queue/schedule.py judges it) in the transaction that records the
attempt.

At most ``upstream.pool_size`` messages are in delivery at once per process (the upstream pool
holds as many connections); the rate is the upstream's (``upstream.max_rate``, relay/smtp/
upstream.py ``RateLimited``). A lease lasts :data:`LEASE_SECONDS` and is renewed every
:data:`RENEW_SECONDS` while its attempt runs, however long (a slow upstream, a large fan-out),
so no other worker takes the message meanwhile. A lease that ran out all the same (the store
could not be written for that long, or the process stalled) may be taken over; the attempt
that lost it goes on, but records and reports nothing (relay/store/queue.py record_attempt).
At start the leases of relay processes that no longer run (``kill -9``) are handed back at
once, and a stop hands back this process's own after the attempts in progress ended.

The one window where a recipient can get a copy twice is every MTA's: between the upstream's
``250`` and the commit that records it (one group commit, as in proxy mode); a process killed
there leaves its lease, and the next attempt sends again the copies whose answer was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from relay import metrics
from relay.clock import Clock
from relay.config import Config
from relay.ids import new_email_id, uuid7
from relay.queue import dsn, schedule
from relay.smtp import processes
from relay.smtp.pipeline import Incoming, MailPipeline, Outcome
from relay.store import messages, queue
from relay.store.engine import Store
from relay.store.events import EVENT_PREFIX

log = logging.getLogger("relay.queue")

LEASE_SECONDS = 600.0
# How often an attempt in progress renews its lease: three renewals may fail in a row.
RENEW_SECONDS = LEASE_SECONDS / 4
# How often the store is looked at when nothing here woke the worker (messages queued by
# another process, or due at a time this process did not know of).
POLL_SECONDS = 1.0
# How long a stop waits for the attempts in progress.
STOP_SECONDS = 30.0

@dataclass(frozen=True, slots=True)
class Judged:
    """One recipient's attempt: the upstream's reply and the verdict on it."""

    recipient: str
    code: int
    reply: str
    verdict: schedule.Verdict
    attempt: int  # 1 for the first

    def result(self) -> queue.Result:
        state = {schedule.SENT: queue.SENT, schedule.RETRY: queue.QUEUED,
                 schedule.BOUNCED: queue.BOUNCED}[self.verdict.state]
        return queue.Result(self.recipient, state, self.code, self.reply)


# A recipient's status in the message's record (relay/stats/queries.py RECIPIENT_STATUSES)
# once the queue gave it up for its age.
EXPIRED_STATUS = "expired"

# Called in the attempt's transaction with the message and each recipient's verdict (the
# webhook outbox: email.delayed, email.bounced).
AttemptListener = Callable[[sqlite3.Connection, queue.Queued, Sequence[Judged]], None]


class QueueWorker:
    def __init__(self, config: Config, store: Store, pipeline: MailPipeline,
                 clock: Clock | None = None,
                 listeners: Sequence[AttemptListener] = ()) -> None:
        self.config = config
        self.store = store
        self.pipeline = pipeline
        self.clock = clock or Clock()
        self.listeners = tuple(listeners)
        self.owner = pipeline.me.id
        self.concurrency = config.upstream.pool_size
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Take no more messages, let the attempts in progress end (cancelled after
        :data:`STOP_SECONDS`), and hand back this process's leases."""
        self._stopping = True
        self.wake()
        if self._task is not None:
            await self._task
        if self._attempts:
            done, late = await asyncio.wait(self._attempts, timeout=STOP_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        try:
            await self.store.write(lambda conn: queue.release(conn, self.owner))
        except Exception:
            log.exception("queue leases not handed back (they run out by themselves)")

    async def _run(self) -> None:
        try:
            await self.store.write(self._release_dead)
        except Exception:  # they run out by themselves
            log.exception("queue: the leases of stopped processes could not be handed back")
        while not self._stopping:
            try:
                taken = await self._claim()
            except Exception:
                log.exception("queue: due messages could not be taken")
                taken = []
            for message in taken:
                task = asyncio.create_task(self._attempt(message))
                self._attempts.add(task)
                task.add_done_callback(self._ended)
            if self._stopping:
                return
            try:
                await self._idle(full=len(self._attempts) >= self.concurrency)
            except Exception:  # the store could not be read: looked at again after a poll
                log.exception("queue: the next due message could not be looked up")
                await self.clock.sleep(POLL_SECONDS)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._attempts.discard(task)
        self.wake()

    async def _claim(self) -> list[queue.Queued]:
        free = self.concurrency - len(self._attempts)
        if free <= 0:
            return []
        now = self.clock.time()
        return await self.store.write(
            lambda conn: queue.claim(conn, self.owner, now, now + LEASE_SECONDS, free))

    async def _idle(self, full: bool) -> None:
        """Wait for a wake-up (a message queued here, an attempt ended), the next due
        message, or the poll interval, whichever comes first."""
        wait = POLL_SECONDS
        if not full:
            at = self.clock.time()
            due = await self.store.read(lambda conn: queue.next_due(conn, at))
            if due is not None:  # the time again: the clock may have moved during the read
                wait = min(wait, max(0.0, due - self.clock.time()))
        if self._wake.is_set():
            self._wake.clear()
            return
        woken = asyncio.ensure_future(self._wake.wait())
        timer = asyncio.ensure_future(self.clock.sleep(wait))
        try:
            await asyncio.wait([woken, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()
        self._wake.clear()

    def _release_dead(self, conn: sqlite3.Connection) -> None:
        """Run before this process takes any lease: one naming its own id is a
        predecessor's whose row was forgotten and whose id was given again."""
        release_dead(conn, self.clock.time(), self.owner)

    async def _attempt(self, message: queue.Queued) -> None:
        incoming = Incoming(message.sender, message.recipients, message.data,
                            message.mail_options, message.peer, message.helo, message.protocol,
                            received_at=message.received_at)
        recorded: list[queue.Recorded] = []

        def settle(conn: sqlite3.Connection, outcome: Outcome) -> None:
            recorded.append(self._settle(conn, message, outcome))

        keeping = asyncio.create_task(self._keep(message))
        try:
            outcome = await self.pipeline.deliver(incoming, message.email_id, settle)
        finally:
            keeping.cancel()
        if not recorded:  # nothing recorded: tried again later, not counted as an attempt
            retry_at = self.clock.time() + self.config.queue.retry_seconds[0]
            log.warning("%s attempt not recorded%s; tried again at the next retry",
                        message.email_id, "" if outcome is None else " (store unavailable)")
            with contextlib.suppress(Exception):
                await self.store.write(lambda conn: queue.give_back(
                    conn, message.email_id, message.lease, retry_at))

    async def _keep(self, message: queue.Queued) -> None:
        """Renew ``message``'s lease every :data:`RENEW_SECONDS` until the attempt ends (it
        cancels this) or the lease is found lost."""
        while True:
            await self.clock.sleep(RENEW_SECONDS)
            now = self.clock.time()
            try:
                held = await self.store.write(partial(
                    queue.renew, email_id=message.email_id, lease=message.lease, now=now,
                    lease_until=now + LEASE_SECONDS))
            except Exception as exc:  # tried again at the next renewal
                log.warning("%s: the lease of its attempt not renewed: %s", message.email_id,
                            exc)
                continue
            if not held:
                log.warning("%s: the lease of its attempt ran out; another worker may take "
                            "the message over, and then this attempt's results are not "
                            "recorded", message.email_id)
                return

    def _settle(self, conn: sqlite3.Connection, message: queue.Queued, outcome: Outcome
                ) -> queue.Recorded:
        """Record the attempt, with its events, unless its lease was lost: then the attempt
        of the claim that took the message over records (and reports) it, once."""
        now = self.clock.time()
        judged = self.judge(message, outcome, now)
        retries = [j.verdict.next_at for j in judged if j.verdict.next_at is not None]
        next_at = min(retries) if retries else now
        recorded = queue.record_attempt(conn, message.email_id, message.lease,
                                        [j.result() for j in judged], next_at, now)
        if recorded is queue.Recorded.LOST:
            log.warning("%s attempt %d not recorded: its lease ran out and the message was "
                        "taken over, or an operator deleted it", message.email_id,
                        message.attempts + 1)
            return recorded
        expired = [(message.email_id, j.recipient, EXPIRED_STATUS, j.reply, now) for j in judged
                   if j.verdict.bounce_type == schedule.EXPIRED]
        if expired:
            messages.set_recipients(conn, expired)
        queue.record_events(conn, delivery_events(message.email_id, judged, now))
        if self.config.queue.bounce_messages:
            self._bounce(conn, message, judged, now)
        for listener in self.listeners:
            listener(conn, message, judged)
        for j in judged:
            metrics.QUEUE_DELIVERIES.labels(j.verdict.bounce_type or j.verdict.state).inc()
        log.info("%s attempt %d: %s%s", message.email_id, message.attempts + 1,
                 ", ".join(f"{j.recipient} {j.verdict.bounce_type or j.verdict.state}"
                           for j in judged),
                 " (done)" if recorded is queue.Recorded.DONE else "")
        return recorded

    def _bounce(self, conn: sqlite3.Connection, message: queue.Queued, judged: Sequence[Judged],
                now: float) -> None:
        """Queue a delivery status notification to the sender for the recipients given up
        (none for a null sender: a bounce is never bounced)."""
        failed = [dsn.Failed(j.recipient, j.reply, j.verdict.bounce_type or "", now)
                  for j in judged if j.verdict.state == schedule.BOUNCED]
        if not failed or not message.sender:
            return
        name = self.config.smtp.server_name
        email_id = new_email_id()
        report = dsn.build(name, message.sender, message.email_id, message.received_at, failed,
                           message.data, now, f"dsn-{secrets.token_hex(12)}",
                           f"<{email_id.removeprefix('email_')}@{name}>")
        options = [] if report.isascii() else ["BODY=8BITMIME"]
        if not message.sender.isascii():
            options.append("SMTPUTF8")
        settings = self.config.queue
        try:
            queue.enqueue(conn, queue.NewMessage(
                email_id, "", [message.sender], report, options, "", name, "ESMTP", now,
                now + settings.max_age_hours * 3600), settings.max_messages, settings.max_bytes)
        except queue.QueueFull:
            log.warning("%s: no bounce message to %s, the queue is full", message.email_id,
                        message.sender)
            return
        log.info("%s: bounce message %s to %s for %d recipient(s)", message.email_id, email_id,
                 message.sender, len(failed))

    def judge(self, message: queue.Queued, outcome: Outcome, now: float) -> list[Judged]:
        """Each recipient's verdict; one reached by an earlier try (a duplicate) is sent."""
        failures = message.attempts + 1
        judged = []
        for recipient in message.recipients:
            if recipient in outcome.duplicates:
                code, text = 250, "2.0.0 already delivered"
            elif recipient in outcome.replies:
                reply = outcome.replies[recipient]
                code, text = reply.code, reply.text
            else:  # not tried (cannot happen short of a bug): tried again
                code, text = 451, "4.3.0 not tried"
            verdict = schedule.judge(code, text, failures, now, message.expires_at,
                                     self.config.queue.retry_seconds)
            judged.append(Judged(recipient, code, f"{code} {text}", verdict, failures))
        return judged


def release_dead(conn: sqlite3.Connection, now: float, me: int | None = None) -> None:
    """Hand back the leases of relay processes that no longer run (relay/smtp/processes.py
    tells, and forgets them), and those naming ``me``: at a worker's start, and before an
    operator's delete (relay/admin/queue.py), so a message a killed relay left ``sending``
    can be deleted at once."""
    owners = queue.lease_owners(conn, now)
    alive = set(processes.running(conn, owners, processes.current(), now))
    for owner in owners:
        if owner not in alive or owner == me:
            count = queue.release(conn, owner)
            log.warning("queue: %d message(s) leased by stopped relay process %s handed "
                        "back", count, owner)


def delivery_events(email_id: str, judged: Sequence[Judged], now: float
                    ) -> list[queue.DeliveryEvent]:
    """The ``delayed`` and ``bounced`` events of an attempt (a copy sent is in the message's
    recipients), with the fields of their webhooks (relay/webhooks/payloads.py)."""
    kinds = {schedule.RETRY: queue.DELAYED_EVENT, schedule.BOUNCED: queue.BOUNCED_EVENT}
    return [queue.DeliveryEvent(EVENT_PREFIX + uuid7(int(now * 1000)), kinds[j.verdict.state],
                                now, email_id, j.recipient, j.code, j.attempt, j.reply,
                                j.verdict.next_at, j.verdict.bounce_type)
            for j in judged if j.verdict.state in kinds]


def publish_metrics(store: Store | None, clock: Clock) -> None:
    """The queue's gauges, read from ``store`` before each scrape (None: zero, once it
    closed)."""
    metrics.BEFORE_SCRAPE[:] = [f for f in metrics.BEFORE_SCRAPE
                                if getattr(f, "func", None) is not _read_gauges]
    if store is not None:
        metrics.BEFORE_SCRAPE.append(partial(_read_gauges, store, clock))
        return
    for gauge in (metrics.QUEUE_MESSAGES, metrics.QUEUE_BYTES, metrics.QUEUE_OLDEST_SECONDS):
        gauge.set(0)


async def _read_gauges(store: Store, clock: Clock) -> None:
    """The gauges keep their last values while the store cannot be read."""
    try:
        (count, size), received = await store.read(
            lambda conn: (queue.totals(conn), queue.oldest(conn)))
    except Exception as exc:
        log.warning("queue not measured for /metrics: %s", exc)
        return
    metrics.QUEUE_MESSAGES.set(count)
    metrics.QUEUE_BYTES.set(size)
    metrics.QUEUE_OLDEST_SECONDS.set(0.0 if received is None else
                                     max(0.0, clock.time() - received))
