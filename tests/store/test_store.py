"""The store's group commit when another connection holds SQLite's write lock (another worker
process, a purge, a CLI command): the event loop goes on, the writes wait and then commit."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay.store.engine import Store, connect


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(tmp_path / "relay.db")
    store.writer.execute("CREATE TABLE notes (text TEXT)")
    yield store
    await store.close()


@pytest.fixture
def other(store: Store) -> Iterator[sqlite3.Connection]:
    """A second connection to the same file, holding the write lock."""
    conn = connect(store.path)
    conn.execute("BEGIN IMMEDIATE")
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


def note(text: str):
    return lambda conn: conn.execute("INSERT INTO notes VALUES (?)", (text,)).rowcount


async def turns_of_the_loop(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_write_waits_for_the_lock_without_stalling_the_loop(store, other):
    first = store.write(note("first"))
    await turns_of_the_loop(50)  # SQLite's busy handler would hold the loop here for seconds
    assert not first.done()
    second = store.write(note("second"))
    await turns_of_the_loop(50)
    batches = store.batches
    other.execute("COMMIT")
    assert await first == 1
    assert await second == 1
    assert store.batches == batches + 1  # what was written while waiting joined the batch
    rows = other.execute("SELECT text FROM notes ORDER BY rowid").fetchall()
    assert rows == [("first",), ("second",)]


async def test_a_write_fails_once_the_lock_stays_taken(store, other):
    store.lock_timeout = 0.05
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await store.write(note("lost"))
    other.execute("COMMIT")
    assert await store.write(note("later")) == 1  # the next write tries afresh
    assert other.execute("SELECT text FROM notes").fetchall() == [("later",)]


async def test_close_commits_the_writes_waiting_for_the_lock(tmp_path):
    store = await Store.open(tmp_path / "relay.db")
    store.writer.execute("CREATE TABLE notes (text TEXT)")
    other = connect(store.path)
    other.execute("BEGIN IMMEDIATE")
    pending = store.write(note("pending"))
    await turns_of_the_loop(5)
    assert not pending.done()
    other.execute("COMMIT")
    await store.close()
    assert pending.result() == 1
    assert other.execute("SELECT text FROM notes").fetchall() == [("pending",)]
    other.close()
