"""The embedded store: one SQLite file in WAL mode.

Writes are grouped: callers hand a function to :meth:`Store.write` and await it; every write
queued during one turn of the event loop runs in one transaction, each inside its own
savepoint, and the awaiting callers resume only after that transaction committed. A commit in
WAL mode with ``synchronous=NORMAL`` survives the process being killed, so "the caller got an
answer" implies "the row is in the file"; a write that must also survive a power cut (queue
mode's "250 = stored") asks for ``durable``: its callers resume only once the WAL, which holds
the commit, was fsync'd. That fsync runs on a thread of its own, after the commit (as
``synchronous=FULL`` would, but without holding the write lock or the event loop for it): the
loop goes on meanwhile, and every durable batch committed while one fsync runs shares the next
(a group commit of the commits; under queue mode's load the fsync on the loop was a tenth of
its time). Writes run on the event loop thread: a commit of a batch costs well under a
millisecond, less than handing it to a worker thread would. Copying the
WAL back into the file (checkpointing: page writes and fsyncs) is not on the loop: a
:class:`Checkpointer` thread does it (worth ~15-25% of the tracker's throughput). Nor does the
loop wait in SQLite's busy handler while another connection holds the write lock: the group
commit tries the lock and, when it is taken, tries again shortly (:meth:`Store._flush`).

Reads that may scan (statistics, listings) go through aiosqlite on their own connection, in its
thread, so they never stall the loop.

Every table is created by a named migration in :data:`MIGRATIONS` (one entry per change, never
edited once released); they run once, in order, and are recorded in the ``migrations`` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite

from relay.errors import StoreError
from relay.store.transaction import Resolution, resolve, transaction

if TYPE_CHECKING:
    from relay.config import StoreSettings
    from relay.store.postgres import PgStore

log = logging.getLogger("relay.store")

T = TypeVar("T")
CACHE_KIB = 65536
# The WAL is copied back by Checkpointer's thread every CHECKPOINT_SECONDS; the writer itself
# checkpoints only past WRITER_CHECKPOINT_PAGES (40 MB of 4 KiB pages), as a backstop.
CHECKPOINT_SECONDS = 0.1
WRITER_CHECKPOINT_PAGES = 10000
# How long a connection waits for the write lock another one holds.
BUSY_TIMEOUT_MS = 5000
# A group commit that finds the write lock taken tries again after this long (Store._flush).
LOCK_RETRY_SECONDS = 0.0005
SQLITE_BUSY = 5
SQLITE_FULL = 13  # the disk, or the file's page limit, is full
PG_DISK_FULL = "53100"  # SQLSTATE disk_full, on the errors relay/store/postgres.py raises
WriteFn = Callable[[sqlite3.Connection], T]

MIGRATIONS: dict[str, str] = {
    "0001_messages": """
        CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            secret BLOB NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE messages (
            email_id TEXT PRIMARY KEY,
            message_id TEXT,
            sender TEXT NOT NULL,
            sender_domain TEXT NOT NULL,
            subject TEXT,
            tag_name TEXT,
            tags TEXT NOT NULL DEFAULT '[]',
            campaign TEXT,
            topic TEXT,
            track_opens INTEGER NOT NULL,
            track_clicks INTEGER NOT NULL,
            decision TEXT NOT NULL,
            size INTEGER NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX messages_created ON messages (created_at);
        CREATE INDEX messages_message_id ON messages (message_id);
        CREATE TABLE recipients (
            email_id TEXT NOT NULL REFERENCES messages (email_id) ON DELETE CASCADE,
            recipient TEXT NOT NULL,
            status TEXT NOT NULL,
            reply TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (email_id, recipient)
        );
        CREATE TABLE deliveries (
            message_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            email_id TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (message_id, recipient)
        );
    """,
    # Opens and clicks, bots included; per-recipient engagement (see relay/tracking/events.py).
    "0002_events": """
        CREATE TABLE events (
            id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            at REAL NOT NULL,
            email_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            url TEXT,
            ip TEXT,
            user_agent TEXT NOT NULL,
            method TEXT NOT NULL,
            classification TEXT NOT NULL,
            bot_source TEXT,
            reason TEXT,
            counted INTEGER NOT NULL,
            implied INTEGER NOT NULL,
            first_for_recipient INTEGER NOT NULL,
            first_for_link INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX events_at ON events (at);
        CREATE TABLE engagement (
            email_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            target TEXT NOT NULL,
            hits INTEGER NOT NULL,
            counted INTEGER NOT NULL,
            last_at REAL NOT NULL,
            PRIMARY KEY (email_id, recipient, target)
        ) WITHOUT ROWID;
    """,
    "0003_api_keys": """
        CREATE TABLE api_keys (
            name TEXT PRIMARY KEY,
            key_hash BLOB NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            revoked_at REAL
        );
    """,
    # Stored rules (relay/admin/settings.py, domains.py, tags.py). Every change to them increments
    # rules_generation in its transaction; config_seeds marks config items already seeded.
    "0004_settings": """
        CREATE TABLE rules_generation (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation INTEGER NOT NULL
        );
        INSERT INTO rules_generation VALUES (1, 0);
        CREATE TABLE config_seeds (
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (kind, key)
        );
        CREATE TABLE account_settings (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            opens INTEGER NOT NULL,
            clicks INTEGER NOT NULL,
            updated_at REAL NOT NULL
        );
        INSERT INTO account_settings VALUES (1, 0, 0, unixepoch());
        CREATE TABLE domain_settings (
            domain TEXT PRIMARY KEY,
            opens INTEGER,
            clicks INTEGER,
            exclude_hosts TEXT NOT NULL DEFAULT '[]',
            updated_at REAL NOT NULL
        );
    """,
    "0005_tracking_domains": """
        CREATE TABLE tracking_domains (
            host TEXT PRIMARY KEY,
            sender_domain TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL CHECK (state IN ('pending', 'verified', 'failed')),
            reason TEXT,
            last_check TEXT,
            checked_at REAL,
            created_at REAL NOT NULL
        );
    """,
    "0006_tags": """
        CREATE TABLE tags (
            name TEXT PRIMARY KEY,
            created_at REAL NOT NULL
        );
    """,
    # Webhook endpoints and the durable outbox (see relay/webhooks/outbox.py).
    "0020_webhooks": """
        CREATE TABLE webhook_endpoints (
            name TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            url TEXT NOT NULL,
            secret TEXT NOT NULL,
            events TEXT NOT NULL,
            allow_private INTEGER NOT NULL,
            timeout REAL NOT NULL,
            created_at REAL NOT NULL,
            disabled_at REAL,
            disabled_reason TEXT
        );
        CREATE TABLE webhook_events (
            id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            occurred_at REAL NOT NULL,
            data TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE webhook_outbox (
            seq INTEGER PRIMARY KEY,
            endpoint TEXT NOT NULL,
            event_id TEXT NOT NULL,
            batch_id TEXT
        );
        CREATE INDEX webhook_outbox_unbatched ON webhook_outbox (endpoint, seq)
            WHERE batch_id IS NULL;
        CREATE INDEX webhook_outbox_batch ON webhook_outbox (batch_id);
        CREATE TABLE webhook_batches (
            id TEXT PRIMARY KEY,
            endpoint TEXT NOT NULL,
            state TEXT NOT NULL,
            events INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            next_at REAL NOT NULL,
            deadline REAL NOT NULL,
            lease_owner TEXT,
            lease_until REAL,
            created_at REAL NOT NULL,
            finished_at REAL,
            last_status INTEGER,
            last_error TEXT
        );
        CREATE INDEX webhook_batches_due ON webhook_batches (state, next_at);
        CREATE INDEX webhook_batches_endpoint ON webhook_batches (endpoint, created_at);
        CREATE TABLE webhook_attempts (
            batch_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            at REAL NOT NULL,
            seconds REAL NOT NULL,
            status INTEGER,
            error TEXT,
            PRIMARY KEY (batch_id, attempt)
        ) WITHOUT ROWID;
    """,
    # Statistics (relay/stats/rollup.py): daily counters kept on write; event listings by message
    # and by recipient (relay/stats/queries.py).
    "0010_stats": """
        CREATE TABLE stats_daily (
            day TEXT NOT NULL,
            sender TEXT NOT NULL,
            tag_name TEXT NOT NULL,
            esp TEXT NOT NULL,
            sender_domain TEXT NOT NULL,
            campaign TEXT NOT NULL,
            sent INTEGER NOT NULL,
            opens INTEGER NOT NULL,
            unique_opens INTEGER NOT NULL,
            clicks INTEGER NOT NULL,
            unique_clicks INTEGER NOT NULL,
            PRIMARY KEY (day, sender, tag_name, esp, sender_domain, campaign)
        ) WITHOUT ROWID;
        CREATE TABLE stats_daily_tags (
            day TEXT NOT NULL,
            tag TEXT NOT NULL,
            sent INTEGER NOT NULL,
            opens INTEGER NOT NULL,
            unique_opens INTEGER NOT NULL,
            clicks INTEGER NOT NULL,
            unique_clicks INTEGER NOT NULL,
            PRIMARY KEY (day, tag)
        ) WITHOUT ROWID;
        CREATE TABLE stats_daily_links (
            day TEXT NOT NULL,
            url TEXT NOT NULL,
            clicks INTEGER NOT NULL,
            unique_clicks INTEGER NOT NULL,
            PRIMARY KEY (day, url)
        ) WITHOUT ROWID;
        CREATE INDEX events_email ON events (email_id);
        CREATE INDEX events_recipient ON events (recipient);
    """,
    # Device, client, OS and location of each event (relay/tracking/enrich.py) and the daily
    # counters by device, client and country (relay/stats/breakdown.py); events recorded before this
    # migration are counted there under '' (unknown).
    "0030_event_details": """
        ALTER TABLE events ADD COLUMN device TEXT;
        ALTER TABLE events ADD COLUMN client TEXT;
        ALTER TABLE events ADD COLUMN os TEXT;
        ALTER TABLE events ADD COLUMN country TEXT;
        ALTER TABLE events ADD COLUMN region TEXT;
        ALTER TABLE events ADD COLUMN city TEXT;
        CREATE TABLE stats_daily_agents (
            day TEXT NOT NULL,
            device TEXT NOT NULL,
            client TEXT NOT NULL,
            country TEXT NOT NULL,
            opens INTEGER NOT NULL,
            unique_opens INTEGER NOT NULL,
            clicks INTEGER NOT NULL,
            unique_clicks INTEGER NOT NULL,
            PRIMARY KEY (day, device, client, country)
        ) WITHOUT ROWID;
        CREATE VIEW stats_daily_agents_sent AS
            SELECT day, device, client, country, 0 AS sent, opens, unique_opens, clicks,
                   unique_clicks
            FROM stats_daily_agents;
        INSERT INTO stats_daily_agents
            SELECT date(m.created_at, 'unixepoch'), '', '', '', sum(e.type = 'open'),
                   sum(e.type = 'open' AND e.first_for_recipient), sum(e.type = 'click'),
                   sum(e.type = 'click' AND e.first_for_recipient)
            FROM events e JOIN messages m ON m.email_id = e.email_id
            WHERE e.counted GROUP BY 1;
    """,
    # Deliveries are remembered by the message's content digest (relay/smtp/dedupe.py), not by its
    # Message-ID, which distinct messages may share; claims keep two tries of one message
    # from sending at once, across processes. The rows remembered by Message-ID alone cannot
    # be given a digest: they are dropped (a retry of a message sent before this migration,
    # within smtp.dedupe_hours, may reach its recipients again; taking them by Message-ID
    # would go on dropping distinct messages that share one).
    "0031_deliveries_by_content": """
        DROP TABLE deliveries;
        CREATE TABLE deliveries (
            digest BLOB NOT NULL,
            recipient TEXT NOT NULL,
            message_id TEXT,
            email_id TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (digest, recipient)
        );
        CREATE TABLE send_owners (
            owner TEXT PRIMARY KEY,
            seen_at REAL NOT NULL
        );
        CREATE TABLE send_claims (
            digest BLOB NOT NULL,
            recipient TEXT NOT NULL,
            email_id TEXT NOT NULL,
            owner TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (digest, recipient)
        );
    """,
    # Each message's links: how many were tracked out of how many, and why the others were
    # left alone (relay/smtp/pipeline.py links_json). NULL for messages recorded before, and for
    # those whose links were not looked at.
    "0040_message_links": """
        ALTER TABLE messages ADD COLUMN links TEXT;
    """,
    # Finding messages (relay/stats/queries.py: by recipient, sender, status; Message-ID has its
    # index) and knowing which process sends one (relay/smtp/processes.py): its recipients are
    # 'sending' until their answers are recorded, 'unknown' if that process stopped first.
    "0041_message_search": """
        CREATE TABLE processes (
            id INTEGER PRIMARY KEY,
            host TEXT NOT NULL,
            boot_id TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        ALTER TABLE messages ADD COLUMN process INTEGER;
        CREATE INDEX messages_sender ON messages (sender COLLATE NOCASE, email_id);
        CREATE INDEX recipients_recipient ON recipients (recipient COLLATE NOCASE, email_id);
        CREATE INDEX recipients_status ON recipients (status, email_id);
    """,
    # Every try deletes the claims of owners whose lease ran out (relay/smtp/dedupe.py
    # forget_stale): found by these indexes, it costs next to nothing when there are none.
    "0042_send_claims_by_owner": """
        CREATE INDEX send_claims_owner ON send_claims (owner);
        CREATE INDEX send_owners_seen_at ON send_owners (seen_at);
    """,
    # The dashboard (relay/admin/dashboard/): people who sign in and their sessions
    # (relay/store/users.py), each distinct HTML body kept once by its digest for the click map
    # (relay/store/html_bodies.py; a message's row goes with the message), and machine traffic
    # by day, classification and source, which the other daily counters leave out
    # (relay/store/machine.py).
    "0050_dashboard": """
        CREATE TABLE dashboard_users (
            name TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE dashboard_sessions (
            id_hash TEXT PRIMARY KEY,
            user_name TEXT NOT NULL REFERENCES dashboard_users (name) ON DELETE CASCADE,
            csrf TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        );
        CREATE INDEX dashboard_sessions_expires ON dashboard_sessions (expires_at);
        CREATE TABLE html_bodies (
            digest TEXT PRIMARY KEY,
            html TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE message_html (
            email_id TEXT PRIMARY KEY REFERENCES messages (email_id) ON DELETE CASCADE,
            digest TEXT NOT NULL
        );
        CREATE INDEX message_html_digest ON message_html (digest);
        CREATE TABLE stats_daily_machine (
            day TEXT NOT NULL,
            classification TEXT NOT NULL,
            source TEXT NOT NULL,
            opens INTEGER NOT NULL,
            clicks INTEGER NOT NULL,
            PRIMARY KEY (day, classification, source)
        );
    """,
    # One record of which relay processes run (relay/smtp/processes.py): a claim names the
    # process whose try it is, found dead as its messages' are (pid and start time on this
    # host, a lapsed heartbeat from another), in place of send_owners and its lease. Claims
    # live only while a try sends: those of the processes before the upgrade are let go.
    "0051_claims_by_process": """
        ALTER TABLE processes ADD COLUMN seen_at REAL NOT NULL DEFAULT 0;
        DROP TABLE send_claims;
        DROP TABLE send_owners;
        CREATE TABLE send_claims (
            digest BLOB NOT NULL,
            recipient TEXT NOT NULL,
            email_id TEXT NOT NULL,
            process INTEGER NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (digest, recipient)
        );
        CREATE INDEX send_claims_process ON send_claims (process);
    """,
    # The send API's Idempotency-Key (relay/store/idempotency.py): per API key, the request's
    # fingerprint and, once answered, the answer, until it expires.
    "0052_idempotency_keys": """
        CREATE TABLE idempotency_keys (
            api_key TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint BLOB NOT NULL,
            status INTEGER,
            response TEXT,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (api_key, key)
        );
        CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
    """,
    # What a key may do (relay/admin/apikeys.py): everything, or only send (the /v1/ API's
    # send_only, as Anypost's keys).
    "0053_api_key_permissions": """
        ALTER TABLE api_keys ADD COLUMN permissions TEXT NOT NULL DEFAULT 'full';
    """,
    # Queue mode (relay/store/queue.py): each message as received with its envelope, until every
    # recipient was delivered or given up; deliveries leased to one process at a time.
    # queue_totals keeps the spool's size for the limits, updated in the same transactions.
    "0054_queue": """
        CREATE TABLE queue_messages (
            email_id TEXT PRIMARY KEY,
            sender TEXT NOT NULL,
            data BLOB NOT NULL,
            size INTEGER NOT NULL,
            mail_options TEXT NOT NULL,
            peer TEXT NOT NULL,
            helo TEXT NOT NULL,
            protocol TEXT NOT NULL,
            received_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            next_at REAL NOT NULL,
            attempts INTEGER NOT NULL,
            held INTEGER NOT NULL,
            lease_owner INTEGER,
            lease_until REAL,
            last_reply TEXT
        );
        CREATE INDEX queue_messages_due ON queue_messages (held, next_at);
        CREATE INDEX queue_messages_lease ON queue_messages (lease_owner);
        CREATE TABLE queue_recipients (
            email_id TEXT NOT NULL REFERENCES queue_messages (email_id) ON DELETE CASCADE,
            recipient TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            smtp_code INTEGER,
            reply TEXT,
            updated_at REAL NOT NULL,
            PRIMARY KEY (email_id, recipient)
        );
        CREATE TABLE queue_totals (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            messages INTEGER NOT NULL,
            bytes INTEGER NOT NULL
        );
        INSERT INTO queue_totals VALUES (1, 0, 0);
    """,
    # TLS certificates ordered over ACME, shared by every node (relay/certs/, SQL in
    # relay/store/certificates.py): the account key per ACME directory, one certificate per
    # host with its state, the HTTP-01 answers any node's plain listener gives, and leases so
    # that one node at a time orders.
    "0060_certificates": """
        CREATE TABLE acme_accounts (
            directory TEXT PRIMARY KEY,
            key_pem TEXT NOT NULL,
            uri TEXT,
            created_at REAL NOT NULL
        );
        CREATE TABLE certificates (
            host TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            cert_pem TEXT,
            key_pem TEXT,
            not_after REAL,
            reason TEXT,
            failures INTEGER NOT NULL,
            next_try REAL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE acme_challenges (
            token TEXT PRIMARY KEY,
            key_authorization TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            expires_at REAL NOT NULL
        );
    """,
    # Queue mode's delivery events (email.delayed, email.bounced), written in the transaction
    # that records the attempt (relay/store/queue.py record_events), listed beside the opens
    # and clicks of ``events`` (relay/store/reports.py) but kept apart from them: nothing
    # counts them.
    "0061_delivery_events": """
        CREATE TABLE delivery_events (
            id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            at REAL NOT NULL,
            email_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            smtp_code INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            reply TEXT NOT NULL,
            next_attempt_at REAL,
            bounce_type TEXT
        );
        CREATE INDEX delivery_events_email ON delivery_events (email_id, id);
    """,
    # Each claim of a queued message names its lease (relay/store/queue.py claim): renewals and
    # the attempt's record hold only for the attempt that claimed it, not for a later claim of
    # the same process after its lease ran out.
    "0062_queue_lease_ids": """
        ALTER TABLE queue_messages ADD COLUMN lease_id TEXT;
    """,
    # Opens and clicks by the event's operating system (relay/stats/breakdown.py), as
    # stats_daily_agents by device, client and country; the events recorded before it counted
    # from their os column (kept since 0030_event_details).
    "0063_stats_os": """
        CREATE TABLE stats_daily_os (
            day TEXT NOT NULL,
            os TEXT NOT NULL,
            opens INTEGER NOT NULL,
            unique_opens INTEGER NOT NULL,
            clicks INTEGER NOT NULL,
            unique_clicks INTEGER NOT NULL,
            PRIMARY KEY (day, os)
        ) WITHOUT ROWID;
        CREATE VIEW stats_daily_os_sent AS
            SELECT day, os, 0 AS sent, opens, unique_opens, clicks, unique_clicks
            FROM stats_daily_os;
        INSERT INTO stats_daily_os
            SELECT date(m.created_at, 'unixepoch'), coalesce(e.os, ''),
                   count(*) FILTER (WHERE e.type = 'open'),
                   count(*) FILTER (WHERE e.type = 'open' AND e.first_for_recipient = 1),
                   count(*) FILTER (WHERE e.type = 'click'),
                   count(*) FILTER (WHERE e.type = 'click' AND e.first_for_recipient = 1)
            FROM events e JOIN messages m ON m.email_id = e.email_id
            WHERE e.counted = 1 GROUP BY 1, 2;
    """,
    # Clicks per link by sender domain and campaign, and by tag (relay/stats/rollup.py), so the
    # links statistics take the filters the others take; the clicks recorded before counted.
    "0064_link_counters": """
        CREATE TABLE stats_daily_links_by (
            day TEXT NOT NULL,
            sender_domain TEXT NOT NULL,
            campaign TEXT NOT NULL,
            url TEXT NOT NULL,
            clicks INTEGER NOT NULL,
            unique_clicks INTEGER NOT NULL,
            PRIMARY KEY (day, sender_domain, campaign, url)
        ) WITHOUT ROWID;
        CREATE TABLE stats_daily_tag_links (
            day TEXT NOT NULL,
            tag TEXT NOT NULL,
            url TEXT NOT NULL,
            clicks INTEGER NOT NULL,
            unique_clicks INTEGER NOT NULL,
            PRIMARY KEY (day, tag, url)
        ) WITHOUT ROWID;
        INSERT INTO stats_daily_links_by
            SELECT date(m.created_at, 'unixepoch'), relay_lower(m.sender_domain),
                   coalesce(m.campaign, ''), e.url, count(*), sum(e.first_for_link)
            FROM events e JOIN messages m ON m.email_id = e.email_id
            WHERE e.counted = 1 AND e.type = 'click' GROUP BY 1, 2, 3, 4;
        INSERT INTO stats_daily_tag_links
            SELECT day, tag, url, count(*), sum(first_for_link) FROM (
                SELECT e.id, date(m.created_at, 'unixepoch') AS day, t.value AS tag, e.url,
                       e.first_for_link
                FROM events e JOIN messages m ON m.email_id = e.email_id, json_each(m.tags) t
                WHERE e.counted = 1 AND e.type = 'click'
                UNION
                SELECT e.id, date(m.created_at, 'unixepoch'), m.tag_name, e.url,
                       e.first_for_link
                FROM events e JOIN messages m ON m.email_id = e.email_id
                WHERE e.counted = 1 AND e.type = 'click') u
            WHERE tag IS NOT NULL
            GROUP BY day, tag, url;
    """,
}


def pipelined(conn: Any) -> contextlib.AbstractContextManager[Any]:
    """A block of writes whose replies are not waited for one by one: PostgreSQL's pipeline
    mode (relay/store/postgres.py ``PgConnection.pipeline``: one round trip for the block,
    errors raised at its end at the latest); on SQLite, where there is no round trip, nothing."""
    pipeline = getattr(conn, "pipeline", None)
    return contextlib.nullcontext() if pipeline is None else pipeline()


def disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of room: SQLite's ``SQLITE_FULL`` (the disk, or the
    file's page limit), PostgreSQL's ``disk_full``."""
    if getattr(exc, "sqlstate", None) == PG_DISK_FULL:
        return True
    return (isinstance(exc, sqlite3.Error)
            and getattr(exc, "sqlite_errorcode", 0) & 0xFF == SQLITE_FULL)


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the pragmas every user of the file needs; ``StoreError`` naming the
    file when it cannot be made, opened or read (not a database, no permission)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(path, getattr(exc, "strerror", None) or str(exc)) from None
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # Savepoint (statement) journals and temporary b-trees in memory: a group commit writes
    # one savepoint per caller, which would otherwise open, write and unlink a temp file.
    conn.execute("PRAGMA temp_store=MEMORY")
    # 64 MB of page cache (negative: KiB), so the hot pages of the event tables stay in memory.
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    return conn


def add_lower(conn: sqlite3.Connection) -> None:
    """``relay_lower()`` in SQL on ``conn``: Python's lower(), since SQLite's folds ASCII
    letters only (and SMTPUTF8 lets addresses such as JÖRG@example.org in); NULL stays NULL."""
    conn.create_function("relay_lower", 1, _lower, deterministic=True)


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def migrate(conn: sqlite3.Connection, where: object = "") -> list[str]:
    """Apply the migrations this file has not seen; returns their names. ``StoreError`` if a
    newer relay migrated it (it holds migrations this one does not know)."""
    add_lower(conn)  # a migration's backfill may call relay_lower()
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, at REAL)")
    check_not_newer({row[0] for row in conn.execute("SELECT name FROM migrations")}, where)
    applied = []
    for name, script in MIGRATIONS.items():
        with transaction(conn):
            # read under the write lock: another process starting at once may have run it
            if conn.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone():
                continue
            for statement in statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
        applied.append(name)
    return applied


def check(conn: sqlite3.Connection) -> None:
    """Read the store once (the health check): raises what the store raises when it cannot."""
    conn.execute("SELECT count(*) FROM migrations").fetchall()


def statements(script: str) -> Iterable[str]:
    return (s for s in script.split(";") if s.strip())


def applied_migrations(conn: Any) -> list[str]:
    """The names of the migrations the store has seen, in name order."""
    return [name for (name,) in conn.execute("SELECT name FROM migrations ORDER BY name")]


def check_not_newer(applied: Iterable[str], where: object) -> None:
    """Refuse a store migrated by a newer relay: its schema may not be what this code writes."""
    unknown = sorted(set(applied) - MIGRATIONS.keys())
    if unknown:
        raise StoreError(where, f"its schema is newer than this relay knows (migrations "
                                f"{', '.join(unknown)}): run the relay version that migrated it, "
                                f"or a newer one")


def open_store(settings: StoreSettings) -> Awaitable[Store | PgStore]:
    """The store of ``[store] url``, migrated (relay/store/postgres.py for PostgreSQL)."""
    if settings.path is None:
        from relay.store.postgres import PgStore

        return PgStore.open(settings.url)
    return Store.open(settings.path)


def connect_url(settings: StoreSettings) -> Any:
    """A migrated connection for a command (the CLI): sqlite3's, or the PostgreSQL adapter."""
    conn = connect_store(settings)
    if settings.path is None:
        from relay.config import redact_url
        from relay.store import postgres

        postgres.migrate(conn, MIGRATIONS, redact_url(settings.url))
    else:
        migrate(conn, settings.path)
    return conn


def connect_store(settings: StoreSettings) -> Any:
    """A connection of its own to the store of ``[store] url``, not migrated: for the process
    serving it, which migrated it when it opened its :class:`Store` (the purge, the erasure
    route). Migrating again would wait for any other node's migration (PostgreSQL's advisory
    lock) and take SQLite's write lock once per migration."""
    if settings.path is None:
        from relay.store import postgres

        return postgres.connect(settings.url)
    return connect(settings.path)


class Checkpointer:
    """Copies committed WAL pages into the database file from a thread of its own (PASSIVE
    checkpoints every ``interval`` seconds), so the page writes and fsyncs of checkpointing
    stay off the event loop. The writer keeps a large automatic checkpoint as a backstop: it
    finds the pages already copied, finishes the rest, and lets the WAL start over."""

    def __init__(self, path: Path, interval: float = CHECKPOINT_SECONDS) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path, interval),
                                        name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, path: Path, interval: float) -> None:
        conn = connect(path)
        try:
            while not self._stop.wait(interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # busy or failing disk: the backstop still runs
                    log.warning("background checkpoint failed: %s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Store:
    engine = "sqlite"

    def __init__(self, path: Path, writer: sqlite3.Connection) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._flush_hooks: list[Callable[[], None]] = []
        self.writer = writer
        self._checkpointer: Checkpointer | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pending: list[tuple[WriteFn[Any], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self._locked_since: float | None = None
        self._durable = False  # a pending write asked for an fsync'd commit
        # Durable batches committed and waiting for the fsync of the WAL; the one running.
        self._unsynced: list[Resolution] = []
        self._syncing: asyncio.Future[None] | None = None
        self._syncer: ThreadPoolExecutor | None = None
        self._synced_file: tuple[int, int] | None = None  # (fd, inode) of the file fsync'd
        self.syncs = 0
        self.lock_timeout = BUSY_TIMEOUT_MS / 1000
        self.batches = 0
        self.last_batch_size = 0

    @classmethod
    async def open(cls, path: Path) -> Store:
        writer = connect(path)
        migrate(writer, path)
        writer.execute(f"PRAGMA wal_autocheckpoint={WRITER_CHECKPOINT_PAGES}")
        store = cls(path, writer)
        store._checkpointer = Checkpointer(path)
        return store

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        while self._syncing is not None:  # before the last flush, which fsyncs on the loop
            await asyncio.wait([self._syncing])
        self._flush(wait=True)
        if self._syncer is not None:
            self._syncer.shutdown()
        if self._synced_file is not None:
            os.close(self._synced_file[0])
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._reader is not None:
            await self._reader.close()
        self.writer.close()

    async def _read_connection(self) -> aiosqlite.Connection:
        """Opened on first use: a process that only relays mail never starts its thread."""
        if self._reader is None:
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            await reader.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._reader = reader
        return self._reader

    def on_flush(self, hook: Callable[[], None]) -> None:
        """``hook()`` runs on the loop before each group commit runs its batch."""
        self._flush_hooks.append(hook)

    def on_rollback(self, hook: Callable[[], None]) -> None:
        """PostgreSQL runs a batch again after a conflict (relay/store/postgres.py); a batch
        here is never run twice, so there is nothing to undo."""

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A small read (primary-key lookups) on the writer connection, at once; PostgreSQL
        runs it on a reader thread."""
        return fn(self.writer)

    def write(self, fn: WriteFn[T], durable: bool = False) -> asyncio.Future[T]:
        """Queue ``fn(conn)`` for the next group commit; the future resolves after the commit.
        ``durable``: the future resolves only once the commit is fsync'd, so that it survives
        a power cut, not only the process being killed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, future))
        self._durable = self._durable or durable
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    def execute_now(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """A small read on the writer connection (primary-key lookups on the hot path)."""
        return self.writer.execute(sql, tuple(params)).fetchall()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """A read that may scan: runs on the reader's thread."""
        reader = await self._read_connection()
        async with reader.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    def _flush(self, wait: bool = False) -> None:
        """Run the pending writes in one transaction once this connection holds the write lock.

        While another connection holds it (another worker process, a purge, a CLI command),
        SQLite's busy handler would sleep on the event loop thread, stalling every request and
        session of this process. Unless ``wait`` is set, the lock is only tried: when taken,
        the flush is tried again shortly, the loop goes on meanwhile, and what is written
        meanwhile joins the batch. Writers get the "database is locked" error after
        ``lock_timeout`` seconds of this, as they would from the busy handler.
        """
        self._flush_scheduled = False
        self._retry = None
        if not self._pending:
            return
        for hook in self._flush_hooks:
            hook()
        try:
            self._begin(wait)
        except sqlite3.OperationalError as exc:
            if not wait and _is_busy(exc) and self._keep_trying():
                self._flush_scheduled = True
                self._retry = asyncio.get_running_loop().call_later(LOCK_RETRY_SECONDS,
                                                                    self._flush)
                return
            self._fail(self._take_pending(), exc)
            return
        durable = self._durable
        results = self._commit(self._take_pending())
        if results is None:
            return
        if not durable:
            resolve(results)
        elif wait:  # closing: no loop turn to wait for a thread
            self._sync()
            resolve(results)
        else:
            self._unsynced += results
            self._start_sync()

    def _start_sync(self) -> None:
        """fsync the WAL on the syncer's thread for the durable batches committed so far,
        unless an fsync runs already (then the next one starts when it ends)."""
        if self._syncing is not None or not self._unsynced:
            return
        batch, self._unsynced = self._unsynced, []
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="wal-fsync")
        syncing = asyncio.get_running_loop().run_in_executor(self._syncer, self._sync)
        self._syncing = syncing

        def synced(done: asyncio.Future[None]) -> None:
            self._syncing = None
            exc = asyncio.CancelledError() if done.cancelled() else done.exception()
            if exc is None:
                resolve(batch)
            else:  # committed, yet not known to be on the disk: no "stored" answer then
                log.error("the store's WAL could not be fsync'd: %s", exc)
                resolve([(future, False, exc) for future, _, _ in batch])
            self._start_sync()

        syncing.add_done_callback(synced)

    def _sync(self) -> None:
        """fsync the file that holds the commits: the WAL (its directory entry too, once),
        or the database itself if SQLite could not use WAL mode. Any descriptor of a file
        flushes what every connection wrote to it."""
        wal = Path(f"{self.path}-wal")
        target = wal if wal.exists() else self.path
        inode = target.stat().st_ino
        if self._synced_file is None or self._synced_file[1] != inode:
            if self._synced_file is not None:
                os.close(self._synced_file[0])
            self._synced_file = (os.open(target, os.O_RDONLY), inode)
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        os.fsync(self._synced_file[0])
        self.syncs += 1

    def _begin(self, wait: bool) -> None:
        if wait:
            self.writer.execute("BEGIN IMMEDIATE")
            return
        self.writer.execute("PRAGMA busy_timeout=0")
        try:
            self.writer.execute("BEGIN IMMEDIATE")
        finally:
            self.writer.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _keep_trying(self) -> bool:
        now = time.monotonic()
        if self._locked_since is None:
            self._locked_since = now
        return now - self._locked_since < self.lock_timeout

    def _take_pending(self) -> list[tuple[WriteFn[Any], asyncio.Future[Any]]]:
        self._locked_since = None
        self._durable = False
        batch, self._pending = self._pending, []
        return batch

    def _commit(self, batch: list[tuple[WriteFn[Any], asyncio.Future[Any]]]
                ) -> list[Resolution] | None:
        """Run the batch in the open transaction and commit; each future with its outcome, to
        be resolved (None: the batch failed, and its futures with it)."""
        results: list[Resolution] = []
        try:
            for fn, future in batch:
                results.append((future, *_in_savepoint(self.writer, fn)))
            self.writer.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.writer.in_transaction:
                self.writer.execute("ROLLBACK")
            self._fail(batch, exc)
            return None
        self.batches += 1
        self.last_batch_size = len(batch)
        return results

    @staticmethod
    def _fail(batch: list[tuple[WriteFn[Any], asyncio.Future[Any]]], exc: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode & 0xFF == SQLITE_BUSY  # the primary code of an extended one


def _in_savepoint(conn: sqlite3.Connection, fn: WriteFn[Any]) -> tuple[bool, Any]:
    conn.execute("SAVEPOINT write")
    try:
        value = fn(conn)
    except Exception as exc:  # one caller's failure must not undo the others' writes
        if not conn.in_transaction:
            raise  # SQLite rolled the whole transaction back (a full disk): the batch fails
        conn.execute("ROLLBACK TO write")
        conn.execute("RELEASE write")
        return False, exc
    conn.execute("RELEASE write")
    return True, value
