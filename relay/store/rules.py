"""The rules snapshot (relay/policy/rules.py) read from the store, and cached by the rules
generation: per message the mail path pays one primary-key lookup; the tables are read again
only after some process changed one of them (every change bumps the generation in its
transaction, relay/store/settings.py)."""

from __future__ import annotations

import sqlite3

from relay.policy.rules import Rules
from relay.store import certificates, domains, settings, tags
from relay.store.engine import Store


def load(conn: sqlite3.Connection) -> Rules:
    """Every rule, read after the generation so the snapshot is never older than its number."""
    number = settings.generation(conn)
    tracking = {d.sender_domain: d for d in domains.listing(conn)}
    return Rules(number, settings.account(conn), settings.domains(conn), tracking,
                 tags.registered(conn), certificates.secure_hosts(conn))


class RulesCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.rules = Rules()

    async def current(self) -> Rules:
        """The rules, read again when their generation changed (one primary-key lookup)."""
        if await self.store.read(settings.generation) != self.rules.generation:
            self.rules = await self.store.read(load)
        return self.rules
