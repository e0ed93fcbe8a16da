"""``deliveries`` and ``send_claims``: the copies already delivered, by content digest and
recipient, and the claims of tries sending now, each naming the process (a row of
``processes``) whose try it is (relay/smtp/dedupe.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from relay.store.sql import placeholders


def delivered(conn: sqlite3.Connection, digest: bytes, recipients: Sequence[str],
              since: float) -> dict[str, str]:
    """recipient -> email_id of those of ``recipients`` that a message with ``digest`` reached
    after ``since``."""
    marks = placeholders(recipients)
    return dict(conn.execute(
        "SELECT recipient, email_id FROM deliveries"
        f" WHERE digest = ? AND at > ? AND recipient IN ({marks})",
        [digest, since, *recipients]).fetchall())


def claim_holders(conn: sqlite3.Connection, digest: bytes, recipients: Sequence[str]
                  ) -> list[int]:
    """The processes whose tries claim one of ``recipients``."""
    marks = placeholders(recipients)
    return [row[0] for row in conn.execute(
        "SELECT DISTINCT process FROM send_claims"
        f" WHERE digest = ? AND recipient IN ({marks})", [digest, *recipients])]


def claim(conn: sqlite3.Connection, digest: bytes, recipients: Sequence[str], email_id: str,
          process: int, now: float) -> None:
    """``process`` claims ``recipients`` for ``email_id`` (taking over any claim already
    there)."""
    conn.executemany(
        "INSERT INTO send_claims VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest, recipient)"
        " DO UPDATE SET email_id = excluded.email_id, process = excluded.process,"
        " at = excluded.at", [(digest, r, email_id, process, now) for r in recipients])


def remember(conn: sqlite3.Connection, digest: bytes, recipients: Sequence[str],
             message_id: str | None, email_id: str, now: float) -> None:
    """``email_id`` (with ``message_id``) reached ``recipients`` at ``now``."""
    conn.executemany(
        "INSERT INTO deliveries (digest, recipient, message_id, email_id, at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest, recipient) DO UPDATE SET"
        " message_id = excluded.message_id, email_id = excluded.email_id, at = excluded.at",
        [(digest, r, message_id, email_id, now) for r in recipients])


def drop_claims(conn: sqlite3.Connection, digest: bytes, email_id: str) -> None:
    conn.execute("DELETE FROM send_claims WHERE digest = ? AND email_id = ?", (digest, email_id))


def drop_process_claims(conn: sqlite3.Connection, process: int) -> None:
    conn.execute("DELETE FROM send_claims WHERE process = ?", (process,))
