"""SQL of the tracking domains (the model: relay/policy/domains.py)."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict

from relay.errors import InvalidInput
from relay.policy import names
from relay.policy.domains import TrackingDomain
from relay.store.settings import bump

_COLUMNS = "host, sender_domain, state, reason, last_check, checked_at, created_at"


def listing(conn: sqlite3.Connection) -> list[TrackingDomain]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM tracking_domains ORDER BY host").fetchall()
    return [TrackingDomain(*row) for row in rows]


def get(conn: sqlite3.Connection, host: str) -> TrackingDomain | None:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM tracking_domains WHERE host = ?",
                        (names.normal(host),)).fetchall()
    return TrackingDomain(*rows[0]) if rows else None


def add(conn: sqlite3.Connection, domain: TrackingDomain) -> None:
    """Store a new tracking domain; one per host and one per sender domain."""
    taken = conn.execute("SELECT host FROM tracking_domains WHERE host = ? OR sender_domain = ?",
                         (domain.host, domain.sender_domain)).fetchall()
    if taken and taken[0][0] == domain.host:
        raise InvalidInput(f"{domain.host} exists already")
    if taken:
        raise InvalidInput(f"{domain.sender_domain} already has the tracking domain "
                           f"{taken[0][0]}: remove it first")
    conn.execute(f"INSERT INTO tracking_domains ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 tuple(asdict(domain).values()))
    bump(conn)


def remove(conn: sqlite3.Connection, host: str) -> bool:
    removed = conn.execute("DELETE FROM tracking_domains WHERE host = ?",
                           (names.normal(host),)).rowcount == 1
    if removed:
        bump(conn)
    return removed


def update(conn: sqlite3.Connection, before: TrackingDomain, after: TrackingDomain) -> None:
    """Store what a check found (``after``); the generation moves when the state did."""
    conn.execute("UPDATE tracking_domains SET state = ?, reason = ?, last_check = ?,"
                 " checked_at = ? WHERE host = ?",
                 (after.state, after.reason, after.last_check, after.checked_at, after.host))
    if after.state != before.state:
        bump(conn)


def count(conn: sqlite3.Connection, state: str) -> int:
    return conn.execute("SELECT count(*) FROM tracking_domains WHERE state = ?",
                        (state,)).fetchall()[0][0]
