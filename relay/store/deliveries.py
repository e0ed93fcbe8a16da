"""``deliveries``, ``send_owners`` and ``send_claims``: the copies already delivered, by content
digest and recipient, and the claims of tries sending now (relay/smtp/dedupe.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

_OWNER_SEEN = ("INSERT INTO send_owners VALUES (?, ?)"
               " ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at")


def delivered(conn: sqlite3.Connection, digest: bytes, recipients: Sequence[str],
              since: float) -> dict[str, str]:
    """recipient -> email_id of those of ``recipients`` that a message with ``digest`` reached
    after ``since``."""
    marks = ",".join("?" * len(recipients))
    return dict(conn.execute(
        "SELECT recipient, email_id FROM deliveries"
        f" WHERE digest = ? AND at > ? AND recipient IN ({marks})",
        [digest, since, *recipients]).fetchall())


def claimed_by_another(conn: sqlite3.Connection, digest: bytes, recipients: Sequence[str],
                       email_id: str, seen_since: float) -> bool:
    """Whether a try other than ``email_id``, of an owner seen after ``seen_since``, claims
    one of ``recipients``."""
    marks = ",".join("?" * len(recipients))
    return conn.execute(
        "SELECT 1 FROM send_claims c JOIN send_owners o ON o.owner = c.owner"
        f" WHERE c.digest = ? AND c.recipient IN ({marks}) AND c.email_id != ?"
        " AND o.seen_at > ? LIMIT 1", [digest, *recipients, email_id, seen_since]
    ).fetchone() is not None


def claim(conn: sqlite3.Connection, digest: bytes, recipients: Sequence[str], email_id: str,
          owner: str, now: float) -> None:
    """``owner`` is alive and claims ``recipients`` for ``email_id`` (taking over any claim
    already there)."""
    see_owner(conn, owner, now)
    conn.executemany(
        "INSERT INTO send_claims VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest, recipient)"
        " DO UPDATE SET email_id = excluded.email_id, owner = excluded.owner, at = excluded.at",
        [(digest, r, email_id, owner, now) for r in recipients])


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


def see_owner(conn: sqlite3.Connection, owner: str, now: float) -> None:
    conn.execute(_OWNER_SEEN, (owner, now))


def forget_owners(conn: sqlite3.Connection, seen_before: float) -> None:
    """Delete the owners not seen after ``seen_before``, and their claims."""
    conn.execute("DELETE FROM send_claims WHERE owner IN"
                 " (SELECT owner FROM send_owners WHERE seen_at <= ?)", (seen_before,))
    conn.execute("DELETE FROM send_owners WHERE seen_at <= ?", (seen_before,))
