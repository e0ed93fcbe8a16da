"""PostgreSQL for the tests: a database of this test run (dropped at its end), and a schema of
its own for each store a test makes, so tests stay independent.

``RELAY_TEST_STORE=postgresql`` makes the relays of the tests (harness.base_settings) use such a
schema instead of a SQLite file; ``RELAY_TEST_PG`` names the server (default: the local one,
trust authentication, as .ci/run starts it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
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


class Cluster:
    """A throwaway PostgreSQL server of its own (``initdb`` in a new folder, ``pg_ctl`` on a
    free loopback port) for a test that stops and restarts it, so that the server the other
    tests share is never restarted. The server refuses to run as root: as root, its folder
    belongs to the ``postgres`` user and its commands run as that user."""

    def __init__(self) -> None:
        from tests.harness import free_port

        bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                         key=lambda p: int(p.parent.parent.name))
        if not bindirs:
            raise RuntimeError("no PostgreSQL server programs in /usr/lib/postgresql/*/bin")
        self.bin = bindirs[-1].parent
        self.folder = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                 "--no-sync", "-E", "UTF8")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed: {done.stderr or done.stdout}")

    def start(self) -> None:
        """Start the server and wait until it takes connections."""
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.folder} -c fsync=off")
        self._pg("pg_ctl", "start", "-w", "-D", str(self.data), "-o", options,
                 "-l", str(self.folder / "server.log"))

    def stop(self) -> None:
        """A fast shutdown, as a restart or a failover looks to clients: every session is
        ended, and new connections are refused until :meth:`start`."""
        self._pg("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
