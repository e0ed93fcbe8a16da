"""The one write transaction for code that holds a connection of its own (the CLI, migrations,
rebuilds, the purge); the relay's request path goes through :meth:`Store.write`'s group commit
instead (relay/store/engine.py)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


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
