"""Certificates over ACME for the hosts the relay serves, shared by every node through the store.

Every :data:`TICK_SECONDS` each process reads the ``certificates`` table and loads what is new
into its :class:`~relay.certs.contexts.CertificateSet` (so a renewal ordered by another node
reaches this one's listeners without a restart; open connections keep theirs). The process
that serves HTTP also orders: for each host that wants a certificate (the host of
``http.public_url`` unless ``http.tls_cert`` covers it, every verified tracking domain, and
``smtp.hostname`` with ``smtp.tls_acme``) and has none, or one within 30 days of its end, or a
failed order whose wait is over (relay/certs/plan.py). Ordering takes the store lease
``acme`` first, and looks again at what is due once it holds it: of several nodes, one orders
and the others find the certificate in the store.

The HTTP-01 answers are written to the store before the ACME server is asked to check them,
and any node's plain listener serves them at ``/.well-known/acme-challenge/<token>``
(:func:`challenge_route`), so the check succeeds whichever node DNS or a load balancer sends
it to. A new certificate bumps the rules generation (relay/admin/settings.py), so the mail
path of every process builds new links on ``https://`` for that host.

Time (renewal, retries, the lease) comes from ``clock``, which tests replace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web

from relay import metrics
from relay.certs import plan
from relay.certs.contexts import CertificateSet
from relay.certs.ordering import AcmeClient, describe
from relay.config import Config
from relay.policy.domains import VERIFIED
from relay.store import certificates
from relay.store import domains as stored_domains
from relay.store.engine import Store
from relay.store.settings import bump

log = logging.getLogger("relay.certs")

TICK_SECONDS = 5.0
LEASE = "acme"
LEASE_SECONDS = 600.0  # longer than one order takes (relay/certs/ordering.py ORDER_SECONDS)
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")


def hosts(config: Config, verified: list[str]) -> list[str]:
    """The hosts that get ACME certificates, in the order they are ordered."""
    wanted: list[str | None] = []
    if config.http.tls_listen is not None and config.http.tls_cert is None:
        wanted.append(urlsplit(config.http.public_url).hostname)
    if config.http.tls_listen is not None:
        wanted.extend(verified)
    if config.smtp.tls_acme:
        wanted.append(config.smtp.server_name)
    return plan.wanted(wanted)


class CertificateManager:
    def __init__(self, store: Store, config: Config, certs: CertificateSet, *,
                 order: bool, clock: Callable[[], float] = time.time) -> None:
        assert config.acme is not None
        self.store, self.config, self.certs = store, config, certs
        self.acme = config.acme
        self.order = order
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self._round = asyncio.Lock()  # one round at a time in this process (one lease owner)
        self._expired: set[str] = set()  # hosts whose certificate was seen run out

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for cert in await self.store.read(certificates.listing):
            with contextlib.suppress(KeyError):
                metrics.CERTIFICATE_DAYS_LEFT.remove(cert.host)

    async def _forever(self) -> None:
        while True:
            try:
                if self.order:
                    await self.run_once()
                await self.refresh()
            except Exception:  # the next tick tries again; the relay keeps running
                log.exception("certificate round failed")
            await asyncio.sleep(TICK_SECONDS)

    async def refresh(self) -> None:
        """Load new or renewed certificates from the store; publish days left. When one has
        run out (its renewals failed for 30 days), the rules generation is bumped, so that
        every process's mail path puts new links to that host on http again."""
        now = self.clock()
        found = await self.store.read(certificates.listing)
        for host in self.certs.update(found):
            log.info("certificate for %s loaded", host)
        for cert in found:
            days = cert.days_left(now)
            if days is not None:
                metrics.CERTIFICATE_DAYS_LEFT.labels(cert.host).set(round(days, 2))
        expired = {c.host for c in found if c.cert_pem is not None and not c.usable(now)}
        if expired - self._expired:
            await self.store.write(bump)
            log.warning("certificate for %s expired: new links to it use http",
                        ", ".join(sorted(expired - self._expired)))
        self._expired = expired

    async def due(self) -> list[str]:
        now = self.clock()

        def read(conn: sqlite3.Connection) -> list[str]:
            verified = [d.host for d in stored_domains.listing(conn) if d.state == VERIFIED]
            return [h for h in hosts(self.config, verified)
                    if plan.due(certificates.get(conn, h), now)]

        return await self.store.read(read)

    async def run_once(self) -> list[str]:
        """Order what is due, under the lease; returns the hosts ordered (issued or failed)."""
        async with self._round:
            return await self._run()

    async def _run(self) -> list[str]:
        if not await self.due():
            return []
        if not await self._lease():
            return []
        done = []
        try:
            client: AcmeClient | None = None
            for host in await self.due():  # again, now that the lease is held
                if not await self._lease():
                    break
                client = client or await self._client()
                await self._order(client, host)
                done.append(host)
        finally:
            await self.store.write(lambda c: certificates.drop_lease(c, LEASE, self.owner))
        await self.refresh()
        return done

    async def _lease(self) -> bool:
        now = self.clock()
        return await self.store.write(
            lambda c: certificates.take_lease(c, LEASE, self.owner, now, LEASE_SECONDS))

    async def _client(self) -> AcmeClient:
        known = await self.store.read(lambda c: certificates.account(c, self.acme.directory))
        key_pem, uri = known if known else (None, None)
        client = AcmeClient(self.acme, key_pem, uri)
        if known is None or uri is None:
            try:
                await asyncio.to_thread(client.connect)
            finally:  # a key the server may have seen is kept, registered or not
                now = self.clock()
                await self.store.write(lambda c: certificates.save_account(
                    c, self.acme.directory, client.key_pem, client.uri, now))
        return client

    async def _order(self, client: AcmeClient, host: str) -> None:
        tokens: list[str] = []
        try:
            order = await asyncio.to_thread(client.begin, host)
            tokens = [challenge.token for challenge, _ in order.challenges]
            now = self.clock()
            answers = [(ch.token, ch.key_authorization) for ch, _ in order.challenges]
            await self.store.write(lambda c: certificates.add_challenges(c, answers, now))
            chain = await asyncio.to_thread(client.finish, order)
            result = plan.issued(host, chain, order.key_pem, self.clock())
        except Exception as exc:  # the ACME server's refusal, the network, a timeout
            before = await self.store.read(lambda c: certificates.get(c, host))
            result = plan.failed(before, host, describe(exc), self.clock())
            metrics.ACME_ORDERS.labels("failed").inc()
            log.warning("certificate for %s not issued: %s; next try in %.0f s (try %d)",
                        host, result.reason, (result.next_try or 0) - self.clock(),
                        result.failures)
        else:
            metrics.ACME_ORDERS.labels("issued").inc()
            log.info("certificate for %s issued, valid until %s", host,
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(result.not_after)))

        def record(conn: sqlite3.Connection) -> None:
            certificates.put(conn, result)
            certificates.remove_challenges(conn, tokens)
            bump(conn)

        await self.store.write(record)


def challenge_route(store: Store) -> Callable[[web.Request], web.StreamResponse]:
    """``GET /.well-known/acme-challenge/<token>``: the key authorization stored for it."""
    async def answer(request: web.Request) -> web.Response:
        token = request.match_info["token"]
        found = None
        if _TOKEN.fullmatch(token):
            found = await store.read(lambda c: certificates.challenge(c, token))
        if found is None:
            return web.json_response({"error": "no such challenge"}, status=404)
        return web.Response(text=found, content_type="text/plain")

    return answer  # type: ignore[return-value]


def start(store: Store, config: Config, *, order: bool
          ) -> tuple[CertificateSet, CertificateManager | None]:
    """This process's certificates: the operator's own for the host of ``http.public_url``
    (``http.tls_cert``), and with ``[acme]`` the store's, kept current by a manager that also
    orders when ``order`` is set (the process serving HTTP)."""
    http = config.http
    static = None
    if http.tls_cert is not None and http.tls_key is not None:
        static = (urlsplit(http.public_url).hostname or "", http.tls_cert, http.tls_key)
    certs = CertificateSet(static)
    if config.acme is None:
        return certs, None
    manager = CertificateManager(store, config, certs, order=order)
    manager.start()
    return certs, manager
