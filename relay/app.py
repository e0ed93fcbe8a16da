"""Wiring: open the store, start the SMTP and/or HTTP services, stop them cleanly on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from relay.config import Config
from relay.keys import load_keyring
from relay.store import Store
from relay.tokens import Keyring

log = logging.getLogger("relay")


@dataclass
class Services:
    store: Store
    keyring: Keyring
    smtp: object | None = None  # relay.smtp_in.SmtpService
    http: web.AppRunner | None = None


@contextlib.asynccontextmanager
async def running(
    config: Config, *, smtp: bool = True, http: bool = True
) -> AsyncIterator[Services]:
    """Start the requested services; stop them, then close the store, on exit."""
    store = await Store.open(config.store.path)
    services = Services(store, load_keyring(config.tracking, store.writer))
    try:
        if smtp:
            from relay.smtp_in import SmtpService

            services.smtp = SmtpService(config, store, services.keyring)
            await services.smtp.start()
        if http:
            services.http = await _start_http(config, services)
        yield services
    finally:
        if services.http is not None:
            await services.http.cleanup()
        if services.smtp is not None:
            await services.smtp.stop()
        await store.close()


async def _start_http(config: Config, services: Services) -> web.AppRunner:
    from relay.api import PREFIX, build_api
    from relay.tracker import build_app

    app = build_app(config, services.store, services.keyring)
    app.add_subapp(PREFIX, build_api(config, services.store))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.http.listen.host, config.http.listen.port)
    await site.start()
    log.info("http listening on %s, public url %s", config.http.listen, config.http.public_url)
    return runner


def http_port(runner: web.AppRunner) -> int:
    """The port the HTTP service listens on (for listen addresses with port 0)."""
    return runner.addresses[0][1]


async def serve(config: Config, *, smtp: bool = True, http: bool = True) -> None:
    """Run until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(config, smtp=smtp, http=http):
        await stop.wait()
        log.info("stopping")
