"""``idempotency_keys``: what the send API (relay/admin/send.py) remembers of a request sent
with an ``Idempotency-Key``, so that a retry gets the first answer instead of a second send.

A row is claimed (``status`` NULL) before the request is carried out and holds its answer once
there is one; a claim whose request ended without an answer worth keeping (a temporary failure:
the client should try again) is let go. Rows expire ``expires_at``; a claim left by a process
that died is taken over once it is ``stale_after`` seconds old.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple


class Remembered(NamedTuple):
    fingerprint: bytes
    status: int | None  # None: the first request is still being carried out
    response: str | None  # the JSON body answered
    created_at: float


def claim(conn: sqlite3.Connection, api_key: str, key: str, fingerprint: bytes, now: float,
          ttl: float, stale_after: float) -> Remembered | None:
    """Claim ``key`` for a request; None when it is now this request's, else what is
    remembered of the earlier one. Expired rows (of every key) and a stale claim of this key
    are dropped first."""
    conn.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,))
    conn.execute("DELETE FROM idempotency_keys WHERE api_key = ? AND key = ? AND status IS NULL"
                 " AND created_at <= ?", (api_key, key, now - stale_after))
    cursor = conn.execute(
        "INSERT INTO idempotency_keys (api_key, key, fingerprint, status, response, created_at,"
        " expires_at) VALUES (?, ?, ?, NULL, NULL, ?, ?) ON CONFLICT (api_key, key) DO NOTHING",
        (api_key, key, fingerprint, now, now + ttl))
    if cursor.rowcount == 1:
        return None
    rows = conn.execute("SELECT fingerprint, status, response, created_at FROM idempotency_keys"
                        " WHERE api_key = ? AND key = ?", (api_key, key)).fetchall()
    return Remembered(bytes(rows[0][0]), *rows[0][1:])


def answer(conn: sqlite3.Connection, api_key: str, key: str, status: int, response: str
           ) -> None:
    """Keep the answer of the request that claimed ``key``."""
    conn.execute("UPDATE idempotency_keys SET status = ?, response = ? WHERE api_key = ? AND"
                 " key = ?", (status, response, api_key, key))


def release(conn: sqlite3.Connection, api_key: str, key: str) -> None:
    """Let go of an unanswered claim, so that a retry is carried out."""
    conn.execute("DELETE FROM idempotency_keys WHERE api_key = ? AND key = ? AND status IS NULL",
                 (api_key, key))
