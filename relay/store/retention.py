"""Retention and erasure: purge what is older than a cutoff, erase everything about a recipient.

:func:`purge` deletes, for a cutoff time:

==================  ======================================================================
events              opens and clicks recorded before the cutoff
delivery_events     queue mode's delays and bounces recorded before the cutoff
recipients          the rows of messages created before the cutoff
deliveries          those recorded before the cutoff (the resend guard, relay/smtp/dedupe.py)
messages            those created before the cutoff (``message_html`` rows go with them)
html_bodies         the HTML bodies no message names any more (relay/store/html_bodies.py)
engagement          rows last hit before the cutoff whose message is gone
webhook_attempts,   batches finished (delivered or failed) before the cutoff, with their
webhook_outbox,     attempts and outbox rows; pending batches and rows not yet batched stay
webhook_batches
webhook_events      those that occurred before the cutoff and no outbox row names any more
==================  ======================================================================

The daily counters (``stats_daily``, ``stats_daily_tags``, the link counters
``stats_daily_links``, ``stats_daily_links_by`` and ``stats_daily_tag_links``,
``stats_daily_agents``, ``stats_daily_os``; relay/stats/rollup.py, relay/stats/breakdown.py)
are kept, so the statistics of old days survive a purge. They name no recipient
(``stats_daily`` holds the sender address and the recipients' mailbox provider), but the link
counters hold the clicked URLs as written in the mail, which may carry personal data in their
query strings: :func:`erase_recipient` deletes the rows whose URL names the recipient's
address, whole (plain or percent-encoded), from all three.

:func:`erase_recipient` matches the address case-insensitively (whole address) and deletes
its recipients, deliveries, send claims (a try in progress, or one a killed process left;
relay/smtp/dedupe.py), events, delivery events and engagement rows, the webhook events naming
it (with their outbox rows, even in a batch still pending: that batch goes out without them),
and the messages whose only recipient it was (their subject may be about that person). A
message that went to others too keeps its row; only the erased recipient's rows go.

Every delete runs in chunks of :data:`CHUNK` rows, one short write transaction each, so a
large purge never holds the write lock long enough to stall the tracker's group commits; on
PostgreSQL a chunk that a conflict with the relay's own writes aborted is run again.
With ``[retention] days`` set, the process serving HTTP purges at start and every
:data:`PURGE_INTERVAL` seconds, on a connection of its own in a worker thread. Stopping the
relay ends a purge before its next chunk: cancelling the task does not stop the thread, and
``asyncio.run`` waits for the thread before the process exits (a first purge of millions of
rows takes minutes, longer than systemd waits after SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from relay.errors import InvalidInput
from relay.store import engine as store
from relay.store import html_bodies
from relay.store.transaction import transact

if TYPE_CHECKING:
    from relay.config import StoreSettings

log = logging.getLogger("relay.retention")

CHUNK = 5000
DAY = 86400.0
PURGE_INTERVAL = 3600.0


@dataclass(frozen=True)
class Step:
    """Delete from ``table`` the rows matching ``where``, found by their ``key`` columns."""

    table: str
    key: str
    where: str


_OLD_MESSAGES = "SELECT email_id FROM messages WHERE created_at < :before"
_FINISHED_BATCHES = ("SELECT id FROM webhook_batches WHERE state != 'pending' "
                     "AND finished_at < :before")
PURGE_STEPS: tuple[Step, ...] = (
    Step("events", "id", "at < :before"),
    Step("delivery_events", "id", "at < :before"),
    Step("recipients", "rowid", f"email_id IN ({_OLD_MESSAGES})"),
    Step("deliveries", "rowid", "at < :before"),
    Step("messages", "rowid", "created_at < :before"),  # message_html rows go with them
    Step("html_bodies", "digest", html_bodies.ORPHANS),
    Step("engagement", "email_id, recipient, target",
         "last_at < :before AND NOT EXISTS "
         "(SELECT 1 FROM messages m WHERE m.email_id = engagement.email_id)"),
    Step("webhook_attempts", "batch_id, attempt", f"batch_id IN ({_FINISHED_BATCHES})"),
    Step("webhook_outbox", "seq", f"batch_id IN ({_FINISHED_BATCHES})"),
    Step("webhook_batches", "rowid", "state != 'pending' AND finished_at < :before"),
    Step("webhook_events", "id",
         "occurred_at < :before AND id NOT IN (SELECT event_id FROM webhook_outbox)"),
)

# Run after the spellings of the address were collected into temp.erase_addresses, the
# messages sent to them alone into temp.erase_messages, the webhook events naming them into
# temp.erase_events and the link counters whose URL names the address into temp.erase_links
# (``temp.`` is ``pg_temp.`` on PostgreSQL: relay/store/postgres.py translate).
_ADDRESSES = "(SELECT address FROM temp.erase_addresses)"
ERASE_STEPS: tuple[Step, ...] = (
    Step("events", "id", f"recipient IN {_ADDRESSES}"),
    Step("delivery_events", "id", f"recipient IN {_ADDRESSES}"),
    Step("engagement", "email_id, recipient, target", f"recipient IN {_ADDRESSES}"),
    Step("deliveries", "rowid", f"recipient IN {_ADDRESSES}"),
    Step("send_claims", "rowid", f"recipient IN {_ADDRESSES}"),
    Step("recipients", "rowid", f"recipient IN {_ADDRESSES}"),
    Step("messages", "rowid", "email_id IN (SELECT email_id FROM temp.erase_messages)"),
    Step("html_bodies", "digest", html_bodies.ORPHANS),
    Step("webhook_outbox", "seq", "event_id IN (SELECT id FROM temp.erase_events)"),
    Step("webhook_events", "id", "id IN (SELECT id FROM temp.erase_events)"),
    Step("stats_daily_links", "day, url",
         "(day, url) IN (SELECT day, url FROM temp.erase_links)"),
    # the same clicks by sender domain and campaign, and by tag: the same (day, url) pairs
    Step("stats_daily_links_by", "day, sender_domain, campaign, url",
         "(day, url) IN (SELECT day, url FROM temp.erase_links)"),
    Step("stats_daily_tag_links", "day, tag, url",
         "(day, url) IN (SELECT day, url FROM temp.erase_links)"),
)
_TEMP_TABLES = {"erase_addresses": "address TEXT PRIMARY KEY",
                "erase_messages": "email_id TEXT PRIMARY KEY",
                "erase_events": "id TEXT PRIMARY KEY",
                "erase_links": "day TEXT, url TEXT, PRIMARY KEY (day, url)"}

# Every spelling of the address stored anywhere (the tables keep it as it was received);
# relay_lower: see store.add_lower.
_SPELLINGS = """
    SELECT recipient FROM recipients WHERE relay_lower(recipient) = :address
    UNION SELECT recipient FROM deliveries WHERE relay_lower(recipient) = :address
    UNION SELECT recipient FROM send_claims WHERE relay_lower(recipient) = :address
    UNION SELECT recipient FROM events WHERE relay_lower(recipient) = :address
    UNION SELECT recipient FROM delivery_events WHERE relay_lower(recipient) = :address
    UNION SELECT recipient FROM engagement WHERE relay_lower(recipient) = :address"""
_ONLY_THEIRS = """SELECT DISTINCT r.email_id FROM recipients r
    WHERE r.recipient IN (SELECT address FROM temp.erase_addresses)
    AND NOT EXISTS (SELECT 1 FROM recipients o WHERE o.email_id = r.email_id
                    AND o.recipient NOT IN (SELECT address FROM temp.erase_addresses))"""
_NAMING = ("SELECT id FROM webhook_events "
           "WHERE relay_lower(json_extract(data, '$.recipient')) = :address")
# The link counters that may name an address: their URL holds an @, plain or percent-encoded
# (:func:`_names` decides in Python, which both engines run alike).
_LINKS_WITH_AT = ("SELECT day, url FROM stats_daily_links "
                  "WHERE url LIKE '%@%' OR url LIKE '%!%40%' ESCAPE '!'")


def purge(conn: sqlite3.Connection, before: float,
          stopping: threading.Event | None = None) -> dict[str, int]:
    """Delete what is older than ``before`` (a Unix time); returns rows deleted per table.
    Once ``stopping`` is set, no further chunk is deleted (the purge resumes next time)."""
    return _run(conn, PURGE_STEPS, {"before": before}, stopping)


def erase_recipient(conn: sqlite3.Connection, address: str) -> dict[str, int]:
    """Delete every row about ``address`` (``local@domain``; ValueError otherwise); returns
    rows deleted per table."""
    params = {"address": valid_address(address).lower()}
    store.add_lower(conn)
    for table, columns in _TEMP_TABLES.items():
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} ({columns})")
    try:
        conn.execute(f"INSERT INTO temp.erase_addresses {_SPELLINGS}", params)
        conn.execute(f"INSERT INTO temp.erase_messages {_ONLY_THEIRS}")
        conn.execute(f"INSERT INTO temp.erase_events {_NAMING}", params)
        names = _names(params["address"])
        conn.executemany("INSERT INTO temp.erase_links VALUES (?, ?)",
                         [(day, url) for day, url in conn.execute(_LINKS_WITH_AT).fetchall()
                          if names(url)])
        return _run(conn, ERASE_STEPS, params)
    finally:
        for table in _TEMP_TABLES:
            conn.execute(f"DELETE FROM temp.{table}")


def _names(address: str) -> Callable[[str], bool]:
    """Whether a URL names ``address`` (lower case), plain or percent-encoded, as a whole
    address: not ``joann@example.org`` nor ``ann@example.org.au`` for ``ann@example.org``.
    What may come before it in a URL (``=``, ``/``, ``?``, ``:``...) is not counted as part of
    the local part."""
    pattern = re.compile(rf"(?<![\w.!#$%&'*+^`{{|}}~-]){re.escape(address)}(?![\w-]|\.\w)")
    return lambda url: pattern.search(unquote(url).lower()) is not None


def valid_address(address: str) -> str:
    """``address`` stripped, if it looks like ``local@domain``."""
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise InvalidInput(f"not an email address: {address!r}")
    return address


def _run(conn: sqlite3.Connection, steps: Sequence[Step], params: dict[str, object],
         stopping: threading.Event | None = None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.table] = counts.get(step.table, 0) + _delete(conn, step, params, stopping)
    return counts


def _delete(conn: sqlite3.Connection, step: Step, params: dict[str, object],
            stopping: threading.Event | None = None) -> int:
    """Delete in chunks of :data:`CHUNK` rows, each in a transaction of its own, until none
    is left or ``stopping`` is set."""
    sql = (f"DELETE FROM {step.table} WHERE ({step.key}) IN "
           f"(SELECT {step.key} FROM {step.table} WHERE {step.where} LIMIT :chunk)")
    total = 0
    while stopping is None or not stopping.is_set():
        # run again if PostgreSQL aborts it for a conflict with the relay's writes
        deleted = transact(conn, lambda c: c.execute(sql, {**params, "chunk": CHUNK}).rowcount)
        total += deleted
        if deleted < CHUNK:
            break
    return total


def purge_expired(settings: StoreSettings, days: int, now: float,
                  stopping: threading.Event | None = None) -> dict[str, int]:
    """Purge what is older than ``days`` days before ``now``, on a connection of its own to
    the store of ``[store]`` (not migrated: the serving process did when it started)."""
    conn = store.connect_store(settings)
    try:
        return purge(conn, now - days * DAY, stopping)
    finally:
        conn.close()


async def purge_forever(settings: StoreSettings, days: int, interval: float = PURGE_INTERVAL,
                        stopping: threading.Event | None = None) -> None:
    """Purge now and every ``interval`` seconds; a failure is logged and tried again."""
    while True:
        try:
            counts = await asyncio.to_thread(purge_expired, settings, days, time.time(),
                                           stopping)
            if any(counts.values()):
                log.info("retention: purged %s", _summary(counts))
        except Exception:
            log.exception("retention purge failed")
        await asyncio.sleep(interval)


def start(settings: StoreSettings, days: int) -> Callable[[], Awaitable[None]]:
    """Start :func:`purge_forever` if ``days`` is set; returns the coroutine that stops it."""
    stopping = threading.Event()  # cancelling the task leaves its thread running: see above
    task = (asyncio.create_task(purge_forever(settings, days, stopping=stopping)) if days > 0
            else None)

    async def stop() -> None:
        stopping.set()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return stop


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{table} {n}" for table, n in counts.items() if n)
