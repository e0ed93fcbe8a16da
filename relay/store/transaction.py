"""The one write transaction for code that holds a connection of its own (the CLI, migrations,
rebuilds, the purge); the relay's request path goes through :meth:`Store.write`'s group commit
instead (relay/store/engine.py).

On PostgreSQL that transaction is SERIALIZABLE (relay/store/postgres.py translate), and the
server may abort it for a conflict with another node's or the relay's own writes:
:func:`retrying` runs such a transaction again, for the writer's group commits and for
:func:`transact`'s callers alike."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
# A committed write's future with its outcome: (future, ok, value or exception).
Resolution = tuple["asyncio.Future[Any]", bool, Any]
# A transaction that PostgreSQL aborted (serialization failure, deadlock) is run again this often.
RETRIES = 20
RETRYABLE = frozenset({"40001", "40P01"})
# Before the n-th run again, wait a random time up to RETRY_WAIT * 2**n seconds (n at most 7:
# 0.26 s).
RETRY_WAIT = 0.002


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error (relay/store/postgres.py _error); None otherwise."""
    return getattr(exc, "sqlstate", None)


def retrying(run: Callable[[], T], rolled_back: Callable[[], None] = lambda: None) -> T:
    """``run()``, run again (after ``rolled_back()``) while it raises a conflict PostgreSQL
    aborted it for; ``run`` must have rolled its transaction back before raising. After
    :data:`RETRIES` runs, ``sqlite3.OperationalError``. SQLite raises no such conflict (its
    writers wait for the write lock instead): there ``run()`` runs once."""
    for attempt in range(RETRIES):
        try:
            return run()
        except Exception as exc:
            if sqlstate(exc) not in RETRYABLE:
                raise
        # Two busy writers retrying at once meet again: wait a random while, longer after each
        # failure, so that one gets through (measured: chains of 20 aborts without it, two
        # relays delivering one queue).
        time.sleep(random.uniform(0, RETRY_WAIT * 2 ** min(attempt, 7)))
        rolled_back()
    raise sqlite3.OperationalError(f"transaction aborted {RETRIES} times by conflicts")


def transact(conn: Any, fn: Callable[[Any], T]) -> T:
    """``fn(conn)`` in :func:`transaction`, run again when PostgreSQL aborts it for a conflict
    (:func:`retrying`); ``fn`` must be safe to run again. Inside a transaction already, once:
    a conflict aborts the caller's whole transaction, which only the caller can run again."""
    if conn.in_transaction:
        with transaction(conn):
            return fn(conn)

    def run() -> T:
        with transaction(conn):
            return fn(conn)

    return retrying(run)


def must_rerun(exc: BaseException) -> bool:
    """Whether ``exc`` means the whole transaction must run again (:func:`retrying`): code
    that rolls back a savepoint of its own and goes on must let such an error through, or the
    rest of the transaction would commit without what the savepoint wrote."""
    return sqlstate(exc) in RETRYABLE


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (the write lock taken at once, so a reader never has to be upgraded
    half way), ``COMMIT`` when the block ends, ``ROLLBACK`` if it or the commit raised.

    ``conn`` is an autocommit connection (``isolation_level=None``, as
    :func:`relay.store.engine.connect` opens them) or anything with the same ``execute``. In a
    transaction already (a function run by ``Store.write``), the block is a savepoint of it."""
    if conn.in_transaction:
        with savepoint(conn, "nested"):
            yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def savepoint(conn: sqlite3.Connection, name: str) -> Iterator[sqlite3.Connection]:
    """A nested part of the caller's transaction: if the block raises, what it wrote is
    rolled back (the rest of the transaction stays) and the exception goes on."""
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield conn
    except BaseException:
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")
        raise
    conn.execute(f"RELEASE {name}")


@contextlib.contextmanager
def snapshot(conn: Any) -> Iterator[Any]:
    """A long read that sees one snapshot of the store throughout, and writes nothing (``relay
    store copy``'s source); rolled back when the block ends. On PostgreSQL ``REPEATABLE READ
    READ ONLY``: the one snapshot of SERIALIZABLE without its predicate locks, which a read of
    millions of rows takes by the million from a pool every database of the server shares
    ("out of shared memory" for the other sessions). On SQLite a deferred ``BEGIN``: its
    first read fixes the snapshot (WAL mode), and it takes no write lock."""
    if isinstance(conn, sqlite3.Connection):
        conn.execute("BEGIN")
    else:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")


def resolve(results: list[Resolution]) -> None:
    """Hand each caller of a group commit its outcome (a caller that gave up is skipped):
    the one way both engines end a batch's futures."""
    for future, ok, value in results:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
