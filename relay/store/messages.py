"""``messages``, ``recipients`` and ``processes``: what the mail path records of each message
(relay/smtp/pipeline.py) and which relay process is sending it (relay/smtp/processes.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import NamedTuple

from relay.store.sql import placeholders


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


# A queued message's later attempts find its row there already.
_INSERT = (f"INSERT INTO messages ({', '.join(NewMessage._fields)}) "
           f"VALUES ({', '.join('?' * len(NewMessage._fields))})"
           " ON CONFLICT (email_id) DO NOTHING")
# Marking the recipients of a process's messages in one status: from the (status, email_id)
# index of recipients, so it reads the few rows in flight, not the store.
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
    """A new row of ``processes``, seen at ``now``; its id."""
    [(process_id,)] = conn.execute(
        "INSERT INTO processes (host, boot_id, pid, started, created_at, seen_at)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (host, boot_id, pid, started, now, now)).fetchall()
    return int(process_id)


def see_process(conn: sqlite3.Connection, process_id: int, host: str, boot_id: str, pid: int,
                started: str, now: float) -> None:
    """Process ``process_id`` was seen at ``now`` (its row made again if it was forgotten)."""
    conn.execute(
        "INSERT INTO processes (id, host, boot_id, pid, started, created_at, seen_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
        (process_id, host, boot_id, pid, started, now, now))


def all_processes(conn: sqlite3.Connection) -> list[tuple[int, str, str, int, str, float]]:
    """(id, host, boot_id, pid, started, seen_at) of every process row (only live processes'
    and those not yet found dead: relay/smtp/processes.py sweep)."""
    return conn.execute("SELECT id, host, boot_id, pid, started, seen_at FROM processes"
                        ).fetchall()


def process_rows(conn: sqlite3.Connection, ids: Sequence[int]
                 ) -> list[tuple[int, str, str, int, str, float]]:
    """The rows of processes ``ids`` that are there, as :func:`all_processes` gives them."""
    marks = placeholders(ids)
    return conn.execute("SELECT id, host, boot_id, pid, started, seen_at FROM processes"
                        f" WHERE id IN ({marks})", list(ids)).fetchall()


def forget_process(conn: sqlite3.Connection, process_id: int) -> None:
    conn.execute("DELETE FROM processes WHERE id = ?", (process_id,))


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
