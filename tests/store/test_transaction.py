"""relay/store/transaction.py: the one write transaction of code holding its own connection."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relay.store.engine import connect
from relay.store.transaction import transaction


@pytest.fixture
def conn(tmp_path: Path):
    conn = connect(tmp_path / "relay.db")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE parents (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE children (parent INTEGER REFERENCES parents (id)"
                 " DEFERRABLE INITIALLY DEFERRED)")
    yield conn
    conn.close()


def test_the_block_commits(conn):
    with transaction(conn):
        conn.execute("INSERT INTO parents VALUES (1)")
    assert not conn.in_transaction
    assert conn.execute("SELECT id FROM parents").fetchall() == [(1,)]


def test_an_error_in_the_block_rolls_back(conn):
    with pytest.raises(KeyError), transaction(conn):
        conn.execute("INSERT INTO parents VALUES (1)")
        raise KeyError("x")
    assert not conn.in_transaction
    assert conn.execute("SELECT id FROM parents").fetchall() == []


def test_a_failed_commit_rolls_back(conn):
    """A deferred foreign key fails at COMMIT, which leaves SQLite's transaction open: the
    connection must not stay inside it (the next BEGIN would fail)."""
    with pytest.raises(sqlite3.IntegrityError), transaction(conn):
        conn.execute("INSERT INTO children VALUES (7)")
    assert not conn.in_transaction
    with transaction(conn):
        conn.execute("INSERT INTO parents VALUES (7)")
        conn.execute("INSERT INTO children VALUES (7)")
    assert conn.execute("SELECT parent FROM children").fetchall() == [(7,)]
