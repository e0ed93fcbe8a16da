"""SQL of the ACME tables (migration ``0060_certificates``): accounts, certificates,
HTTP-01 answers and leases. Named functions taking the connection; the SQL is the subset
SQLite and PostgreSQL share."""

from __future__ import annotations

import sqlite3
from dataclasses import astuple

from relay.certs.plan import Certificate

_COLUMNS = "host, state, cert_pem, key_pem, not_after, reason, failures, next_try, updated_at"


def account(conn: sqlite3.Connection, directory: str) -> tuple[str, str | None] | None:
    """The account key (PEM) and account URL kept for an ACME directory."""
    rows = conn.execute("SELECT key_pem, uri FROM acme_accounts WHERE directory = ?",
                        (directory,)).fetchall()
    return (rows[0][0], rows[0][1]) if rows else None


def save_account(conn: sqlite3.Connection, directory: str, key_pem: str, uri: str | None,
                 now: float) -> None:
    conn.execute("INSERT INTO acme_accounts (directory, key_pem, uri, created_at)"
                 " VALUES (?, ?, ?, ?) ON CONFLICT (directory) DO UPDATE"
                 " SET key_pem = excluded.key_pem, uri = excluded.uri",
                 (directory, key_pem, uri, now))


def listing(conn: sqlite3.Connection) -> list[Certificate]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM certificates ORDER BY host").fetchall()
    return [Certificate(*row) for row in rows]


def get(conn: sqlite3.Connection, host: str) -> Certificate | None:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM certificates WHERE host = ?",
                        (host,)).fetchall()
    return Certificate(*rows[0]) if rows else None


def put(conn: sqlite3.Connection, cert: Certificate) -> None:
    updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", ")[1:])
    conn.execute(f"INSERT INTO certificates ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                 f" ON CONFLICT (host) DO UPDATE SET {updates}", astuple(cert))


def secure_hosts(conn: sqlite3.Connection, now: float) -> frozenset[str]:
    """Hosts that have a certificate valid at ``now`` (issued, possibly since renewed or
    failing to renew): new links to one whose certificate ran out go on http."""
    rows = conn.execute("SELECT host FROM certificates WHERE cert_pem IS NOT NULL"
                        " AND not_after > ?", (now,)).fetchall()
    return frozenset(row[0] for row in rows)


def add_challenges(conn: sqlite3.Connection, answers: list[tuple[str, str]],
                   now: float) -> None:
    """(token, key authorization) pairs to answer HTTP-01 requests with."""
    for token, key_authorization in answers:
        conn.execute("INSERT INTO acme_challenges (token, key_authorization, created_at)"
                     " VALUES (?, ?, ?) ON CONFLICT (token) DO UPDATE"
                     " SET key_authorization = excluded.key_authorization",
                     (token, key_authorization, now))


def challenge(conn: sqlite3.Connection, token: str) -> str | None:
    """The key authorization to answer an HTTP-01 request for ``token`` with."""
    rows = conn.execute("SELECT key_authorization FROM acme_challenges WHERE token = ?",
                        (token,)).fetchall()
    return rows[0][0] if rows else None


def remove_challenges(conn: sqlite3.Connection, tokens: list[str]) -> None:
    for token in tokens:
        conn.execute("DELETE FROM acme_challenges WHERE token = ?", (token,))


def take_lease(conn: sqlite3.Connection, name: str, owner: str, now: float,
               seconds: float) -> bool:
    """Take (or extend) the lease ``name`` for ``owner``: True unless another owner holds
    one that has not run out."""
    conn.execute("INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?)"
                 " ON CONFLICT (name) DO UPDATE"
                 " SET owner = excluded.owner, expires_at = excluded.expires_at"
                 " WHERE leases.owner = excluded.owner OR leases.expires_at <= ?",
                 (name, owner, now + seconds, now))
    rows = conn.execute("SELECT owner FROM leases WHERE name = ?", (name,)).fetchall()
    return rows[0][0] == owner


def drop_lease(conn: sqlite3.Connection, name: str, owner: str) -> None:
    conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))
