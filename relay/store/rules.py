"""The rules snapshot (relay/policy/rules.py) read from the store, and cached by the rules
generation: per message the mail path pays one primary-key lookup; the tables are read again
only after some process changed one of them (every change bumps the generation in its
transaction, relay/store/settings.py)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from relay.policy.rules import Rules
from relay.store import certificates, domains, settings, tags
from relay.store.engine import Store


def load(conn: sqlite3.Connection, now: float) -> Rules:
    """Every rule, read after the generation so the snapshot is never older than its number.
    A certificate that runs out changes no table: the certificate manager bumps the
    generation when it sees one expire (relay/certs/manager.py)."""
    number = settings.generation(conn)
    tracking = {d.sender_domain: d for d in domains.listing(conn)}
    return Rules(number, settings.account(conn), settings.domains(conn), tracking,
                 tags.registered(conn), certificates.secure_hosts(conn, now))


class RulesCache:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.rules = Rules()

    async def current(self) -> Rules:
        """The rules, read again when their generation changed (one primary-key lookup)."""
        if await self.store.read(settings.generation) != self.rules.generation:
            now = self.clock()
            self.rules = await self.store.read(lambda conn: load(conn, now))
        return self.rules
