"""Abuse limits of the SMTP listener that outlive one session: password checks off the event
loop, a budget of failed logins per client address, connections per client address.

- ``PasswordChecker``: scrypt (about 50 ms a check, on purpose) runs in a small thread pool.
  ``hashlib.scrypt`` releases the GIL (measured: two threads hash 1.8 times as fast as one, and
  the loop thread runs at full speed beside them), so the loop keeps serving SMTP and HTTP
  during a flood of logins. An unknown user costs the same check as a wrong password (against
  a dummy hash), so the time of the reply does not tell which user names exist.
- ``AuthBudget``: failed logins per client (relay/limits.py ``client_key``: an IPv6 client
  by its /64). Each failure past the first is answered after a growing delay;
  at ``smtp.auth_max_failures`` the address is refused AUTH (``421``) for
  ``smtp.auth_block_seconds``. Logins being checked count against the budget: one past it
  waits for them (``454``). Per process.
- ``admit``: ``smtp.max_connections`` and ``max_connections_per_ip``, counted by the
  bookkeeping the HTTP listener uses too (relay/limits.py); past either, ``421``. Clients in
  ``smtp.allowed_networks`` (applications, whose pools may hold many connections; Postfix
  exempts ``$mynetworks`` alike) have only the total limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from relay.limits import PER_IP, TOTAL, ConnectionLimits, client_key
from relay.metrics import SMTP_AUTH, SMTP_AUTH_BLOCKS, SMTP_LIMITS
from relay.smtp import passwords
from relay.throttle import ThrottledLog

if TYPE_CHECKING:
    from relay.config import SmtpSettings

log = logging.getLogger("relay.smtp")

# Threads that hash passwords: enough to use two cores, few enough that a flood cannot take
# every core from the loop.
HASH_THREADS = min(2, os.cpu_count() or 1)
# How much lower than the loop thread's the hashing threads' CPU priority is (a nice value).
HASH_NICE = 10
# The most password checks waiting or running at once (per process): past it a login is
# answered 454 (RFC 4954: temporary failure) at once, instead of queueing behind a flood.
MAX_PENDING_CHECKS = 64
# The most client addresses whose failures are remembered (the oldest are forgotten first).
MAX_ADDRESSES = 100_000
# The longest a failed login's reply is delayed.
MAX_DELAY = 10.0


# One line a minute per limit and client address, however often it is reached.
_limits_log = ThrottledLog(log)


def limit_reached(limit: str, peer: str, message: str, *args: object) -> None:
    """Count a session or connection ended by ``limit`` in /metrics, and log it (throttled)."""
    SMTP_LIMITS.labels(limit).inc()
    _limits_log(f"{limit} {peer}", logging.WARNING, message, *args)


class PasswordChecker:
    """Checks AUTH credentials against ``[[smtp.users]]`` in a thread pool."""

    def __init__(self, users: Mapping[str, str], threads: int = HASH_THREADS,
                 max_pending: int | None = None) -> None:
        self._users = dict(users)
        self.max_pending = MAX_PENDING_CHECKS if max_pending is None else max_pending
        self._pending = 0
        # What an unknown user's password is checked against: the same work as a real check.
        self._dummy = passwords.hash_password(secrets.token_urlsafe(16)) if users else ""
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="relay-scrypt",
                                        initializer=_lower_priority)
        # The password that last verified, per user (its SHA-256): a client that logs in on
        # every connection pays the scrypt check once. Failures are never remembered, so a
        # wrong password always costs the full check.
        self._verified: dict[str, bytes] = {}

    async def check(self, name: str, password: bytes) -> bool | None:
        """Whether ``password`` is ``name``'s; None when ``max_pending`` checks are already
        waiting or running (try again later)."""
        encoded = self._users.get(name)
        digest = hashlib.sha256(password).digest()
        known = self._verified.get(name)
        if encoded is not None and known is not None and hmac.compare_digest(known, digest):
            return True
        if not self._users:
            return False
        ok = await self.verify(encoded, password)
        if ok and encoded is not None:
            self._verified[name] = digest
        return ok

    async def verify(self, encoded: str | None, password: bytes) -> bool | None:
        """Whether ``password`` matches the hash ``encoded``, checked in the pool (None: no
        such user, checked against a dummy hash all the same); None when ``max_pending``
        checks are already waiting or running. Also for the dashboard's sign-in
        (relay/admin/dashboard/auth.py), whose users are in the store."""
        if self._pending >= self.max_pending:
            return None
        if not self._dummy:
            self._dummy = passwords.hash_password(secrets.token_urlsafe(16))
        self._pending += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(
                self._pool, passwords.verify_password, password.decode("utf-8", "replace"),
                encoded if encoded is not None else self._dummy)
        finally:
            self._pending -= 1
        return bool(ok and encoded is not None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    """Run this hashing thread at a lower CPU priority than the loop thread, so that under a
    flood the cores go to answering clients first (Linux: a nice value is per thread)."""
    with contextlib.suppress(OSError, AttributeError):  # not permitted, not Linux: as is
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICE)


def admit(limits: ConnectionLimits, peer: object) -> tuple[str, str | None]:
    """Take a slot in ``limits`` (relay/limits.py: ``smtp.max_connections`` and
    ``max_connections_per_ip``) for a new connection from ``peer``, counted by its
    ``client_key`` (an IPv6 client by its /64). Returns its address (to release when the
    connection ends) and None, or the ``421`` that refuses the connection: answered and closed
    before its session starts, so a flood of idle connections cannot use up the process's file
    descriptors (and with them SMTP, HTTP and the store)."""
    host = peer_host(peer)
    refused = limits.admit(host)
    if refused == TOTAL:
        limit_reached("connections", "", "refusing connections: %d open, the most "
                      "smtp.max_connections allows", limits.open)
        return host, "421 4.7.0 Too many connections, try again later"
    if refused == PER_IP:
        key = peer_key(peer)
        limit_reached("connections_per_ip", key, "refusing connections from %s: %d open, the "
                      "most smtp.max_connections_per_ip allows", key, limits.held(host))
        return host, "421 4.7.0 Too many connections from your address, try again later"
    return host, None


@dataclass
class _Record:
    failures: int
    last: float
    blocked_until: float = 0.0
    checking: int = 0  # attempts reserved and not yet settled


class AuthBudget:
    """Failed logins per client address, on an injectable ``clock`` (seconds).

    Failures are remembered until ``block_seconds`` pass without one. The n-th failure's reply
    waits ``delay * (n - 1)`` seconds (at most ``MAX_DELAY``); the ``max_failures``-th refuses
    the address for ``block_seconds``: logged once per block, counted in ``/metrics``.

    An attempt is reserved (:meth:`reserve`) before its password is checked and settled
    (:meth:`settle`) after: attempts being checked count against the budget, so parallel
    connections from one address get no more checks than serial ones would.
    """

    def __init__(self, max_failures: int, block_seconds: float, delay: float,
                 clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = MAX_ADDRESSES, smtp: bool = True) -> None:
        self.smtp = smtp  # counted in SMTP AUTH's metrics (the dashboard's sign-in: not)
        self.max_failures = max_failures
        self.block_seconds = block_seconds
        self.delay = delay
        self.clock = clock
        self.max_addresses = max_addresses
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._refusals = ThrottledLog(log, clock=clock)

    def refused(self, peer: object) -> float:
        """Seconds left in the refusal window of ``peer``'s address (0: it may try)."""
        key = peer_key(peer)
        record = self._records.get(key)
        if record is None:
            return 0.0
        left = record.blocked_until - self.clock()
        if left <= 0:
            return 0.0
        if self.smtp:
            SMTP_AUTH.labels("refused").inc()
        self._refusals(key, logging.INFO, "auth refused for %s: %d s left of its refusal "
                       "window", key, left)
        return left

    def reserve(self, peer: object) -> bool:
        """Take one of the attempts left in ``peer``'s budget before checking its password;
        False when the failures so far and the attempts being checked use up the budget (try
        again later). A reserved attempt must be settled."""
        record = self._record(peer_key(peer), self.clock())
        if record.failures + record.checking >= self.max_failures:
            return False
        record.checking += 1
        return True

    def settle(self, peer: object, failed: bool | None) -> tuple[float, bool]:
        """End a reserved attempt: ``failed`` True counts a failed login, False a good one,
        None one that was never answered. Returns the delay before a failure's reply, and
        whether the address is refused from now on (this failure used up the budget, or
        another attempt's did while this one was checked)."""
        key = peer_key(peer)
        now = self.clock()
        record = self._record(key, now)
        record.checking = max(0, record.checking - 1)
        if not failed:
            return 0.0, False
        if self.smtp:
            SMTP_AUTH.labels("failed").inc()
        if record.blocked_until > now:  # blocked meanwhile: neither counted again nor extended
            return 0.0, True
        record.failures += 1
        record.last = now
        if record.failures >= self.max_failures:
            record.blocked_until = now + self.block_seconds
            record.failures = 0  # a fresh budget once the window is over
            if self.smtp:
                SMTP_AUTH_BLOCKS.inc()
            log.warning("auth: %s refused for %.0f s after %d failed logins", key,
                        self.block_seconds, self.max_failures)
            return 0.0, True
        return min(self.delay * (record.failures - 1), MAX_DELAY), False

    def _record(self, key: str, now: float) -> _Record:
        """``key``'s record, its failures forgotten after a quiet ``block_seconds``; the most
        recently used last, the oldest forgotten past ``max_addresses``."""
        record = self._records.pop(key, None)
        if record is None:
            record = _Record(0, now)
        elif now - record.last >= self.block_seconds and now >= record.blocked_until:
            record.failures, record.last = 0, now
        self._records[key] = record
        while len(self._records) > self.max_addresses:
            self._records.popitem(last=False)
        return record


def peer_host(peer: object) -> str:
    """The host part of a socket's peer name (``(host, port, ...)``), or the name as text."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def peer_key(peer: object) -> str:
    """The client a socket's peer is counted as (relay/limits.py ``client_key``)."""
    host = peer_host(peer)
    return client_key(host) or host


class Logins:
    """AUTH PLAIN and LOGIN, as aiosmtpd's mechanism hooks (its docs/auth.rst: a handler's
    ``auth_PLAIN``/``auth_LOGIN`` replace the built-in ones). The built-in hooks call a
    synchronous authenticator, which would run scrypt on the event loop; these read the
    credentials the same way (``challenge_auth``, RFC 4954 and 4616) and await the check."""

    def __init__(self, settings: SmtpSettings, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.checker = PasswordChecker({u.name: u.password_hash for u in settings.users})
        self.budget = AuthBudget(settings.auth_max_failures, settings.auth_block_seconds,
                                 settings.auth_failure_delay, clock)

    async def plain(self, server: SMTP, args: list[str]) -> AuthResult:
        if await self._refused(server):
            return AuthResult(success=False)
        blob = await _response(server, args, "")
        if blob is None:
            return AuthResult(success=False)
        try:  # authzid NUL authcid NUL passwd; the authorization identity is ignored
            _, login, password = blob.split(b"\x00")
        except ValueError:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False)
        return await self._check(server, login, password)

    async def login(self, server: SMTP, args: list[str]) -> AuthResult:
        if await self._refused(server):
            return AuthResult(success=False)
        login = await _response(server, args, SMTP.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False)
        password = await _response(server, [], SMTP.AuthLoginPasswordChallenge)
        if password is None:
            return AuthResult(success=False)
        return await self._check(server, login, password)

    async def _refused(self, server: SMTP) -> bool:
        assert server.session is not None
        left = self.budget.refused(server.session.peer)
        if left:
            await _close(server, f"421 4.7.0 Too many failed logins from your address: try "
                                 f"again in {left:.0f} s")
        return bool(left)

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        assert server.session is not None
        peer = server.session.peer
        name = login.decode("utf-8", "replace")
        if not self.budget.reserve(peer):
            if await self._refused(server):  # another attempt used up the budget meanwhile
                return AuthResult(success=False)
            SMTP_AUTH.labels("busy").inc()
            return AuthResult(success=False, handled=False, message=(
                "454 4.7.0 Temporary authentication failure: other logins from your address "
                "are being checked, try again later"))
        ok: bool | None = None
        try:
            ok = await self.checker.check(name, password)
        finally:
            delay, blocked = self.budget.settle(peer, None if ok is None else not ok)
        if ok is None:
            SMTP_AUTH.labels("busy").inc()
            _limits_log("auth busy", logging.WARNING, "auth: %d password checks already "
                        "waiting or running; answering 454", self.checker.max_pending)
            return AuthResult(success=False, handled=False, message=(
                "454 4.7.0 Temporary authentication failure: too many logins at once, try "
                "again later"))
        if ok:
            if await self._refused(server):  # blocked while this password was checked
                return AuthResult(success=False)
            SMTP_AUTH.labels("ok").inc()
            log.info("auth ok for %r from %s", name, peer_key(peer))
            return AuthResult(success=True, auth_data=name)
        log.info("auth failed for %r from %s", name, peer_key(peer))
        if blocked:
            await _close(server, f"421 4.7.0 Too many failed logins from your address: try "
                                 f"again in {self.budget.block_seconds:.0f} s")
            return AuthResult(success=False)
        if delay:
            await asyncio.sleep(delay)
        return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8

    def close(self) -> None:
        self.checker.close()


async def _response(server: SMTP, args: list[str], challenge: str) -> bytes | None:
    """The client's base64 answer: given with the command (``args[1]``) or to a ``334``
    challenge; None once the client has been answered (cancelled, not base64)."""
    if len(args) > 1:
        try:
            return base64.b64decode(args[1], validate=True)
        except (binascii.Error, ValueError):
            await server.push("501 5.5.2 Can't decode base64")
            return None
    blob = await server.challenge_auth(challenge)  # answers '*' and bad base64 itself
    return None if blob is MISSING else blob  # type: ignore[return-value]


async def _close(server: SMTP, reply: str) -> None:
    await server.push(reply)
    if server.transport is not None:
        server.transport.close()
