"""Recognising a retry: the same message sent again must not reach a recipient twice.

A retry is recognised by its content, never by its Message-ID alone (applications reuse one
for distinct messages: a fixed template header, a resend that copies headers). The key is the
SHA-256 of the message as received, minus its *trace block*: the ``Received:`` and
``Return-Path:`` header fields at the very top, which RFC 5321 4.4 has every SMTP server
prepend (or, for Return-Path, add at delivery), so a retry that passed through one more relay,
or was queued again by the client's MTA, differs from the first try there and only there.
Every other byte counts, the first non-trace field and everything after it included: headers a
client adds per attempt further down (an ``X-...-Attempt`` counter, a new ``Date:``) make it a
new message, since nothing tells such a header from the content apart.

Deliveries are remembered per (digest, recipient) for ``smtp.dedupe_hours``. A message without
a Message-ID gets one derived from its digest (:func:`message_id_for`), so a client's retry of
it gets the same one; it is taken for a retry within :data:`NO_MESSAGE_ID_SECONDS` only:
monitoring scripts send the same alert, byte for byte (no Message-ID, no Date), again and again,
and each repeat is news, while a client's retry comes within minutes.

Two tries of one message at once (a client that gave up waiting, or several connections) must
not both send: before sending, a try *claims* each recipient it will send to, in one store
transaction (:func:`take`); a try that finds a recipient claimed by another live try waits for
it to finish, then finds its deliveries. A claim names the process whose try it is (its row
of ``processes``): a try that finds recipients claimed checks whether that process still runs,
and takes over the claims of one that stopped (a process killed mid-send); the heartbeat of
each process that has sent (:meth:`Claims._beat`) forgets stopped processes with their claims
even if no try needs them. How a process is found dead, and what else is forgotten with it,
is relay/smtp/processes.py's. Claims live in the store, so they hold across the worker
processes (and relays) sharing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.rewrite.headers import HeaderBlock
from relay.smtp import processes
from relay.store import deliveries
from relay.store.engine import Store

log = logging.getLogger("relay.mail")

# The trace fields of RFC 5321 4.4 / RFC 5322 3.6.7, as found in a leading run.
TRACE_FIELDS = frozenset({"received", "return-path"})
# How long a message that arrived without a Message-ID counts as a retry (README: Retries).
NO_MESSAGE_ID_SECONDS = 600.0
# How often a try waiting for another process's try looks again (one in this process wakes it
# at once).
POLL_SECONDS = 0.1


def trace_end(block: HeaderBlock) -> int:
    """Offset just past the leading run of trace header fields (0 when there is none)."""
    end = 0
    for header in block.headers:
        if header.key not in TRACE_FIELDS:
            return header.start
        end = header.end
    return end


def content_digest(raw: bytes, block: HeaderBlock) -> bytes:
    """What identifies the message across retries: SHA-256 of all but its trace block."""
    return hashlib.sha256(memoryview(raw)[trace_end(block):]).digest()


def message_id_for(digest: bytes, domain: str) -> str:
    """The Message-ID given to a message that has none: the same for every retry of it."""
    return f"<{digest[:16].hex()}@{domain}>"


@dataclass(slots=True)
class Claim:
    """One try's part of a message: the recipients it sends to (and holds claims for until
    :func:`settle` or :meth:`Claims.release`), and those an earlier try already reached."""

    digest: bytes
    email_id: str
    pending: list[str]
    duplicates: list[str]
    held: bool = False  # claim rows in the store
    earlier: tuple[str, ...] = ()  # the email ids that reached the duplicates


def take(conn: sqlite3.Connection, digest: bytes, recipients: Sequence[str], email_id: str,
         me: processes.Registered, now: float, window: float) -> Claim | None:
    """In one transaction: the recipients delivered within ``window`` seconds are duplicates;
    the others are claimed for ``email_id`` by process ``me``, unless another try that still
    runs holds any of them (then None, and nothing is claimed: a try never holds some
    recipients while waiting for others, so two tries cannot wait for each other). That try
    may be of the same ``email_id``: a queued message's attempt whose lease ran out, taken
    over (relay/smtp/delivery.py), by this process or another."""
    done = deliveries.delivered(conn, digest, recipients, now - window)
    pending = [r for r in recipients if r not in done]
    duplicates = [r for r in recipients if r in done]
    earlier = tuple(sorted(set(done.values())))
    if not pending:
        return Claim(digest, email_id, pending, duplicates, earlier=earlier)
    holders = deliveries.claim_holders(conn, digest, pending)
    if holders and processes.running(conn, holders, me.process, now):
        return None
    processes.see(conn, me, now)
    deliveries.claim(conn, digest, pending, email_id, me.id, now)
    return Claim(digest, email_id, pending, duplicates, held=True, earlier=earlier)


def settle(conn: sqlite3.Connection, claim: Claim, message_id: str | None,
           sent: Sequence[str], now: float, remember: bool) -> None:
    """Record the recipients the upstream took and drop the try's claims, in the caller's
    transaction (the one recording the message), so no retry finds neither."""
    if remember and sent:
        deliveries.remember(conn, claim.digest, sent, message_id, claim.email_id, now)
    if claim.held:
        _drop(conn, claim)


def _drop(conn: sqlite3.Connection, claim: Claim) -> None:
    deliveries.drop_claims(conn, claim.digest, claim.email_id)


class Claims:
    """This process's claims: taking them (waiting while another try holds them), keeping
    them alive while held, and letting them go."""

    def __init__(self, store: Store, window_seconds: float, me: processes.Registered,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.window = window_seconds
        self.me = me
        self.clock = clock
        self._heartbeat: asyncio.Task[None] | None = None
        self._unreleased: list[Claim] = []  # their rows could not be deleted yet
        self._released = asyncio.Event()

    async def acquire(self, digest: bytes, recipients: Sequence[str], email_id: str,
                      window: float | None = None) -> Claim:
        """The try's claim; waits while another live try holds one of its recipients. Raises
        what the store raises when it cannot be written. ``window``: a shorter time than
        ``smtp.dedupe_hours`` in which earlier deliveries count (:data:`NO_MESSAGE_ID_SECONDS`)."""
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat())
        if not self.window:  # dedupe off: every try sends
            return Claim(digest, email_id, list(recipients), [])
        window = self.window if window is None else min(window, self.window)
        waited = False
        while True:
            claim = await self.store.write(lambda conn: take(
                conn, digest, recipients, email_id, self.me, self.clock(), window))
            if claim is not None:
                return claim
            if not waited:
                log.info("%s waits: another try of the same message is being sent to its "
                         "recipients", email_id)
                waited = True
            released = self._released
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), POLL_SECONDS)

    def settled(self, claim: Claim) -> None:
        """The claim's rows are gone from the store (:func:`settle` committed)."""
        if not claim.held:
            return
        claim.held = False
        self._released.set()
        self._released = asyncio.Event()

    async def release(self, claim: Claim) -> None:
        """Let go of a claim not settled with a record (the try ended early). If the store
        cannot be written, each heartbeat tries again (a later try of the message waits that
        long)."""
        if not claim.held:
            return
        try:
            await self.store.write(lambda conn: _drop(conn, claim))
        except Exception:
            log.exception("%s: its claims could not be released", claim.email_id)
            self._unreleased.append(claim)
        self.settled(claim)

    async def _beat(self) -> None:
        """From the first try on: say this process is alive (to relays of other hosts sharing
        the store) and forget the processes that stopped, with their claims, even if no try
        needs them (relay/smtp/processes.py)."""
        while True:
            unreleased, self._unreleased = self._unreleased, []
            try:
                await self.store.write(functools.partial(self._alive, unreleased=unreleased))
            except Exception as exc:  # the next beat tries again (the lease is four beats)
                self._unreleased.extend(unreleased)
                log.warning("process heartbeat not written: %s", exc)
            await asyncio.sleep(processes.HEARTBEAT_SECONDS)

    def _alive(self, conn: sqlite3.Connection, unreleased: Sequence[Claim]) -> None:
        processes.beat(conn, self.me, self.clock())
        for claim in unreleased:
            _drop(conn, claim)
