"""The queue's tables (migration ``0054_queue``): messages as received, each recipient's state,
and the spool's totals. Named functions of a connection, in the SQL SQLite and PostgreSQL
share, run inside the caller's transaction.

A message leaves the queue (its row and its bytes) once no recipient is ``queued``: each was
``sent`` or ``bounced`` (given up). Deliveries are leased: :func:`claim` takes due messages for
one process in a single ``UPDATE ... RETURNING`` whose condition re-checks the lease, so two
processes (or nodes, on a shared store) never take the same message at once; a lease that ran
out (its holder died) is taken over by the next claim. Each claim names its lease with an id of
its own: :func:`renew` and :func:`record_attempt` hold only for the attempt whose lease is still
the message's, never for one whose lease ran out and was taken over, by another process or by
a later claim of the same one.
"""

from __future__ import annotations

import enum
import json
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

QUEUED = "queued"
SENT = "sent"
BOUNCED = "bounced"
# The types of the delivery events listed beside opens and clicks (relay/stats/queries.py).
DELAYED_EVENT = "delayed"
BOUNCED_EVENT = "bounced"
DELIVERY_EVENT_COLUMNS = ("id", "type", "at", "email_id", "recipient", "smtp_code", "attempt",
                          "reply", "next_attempt_at", "bounce_type")

# Message states as listed (relay queue list --state): derived, not stored.
MESSAGE_STATES = ("waiting", "deferred", "sending", "held")
_STATE = ("CASE WHEN held = 1 THEN 'held' WHEN lease_until > ? THEN 'sending'"
          " WHEN attempts > 0 THEN 'deferred' ELSE 'waiting' END")


class QueueFull(Exception):
    """The spool holds ``queue.max_messages`` messages or ``queue.max_bytes`` already."""


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to keep: its envelope, its bytes as received (CRLF, dot-unstuffed) and what
    the ``Received:`` line of its copies says about the client."""

    email_id: str
    sender: str
    recipients: Sequence[str]
    data: bytes
    mail_options: Sequence[str]
    peer: str
    helo: str
    protocol: str
    received_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Queued:
    """A message taken for a delivery attempt, with the recipients still to reach."""

    email_id: str
    sender: str
    recipients: list[str]
    data: bytes
    mail_options: list[str]
    peer: str
    helo: str
    protocol: str
    received_at: float
    expires_at: float
    attempts: int  # made before this one
    lease: str  # the id of this claim's lease


@dataclass(frozen=True, slots=True)
class Result:
    """What one attempt did for one recipient: its new state and the upstream's reply."""

    recipient: str
    state: str  # QUEUED (try again), SENT or BOUNCED
    smtp_code: int | None
    reply: str


def enqueue(conn: sqlite3.Connection, m: NewMessage, max_messages: int, max_bytes: int
            ) -> None:
    """Keep ``m`` due at once, or raise :class:`QueueFull` (nothing written)."""
    messages, size = conn.execute(
        "SELECT messages, bytes FROM queue_totals WHERE id = 1").fetchone()
    if messages + 1 > max_messages or size + len(m.data) > max_bytes:
        raise QueueFull(f"{messages} messages, {size} bytes queued")
    conn.execute(
        "INSERT INTO queue_messages (email_id, sender, data, size, mail_options, peer, helo,"
        " protocol, received_at, expires_at, next_at, attempts, held)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0)",
        (m.email_id, m.sender, m.data, len(m.data), json.dumps(list(m.mail_options)), m.peer,
         m.helo, m.protocol, m.received_at, m.expires_at, m.received_at))
    conn.executemany(
        "INSERT INTO queue_recipients (email_id, recipient, state, attempts, updated_at)"
        " VALUES (?, ?, ?, 0, ?)",
        [(m.email_id, r, QUEUED, m.received_at) for r in m.recipients])
    conn.execute("UPDATE queue_totals SET messages = messages + 1, bytes = bytes + ?"
                 " WHERE id = 1", (len(m.data),))


def claim(conn: sqlite3.Connection, owner: int, now: float, lease_until: float, limit: int
          ) -> list[Queued]:
    """Lease up to ``limit`` due messages (not held, not leased by a live lease) to ``owner``
    until ``lease_until``, under a new lease id; oldest due first."""
    lease = secrets.token_hex(12)
    rows = conn.execute(
        "UPDATE queue_messages SET lease_owner = ?, lease_until = ?, lease_id = ?"
        " WHERE email_id IN (SELECT email_id FROM queue_messages"
        "   WHERE held = 0 AND next_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
        "   ORDER BY next_at LIMIT ?)"
        " AND held = 0 AND (lease_until IS NULL OR lease_until < ?)"
        " RETURNING email_id, sender, data, mail_options, peer, helo, protocol, received_at,"
        " expires_at, attempts",
        (owner, lease_until, lease, now, now, limit, now)).fetchall()
    taken = []
    for email_id, sender, data, options, peer, helo, protocol, received, expires, tries in rows:
        recipients = [r for (r,) in conn.execute(
            "SELECT recipient FROM queue_recipients WHERE email_id = ? AND state = ?"
            " ORDER BY recipient", (email_id, QUEUED))]
        taken.append(Queued(email_id, sender, recipients, bytes(data), json.loads(options),
                            peer, helo, protocol, received, expires, tries, lease))
    return taken


def renew(conn: sqlite3.Connection, email_id: str, lease: str, now: float, lease_until: float
          ) -> bool:
    """Extend the lease ``lease`` of a message in delivery to ``lease_until``; False when it
    is no longer that message's (recorded, handed back, or taken over) or ran out before
    ``now`` (another claim may take it at any moment: the attempt has lost it)."""
    return conn.execute(
        "UPDATE queue_messages SET lease_until = ? WHERE email_id = ? AND lease_id = ?"
        " AND lease_until >= ?", (lease_until, email_id, lease, now)).rowcount > 0


class Recorded(enum.Enum):
    """What :func:`record_attempt` did with an attempt's results."""

    LOST = "lost"  # nothing: the lease was no longer the attempt's
    KEPT = "kept"  # recorded; recipients are left to try
    DONE = "done"  # recorded; none is left, the message left the queue


def record_attempt(conn: sqlite3.Connection, email_id: str, lease: str,
                   results: Sequence[Result], next_at: float, now: float) -> Recorded:
    """Store one attempt's results and let go of its lease; the message leaves the queue
    when no recipient is left to try. Nothing is written if the lease is no longer
    ``lease`` (it ran out and another claim took the message): that claim's attempt is the
    one that counts. A lease that ran out but was not taken over is still the attempt's."""
    held = conn.execute("SELECT 1 FROM queue_messages WHERE email_id = ? AND lease_id = ?",
                        (email_id, lease)).fetchone()
    if held is None:
        return Recorded.LOST
    conn.executemany(
        "UPDATE queue_recipients SET state = ?, attempts = attempts + 1, smtp_code = ?,"
        " reply = ?, updated_at = ? WHERE email_id = ? AND recipient = ? AND state = ?",
        [(r.state, r.smtp_code, r.reply, now, email_id, r.recipient, QUEUED) for r in results])
    last = next((r.reply for r in results if r.state != SENT), None)
    conn.execute(
        "UPDATE queue_messages SET attempts = attempts + 1, next_at = ?, lease_owner = NULL,"
        " lease_until = NULL, lease_id = NULL, last_reply = coalesce(?, last_reply)"
        " WHERE email_id = ?", (next_at, last, email_id))
    return Recorded.DONE if _remove_if_done(conn, email_id) else Recorded.KEPT


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """A recipient's ``delayed`` or ``bounced`` attempt, as the events listings show it."""

    id: str  # evt_<uuid7>: orders by time with the opens and clicks
    type: str
    at: float
    email_id: str
    recipient: str
    smtp_code: int
    attempt: int
    reply: str
    next_attempt_at: float | None
    bounce_type: str | None


def record_events(conn: sqlite3.Connection, events: Sequence[DeliveryEvent]) -> None:
    """Keep an attempt's delivery events (in the attempt's transaction)."""
    conn.executemany(
        "INSERT INTO delivery_events (id, type, at, email_id, recipient, smtp_code, attempt,"
        " reply, next_attempt_at, bounce_type) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(e.id, e.type, e.at, e.email_id, e.recipient, e.smtp_code, e.attempt, e.reply,
          e.next_attempt_at, e.bounce_type) for e in events])


def _remove_if_done(conn: sqlite3.Connection, email_id: str) -> bool:
    left = conn.execute("SELECT 1 FROM queue_recipients WHERE email_id = ? AND state = ?"
                        " LIMIT 1", (email_id, QUEUED)).fetchone()
    if left is not None:
        return False
    return delete(conn, email_id)


def delete(conn: sqlite3.Connection, email_id: str, now: float | None = None) -> bool:
    """Remove a message from the queue (its recipients go with it: ON DELETE CASCADE);
    False when it is not there. With ``now`` (an operator's delete), not while a live lease
    holds it: its attempt would deliver it all the same (:func:`state` tells why)."""
    sql = "DELETE FROM queue_messages WHERE email_id = ?"
    params: list[object] = [email_id]
    if now is not None:
        sql += " AND (lease_until IS NULL OR lease_until < ?)"
        params.append(now)
    row = conn.execute(sql + " RETURNING size", params).fetchone()
    if row is None:
        return False
    conn.execute("UPDATE queue_totals SET messages = messages - 1, bytes = bytes - ?"
                 " WHERE id = 1", (row[0],))
    return True


def release(conn: sqlite3.Connection, owner: int) -> int:
    """Hand back every lease of process ``owner``; returns how many."""
    return conn.execute("UPDATE queue_messages SET lease_owner = NULL, lease_until = NULL,"
                        " lease_id = NULL WHERE lease_owner = ?", (owner,)).rowcount


def give_back(conn: sqlite3.Connection, email_id: str, lease: str, next_at: float) -> bool:
    """Hand back one attempt's lease (if still its), the message due again at ``next_at``."""
    return conn.execute("UPDATE queue_messages SET lease_owner = NULL, lease_until = NULL,"
                        " lease_id = NULL, next_at = ? WHERE email_id = ? AND lease_id = ?",
                        (next_at, email_id, lease)).rowcount > 0


def lease_owners(conn: sqlite3.Connection, now: float) -> list[int]:
    """The processes (rows of ``processes``, or gone from it) holding leases at ``now``."""
    return [owner for (owner,) in conn.execute(
        "SELECT DISTINCT lease_owner FROM queue_messages WHERE lease_until >= ?", (now,))]


def next_due(conn: sqlite3.Connection, now: float) -> float | None:
    """When the next message not held can be taken: when it is due, or for one leased now,
    when its lease runs out (None: nothing to wait for)."""
    row = conn.execute(
        "SELECT min(CASE WHEN lease_until >= ? THEN lease_until ELSE next_at END)"
        " FROM queue_messages WHERE held = 0", (now,)).fetchone()
    return row[0]


def totals(conn: sqlite3.Connection) -> tuple[int, int]:
    """(messages, bytes) queued."""
    messages, size = conn.execute("SELECT messages, bytes FROM queue_totals WHERE id = 1"
                                  ).fetchone()
    return messages, size


def state_counts(conn: sqlite3.Connection, now: float) -> dict[str, int]:
    """How many queued messages are in each of :data:`MESSAGE_STATES` at ``now``."""
    counts = dict.fromkeys(MESSAGE_STATES, 0)
    counts.update(conn.execute(f"SELECT state, count(*) FROM (SELECT {_STATE} AS state"
                               " FROM queue_messages) AS q GROUP BY state", (now,)).fetchall())
    return counts


def state(conn: sqlite3.Connection, email_id: str, now: float) -> str | None:
    """A queued message's state at ``now`` (one of :data:`MESSAGE_STATES`; None: not
    queued)."""
    row = conn.execute(f"SELECT {_STATE} FROM queue_messages WHERE email_id = ?",
                       (now, email_id)).fetchone()
    return None if row is None else row[0]


def oldest(conn: sqlite3.Connection) -> float | None:
    """When the oldest message in the queue was received (None: the queue is empty)."""
    return conn.execute("SELECT min(received_at) FROM queue_messages").fetchone()[0]


_LISTED = ("email_id, sender, size, received_at, expires_at, next_at, attempts, last_reply, "
           + _STATE + " AS state, (SELECT count(*) FROM queue_recipients r"
           " WHERE r.email_id = q.email_id AND r.state = 'queued') AS waiting")


def listing(conn: sqlite3.Connection, now: float, state: str | None, after: str | None,
            limit: int) -> list[dict[str, Any]]:
    """Queued messages oldest first (by email id, which orders by time), from after the email
    id ``after``, in ``state`` (one of :data:`MESSAGE_STATES`) when given."""
    sql = f"SELECT * FROM (SELECT {_LISTED} FROM queue_messages q) AS m WHERE email_id > ?"
    params: list[object] = [now, after or ""]
    if state is not None:
        sql += " AND state = ?"
        params.append(state)
    return _rows(conn, sql + " ORDER BY email_id LIMIT ?", [*params, limit])


def message(conn: sqlite3.Connection, email_id: str, now: float
            ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """One queued message as :func:`listing` has it, and its recipients; None if not queued."""
    found = _rows(conn, f"SELECT {_LISTED} FROM queue_messages q WHERE email_id = ?",
                  [now, email_id])
    if not found:
        return None
    recipients = _rows(conn, "SELECT recipient, state, attempts, smtp_code, reply, updated_at"
                             " FROM queue_recipients WHERE email_id = ? ORDER BY recipient",
                       [email_id])
    return found[0], recipients


def retry_now(conn: sqlite3.Connection, email_id: str | None, now: float) -> int:
    """Make one message (None: every message) due now, unless held; returns how many."""
    sql = "UPDATE queue_messages SET next_at = ? WHERE held = 0"
    params: list[object] = [now]
    if email_id is not None:
        sql += " AND email_id = ?"
        params.append(email_id)
    return conn.execute(sql, params).rowcount


def set_held(conn: sqlite3.Connection, email_id: str, held: bool) -> bool:
    """Hold a message (no delivery attempt until released) or release it; False when it is
    not queued. An attempt already in progress ends as it would have."""
    return conn.execute("UPDATE queue_messages SET held = ? WHERE email_id = ?",
                        (int(held), email_id)).rowcount > 0


def _rows(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
