"""The second engine: PostgreSQL (``store.url = "postgresql://..."``), for several relay nodes.

The store functions of ``relay/store/`` and the rest of the code are written once, against a
DB-API connection (``conn.execute(sql, params)`` with ``?`` and ``:name`` placeholders, as
sqlite3 takes them). Here they run unchanged on PostgreSQL through :class:`PgConnection`, an
adapter over a psycopg 3 connection that translates the placeholders, turns Python booleans
into the integers the shared schema stores, and raises the DB-API error classes of the sqlite3
module (IntegrityError, OperationalError, ...) so that one ``except`` serves both engines.

Writes keep the SQLite engine's contract (relay/store/engine.py): callers queue a function and
await it; the functions queued during one turn of the loop run in one transaction, each in its
own savepoint, and the callers resume after the COMMIT. Here the transaction runs in a writer
thread of its own (one hand-off per batch, never a wait on the loop) at SERIALIZABLE isolation:
like SQLite's single writer, two nodes that read the same engagement row cannot both record a
first open; PostgreSQL aborts one of them, and the batch is run again (serialization failures
and deadlocks are retried, :data:`RETRIES`). Every batch of every node writes the same few
rows of daily counters, so two nodes' batches at once would nearly always collide and one
would be run again, its work wasted: each batch first takes an advisory lock
(:data:`WRITE_LOCK`, before BEGIN, so that its snapshot is taken once the other's batch has
committed), and the nodes' batches follow one another, as SQLite's writers do on one host;
the work outside the transaction (HTTP, tokens, SMTP) runs on every node at once. Reads run on
a small pool of reader threads.

When the connection breaks (a restart, a failover), the batch in flight fails with
``sqlite3.OperationalError`` (the SMTP side answers ``451``, the tracker counts the events it
could not store, as with SQLite) and the next batch connects again.

Driver: psycopg 3's synchronous connection, measured against asyncpg on the tracker's write
path by ``bench/pg_driver_bench.py``: with the store functions synchronous, a sync driver in a
writer thread costs one hand-off per batch, while an async driver would need every function
written twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.adapt import Loader

from relay.errors import StoreError
from relay.store.transaction import transaction

log = logging.getLogger("relay.store")

T = TypeVar("T")
WriteFn = Callable[[Any], T]
# A batch that PostgreSQL aborted (serialization failure, deadlock) is run again this often.
RETRIES = 20
RETRYABLE = frozenset({"40001", "40P01"})
# Before the n-th run again, the writer waits a random time up to RETRY_WAIT * 2**n seconds
# (n at most 7: 0.26 s).
RETRY_WAIT = 0.002
CONNECT_TIMEOUT = 5
READERS = 2
# Migrations and `relay store copy` hold this advisory lock: nodes starting together migrate
# one after the other (pg_advisory_lock's key; any constant unlikely to collide).
MIGRATION_LOCK = 0x72656C6179  # "relay"
# Held by a node's writer around each batch's transaction (see the module docstring).
WRITE_LOCK = MIGRATION_LOCK + 1

# --- the dialect ------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")|::|\?|:([A-Za-z_]\w*)|%|\browid\b|\btemp\.")


@functools.lru_cache(maxsize=2048)
def translate(sql: str, params: bool = True) -> str:
    """``sql`` as psycopg takes it: ``rowid`` (a row's address, to delete in chunks) as
    ``ctid``, the schema of temporary tables ``temp.`` as ``pg_temp.`` and, for a statement
    with ``params``, sqlite3's placeholders (``?``, ``:name``) as psycopg's (``%s``,
    ``%(name)s``) and every literal ``%`` doubled (psycopg reads ``%`` even in quoted text).
    Without params psycopg reads no placeholders, and nothing else changes. Quoted text and
    ``::`` casts keep their ``?`` and ``:``."""
    def token(match: re.Match[str]) -> str:
        text = match.group(0)
        if match.group(1):  # quoted
            return text.replace("%", "%%") if params else text
        if text == "rowid":
            return "ctid"
        if text == "temp.":
            return "pg_temp."
        if text == "%":
            return "%%" if params else text
        if text == "?" and params:
            return "%s"
        if match.group(2) and params:
            return f"%({match.group(2)})s"
        return text

    translated = _TOKEN.sub(token, sql)
    if translated.strip().upper() == "BEGIN IMMEDIATE":  # SQLite's one-writer-at-a-time
        return "BEGIN ISOLATION LEVEL SERIALIZABLE"
    return translated


# Column types and clauses of the shared migrations (relay/store/engine.py MIGRATIONS), in order.
_DDL = (
    (re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bWITHOUT ROWID\b"), ""),
    (re.compile(r"\bunixepoch\(\)"), "extract(epoch FROM now())"),
)
# What the shared SQL calls that PostgreSQL lacks: COLLATE NOCASE (a case-insensitive ICU
# collation), relay_lower() (engine.add_lower's function on SQLite), relay_domain() (an
# address's domain as relay/stats/maths.py domain_of gives it: after the last @, stripped,
# lower case; registered by relay/stats/rollup.py rebuild on SQLite), SQLite's
# date(seconds, 'unixepoch'), json_each(TEXT) over a JSON array (its elements as ``value``) and
# json_extract(TEXT, '$.key') of a JSON object (as text; '$.a.b' for nested keys).
# Created before the migrations run, idempotently.
SERVER_SETUP = (
    "CREATE COLLATION IF NOT EXISTS nocase "
    "(provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
    "CREATE OR REPLACE FUNCTION relay_lower(text) RETURNS text "
    "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT lower($1)'",
    "CREATE OR REPLACE FUNCTION relay_domain(text) RETURNS text "
    "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS "
    "$$SELECT lower(btrim(reverse(split_part(reverse($1), '@', 1)), "
    "E' \\t\\n\\r\\f' || chr(11)))$$",
    "CREATE OR REPLACE FUNCTION date(double precision, text) RETURNS text "
    "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS "
    "$$SELECT to_char(to_timestamp($1) AT TIME ZONE 'UTC', 'YYYY-MM-DD')$$",
    "CREATE OR REPLACE FUNCTION json_each(text) RETURNS TABLE (value text) "
    "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS "
    "'SELECT json_array_elements_text($1::json)'",
    "CREATE OR REPLACE FUNCTION json_extract(text, text) RETURNS text "
    "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS "
    "$$SELECT $1::json #>> string_to_array(substr($2, 3), '.')$$",
)
SERVER_FUNCTIONS = frozenset({"relay_lower", "relay_domain"})
# Migrations released before this engine existed: a PostgreSQL database went through them
# empty (relay migrate) and was filled after the last one (relay store copy), so their
# backfills of existing rows (INSERT ... SELECT, written for SQLite) have nothing to do here.
BEFORE_POSTGRESQL = frozenset({
    "0001_messages", "0002_events", "0003_api_keys", "0004_settings", "0005_tracking_domains",
    "0006_tags", "0020_webhooks", "0010_stats", "0030_event_details",
    "0031_deliveries_by_content", "0040_message_links", "0041_message_search",
    "0042_send_claims_by_owner",
})
_BACKFILL = re.compile(r"^\s*INSERT INTO \w+\s+SELECT\b", re.IGNORECASE)


def ddl(name: str, statement: str) -> str | None:
    """A statement of migration ``name`` as PostgreSQL takes it; None: nothing to run here."""
    if name in BEFORE_POSTGRESQL and _BACKFILL.match(statement):
        return None
    for pattern, replacement in _DDL:
        statement = pattern.sub(replacement, statement)
    return statement


# --- the connection adapter ---------------------------------------------------------------


class _NumericLoader(Loader):
    """sum() of BIGINT is NUMERIC in PostgreSQL: read it as the int (or float) SQLite gives."""

    def load(self, data: Any) -> int | float:
        text = bytes(data)
        return float(text) if b"." in text or b"e" in text.lower() else int(text)


def _param(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def _params(params: Any) -> Any:
    if isinstance(params, Mapping):
        return {key: _param(value) for key, value in params.items()}
    return [_param(value) for value in params]


def _error(exc: psycopg.Error) -> sqlite3.Error:
    """The sqlite3 (DB-API) class of ``exc``, carrying its SQLSTATE as ``sqlstate``."""
    if isinstance(exc, psycopg.IntegrityError):
        mapped: sqlite3.Error = sqlite3.IntegrityError(str(exc))
    elif isinstance(exc, psycopg.OperationalError | psycopg.errors.SerializationFailure):
        mapped = sqlite3.OperationalError(str(exc))
    elif isinstance(exc, psycopg.ProgrammingError):
        mapped = sqlite3.ProgrammingError(str(exc))
    else:
        mapped = sqlite3.DatabaseError(str(exc))
    mapped.sqlstate = exc.sqlstate  # type: ignore[attr-defined]
    return mapped


def sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


class PgConnection:
    """The part of ``sqlite3.Connection`` the store functions use, over psycopg (autocommit:
    transactions are the explicit ``BEGIN``/``COMMIT`` of the callers and of the engine)."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def _cursor(self) -> psycopg.Cursor[Any]:
        """A cursor; sqlite3.OperationalError on a connection already closed (psycopg closes
        one that broke, and a caller that went on after the error reaches it here)."""
        try:
            return self.raw.cursor()
        except psycopg.Error as exc:
            raise _error(exc) from exc

    def execute(self, sql: str, params: Any = ()) -> psycopg.Cursor[Any]:
        cursor = self._cursor()
        try:
            if params:
                cursor.execute(translate(sql), _params(params))  # type: ignore[arg-type]
            else:
                cursor.execute(translate(sql, params=False))  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise _error(exc) from exc
        return cursor

    def executemany(self, sql: str, rows: Iterable[Any]) -> psycopg.Cursor[Any]:
        cursor = self._cursor()
        try:
            cursor.executemany(translate(sql), [_params(row) for row in rows])  # type: ignore
        except psycopg.Error as exc:
            raise _error(exc) from exc
        return cursor

    def copy_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
                  ) -> None:
        """Insert ``rows`` with ``COPY ... FROM STDIN`` (``relay store copy``: many times
        faster than INSERTs for millions of rows)."""
        cursor = self._cursor()
        try:
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(_params(row))
        except psycopg.Error as exc:
            raise _error(exc) from exc

    def create_function(self, name: str, *args: Any, **kwargs: Any) -> None:
        """sqlite3's user functions: those in SERVER_SETUP exist on the server already."""
        if name not in SERVER_FUNCTIONS:
            raise sqlite3.NotSupportedError(f"SQL function {name}() is SQLite only")

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != pq.TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def commit(self) -> None:
        if self.in_transaction:
            self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction and not self.broken:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> PgConnection:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        """As sqlite3's: ends the transaction in progress (commit, or rollback on an error)."""
        if kind is None:
            self.commit()
        else:
            self.rollback()

    def restart_identities(self) -> None:
        """Identity columns (SQLite's INTEGER PRIMARY KEY) go on after the largest value in
        them (after rows were inserted with their ids: relay/store/copy.py)."""
        for table, column in self.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE is_identity = 'YES' AND table_schema = current_schema()").fetchall():
            self.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                         f"coalesce(max({column}), 0) + 1, false) FROM {table}")


def connect(url: str) -> PgConnection:
    """A connection to ``url``; ``StoreError`` naming the server (never the password)."""
    from relay.config import redact_url

    try:
        raw = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                              application_name="relay")
    except psycopg.Error as exc:
        raise StoreError(redact_url(url), str(exc).strip() or type(exc).__name__) from None
    raw.adapters.register_loader("numeric", _NumericLoader)
    return PgConnection(raw)


def migrate(conn: PgConnection, migrations: Mapping[str, str], where: str) -> list[str]:
    """Apply the migrations the database has not seen, under an advisory lock (nodes starting
    together wait for each other), each in its own transaction; returns their names."""
    from relay.store.engine import applied_migrations, check_not_newer, statements

    conn.execute("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))
    try:
        for statement in SERVER_SETUP:
            conn.execute(statement)
        conn.execute("CREATE TABLE IF NOT EXISTS migrations "
                     "(name TEXT PRIMARY KEY, at DOUBLE PRECISION)")
        done = set(applied_migrations(conn))
        check_not_newer(done, where)
        applied = []
        for name, script in migrations.items():
            if name in done:
                continue
            with transaction(conn):
                for statement in statements(script):
                    translated = ddl(name, statement)
                    if translated is not None:
                        conn.execute(translated)
                conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
            applied.append(name)
        return applied
    finally:
        if not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))


# --- the store ----------------------------------------------------------------------------


class _Retry(Exception):
    """PostgreSQL aborted the transaction (serialization failure, deadlock): run it again."""


Batch = list[tuple[WriteFn[Any], "asyncio.Future[Any]"]]


class PgStore:
    """:class:`relay.store.engine.Store`'s interface on PostgreSQL (see the module docstring)."""

    engine = "postgresql"
    path = None

    def __init__(self, url: str, writer: PgConnection,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.url = url
        self._writer: PgConnection | None = writer
        self._loop = loop
        self._pending: Batch = []
        self._flush_scheduled = False
        self._flush_hooks: list[Callable[[], None]] = []
        self._rollback_hooks: list[Callable[[], None]] = []
        self._jobs: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="pg-read")
        self._local = threading.local()
        self._reader_connections: list[PgConnection] = []
        self.batches = 0
        self.last_batch_size = 0
        self.retries = 0
        self._thread = threading.Thread(target=self._run_writer, name="pg-write", daemon=True)
        self._thread.start()

    @classmethod
    async def open(cls, url: str) -> PgStore:
        from relay.config import redact_url
        from relay.store.engine import MIGRATIONS

        writer = await asyncio.to_thread(connect, url)
        try:
            await asyncio.to_thread(migrate, writer, MIGRATIONS, redact_url(url))
        except BaseException:
            writer.close()
            raise
        return cls(url, writer, asyncio.get_running_loop())

    async def close(self) -> None:
        if self._pending:
            self._flush()
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._readers.shutdown(wait=True)
        for conn in self._reader_connections:
            conn.close()
        if self._writer is not None:
            self._writer.close()

    # writes

    def on_flush(self, hook: Callable[[], None]) -> None:
        """``hook()`` runs on the loop before each batch is handed to the writer."""
        self._flush_hooks.append(hook)

    def on_rollback(self, hook: Callable[[], None]) -> None:
        """``hook()`` runs (in the writer thread) when a batch is rolled back to run again."""
        self._rollback_hooks.append(hook)

    def write(self, fn: WriteFn[T], durable: bool = False) -> asyncio.Future[T]:
        """Queue ``fn(conn)`` for the next group commit; the future resolves after the commit.
        ``fn`` runs in the writer thread: it must not touch the loop's objects. ``durable``:
        every commit here is (PostgreSQL's ``synchronous_commit`` defaults to on)."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._pending.append((fn, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        for hook in self._flush_hooks:
            hook()
        batch, self._pending = self._pending, []
        if batch:
            self._jobs.put(batch)

    def _run_writer(self) -> None:
        stopping = False
        while not stopping:
            batch = self._jobs.get()
            if batch is None:
                return
            while True:  # what queued up meanwhile joins this transaction
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.extend(more)
            outcomes = self._run_batch(batch)
            self._loop.call_soon_threadsafe(self._resolve, batch, outcomes)

    def _run_batch(self, batch: Batch) -> list[tuple[bool, Any]]:
        for attempt in range(RETRIES):
            try:
                return self._transaction(batch)
            except _Retry:
                self.retries += 1
                # Two busy nodes retrying at once meet again: wait a random while, longer
                # after each failure, so that one gets through (measured: chains of 20
                # aborts without it, two relays delivering one queue).
                time.sleep(random.uniform(0, RETRY_WAIT * 2 ** min(attempt, 7)))
                for hook in self._rollback_hooks:
                    hook()
            except Exception as exc:  # the writer thread must outlive any failed batch
                return [(False, exc)] * len(batch)
        failure = sqlite3.OperationalError(f"transaction aborted {RETRIES} times by conflicts")
        return [(False, failure)] * len(batch)

    def _transaction(self, batch: Batch) -> list[tuple[bool, Any]]:
        conn = self._writer_connection()
        try:
            conn.execute("SELECT pg_advisory_lock(?)", (WRITE_LOCK,))
            conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
            outcomes = [_in_savepoint(conn, fn) for fn, _ in batch]
            conn.execute("COMMIT")
        except Exception as exc:
            self._after_failure(conn)
            if sqlstate(exc) in RETRYABLE:
                raise _Retry from exc
            raise
        finally:
            self._unlock(conn)
        self.batches += 1
        self.last_batch_size = len(batch)
        return outcomes

    def _writer_connection(self) -> PgConnection:
        if self._writer is None:
            try:
                self._writer = connect(self.url)
            except StoreError as exc:
                raise sqlite3.OperationalError(str(exc)) from None
            log.warning("store: connected to PostgreSQL again")
        return self._writer

    def _unlock(self, conn: PgConnection) -> None:
        """Let the other nodes' writers go on. Whatever became of the batch: its outcome is
        decided, and a connection that cannot unlock is closed (the server lets the lock go
        with the session)."""
        if conn is not self._writer or conn.broken:
            return
        try:
            conn.execute("SELECT pg_advisory_unlock(?)", (WRITE_LOCK,))
        except sqlite3.Error:
            conn.close()
            self._writer = None

    def _after_failure(self, conn: PgConnection) -> None:
        if conn.broken:
            log.warning("store: the connection to PostgreSQL broke; connecting again")
            conn.close()
            self._writer = None
            return
        try:
            conn.rollback()
        except sqlite3.Error:
            conn.close()
            self._writer = None

    @staticmethod
    def _resolve(batch: Batch, outcomes: Sequence[tuple[bool, Any]]) -> None:
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    # reads

    async def read(self, fn: Callable[[Any], T]) -> T:
        """``fn(conn)`` on a reader thread's connection (autocommit: each statement sees what
        was committed before it)."""
        return await self._loop.run_in_executor(self._readers, self._read, fn)

    def _read(self, fn: Callable[[Any], T]) -> T:
        conn: PgConnection | None = getattr(self._local, "conn", None)
        if conn is None or conn.broken:
            try:
                conn = connect(self.url)
            except StoreError as exc:
                raise sqlite3.OperationalError(str(exc)) from None
            self._local.conn = conn
            self._reader_connections.append(conn)
        return fn(conn)

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return await self.read(lambda conn: conn.execute(sql, tuple(params)).fetchall())


def _in_savepoint(conn: PgConnection, fn: WriteFn[Any]) -> tuple[bool, Any]:
    conn.execute("SAVEPOINT write")
    try:
        value = fn(conn)
    except Exception as exc:  # one caller's failure must not undo the others' writes
        if sqlstate(exc) in RETRYABLE or conn.broken:
            raise
        conn.execute("ROLLBACK TO write")
        conn.execute("RELEASE write")
        return False, exc
    conn.execute("RELEASE write")
    return True, value
