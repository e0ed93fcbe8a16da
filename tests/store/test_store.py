"""The store's group commit when another connection holds SQLite's write lock (another worker
process, a purge, a CLI command): the event loop goes on, the writes wait and then commit; and
durable writes, answered once their commit is fsync'd."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay.store import engine
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


async def test_a_durable_write_resolves_once_the_wal_is_fsynced_off_the_loop(store, monkeypatch):
    """Queue mode's 250 follows an fsync of the WAL holding its commit. The fsync runs on a
    thread: the loop and other writes go on meanwhile, and the durable writes committed while
    it runs share the next one."""
    started, release = threading.Event(), threading.Event()
    synced: list[int] = []  # the inode of each file fsync'd
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        started.set()
        release.wait(10)
        fsync(fd)
        synced.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(engine.os, "fsync", slow_fsync)
    first = store.write(note("first"), durable=True)
    assert await asyncio.to_thread(started.wait, 10), "no fsync"
    assert not first.done()
    assert await store.write(note("plain")) == 1  # not durable: answered after its commit
    second = store.write(note("second"), durable=True)
    await turns_of_the_loop(5)
    third = store.write(note("third"), durable=True)
    await turns_of_the_loop(5)
    assert not (first.done() or second.done() or third.done())
    release.set()
    assert [await first, await second, await third] == [1, 1, 1]
    wal = os.stat(f"{store.path}-wal").st_ino
    assert synced.count(wal) == 2  # the second and the third shared one
    other = connect(store.path)
    assert other.execute("SELECT text FROM notes ORDER BY rowid").fetchall() == [
        ("first",), ("plain",), ("second",), ("third",)]
    other.close()
