"""People who sign in to the dashboard (``dashboard_users``, their scrypt hashes as
relay/smtp/passwords.py makes them) and their sessions (``dashboard_sessions``).

A session is known by the SHA-256 of its cookie's value (``id_hash``): the store never holds
what a browser sends, so a copy of the database signs no one in. Each session has its own
CSRF token and an absolute expiry (relay/admin/dashboard/auth.py).
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple


class Session(NamedTuple):
    user_name: str
    csrf: str
    expires_at: float


def set_user(conn: sqlite3.Connection, name: str, password_hash: str, now: float) -> bool:
    """Add ``name`` or change its password (ending its sessions); whether it was new."""
    known = conn.execute("SELECT 1 FROM dashboard_users WHERE name = ?", (name,)).fetchall()
    conn.execute(
        "INSERT INTO dashboard_users (name, password_hash, created_at, updated_at) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
        "password_hash = excluded.password_hash, updated_at = excluded.updated_at",
        (name, password_hash, now, now))
    conn.execute("DELETE FROM dashboard_sessions WHERE user_name = ?", (name,))
    return not known


def password_hash(conn: sqlite3.Connection, name: str) -> str | None:
    rows = conn.execute("SELECT password_hash FROM dashboard_users WHERE name = ?",
                       (name,)).fetchall()
    return None if not rows else str(rows[0][0])


def user_names(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM dashboard_users ORDER BY name")]


def remove_user(conn: sqlite3.Connection, name: str) -> bool:
    """Remove ``name`` and its sessions; whether there was such a user."""
    conn.execute("DELETE FROM dashboard_sessions WHERE user_name = ?", (name,))
    return conn.execute("DELETE FROM dashboard_users WHERE name = ?", (name,)).rowcount > 0


def add_session(conn: sqlite3.Connection, id_hash: str, user_name: str, csrf: str, now: float,
                expires_at: float) -> None:
    """A new session; the expired ones of everyone go at the same time."""
    conn.execute("DELETE FROM dashboard_sessions WHERE expires_at <= ?", (now,))
    conn.execute("INSERT INTO dashboard_sessions (id_hash, user_name, csrf, created_at, "
                 "expires_at) VALUES (?, ?, ?, ?, ?)",
                 (id_hash, user_name, csrf, now, expires_at))


def session(conn: sqlite3.Connection, id_hash: str) -> Session | None:
    rows = conn.execute("SELECT user_name, csrf, expires_at FROM dashboard_sessions "
                       "WHERE id_hash = ?", (id_hash,)).fetchall()
    return None if not rows else Session(*rows[0])


def end_session(conn: sqlite3.Connection, id_hash: str) -> None:
    conn.execute("DELETE FROM dashboard_sessions WHERE id_hash = ?", (id_hash,))
