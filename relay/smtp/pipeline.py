"""The mail path between SMTP in and SMTP out: read the control headers, decide what to
track, rewrite one copy per recipient, forward, remember what was delivered, record.

``MailPipeline.process`` is the one way a received message (envelope and bytes) enters the
mail path, from SMTP's DATA and from the HTTP send API alike. It never raises for a problem
with the message: every outcome is an SMTP reply. In proxy mode
(``smtp.mode = "proxy"``) the message is forwarded before the reply; in queue mode it is
stored (fsync'd) and the queue's workers (relay/smtp/delivery.py) forward it through
:meth:`MailPipeline.deliver`, the same path, later.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import TypeVar
from urllib.parse import urlsplit

from relay import metrics
from relay.config import Config, HttpSettings
from relay.errors import SmtpReplyError
from relay.ids import new_email_id
from relay.policy.decide import Controls, Decision, Https, decide, read_controls
from relay.rewrite import urls
from relay.rewrite.dkim import DkimSigner, signs_header
from relay.rewrite.headers import (
    HeaderBlock,
    insert_field,
    parse_header_block,
    prepend_headers,
    remove_headers,
)
from relay.rewrite.splice import Links, Prepared, RewriteOptions, prepare
from relay.smtp import dedupe, processes, trace
from relay.smtp.upstream import Copy, Reply, Upstream
from relay.store import messages, queue
from relay.store.engine import Store, disk_full
from relay.store.rules import RulesCache
from relay.tracking.tokens import Keyring

log = logging.getLogger("relay.mail")

# Messages larger than this are rewritten on a worker thread, out of the event loop's way.
LARGE_MESSAGE = 256 * 1024
# How many tokens a copy signs before the event loop gets to do other work (about 2 ms).
TOKENS_PER_STEP = 500
# How many copies of a large message (see Copies.large) are rendered or being sent at once.
LARGE_IN_FLIGHT = 2
# MAIL FROM parameters passed on to the upstream (SIZE is not: the rewrite changes the size).
PASSED_MAIL_OPTIONS = ("BODY=8BITMIME", "SMTPUTF8")
T = TypeVar("T")
# Links left untracked kept in a message's record, each href cut to this many characters.
UNTRACKED_KEPT = 100
HREF_KEPT = 500


@dataclass(frozen=True, slots=True)
class Incoming:
    sender: str
    recipients: Sequence[str]
    message: bytes  # the DATA as received, CRLF, dot-unstuffed (relay/smtp/server.py)
    mail_options: Sequence[str] = ()
    peer: str = ""
    helo: str = ""  # the name the client gave in EHLO or HELO
    protocol: str = "ESMTP"  # as the Received line names it (trace.protocol)
    received_at: float | None = None  # when it was received, if not now (a queued message)


@dataclass(slots=True)
class Outcome:
    """What happened to one message, for the reply, the store and the log line."""

    email_id: str
    replies: dict[str, Reply] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)

    @property
    def sent(self) -> list[str]:
        return [r for r, reply in self.replies.items() if reply.ok]

    @property
    def failed(self) -> dict[str, Reply]:
        return {r: reply for r, reply in self.replies.items() if not reply.ok}


# How long the record of a message already sent is tried again while PostgreSQL is away
# (the client waits for its reply meanwhile).
RECORD_RETRY_SECONDS = 120
NOT_RECORDED = "451 4.3.0 The relay cannot record messages right now; not sent, try again later"
QUEUE_FULL = "452 4.3.1 The relay's queue is full; not stored, try again later"
DISK_FULL = "452 4.3.1 Insufficient storage in the relay; not stored, try again later"
# A message that alone is more than queue.max_bytes: it never fits, so not a 452 a client
# would retry for as long as it keeps trying.
TOO_BIG_TO_QUEUE = ("552 5.3.4 Message larger than the relay's queue may hold "
                    "(queue.max_bytes); not stored")
NOT_STORED = "451 4.3.0 The relay cannot store messages right now; try again later"


class MailPipeline:
    def __init__(self, config: Config, store: Store, keyring: Keyring, upstream: Upstream,
                 listeners: Sequence[MessageListener] = (), *, me: processes.Registered):
        self.config = config
        self.store = store
        self.keyring = keyring
        self.upstream = upstream
        self.listeners = tuple(listeners)
        self.rules = RulesCache(store, lambda: self.clock())
        # what its messages and claims name (registered by the caller, through store.write:
        # the PostgreSQL engine has no connection to write it on from here)
        self.me = me
        self.claims = dedupe.Claims(store, config.smtp.dedupe_hours * 3600, self.me)
        self.on_queued: Callable[[], None] = lambda: None  # the queue's workers wake up
        self.clock: Callable[[], float] = time.time
        self.https = _https(config.http)

    async def process(self, incoming: Incoming, email_id: str | None = None) -> str:
        """The one way a received message enters the mail path (SMTP's DATA, the send API):
        the reply to ``incoming``, which gets ``email_id`` (the send API names its messages
        before they are sent), else a new one. Proxy mode: forwarded, and the reply follows
        the upstream's. Queue mode: stored, fsync'd, then ``250`` (``452`` when the queue or
        the disk is full, ``451`` when the store cannot be written: nothing is kept then).
        A malformed control header or an unknown tag is refused (``5xx``) in both. Never
        raises: every outcome is a reply."""
        email_id = email_id or new_email_id()
        if self.config.smtp.mode == "queue":
            try:
                return await self._enqueue(incoming, email_id)
            except Exception:  # a bug must not lose the message: the client keeps it
                log.exception("%s not queued from=%s peer=%s", email_id, incoming.sender,
                              incoming.peer)
                return NOT_STORED
        return await self._relay(incoming, email_id)

    async def deliver(self, incoming: Incoming, email_id: str,
                      settle: Settle) -> Outcome | None:
        """A queued message's delivery attempt to ``incoming.recipients``, as proxy mode
        sends it; ``settle`` runs in the transaction that records its outcome (it does not
        run when nothing could be recorded). None when the attempt failed in an unforeseen
        way; a message the policy now refuses (a tag deleted since) is refused for every
        recipient."""
        try:
            _, outcome, _ = await self._process(incoming, email_id, settle)
        except SmtpReplyError as exc:
            reply = Reply(exc.code, f"{exc.enhanced} {exc.text}")
            outcome = Outcome(email_id, replies={r: reply for r in incoming.recipients})
            await self.store.write(lambda conn: settle(conn, outcome))
        except Exception:
            log.exception("%s delivery attempt failed", email_id)
            return None
        return outcome

    async def _enqueue(self, incoming: Incoming, email_id: str) -> str:
        raw = incoming.message
        block = parse_header_block(raw)
        try:
            controls = read_controls(raw, block)
            rules = await self.rules.current()
            decide(controls, _sender_domain(raw, block, incoming.sender), rules,
                   self.config.http.public_url)
        except SmtpReplyError as exc:
            log.info("%s refused from=%s peer=%s: %s", email_id, incoming.sender,
                     incoming.peer, exc.reply)
            metrics.SMTP_MESSAGES.labels("refused").inc()
            return exc.reply
        settings = self.config.queue
        if len(incoming.message) > settings.max_bytes:
            log.warning("%s not queued from=%s: %d bytes, more than queue.max_bytes", email_id,
                        incoming.sender, len(incoming.message))
            metrics.SMTP_MESSAGES.labels("refused").inc()
            return TOO_BIG_TO_QUEUE
        now = self.clock()
        message = queue.NewMessage(
            email_id, incoming.sender, list(incoming.recipients), incoming.message,
            list(incoming.mail_options), incoming.peer, incoming.helo, incoming.protocol, now,
            now + settings.max_age_hours * 3600)
        try:
            await self.store.write(lambda conn: queue.enqueue(
                conn, message, settings.max_messages, settings.max_bytes), durable=True)
        except queue.QueueFull as exc:
            log.warning("%s not queued from=%s: the queue is full (%s)", email_id,
                        incoming.sender, exc)
            metrics.SMTP_MESSAGES.labels("deferred").inc()
            return QUEUE_FULL
        except Exception as exc:
            log.exception("%s not queued from=%s", email_id, incoming.sender)
            metrics.SMTP_MESSAGES.labels("deferred").inc()
            return DISK_FULL if disk_full(exc) else NOT_STORED
        self.on_queued()
        metrics.SMTP_MESSAGES.labels("queued").inc()
        log.info("%s queued from=%s to=%d size=%d", email_id, incoming.sender,
                 len(incoming.recipients), len(incoming.message))
        return f"250 2.0.0 Ok: queued as {email_id}"

    async def _relay(self, incoming: Incoming, email_id: str) -> str:
        started = time.perf_counter()
        try:
            reply, outcome, summary = await self._process(incoming, email_id)
        except SmtpReplyError as exc:
            log.info("%s refused from=%s peer=%s: %s", email_id, incoming.sender,
                     incoming.peer, exc.reply)
            metrics.SMTP_MESSAGES.labels("refused").inc()
            return exc.reply
        except Exception:
            # A bug must not lose the message: the client keeps it and tries again.
            log.exception("%s failed from=%s peer=%s", email_id, incoming.sender, incoming.peer)
            metrics.SMTP_MESSAGES.labels("error").inc()
            return "451 4.3.0 Internal error in the relay; the message was not sent, try again"
        metrics.SMTP_SECONDS.observe(time.perf_counter() - started)
        log.info("%s from=%s to=%d %s sent=%d failed=%d duplicate=%d reply=%r (%.1f ms)",
                 email_id, incoming.sender, len(incoming.recipients), summary,
                 len(outcome.sent), len(outcome.failed), len(outcome.duplicates),
                 reply[:120], (time.perf_counter() - started) * 1000)
        return reply

    async def _process(self, incoming: Incoming, email_id: str,
                       settle: Settle | None = None) -> tuple[str, Outcome, str]:
        raw = incoming.message
        block = parse_header_block(raw)
        controls = read_controls(raw, block)
        sender_domain = _sender_domain(raw, block, incoming.sender)
        decision = decide(controls, sender_domain, await self.rules.current(),
                          self.config.http.public_url, self.https)
        clean = remove_headers(raw, controls.headers)
        clean_block = block.without(controls.headers)
        digest = dedupe.content_digest(raw, block)
        message_id = _header(raw, block, "Message-ID")
        no_id = block.get("Message-ID") is None
        if no_id and not signs_header(raw, block, "Message-ID"):
            # below the trace block, which stays on top (control headers are never in it)
            message_id = dedupe.message_id_for(digest, self.config.smtp.server_name)
            clean, clean_block = insert_field(clean, clean_block,
                                              f"Message-ID: {message_id}\r\n".encode(),
                                              dedupe.trace_end(block))
        try:
            claim = await self.claims.acquire(
                digest, incoming.recipients, email_id,
                dedupe.NO_MESSAGE_ID_SECONDS if no_id else None)
        except Exception:
            log.exception("%s: earlier deliveries could not be looked up", email_id)
            metrics.SMTP_MESSAGES.labels("deferred").inc()
            return NOT_RECORDED, Outcome(email_id), "store unavailable: nothing sent"
        if claim.duplicates:
            log.info("%s is a retry of %s: not sent again to %d recipient(s) it reached",
                     email_id, ", ".join(claim.earlier), len(claim.duplicates))
        try:
            pending, duplicates = claim.pending, claim.duplicates
            outcome = Outcome(email_id, duplicates=duplicates)
            prepared = (await self._prepare(clean, clean_block, decision, sender_domain)
                        if pending else None)
            reason = decision.reason if prepared is None else _reason(decision, prepared)
            tracked = prepared is not None and prepared.will_change
            links = prepared.links if prepared is not None else None
            record = MessageRecord(email_id, message_id, incoming.sender, sender_domain,
                                   _header(raw, block, "Subject"), controls,
                                   decision if tracked else None, reason, len(raw), time.time(),
                                   links, self.me.id, tuple(pending),
                                   prepared.html if tracked and self.config.dashboard.keep_html
                                   else None)
            stored = bool(pending)
            if stored and not await self._store_message(record):
                metrics.SMTP_MESSAGES.labels("deferred").inc()
                return NOT_RECORDED, outcome, "store unavailable: nothing sent"
            copies = Copies(incoming.sender, pending, clean,
                            [o for o in incoming.mail_options if o.upper() in PASSED_MAIL_OPTIONS],
                            email_id, prepared if tracked else None,
                            self._received(incoming, email_id))
            outcome.replies.update(await self._forward(copies))
            await self._record(record, outcome, stored, claim, settle)
            _count(outcome, decision if tracked else None)
            summary = f"tracking={reason!r}"
            if prepared is not None and links is not None:
                summary += f" links={prepared.report.links_text()!r}"
            return _reply(outcome, incoming.recipients), outcome, summary
        finally:
            # Held from the look-up of earlier deliveries until the record of this try's:
            # a retry arriving meanwhile (in this process or another) waits, then finds them.
            await self.claims.release(claim)

    def _received(self, incoming: Incoming, email_id: str) -> trace.Received | None:
        if not self.config.smtp.add_received:
            return None
        return trace.Received(helo=incoming.helo, address=incoming.peer,
                              by=self.config.smtp.server_name, protocol=incoming.protocol,
                              email_id=email_id, when=incoming.received_at or time.time())

    async def _store_message(self, record: MessageRecord) -> bool:
        """The message's row, before its copies go out: a link scanner may click within a
        second of delivery, and the tracker needs the send time to tell it from a person; and
        a store that cannot be written (locked, disk full) is found before anything is sent,
        rather than after, when the copies could not be recorded nor retries recognised."""
        try:
            await self.store.write(lambda conn: _insert_message(conn, record))
        except Exception:
            log.exception("%s not stored before sending", record.email_id)
            return False
        return True

    async def _record(self, record: MessageRecord, outcome: Outcome, stored: bool,
                      claim: dedupe.Claim, settle: Settle | None = None) -> None:
        """Store what became of the message, and let go of the try's claim (on PostgreSQL, again
        while the server is away, up to :data:`RECORD_RETRY_SECONDS`); a failure is
        logged, and the reply still follows the upstream's: "not sent, try again" for copies
        the upstream took would have them sent twice. ``settle``: one more listener, for
        this message only (the queue's record of the attempt)."""
        remember = self.config.smtp.dedupe_hours > 0
        listeners = self.listeners
        if settle is not None:
            listeners = (*listeners, lambda conn, _, outcome: settle(conn, outcome))
        give_up = time.monotonic() + RECORD_RETRY_SECONDS
        delay = 0.25
        while True:
            try:
                await self.store.write(lambda conn: _record(conn, record, outcome, remember,
                                                            listeners, stored, claim))
                break
            except sqlite3.OperationalError:
                # PostgreSQL away (a restart, a failover) after the copies went out: the
                # record waits for it, rather than leave the recipients "sending" for good
                if self.store.engine != "postgresql" or time.monotonic() + delay > give_up:
                    log.exception("%s not recorded (sent=%d failed=%d)", record.email_id,
                                  len(outcome.sent), len(outcome.failed))
                    return
                log.warning("%s not recorded yet (sent=%d failed=%d): the store is away; "
                            "trying again", record.email_id, len(outcome.sent),
                            len(outcome.failed))
                await asyncio.sleep(delay)  # the store coming back, not a synchronisation
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("%s not recorded (sent=%d failed=%d)", record.email_id,
                              len(outcome.sent), len(outcome.failed))
                return
        self.claims.settled(claim)

    async def _prepare(self, clean: bytes, block: HeaderBlock, decision: Decision,
                       sender_domain: str) -> Prepared | None:
        if not decision.tracking:
            return None
        key = self.config.dkim_key(sender_domain)
        options = RewriteOptions(
            opens=decision.opens, clicks=decision.clicks, base_url=decision.base_url,
            excluded_hosts=decision.excluded_hosts,
            dkim=DkimSigner(key.domain, key.selector, key.private_key) if key else None,
        )
        if len(clean) > LARGE_MESSAGE:
            return await asyncio.to_thread(_without_cyclic_gc, prepare, clean, options, block)
        return prepare(clean, options, block)

    async def _forward(self, copies: Copies) -> dict[str, Reply]:
        """Send the copies and gather each recipient's reply.

        A copy is rendered only when its turn comes, and dropped once the upstream answered
        it, so what a message holds in memory does not grow with its recipients: of a large
        message (see :attr:`Copies.large`) one copy is rendered at a time, and at most
        :data:`LARGE_IN_FLIGHT` are rendered or being sent.
        """
        batches = copies.batches()
        in_flight = asyncio.Semaphore(LARGE_IN_FLIGHT if copies.large else len(batches) or 1)
        rendering = asyncio.Lock()

        async def send(recipients: Sequence[str]) -> dict[str, Reply]:
            async with in_flight:
                async with rendering:
                    copy = await copies.copy(recipients, self.keyring)
                return await self.upstream.send(copy)

        sent = await asyncio.gather(*(send(batch) for batch in batches), return_exceptions=True)
        replies: dict[str, Reply] = {}
        for batch, result in zip(batches, sent, strict=True):
            replies.update(_replies_of(batch, result, copies.email_id))
        return replies


@dataclass(frozen=True, slots=True)
class Copies:
    """The copies of one message still to send: one per recipient when it is tracked, each
    with its own tokens, else one for all (README, "How a message travels", step 3)."""

    sender: str
    recipients: Sequence[str]
    clean: bytes  # the message without its control headers
    mail_options: Sequence[str]
    email_id: str
    tracked: Prepared | None
    received: trace.Received | None  # the Received line for the top of each copy

    def batches(self) -> list[Sequence[str]]:
        """The recipients of each copy."""
        if self.tracked is None:
            return [self.recipients] if self.recipients else []
        return [[r] for r in self.recipients]

    @property
    def large(self) -> bool:
        """Whether a tracked copy takes more than one step to render, or is large enough that
        joining (and DKIM-signing) its bytes is worth a worker thread."""
        return self.tracked is not None and (len(self.clean) > LARGE_MESSAGE
                                             or self.tracked.tokens > TOKENS_PER_STEP)

    async def copy(self, recipients: Sequence[str], keyring: Keyring) -> Copy:
        """The copy for ``recipients`` (one of :meth:`batches`), ready for the upstream. Its
        tokens are signed :data:`TOKENS_PER_STEP` at a time, the event loop doing its other
        work between the steps."""
        if self.tracked is None:
            message = _traced(self.clean, self.received, recipients)
        else:
            rendering = self.tracked.rendering(self.email_id, recipients[0], keyring)
            while not rendering.sign(TOKENS_PER_STEP):
                await asyncio.sleep(0)
            if self.large:
                message = await asyncio.to_thread(
                    lambda: _traced(rendering.message(), self.received, recipients))
            else:
                message = _traced(rendering.message(), self.received, recipients)
        return Copy(self.sender, recipients, message, self.mail_options, self.email_id)


def _traced(message: bytes, received: trace.Received | None, recipients: Sequence[str]
            ) -> bytes:
    """One copy with the relay's ``Received:`` line on top (unless ``smtp.add_received`` is
    off): added after the rewrite and any DKIM re-signing, so no signature covers it."""
    if received is None:
        return message
    field = received.field(recipients[0] if len(recipients) == 1 else None)
    return prepend_headers(message, [field])


def _without_cyclic_gc(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` with the cyclic garbage collector paused (on a worker thread).

    Planning the rewrite of a message with many links makes hundreds of thousands of small
    objects at once; the collections that sets off walk every object in the process while
    holding the GIL, and the event loop waits for each whole pass (for 100k links: five
    passes of 0.3-0.7 s). Those objects hold no cycles, so reference counting frees them and
    nothing is lost by collecting later. Several threads may pause it at once: the last one
    out turns it back on.
    """
    global _gc_pausing
    with _gc_lock:
        if not _gc_pausing:
            gc.disable()
        _gc_pausing += 1
    try:
        return fn(*args)
    finally:
        with _gc_lock:
            _gc_pausing -= 1
            if not _gc_pausing:
                gc.enable()


_gc_lock = threading.Lock()
_gc_pausing = 0


def _replies_of(recipients: Sequence[str], replies: dict[str, Reply] | BaseException,
                email_id: str) -> dict[str, Reply]:
    """A copy's replies; a copy whose rendering or sending failed in an unforeseen way is
    deferred alone, so the copies that did go out are still recorded and a retry does not
    repeat them."""
    if not isinstance(replies, BaseException):
        return replies
    log.error("%s copy to %s failed", email_id, ", ".join(recipients), exc_info=replies)
    reply = Reply(451, "4.3.0 Internal error while forwarding; try again later")
    return {r: reply for r in recipients}


def _reason(decision: Decision, prepared: Prepared) -> str:
    if prepared.will_change:
        return f"{decision.reason}: {prepared.reason}"
    return f"{decision.reason}, delivered untracked: {prepared.reason}"


def _header(raw: bytes, block: HeaderBlock, name: str) -> str | None:
    header = block.get(name)
    return header.value(raw) if header is not None else None


def _https(http: HttpSettings) -> Https | None:
    """Where links may use https: with http.tls_listen, hosts with a certificate."""
    if http.tls_listen is None:
        return None
    host = urlsplit(http.public_url).hostname if http.tls_cert is not None else None
    return Https(http.tls_listen.port, frozenset([host] if host else []))


def _sender_domain(raw: bytes, block: HeaderBlock, envelope_sender: str) -> str:
    """The From header's domain (what recipients see and DKIM signs), else the envelope's.
    The value is parsed as written: decoding RFC 2047 words first would let a display name
    such as ``=?utf-8?q?x=40other.example?=`` pass for the address, and pick which domain's
    settings and tracking host apply."""
    from_header = block.get("From")
    addresses = getaddresses([from_header.raw_value(raw)]) if from_header is not None else []
    for _, address in addresses:
        if "@" in address:
            return address.rpartition("@")[2].lower()
    return envelope_sender.rpartition("@")[2].lower()


PARTIAL = "Delivered to "  # how a reply for a message some recipients got goes on


def delivered_some(reply: str) -> bool:
    """Whether a failure reply (:func:`_reply`) says some recipients got the message."""
    return reply[4:].startswith(("4.0.0 " + PARTIAL, "5.0.0 " + PARTIAL))


def _reply(outcome: Outcome, recipients: Sequence[str]) -> str:
    failed = outcome.failed
    if not failed:
        return f"250 2.0.0 Ok: queued as {outcome.email_id}"
    distinct = set(failed.values())
    if len(failed) == len(recipients) and len(distinct) == 1:
        reply = distinct.pop()
        return f"{reply.code} {_one_line(reply.text)}"
    temporary = any(reply.temporary for reply in failed.values())
    code, enhanced = (451, "4.0.0") if temporary else (550, "5.0.0")
    listed = "; ".join(f"{r}: {reply.code} {_one_line(reply.text)}" for r, reply in failed.items())
    delivered = len(outcome.sent) + len(outcome.duplicates)
    return (f"{code} {enhanced} {PARTIAL}{delivered} of {len(recipients)} recipients "
            f"({outcome.email_id}); failed: {listed}")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def _count(outcome: Outcome, tracked: Decision | None) -> None:
    result = "sent" if not outcome.failed else ("partial" if outcome.sent else "failed")
    metrics.SMTP_MESSAGES.labels(result).inc()
    metrics.SMTP_TRACKING.labels(tracked.label if tracked else "none").inc()
    for name, count in (("sent", len(outcome.sent)), ("failed", len(outcome.failed)),
                        ("duplicate", len(outcome.duplicates))):
        if count:
            metrics.SMTP_COPIES.labels(name).inc(count)


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """The row kept about one message: who sent it, what it carried, what was decided."""

    email_id: str
    message_id: str | None
    sender: str
    sender_domain: str
    subject: str | None
    controls: Controls
    tracked: Decision | None
    reason: str
    size: int
    created_at: float  # before the copies went out
    links: Links | None = None  # None: not looked at (rewrite.Prepared.links)
    process: int | None = None  # the processes row of the relay process sending it
    sending: Sequence[str] = ()  # the recipients its copies go to
    html: str | None = None  # its first HTML part, kept for the click map (tracked mail only)


def links_json(links: Links | None) -> str | None:
    """The ``messages.links`` column: how many links were tracked out of how many, and the
    first :data:`UNTRACKED_KEPT` left alone, each with its reason code and detail, the href
    without its userinfo, query and fragment (:func:`urls.redacted`)."""
    if links is None:
        return None
    untracked = links.untracked(UNTRACKED_KEPT)
    return json.dumps({
        "total": len(links), "tracked": links.tracked,
        "untracked": [{"href": urls.redacted(link.href)[:HREF_KEPT], "reason": link.code,
                       "detail": link.reason} for link in untracked],
        "omitted": len(links) - links.tracked - len(untracked),
    }, ensure_ascii=False)


def _insert_message(conn: sqlite3.Connection, m: MessageRecord) -> None:
    """The message's row, and its recipients as ``sending`` until :func:`_record` stores
    their answers (relay/smtp/processes.py tells a send in progress from one a crash ended)."""
    opens, clicks = (m.tracked.opens, m.tracked.clicks) if m.tracked else (False, False)
    messages.insert(conn, messages.NewMessage(
        m.email_id, m.message_id, m.sender, m.sender_domain, m.subject, m.controls.tag_name,
        json.dumps(list(m.controls.tags)), m.controls.campaign, m.controls.topic, int(opens),
        int(clicks), m.reason, m.size, m.created_at, links_json(m.links), m.process),
        m.sending, processes.SENDING)


def _record(conn: sqlite3.Connection, m: MessageRecord, outcome: Outcome, remember: bool,
            listeners: Sequence[MessageListener] = (), stored: bool = False,
            claim: dedupe.Claim | None = None) -> None:
    """The message's row (unless ``stored`` already), its recipients and deliveries (and the
    end of the try's claim), and the listeners' rows, in one transaction."""
    now = time.time()
    if not stored:
        _insert_message(conn, m)
    rows = [(m.email_id, r, _status(reply), str(reply), now)
            for r, reply in outcome.replies.items()]
    rows += [(m.email_id, r, "duplicate", "already delivered", now) for r in outcome.duplicates]
    messages.set_recipients(conn, rows)
    if claim is not None:
        dedupe.settle(conn, claim, m.message_id, outcome.sent, now, remember)
    for listener in listeners:
        listener(conn, m, outcome)


# Called in the transaction that records a message, after its rows (the webhook outbox).
MessageListener = Callable[[sqlite3.Connection, MessageRecord, Outcome], None]
# Called in the same transaction for one queued message's attempt (relay/smtp/delivery.py).
Settle = Callable[[sqlite3.Connection, Outcome], None]


def _status(reply: Reply) -> str:
    if reply.ok:
        return "sent"
    return "deferred" if reply.temporary else "failed"
