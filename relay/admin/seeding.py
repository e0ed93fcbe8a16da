"""What a running relay does with the stored rules: seed them from the config (once per item,
see relay/admin/settings.py), publish the tracking-domain metrics and, in the process serving
HTTP, re-check tracking domains."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable

from relay.admin import dnscheck, domains, settings, tags
from relay.config import Config
from relay.store.engine import Store


def seed(conn: sqlite3.Connection, config: Config) -> None:
    for module in (settings, domains, tags):
        module.seed(conn, config)


async def start(store: Store, config: Config, *, recheck: bool
                ) -> Callable[[], Awaitable[None]]:
    """Seed, publish metrics, start re-checks if asked; returns the coroutine that stops it."""
    await store.write(lambda conn: seed(conn, config))
    dnscheck.publish_metrics(store)
    task = None
    if recheck and config.dns.recheck_interval > 0:
        task = asyncio.create_task(dnscheck.recheck_forever(store, config))

    async def stop() -> None:
        dnscheck.publish_metrics(None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return stop
