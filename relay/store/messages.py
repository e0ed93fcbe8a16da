"""``messages``, ``recipients`` and ``processes``: what the mail path records of each message
(relay/smtp/pipeline.py) and which relay process is sending it (relay/smtp/processes.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import NamedTuple


class NewMessage(NamedTuple):
    """A message's row as the mail path first writes it."""

    email_id: str
    message_id: str | None
    sender: str
    sender_domain: str
    subject: str | None
    tag_name: str | None
    tags: str  # a JSON list
    campaign: str | None
    topic: str | None
    track_opens: int
    track_clicks: int
    decision: str
    size: int
    created_at: float
    links: str | None  # JSON (relay/smtp/pipeline.py links_json)
    process: int | None  # a row of processes


_INSERT = (f"INSERT INTO messages ({', '.join(NewMessage._fields)}) "
           f"VALUES ({', '.join('?' * len(NewMessage._fields))})")
# The processes with recipients in ``status``, and marking one's: both start from the
# (status, email_id) index of recipients, so they read the few rows in flight, not the store.
SENDERS = ("SELECT DISTINCT p.id, p.host, p.boot_id, p.pid, p.started FROM recipients r "
           "JOIN messages m ON m.email_id = r.email_id JOIN processes p ON p.id = m.process "
           "WHERE r.status = ?")
MARK = ("UPDATE recipients SET status = ?, reply = ?, at = ? WHERE status = ? AND "
        "(SELECT process FROM messages m WHERE m.email_id = recipients.email_id) = ?")


def insert(conn: sqlite3.Connection, message: NewMessage, recipients: Sequence[str],
           status: str) -> None:
    """The message's row, and its recipients in ``status`` with an empty reply (a recipient
    already stored for it is left as it is)."""
    conn.execute(_INSERT, message)
    conn.executemany("INSERT INTO recipients VALUES (?, ?, ?, '', ?)"
                     " ON CONFLICT (email_id, recipient) DO NOTHING",
                     [(message.email_id, r, status, message.created_at) for r in recipients])


def set_recipients(conn: sqlite3.Connection, rows: Sequence[tuple[str, str, str, str, float]]
                   ) -> None:
    """Store (email_id, recipient, status, reply, at) rows, replacing what they replace."""
    conn.executemany("INSERT INTO recipients VALUES (?, ?, ?, ?, ?)"
                     " ON CONFLICT (email_id, recipient) DO UPDATE SET status = excluded.status,"
                     " reply = excluded.reply, at = excluded.at", rows)


def add_process(conn: sqlite3.Connection, host: str, boot_id: str, pid: int, started: str,
                now: float) -> int:
    """A new row of ``processes``; its id."""
    [(process_id,)] = conn.execute(
        "INSERT INTO processes (host, boot_id, pid, started, created_at)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id", (host, boot_id, pid, started, now)).fetchall()
    return int(process_id)


def senders(conn: sqlite3.Connection, status: str) -> list[tuple[int, str, str, int, str]]:
    """(id, host, boot_id, pid, started) of the processes whose messages have recipients in
    ``status``."""
    return conn.execute(SENDERS, (status,)).fetchall()


def mark_process(conn: sqlite3.Connection, process_id: int, status: str, new_status: str,
                 reply: str, now: float) -> int:
    """Move the recipients in ``status`` of the messages ``process_id`` sends to
    ``new_status`` with ``reply``; returns how many."""
    return conn.execute(MARK, (new_status, reply, now, status, process_id)).rowcount


class StoredMessage(NamedTuple):
    """What the statistics and the webhooks file a message's events under."""

    email_id: str
    message_id: str | None
    sender: str
    sender_domain: str
    subject: str | None
    tag_name: str | None
    tags: str  # a JSON list
    campaign: str | None
    topic: str | None
    created_at: float


_STORED = f"SELECT {', '.join(StoredMessage._fields)} FROM messages WHERE email_id = ?"


def stored(conn: sqlite3.Connection, email_id: str) -> StoredMessage | None:
    row = conn.execute(_STORED, (email_id,)).fetchone()
    return None if row is None else StoredMessage(*row)
