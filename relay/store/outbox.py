"""The webhook tables: ``webhook_endpoints``, ``webhook_events``, ``webhook_outbox``,
``webhook_batches`` and ``webhook_attempts`` (relay/webhooks/outbox.py describes them)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from relay.errors import Conflict

# --- endpoints ----------------------------------------------------------------------------

_UPSERT_CONFIG = """
    INSERT INTO webhook_endpoints (name, source, url, secret, events, allow_private, timeout,
                                   created_at)
    VALUES (?, 'config', ?, ?, ?, ?, ?, ?)
    ON CONFLICT (name) DO UPDATE SET source = 'config', url = excluded.url,
        secret = excluded.secret, events = excluded.events,
        allow_private = excluded.allow_private, timeout = excluded.timeout,
        disabled_at = CASE WHEN webhook_endpoints.url = excluded.url
                           THEN webhook_endpoints.disabled_at END,
        disabled_reason = CASE WHEN webhook_endpoints.url = excluded.url
                               THEN webhook_endpoints.disabled_reason END"""


def put_config_endpoint(conn: sqlite3.Connection, name: str, url: str, secret: str,
                        events: Sequence[str], allow_private: bool, timeout: float,
                        now: float) -> None:
    """Add or update an endpoint of the config file; one whose URL changed is enabled again."""
    conn.execute(_UPSERT_CONFIG, (name, url, secret, json.dumps(events), allow_private,
                                  timeout, now))


def config_endpoints(conn: sqlite3.Connection) -> list[str]:
    """The names of the stored endpoints that come from the config file."""
    return [name for (name,) in conn.execute(
        "SELECT name FROM webhook_endpoints WHERE source = 'config'").fetchall()]


def delete_endpoint(conn: sqlite3.Connection, name: str) -> bool:
    """Delete an endpoint, its queue and its delivery history; whether it existed."""
    conn.execute("DELETE FROM webhook_attempts WHERE batch_id IN "
                 "(SELECT id FROM webhook_batches WHERE endpoint = ?)", (name,))
    conn.execute("DELETE FROM webhook_batches WHERE endpoint = ?", (name,))
    conn.execute("DELETE FROM webhook_outbox WHERE endpoint = ?", (name,))
    conn.execute("DELETE FROM webhook_events WHERE NOT EXISTS "
                 "(SELECT 1 FROM webhook_outbox o WHERE o.event_id = webhook_events.id)")
    return conn.execute("DELETE FROM webhook_endpoints WHERE name = ?", (name,)).rowcount == 1


def subscribers(conn: sqlite3.Connection, kind: str) -> list[str]:
    """The enabled endpoints that take events of ``kind``, by name (``events`` is a JSON
    list, read here rather than with an engine's JSON functions)."""
    return [name for name, events in conn.execute(
        "SELECT name, events FROM webhook_endpoints WHERE disabled_at IS NULL")
        if kind in json.loads(events)]


# --- enqueueing ---------------------------------------------------------------------------

def enqueue(conn: sqlite3.Connection, endpoints: Sequence[str], event_id: str, kind: str,
            at: float, data: str) -> None:
    """An event (``data``: its JSON) and one outbox row for each of ``endpoints``."""
    conn.execute("INSERT INTO webhook_events VALUES (?, ?, ?, ?)", (event_id, kind, at, data))
    conn.executemany("INSERT INTO webhook_outbox (endpoint, event_id) VALUES (?, ?)",
                     [(name, event_id) for name in endpoints])


# --- batches ------------------------------------------------------------------------------

_READY = """SELECT e.name FROM webhook_endpoints e WHERE e.disabled_at IS NULL
    AND EXISTS (SELECT 1 FROM webhook_outbox o WHERE o.endpoint = e.name AND o.batch_id IS NULL)
    AND NOT EXISTS (SELECT 1 FROM webhook_batches b WHERE b.endpoint = e.name
                    AND b.state = 'pending' AND b.attempts > 0 AND b.lease_until IS NULL)"""
_FILL = """UPDATE webhook_outbox SET batch_id = ? WHERE seq IN (SELECT seq FROM webhook_outbox
    WHERE endpoint = ? AND batch_id IS NULL ORDER BY seq LIMIT ?)"""
_CLAIM = """UPDATE webhook_batches SET attempts = attempts + 1, lease_owner = ?,
        lease_until = ? + (SELECT timeout FROM webhook_endpoints WHERE name = endpoint) + ?
    WHERE id IN (SELECT b.id FROM webhook_batches b
                 JOIN webhook_endpoints e ON e.name = b.endpoint AND e.disabled_at IS NULL
                 WHERE b.state = 'pending' AND b.next_at <= ?
                 AND (b.lease_until IS NULL OR b.lease_until < ?)
                 ORDER BY b.next_at LIMIT ?)
    RETURNING id, endpoint, attempts, deadline"""
_TARGET = ("SELECT name, url, secret, allow_private, timeout FROM webhook_endpoints "
           "WHERE name = ?")
_EVENTS = """SELECT e.id, e.type, e.occurred_at, e.data FROM webhook_outbox o
    JOIN webhook_events e ON e.id = o.event_id WHERE o.batch_id = ? ORDER BY o.seq"""


def ready_endpoints(conn: sqlite3.Connection) -> list[str]:
    """The enabled endpoints with unbatched events and no batch waiting for a retry."""
    return [name for (name,) in conn.execute(_READY).fetchall()]


def add_batch(conn: sqlite3.Connection, batch_id: str, endpoint: str, size: int, state: str,
              now: float, deadline: float) -> None:
    """A batch of up to ``size`` of the endpoint's unbatched events, oldest first, due now."""
    count = conn.execute(_FILL, (batch_id, endpoint, size)).rowcount
    conn.execute("INSERT INTO webhook_batches (id, endpoint, state, events, attempts,"
                 " next_at, deadline, created_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                 (batch_id, endpoint, state, count, now, deadline, now))


def lease_due(conn: sqlite3.Connection, owner: str, now: float, margin: float, limit: int
              ) -> list[tuple[str, str, int, float]]:
    """Lease up to ``limit`` due pending batches of enabled endpoints to ``owner`` (until the
    endpoint's timeout plus ``margin`` from now), one attempt more each; (id, endpoint,
    attempts, deadline) of each."""
    return conn.execute(_CLAIM, (owner, now, margin, now, now, limit)).fetchall()


def target(conn: sqlite3.Connection, endpoint: str) -> tuple[str, str, str, int, float]:
    """(name, url, secret, allow_private, timeout) of an endpoint."""
    return conn.execute(_TARGET, (endpoint,)).fetchone()


def batch_events(conn: sqlite3.Connection, batch_id: str) -> list[tuple[str, str, float, str]]:
    """(id, type, occurred_at, data) of the batch's events, in order."""
    return conn.execute(_EVENTS, (batch_id,)).fetchall()


def add_attempt(conn: sqlite3.Connection, batch_id: str, attempt: int, at: float,
                seconds: float, status: int | None, error: str | None) -> None:
    conn.execute("INSERT INTO webhook_attempts VALUES (?, ?, ?, ?, ?, ?)"
                 " ON CONFLICT (batch_id, attempt) DO UPDATE SET at = excluded.at,"
                 " seconds = excluded.seconds, status = excluded.status, error = excluded.error",
                 (batch_id, attempt, at, seconds, status, error))


def end_attempt(conn: sqlite3.Connection, batch_id: str, owner: str, state: str,
                next_at: float | None, status: int | None, error: str | None,
                finished_at: float | None) -> bool:
    """The batch's state after an attempt, its lease given up; False if ``owner`` no longer
    held it."""
    return conn.execute(
        "UPDATE webhook_batches SET state = ?, next_at = coalesce(?, next_at),"
        " lease_owner = NULL, lease_until = NULL, last_status = ?, last_error = ?,"
        " finished_at = ? WHERE id = ? AND lease_owner = ?",
        (state, next_at, status, error, finished_at, batch_id, owner)).rowcount == 1


def disable_endpoint(conn: sqlite3.Connection, name: str, at: float, reason: str) -> None:
    """Disable an enabled endpoint (an already disabled one keeps its time and reason)."""
    conn.execute("UPDATE webhook_endpoints SET disabled_at = ?, disabled_reason = ?"
                 " WHERE name = ? AND disabled_at IS NULL", (at, reason, name))


def release_leases(conn: sqlite3.Connection, owner: str, state: str) -> None:
    """Give up ``owner``'s leases of batches in ``state``."""
    conn.execute("UPDATE webhook_batches SET lease_owner = NULL, lease_until = NULL"
                 " WHERE lease_owner = ? AND state = ?", (owner, state))


# --- managing endpoints and deliveries (relay webhooks ..., /api/v1/webhooks) ----------------

def add_endpoint(conn: sqlite3.Connection, name: str, url: str, secret: str,
                 events: Sequence[str], allow_private: bool, timeout: float, now: float) -> None:
    """An endpoint added at run time (source ``api``); Conflict when the name is taken."""
    added = conn.execute(
        "INSERT INTO webhook_endpoints (name, source, url, secret, events, allow_private,"
        " timeout, created_at) VALUES (?, 'api', ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        (name, url, secret, json.dumps(list(dict.fromkeys(events))), allow_private, timeout,
         now)).rowcount
    if added != 1:
        raise Conflict(f"an endpoint named {name!r} exists already")


def endpoint_source(conn: sqlite3.Connection, name: str) -> str | None:
    """``config`` or ``api``; None when there is no such endpoint."""
    row = conn.execute("SELECT source FROM webhook_endpoints WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def enable_endpoint(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL"
                        " WHERE name = ?", (name,)).rowcount == 1


def change_endpoint(conn: sqlite3.Connection, name: str, url: str, events: Sequence[str]
                    ) -> bool:
    """Change the URL and events of an endpoint added at run time; whether there was one."""
    return conn.execute(
        "UPDATE webhook_endpoints SET url = ?, events = ? WHERE name = ? AND source = 'api'",
        (url, json.dumps(list(dict.fromkeys(events))), name)).rowcount == 1


def set_secret(conn: sqlite3.Connection, name: str, secret: str) -> bool:
    """Replace the signing secret of an endpoint added at run time; whether there was one."""
    return conn.execute("UPDATE webhook_endpoints SET secret = ? WHERE name = ? AND source = 'api'",
                        (secret, name)).rowcount == 1


_ENDPOINTS = """SELECT name, source, url, events, allow_private, timeout, created_at,
    disabled_at, disabled_reason,
    (SELECT count(*) FROM webhook_outbox o WHERE o.endpoint = name AND o.batch_id IS NULL),
    (SELECT count(*) FROM webhook_batches b WHERE b.endpoint = name AND b.state = 'pending')
    FROM webhook_endpoints ORDER BY name"""


def endpoint_listing(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every endpoint, without its secret, with how much waits for it."""
    return [{"name": name, "source": source, "url": url, "events": json.loads(events),
             "allow_private": bool(private), "timeout": timeout, "created_at": created,
             "disabled_at": disabled_at, "disabled_reason": reason,
             "waiting_events": waiting, "pending_batches": pending}
            for (name, source, url, events, private, timeout, created, disabled_at, reason,
                 waiting, pending) in conn.execute(_ENDPOINTS)]


_BATCH_COLUMNS = ("id", "endpoint", "state", "events", "attempts", "created_at", "next_at",
                  "finished_at", "last_status", "last_error")


def deliveries(conn: sqlite3.Connection, endpoint: str | None = None, state: str | None = None,
               limit: int | None = 50) -> list[dict[str, Any]]:
    """Batches, newest first, with the result of their last attempt (``limit`` None: all)."""
    conditions, params = [], []
    for column, value in (("endpoint", endpoint), ("state", state)):
        if value is not None:
            conditions.append(f"{column} = ?")
            params.append(value)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    if limit is not None:
        params.append(limit)
    rows = conn.execute(f"SELECT {', '.join(_BATCH_COLUMNS)} FROM webhook_batches{where}"
                        " ORDER BY created_at DESC" + (" LIMIT ?" if limit is not None else ""),
                        params)
    return [dict(zip(_BATCH_COLUMNS, row, strict=True)) for row in rows]


def batch(conn: sqlite3.Connection, batch_id: str) -> dict[str, Any] | None:
    """One batch with its attempts and event ids."""
    row = conn.execute(f"SELECT {', '.join(_BATCH_COLUMNS)} FROM webhook_batches WHERE id = ?",
                       (batch_id,)).fetchone()
    if row is None:
        return None
    attempts = conn.execute("SELECT attempt, at, seconds, status, error FROM webhook_attempts"
                            " WHERE batch_id = ? ORDER BY attempt", (batch_id,))
    event_ids = conn.execute("SELECT event_id FROM webhook_outbox WHERE batch_id = ?"
                             " ORDER BY seq", (batch_id,))
    return {**dict(zip(_BATCH_COLUMNS, row, strict=True)),
            "attempt_log": [dict(zip(("attempt", "at", "seconds", "status", "error"), a,
                                     strict=True)) for a in attempts],
            "event_ids": [e[0] for e in event_ids]}


def replay(conn: sqlite3.Connection, batch_ids: Sequence[str], state: str, now: float,
           keep_trying: float) -> int:
    """Make these batches due again in ``state``, with a fresh retry window; how many exist."""
    return sum(conn.execute(
        "UPDATE webhook_batches SET state = ?, next_at = ?, deadline = ?, finished_at = NULL,"
        " lease_owner = NULL, lease_until = NULL WHERE id = ?",
        (state, now, now + keep_trying, batch_id)).rowcount for batch_id in batch_ids)


SECRET_SHOWN = 12  # characters of a secret the /v1/ API shows, as Anypost's signing_secret_prefix


def secret_prefixes(conn: sqlite3.Connection) -> dict[str, str]:
    """Each endpoint's name and the first :data:`SECRET_SHOWN` characters of its secret (what
    relay/admin/v1_webhooks.py shows of it, never the rest)."""
    return dict(conn.execute(f"SELECT name, substr(secret, 1, {SECRET_SHOWN})"
                             " FROM webhook_endpoints").fetchall())
