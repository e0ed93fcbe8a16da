"""``events`` and ``engagement``: the open and click events of the tracker, and what a hit
must look up about its recipient (relay/tracking/events.py describes both tables)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

EVENT_PREFIX = "evt_"  # the ids of events rows, and of the webhook events reporting them

# The columns of ``events`` in the order of relay.tracking.events.Event's fields, which is
# the order of the rows :func:`insert` takes.
COLUMNS = ("id", "type", "at", "email_id", "recipient", "url", "ip", "user_agent", "method",
           "classification", "bot_source", "reason", "counted", "implied",
           "first_for_recipient", "first_for_link", "device", "client", "os", "country",
           "region", "city")

_INSERT = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_ENGAGE = """INSERT INTO engagement VALUES (?, ?, ?, 1, ?, ?)
    ON CONFLICT (email_id, recipient, target) DO UPDATE SET hits = engagement.hits + 1,
    counted = engagement.counted + excluded.counted, last_at = excluded.last_at"""


def insert(conn: sqlite3.Connection, events: Sequence[Sequence[Any]]) -> None:
    """Rows of :data:`COLUMNS`."""
    conn.executemany(_INSERT, events)


# Keys per statement of :func:`engagements` (two parameters each, well under both engines'
# limits on parameters).
ENGAGEMENT_KEYS = 500


def engagements(conn: sqlite3.Connection, keys: Sequence[tuple[str, str]]
                ) -> dict[tuple[str, str], list[tuple[str, int, float]]]:
    """(target, counted, last_at) of the engagement rows of each recipient, ``(email_id,
    recipient)`` each, in one statement per :data:`ENGAGEMENT_KEYS` (on PostgreSQL a statement
    is a round trip to the server); recipients without rows are left out."""
    found: dict[tuple[str, str], list[tuple[str, int, float]]] = {}
    for start in range(0, len(keys), ENGAGEMENT_KEYS):
        chunk = keys[start:start + ENGAGEMENT_KEYS]
        sql = " UNION ALL ".join([_ENGAGEMENTS] * len(chunk))
        params = [value for key in chunk for value in key]
        for email_id, recipient, target, counted, last_at in conn.execute(sql, params):
            found.setdefault((email_id, recipient), []).append((target, counted, last_at))
    return found


_ENGAGEMENTS = ("SELECT email_id, recipient, target, counted, last_at FROM engagement "
                "WHERE email_id = ? AND recipient = ?")


def engage(conn: sqlite3.Connection, changes: Sequence[tuple[str, str, str, bool, float]]
           ) -> None:
    """(email_id, recipient, target, counted, at) each: one more hit of the target, counted or
    not, last at ``at``."""
    conn.executemany(_ENGAGE, changes)
