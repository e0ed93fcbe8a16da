"""SQL of the tag registry (what it is for: relay/admin/tags.py)."""

from __future__ import annotations

import sqlite3
import time

from relay.store.settings import bump


def registered(conn: sqlite3.Connection) -> frozenset[str]:
    return frozenset(row[0] for row in conn.execute("SELECT name FROM tags").fetchall())


def listing(conn: sqlite3.Connection) -> list[tuple[str, float]]:
    return conn.execute("SELECT name, created_at FROM tags ORDER BY name").fetchall()


def add(conn: sqlite3.Connection, name: str) -> bool:
    """Register ``name`` (validated by the caller); False when it was registered already."""
    added = conn.execute("INSERT INTO tags VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                         (name, time.time())).rowcount == 1
    if added:
        bump(conn)
    return added


def remove(conn: sqlite3.Connection, name: str) -> bool:
    removed = conn.execute("DELETE FROM tags WHERE name = ?", (name,)).rowcount == 1
    if removed:
        bump(conn)
    return removed
