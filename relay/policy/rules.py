"""The decision's input: settings, tracking domains and tags as one immutable snapshot, cached
by the rules generation (relay/admin/settings.py). Per message the mail path pays one primary-key
lookup; the tables are read again only after some process changed one of them.

:func:`start` is what a running relay does with them: seed the store from the config, publish
the tracking-domain metrics and, in the process serving HTTP, re-check tracking domains.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from relay.admin import domains, settings, tags
from relay.config import Config
from relay.store.engine import Store
from relay.store.transaction import transaction


@dataclass(frozen=True)
class Rules:
    generation: int = -1
    account: settings.Account = settings.Account()
    domains: Mapping[str, settings.Domain] = field(default_factory=dict)
    tracking: Mapping[str, domains.TrackingDomain] = field(default_factory=dict)  # by sender
    tags: frozenset[str] = frozenset()


def load(conn: sqlite3.Connection) -> Rules:
    """Every rule, read after the generation so the snapshot is never older than its number."""
    number = settings.generation(conn)
    tracking = {d.sender_domain: d for d in domains.listing(conn)}
    return Rules(number, settings.account(conn), settings.domains(conn), tracking,
                 tags.registered(conn))


class RulesCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.rules = Rules()

    def current(self) -> Rules:
        if settings.generation(self.store.writer) != self.rules.generation:
            self.rules = load(self.store.writer)
        return self.rules


def seed(conn: sqlite3.Connection, config: Config) -> None:
    for module in (settings, domains, tags):
        module.seed(conn, config)


def start(store: Store, config: Config, *, recheck: bool) -> Callable[[], Awaitable[None]]:
    """Seed, publish metrics, start re-checks if asked; returns the coroutine that stops it."""
    with transaction(store.writer):
        seed(store.writer, config)
    domains.publish_metrics(store)
    task = None
    if recheck and config.dns.recheck_interval > 0:
        task = asyncio.create_task(domains.recheck_forever(store, config))

    async def stop() -> None:
        domains.publish_metrics(None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return stop
