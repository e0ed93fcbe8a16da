"""Wiring: open the store, start the SMTP and/or HTTP services, stop them cleanly on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from urllib.parse import urlsplit

from aiohttp import web

from relay.admin import seeding
from relay.certs import manager as certs
from relay.certs.contexts import CertificateSet
from relay.clock import Clock
from relay.config import Address, Config
from relay.http_site import GuardedSite, ServerLog
from relay.limits import ConnectionLimits
from relay.smtp import delivery, processes
from relay.smtp.delivery import AttemptListener
from relay.smtp.pipeline import MailPipeline, MessageListener
from relay.smtp.upstream import build_upstream
from relay.stats.breakdown import Breakdown
from relay.stats.machine import MachineTraffic
from relay.stats.rollup import Rollup
from relay.store import html_bodies, retention
from relay.store.engine import Store, open_store
from relay.throttle import ThrottledLog, install_accept_handler
from relay.tracking.events import Listener
from relay.tracking.keys import load_keyring
from relay.tracking.tokens import Keyring
from relay.webhooks.outbox import DeliveryWorker, Outbox, sync_endpoints

log = logging.getLogger("relay")

# How long worker processes get to stop on SIGTERM before they are killed. They bound their own
# stop as this process does (30 s for SMTP sessions delivering a message and HTTP requests in
# progress, side by side), so this only ends a worker that hangs; it stays under systemd's 90 s.
WORKER_STOP_SECONDS = 75.0
# How long a stop lets HTTP requests in progress finish (the SMTP drain is as long).
HTTP_DRAIN_SECONDS = 30.0


@dataclass
class Services:
    store: Store
    keyring: Keyring
    smtp: object | None = None  # relay.smtp.server.SmtpService
    # the mail path, shared by the SMTP service and the send API (relay/admin/send.py)
    pipeline: MailPipeline | None = None
    http: web.AppRunner | None = None
    admin_http: web.AppRunner | None = None  # http.admin_listen's: the API and the dashboard
    # written in the transaction of each event / message (relay/tracking/events.py,
    # relay/smtp/pipeline.py)
    event_listeners: list[Listener] = field(default_factory=list)
    message_listeners: list[MessageListener] = field(default_factory=list)
    attempt_listeners: list[AttemptListener] = field(default_factory=list)  # queue mode
    certificates: CertificateSet = field(default_factory=CertificateSet)
    acme: certs.CertificateManager | None = None  # relay/certs/manager.py
    clock: Clock = field(default_factory=Clock)  # the queue's time (``running``'s clock)


@contextlib.asynccontextmanager
async def running(
    config: Config, *, smtp: bool = True, http: bool = True, clock: Clock | None = None
) -> AsyncIterator[Services]:
    """Start the requested services; stop them, then close the store, on exit. ``clock``:
    the queue's time (tests drive it)."""
    store = await open_store(config.store)
    await store.write(processes.sweep)  # what stopped processes left: relay/smtp/processes.py
    keyring = await store.write(functools.partial(load_keyring, config.tracking))
    services = Services(store, keyring, clock=clock or Clock())
    stop_rules = await seeding.start(store, config, recheck=http)
    stop_retention = retention.start(config.store, config.retention.days if http else 0)
    delivery.publish_metrics(store, clock or Clock())  # after seeding's (dnscheck)
    rollup = Rollup()
    services.event_listeners.append(rollup)
    services.message_listeners.append(rollup.on_message)
    services.event_listeners.append(Breakdown())
    services.event_listeners.append(MachineTraffic())
    if config.dashboard.keep_html:
        services.message_listeners.append(html_bodies.on_message)
    outbox = Outbox()
    services.event_listeners.append(outbox)
    services.message_listeners.append(outbox.on_message)
    services.attempt_listeners.append(outbox.on_attempt)
    await store.write(lambda conn: sync_endpoints(conn, config.webhooks, time.time()))
    webhooks = DeliveryWorker(store, config.webhook_delivery, outbox.wake)
    webhooks.start()
    # one line a minute per listener when accept() fails (out of descriptors), not a
    # traceback per attempt
    restore_handler = install_accept_handler(asyncio.get_running_loop(), ThrottledLog(log))
    services.pipeline = MailPipeline(
        config, store, services.keyring,
        build_upstream(config.upstream, config.smtp.server_name, clock),
        services.message_listeners,
        me=await store.write(processes.register))
    services.certificates, services.acme = certs.start(store, config, order=http)
    try:
        if smtp:
            from relay.smtp.server import SmtpService

            services.smtp = SmtpService(config, store, services.pipeline, clock=clock,
                                        attempt_listeners=services.attempt_listeners,
                                        certificates=services.certificates)
            await services.smtp.start()
        if http:
            services.http = await _start_http(config, services)
        yield services
    finally:
        # Both stop listening at once and drain side by side: one after the other, SMTP kept
        # taking mail while HTTP requests finished, and the two drains added up.
        stops: list[Awaitable[None]] = []
        for runner in (services.http, services.admin_http):
            if runner is not None:
                stops.append(runner.cleanup())
        if services.smtp is not None:
            stops.append(services.smtp.stop())
        await asyncio.gather(*stops)
        await services.pipeline.upstream.close()
        if services.acme is not None:
            await services.acme.stop()
        await stop_rules()
        await stop_retention()
        await webhooks.stop()
        delivery.publish_metrics(None, clock or Clock())
        await store.close()
        restore_handler()


async def _start_http(config: Config, services: Services) -> web.AppRunner:
    """The tracker on ``http.listen``, with the API and the dashboard beside it, or on
    ``http.admin_listen`` when that is set (started first: the connection gauge of /metrics
    follows the last listener started, the public one)."""
    from relay.tracking.tracker import build_app

    app = build_app(config, services.store, services.keyring,
                    listeners=services.event_listeners)
    admin = config.http.admin_listen
    if admin is None:
        _add_admin(app, config, services)
    else:
        admin_app = web.Application()
        _add_admin(admin_app, config, services)
        services.admin_http = await _serve_app(admin_app, config, admin)
        log.info("http api and dashboard listening on %s", admin)
    if config.acme is not None:
        app.router.add_get("/.well-known/acme-challenge/{token}",
                           certs.challenge_route(services.store))
    tls = None
    if config.http.tls_listen is not None:
        tls = services.certificates.server_context(urlsplit(config.http.public_url).hostname)
    runner = await _serve_app(app, config, config.http.listen, tls)
    log.info("http listening on %s, public url %s", config.http.listen, config.http.public_url)
    if tls is not None:
        log.info("https listening on %s", config.http.tls_listen)
    return runner


def _add_admin(app: web.Application, config: Config, services: Services) -> None:
    from relay.admin.api import PREFIX, build_api
    from relay.admin.dashboard.app import PREFIX as UI
    from relay.admin.dashboard.app import build_dashboard

    app.add_subapp(PREFIX, build_api(config, services.store))
    app.add_subapp(UI, build_dashboard(config, services.store, clock=services.clock.time))
    if services.pipeline is not None:
        from relay.admin import anypost

        app.add_subapp(anypost.PREFIX, anypost.build_v1(config, services.store,
                                                        services.pipeline))


async def _serve_app(app: web.Application, config: Config, listen: Address,
                     tls: ssl.SSLContext | None = None) -> web.AppRunner:
    """``app`` on ``listen`` and, given ``tls``, on ``http.tls_listen`` with the same limits."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=HTTP_DRAIN_SECONDS,
                           keepalive_timeout=config.http.keepalive_timeout, logger=ServerLog())
    await runner.setup()
    limits = ConnectionLimits(config.http.max_connections, config.http.max_connections_per_ip,
                              exempt=config.http.trusted_proxies)
    site = GuardedSite(runner, listen.host, listen.port, limits=limits,
                       header_timeout=config.http.header_timeout,
                       reuse_port=config.http.workers > 1 or None)
    await site.start()
    if tls is not None and config.http.tls_listen is not None:
        secure = GuardedSite(runner, config.http.tls_listen.host, config.http.tls_listen.port,
                             limits=limits, header_timeout=config.http.header_timeout,
                             reuse_port=config.http.workers > 1 or None, ssl_context=tls)
        await secure.start()
    return runner


def http_port(runner: web.AppRunner) -> int:
    """The port the HTTP service listens on (for listen addresses with port 0)."""
    return runner.addresses[0][1]


async def serve(config: Config, *, smtp: bool = True, http: bool = True,
                main: bool = True) -> int:
    """Run until SIGINT or SIGTERM, with the extra worker processes the config asks for.

    Workers are whole copies of the SMTP (or HTTP) service listening on the same port with
    SO_REUSEPORT, so the kernel spreads connections over them; they share the store (SQLite in
    WAL mode takes writers from several processes). If one dies, the others are stopped and
    the command exits non-zero, for systemd to restart the lot. Returns the exit status.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    died: list[BaseProcess] = []

    def worker_ended(worker: BaseProcess) -> None:
        loop.remove_reader(worker.sentinel)
        died.append(worker)
        stop.set()

    reaping: asyncio.Task[None] | None = None
    try:
        async with running(config, smtp=smtp, http=http):
            workers = _start_workers(config, smtp=smtp, http=http) if main else []
            for worker in workers:
                loop.add_reader(worker.sentinel, worker_ended, worker)
            await stop.wait()
            log.info("stopping")
            for worker in workers:
                loop.remove_reader(worker.sentinel)  # what ends now was stopped, not died
            if workers:  # they stop while this process stops its own services
                reaping = asyncio.create_task(asyncio.to_thread(_stop_workers, workers))
    finally:
        if reaping is not None:
            await reaping
    for worker in died:
        log.error("worker process %s died (exit code %s); stopped the others", worker.pid,
                  worker.exitcode)
    return 1 if died else 0


def _start_workers(config: Config, *, smtp: bool, http: bool) -> list[BaseProcess]:
    context = multiprocessing.get_context("spawn")
    plans = [(True, False)] * (config.smtp.workers - 1 if smtp else 0)
    plans += [(False, True)] * (config.http.workers - 1 if http else 0)
    workers = []
    for worker_smtp, worker_http in plans:
        process = context.Process(target=_worker, args=(config, worker_smtp, worker_http),
                                  daemon=True)
        process.start()
        workers.append(process)
    return workers


def _worker(config: Config, smtp: bool, http: bool) -> None:
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    quiet_libraries(config.log_level)
    raise SystemExit(asyncio.run(serve(config, smtp=smtp, http=http, main=False)))


def _stop_workers(workers: list[BaseProcess], timeout: float = WORKER_STOP_SECONDS) -> None:
    """SIGTERM every worker, give them ``timeout`` seconds together, then SIGKILL the rest."""
    for worker in workers:
        if worker.exitcode is None:
            worker.terminate()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.exitcode is None:
            log.error("worker process %s did not stop within %.0f s; killed", worker.pid,
                      timeout)
            worker.kill()
            worker.join()


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def quiet_libraries(level: str) -> None:
    """aiosmtpd logs every SMTP command at INFO: keep that for DEBUG."""
    if level != "DEBUG":
        logging.getLogger("mail.log").setLevel(logging.WARNING)
