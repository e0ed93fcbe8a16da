"""SQL of the API keys (what they are: relay/admin/apikeys.py). Keys are stored only as hashes."""

from __future__ import annotations

import sqlite3
import time

from relay.errors import Conflict


def insert(conn: sqlite3.Connection, name: str, key_hash: bytes, permissions: str) -> None:
    inserted = conn.execute("INSERT INTO api_keys (name, key_hash, created_at, revoked_at,"
                            " permissions) VALUES (?, ?, ?, NULL, ?)"
                            " ON CONFLICT (name) DO NOTHING",
                            (name, key_hash, time.time(), permissions)).rowcount
    if inserted != 1:
        raise Conflict(f"a key named {name!r} exists already")


def revoke(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                        (time.time(), name)).rowcount == 1


def listing(conn: sqlite3.Connection) -> list[tuple[str, float, float | None, str]]:
    return conn.execute("SELECT name, created_at, revoked_at, permissions FROM api_keys"
                        " ORDER BY name").fetchall()


def active(conn: sqlite3.Connection, key_hash: bytes) -> tuple[str, str] | None:
    """The name and permissions of the unrevoked key with this hash, or None.

    ``fetchall`` finishes the statement, so no read snapshot stays open on ``conn`` and a key
    revoked from another process stops working at once."""
    rows = conn.execute("SELECT name, permissions FROM api_keys WHERE key_hash = ? AND"
                        " revoked_at IS NULL", (key_hash,)).fetchall()
    return (rows[0][0], rows[0][1]) if rows else None
