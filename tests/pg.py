"""PostgreSQL for the tests: a database of this test run (dropped at its end), and a schema of
its own for each store a test makes, so tests stay independent.

``RELAY_TEST_STORE=postgresql`` makes the relays of the tests (harness.base_settings) use such a
schema instead of a SQLite file; ``RELAY_TEST_PG`` names the server (default: the local one,
trust authentication, as .ci/run starts it).
"""

from __future__ import annotations

import os
import uuid
from typing import Any
from urllib.parse import quote

import psycopg

from relay.store.postgres import PgConnection, connect

SERVER = os.environ.get("RELAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
ENGINE = os.environ.get("RELAY_TEST_STORE", "sqlite")
_database: str | None = None


def database() -> str:
    """This run's database, made on first use."""
    global _database
    if _database is None:
        name = f"relay_tests_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        _database = name
    return _database


def drop_database() -> None:
    global _database
    if _database is not None:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{_database}" WITH (FORCE)')
        _database = None


def schema_url() -> str:
    """The URL of a new, empty schema (``search_path`` set by the URL's options)."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    base = f"{SERVER}/{database()}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{base}?options={quote(f'-csearch_path={schema}', safe='')}"


class Row(tuple):
    """A row read by index or by column name, as sqlite3.Row."""

    names: list[str]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return self.names


def _rows(cursor: Any) -> Any:
    names = [column.name for column in cursor.description or ()]

    def make(values: Any) -> Row:
        row = Row(values)
        row.names = names
        return row

    return make


def connect_rows(url: str) -> PgConnection:
    """A connection to ``url`` whose rows read as sqlite3.Row's (tests read columns by name)."""
    conn = connect(url)
    conn.raw.row_factory = _rows
    return conn
