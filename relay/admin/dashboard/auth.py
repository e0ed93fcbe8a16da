"""Signing in to the dashboard: sessions, CSRF tokens, and a delay on repeated failures.

- **Passwords** are scrypt hashes in the store (``relay users add``, relay/store/users.py),
  checked off the event loop in the thread pool SMTP AUTH uses (relay/smtp/guard.py
  ``PasswordChecker.verify``); an unknown name costs the same check as a wrong password.
- **Failures** are counted per client address (IPv6: per /64) by the budget SMTP AUTH uses
  (``AuthBudget``), with its settings and a count of its own: each failure past the first is
  answered ``smtp.auth_failure_delay`` seconds later than the one before (at most 10 s), and
  the ``smtp.auth_max_failures``-th refuses the address (``429``) for
  ``smtp.auth_block_seconds``.
- **Sessions**: a random cookie (``relay_session``: ``HttpOnly``, ``SameSite=Strict``, path
  ``/ui/``, ``Secure`` when the request came over https, directly or through a trusted proxy:
  :func:`forwarded`) whose SHA-256 names the session row;
  it ends at sign-out, when the password is changed, or ``dashboard.session_hours`` after
  sign-in (on an injectable clock).
- **CSRF**: every ``POST`` carries the session's token in the form field ``csrf`` (the sign-in
  form: the value of a cookie set with the form, double-submit), and one whose ``Origin`` (or,
  without one, ``Referer``) names another site is refused; ``SameSite=Strict`` is the second
  lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from relay.addresses import Network
from relay.admin.users import MAX_PASSWORD, name_problem
from relay.config import Config
from relay.smtp.guard import AuthBudget, PasswordChecker
from relay.store import users
from relay.store.engine import Store
from relay.tracking.tracker import client_ip, in_networks

COOKIE = "relay_session"
LOGIN_COOKIE = "relay_login"
COOKIE_PATH = "/ui/"


@dataclass(frozen=True)
class Signed:
    """The signed-in user of a request, and the session's CSRF token for its forms."""

    name: str
    csrf: str


class LoginRefused(Exception):
    """A sign-in that failed: ``status`` and a message for people."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Auth:
    def __init__(self, store: Store, config: Config, clock: Callable[[], float],
                 monotonic: Callable[[], float]) -> None:
        self.store = store
        self.session_seconds = config.dashboard.session_hours * 3600
        self.clock = clock
        smtp = config.smtp
        self.budget = AuthBudget(smtp.auth_max_failures, smtp.auth_block_seconds,
                                 smtp.auth_failure_delay, clock=monotonic, smtp=False)
        self.checker = PasswordChecker({})

    def close(self) -> None:
        self.checker.close()

    async def current(self, request: web.Request) -> Signed | None:
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        hashed = _hash(token)
        found = await self.store.read(lambda conn: users.session(conn, hashed))
        if found is None or found.expires_at <= self.clock():
            return None
        return Signed(found.user_name, found.csrf)

    async def sign_in(self, client: str, name: str, password: str) -> str:
        """A new session's cookie value for ``name``; LoginRefused when the password is
        wrong (after the failure's delay), or the address is refused for now."""
        left = self.budget.refused(client)
        if left:
            raise LoginRefused(429, f"Too many failed sign-ins from your address: try again "
                                    f"in {int(left) + 1} s.")
        if not self.budget.reserve(client):
            raise LoginRefused(429, "Sign-ins from your address are being checked: try again "
                                    "in a moment.")
        ok: bool | None = None
        try:
            # a name or password no user can have is checked against the dummy hash all the
            # same: the answer's timing tells nothing
            known = not name_problem(name) and len(password) <= MAX_PASSWORD
            encoded = await self.store.read(
                lambda conn: users.password_hash(conn, name)) if known else None
            ok = await self.checker.verify(encoded, password[:MAX_PASSWORD].encode())
        finally:
            delay, blocked = self.budget.settle(client, None if ok is None else not ok)
        if ok is None:
            raise LoginRefused(503, "Too many sign-ins at once: try again in a moment.")
        if not ok:
            await asyncio.sleep(delay)  # the growing delay of repeated failures (not a wait)
            if blocked:
                raise LoginRefused(429, "Too many failed sign-ins from your address: try "
                                        f"again in {int(self.budget.block_seconds)} s.")
            raise LoginRefused(401, "Wrong name or password.")
        token = secrets.token_urlsafe(32)
        now = self.clock()
        await self.store.write(lambda conn: users.add_session(
            conn, _hash(token), name, secrets.token_urlsafe(32), now,
            now + self.session_seconds))
        return token

    async def sign_out(self, request: web.Request) -> None:
        token = request.cookies.get(COOKIE)
        if token:
            await self.store.write(lambda conn: users.end_session(conn, _hash(token)))


def set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str,
               max_age: float | None = None) -> None:
    response.set_cookie(name, value, path=COOKIE_PATH, httponly=True, samesite="Strict",
                        secure=request.secure, max_age=None if max_age is None
                        else int(max_age))


_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _nearest(header: str) -> str:
    """The value the nearest proxy added to a comma-separated ``X-Forwarded-*`` header."""
    return header.rpartition(",")[2].strip()


def forwarded(request: web.Request, proxies: tuple[Network, ...]) -> dict[str, str]:
    """What the browser's request was, when it came through a trusted proxy
    (``http.trusted_proxies``), as ``request.clone`` arguments: the client's address from
    ``X-Forwarded-For`` (read as the tracker reads it), the scheme and host from
    ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (the nearest proxy's value). Behind a proxy
    that ends TLS the session cookie is then ``Secure`` and the pages' own posts pass
    :func:`same_origin` (their ``Origin`` says https), and failed sign-ins are counted per
    client, not for the proxy as one. From any other peer these headers are ignored."""
    peer = request.remote
    changes: dict[str, str] = {}
    if peer is None or not in_networks(peer, proxies):
        return changes
    remote = client_ip(peer, ",".join(request.headers.getall("X-Forwarded-For", ())),
                       lambda ip: in_networks(ip, proxies))
    if remote and remote != peer:
        changes["remote"] = remote
    scheme = _nearest(request.headers.get("X-Forwarded-Proto", "")).lower()
    if scheme in ("http", "https"):
        changes["scheme"] = scheme
    host = _nearest(request.headers.get("X-Forwarded-Host", ""))
    if _HOST.fullmatch(host):
        changes["host"] = host
    return changes


def same_origin(request: web.Request) -> bool:
    """Whether a form post comes from the dashboard's own pages: its ``Origin`` header (or,
    without one, its ``Referer``) names this host. Browsers send one of them with every
    cross-site post; a post with neither (a script, curl) still needs the CSRF token."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source:
        return True
    if source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme == request.scheme and parts.netloc == request.host


def token_matches(expected: str, given: str) -> bool:
    return bool(expected) and hmac.compare_digest(expected.encode(), given.encode())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
