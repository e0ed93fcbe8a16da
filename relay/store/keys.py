"""``signing_keys``: the secrets of tracking tokens the relay generated itself
(relay/tracking/keys.py)."""

from __future__ import annotations

import sqlite3


def stored(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
    """(kid, secret) of every stored key, oldest first."""
    return [(kid, bytes(secret)) for kid, secret in conn.execute(
        "SELECT kid, secret FROM signing_keys ORDER BY created_at")]


def add_once(conn: sqlite3.Connection, kid: str, secret: bytes, now: float) -> bytes:
    """Store ``secret`` under ``kid`` unless a key has it already (another process was first);
    returns the stored secret."""
    conn.execute("INSERT INTO signing_keys VALUES (?, ?, ?) ON CONFLICT (kid) DO NOTHING",
                 (kid, secret, now))
    [(stored_secret,)] = conn.execute("SELECT secret FROM signing_keys WHERE kid = ?",
                                      (kid,)).fetchall()
    return bytes(stored_secret)
