"""SQL of the stored tracking settings (account and sender domains) and of what every stored
rule shares: the rules generation and the seed-once marks (what they are for:
relay/admin/settings.py)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from relay.policy.settings import Account, Domain


def bump(conn: sqlite3.Connection) -> None:
    """Call inside the transaction that changes a rule."""
    conn.execute("UPDATE rules_generation SET generation = generation + 1 WHERE id = 1")


def generation(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT generation FROM rules_generation WHERE id = 1").fetchall()[0][0]


def seed_once(conn: sqlite3.Connection, kind: str, key: str) -> bool:
    """True the first time (kind, key) is seeded from the config, False ever after."""
    cursor = conn.execute("INSERT INTO config_seeds VALUES (?, ?, ?)"
                          " ON CONFLICT (kind, key) DO NOTHING", (kind, key, time.time()))
    return cursor.rowcount == 1


def account(conn: sqlite3.Connection) -> Account:
    opens, clicks = conn.execute(
        "SELECT opens, clicks FROM account_settings WHERE id = 1").fetchall()[0]
    return Account(bool(opens), bool(clicks))


def set_account(conn: sqlite3.Connection, settings: Account) -> None:
    conn.execute("UPDATE account_settings SET opens = ?, clicks = ?, updated_at = ? WHERE id = 1",
                 (settings.opens, settings.clicks, time.time()))
    bump(conn)


def domains(conn: sqlite3.Connection) -> dict[str, Domain]:
    rows = conn.execute(
        "SELECT domain, opens, clicks, exclude_hosts FROM domain_settings ORDER BY domain")
    return {row[0]: _domain(row) for row in rows.fetchall()}


def domain(conn: sqlite3.Connection, name: str) -> Domain | None:
    rows = conn.execute("SELECT domain, opens, clicks, exclude_hosts FROM domain_settings"
                        " WHERE domain = ?", (name,)).fetchall()
    return _domain(rows[0]) if rows else None


def _domain(row: tuple[Any, ...]) -> Domain:
    def flag(value: int | None) -> bool | None:
        return None if value is None else bool(value)

    return Domain(row[0], flag(row[1]), flag(row[2]), tuple(json.loads(row[3])))


def put_domain(conn: sqlite3.Connection, settings: Domain) -> None:
    conn.execute("INSERT INTO domain_settings (domain, opens, clicks, exclude_hosts, updated_at)"
                 " VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain) DO UPDATE SET"
                 " opens = excluded.opens, clicks = excluded.clicks,"
                 " exclude_hosts = excluded.exclude_hosts, updated_at = excluded.updated_at",
                 (settings.name, settings.opens, settings.clicks,
                  json.dumps(list(settings.exclude_hosts)), time.time()))
    bump(conn)


def delete_domain(conn: sqlite3.Connection, name: str) -> bool:
    deleted = conn.execute("DELETE FROM domain_settings WHERE domain = ?", (name,)).rowcount
    if deleted:
        bump(conn)
    return deleted == 1
