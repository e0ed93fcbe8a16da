"""``relay store copy``: every row of one store into another, empty one (SQLite to PostgreSQL
when an installation outgrows one machine, or back).

Both stores are migrated first, so they have the same tables; the target must hold nothing but
what its migrations put there. The copy is one transaction on the target: it is all there,
with every table's row count checked against the source, or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from relay.store.engine import MIGRATIONS
from relay.store.transaction import snapshot

CHUNK = 2000
# Rows the migrations themselves insert (relay/store/engine.py 0004_settings, 0054_queue):
# replaced.
SEEDED = frozenset({"rules_generation", "account_settings", "queue_totals"})
_TABLE = re.compile(r"(CREATE|DROP) TABLE (?:IF EXISTS )?(\w+)", re.IGNORECASE)


def tables() -> list[str]:
    """The store's tables in the order they were created (a referenced table comes before the
    tables that reference it), less those a later migration dropped."""
    names: list[str] = []
    for script in MIGRATIONS.values():
        for verb, name in _TABLE.findall(script):
            if name in names:
                names.remove(name)
            if verb.upper() == "CREATE":
                names.append(name)
    return names


def count(conn: Any, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def not_empty(conn: Any) -> dict[str, int]:
    """The tables of ``conn`` holding rows its migrations did not put there."""
    counts = {table: count(conn, table) for table in tables() if table not in SEEDED}
    return {table: n for table, n in counts.items() if n}


def copy(source: Any, target: Any) -> dict[str, int]:
    """Copy every table of ``source`` into ``target`` (both migrated; the target empty) in one
    transaction; returns the rows copied per table. ValueError (nothing copied) when the target
    is not empty or a count differs after the copy."""
    filled = not_empty(target)
    if filled:
        listed = ", ".join(f"{table} ({n} rows)" for table, n in sorted(filled.items()))
        raise ValueError(f"the target store is not empty: {listed}")
    copied: dict[str, int] = {}
    # One snapshot of the source, so that the counts checked at the end are those of the rows
    # copied even while a relay still writes to it.
    with snapshot(source):
        # A plain BEGIN (READ COMMITTED on PostgreSQL), not transaction()'s SERIALIZABLE:
        # reading millions of rows back for the counts there took more predicate locks than
        # the server has room for ("out of shared memory"); nothing else writes to a target
        # that was empty.
        target.execute("BEGIN")
        try:
            _copy_all(source, target, copied)
            target.execute("COMMIT")
        except BaseException:
            target.execute("ROLLBACK")
            raise
    return copied


def _copy_all(source: Any, target: Any, copied: dict[str, int]) -> None:
    for table in tables():
        if table in SEEDED:
            target.execute(f"DELETE FROM {table}")
        copied[table] = _copy_table(source, target, table)
    differ = {table: (count(source, table), count(target, table)) for table in copied}
    differ = {table: counts for table, counts in differ.items() if counts[0] != counts[1]}
    if differ:
        raise ValueError("row counts differ after the copy (source, target): " + ", ".join(
            f"{table} {counts}" for table, counts in differ.items()))
    _restart_identities(target)


def _copy_table(source: Any, target: Any, table: str) -> int:
    """The rows of ``table``: in chunks of INSERTs, or with PostgreSQL's COPY into a
    PostgreSQL target (``copy_rows``)."""
    cursor = source.execute(f"SELECT * FROM {table}")
    columns = [column[0] for column in cursor.description]
    insert = (f"INSERT INTO {table} ({', '.join(columns)}) "
              f"VALUES ({', '.join('?' * len(columns))})")
    copy_rows = getattr(target, "copy_rows", None)
    total = 0
    for rows in _chunks(cursor):
        if copy_rows is not None:
            copy_rows(table, columns, rows)
        else:
            target.executemany(insert, rows)
        total += len(rows)
    return total


def _chunks(cursor: Any) -> Iterator[list[Any]]:
    while rows := cursor.fetchmany(CHUNK):
        yield rows


def _restart_identities(target: Any) -> None:
    """PostgreSQL's identity columns (SQLite's INTEGER PRIMARY KEY) go on after the copied
    values; SQLite needs nothing."""
    restart = getattr(target, "restart_identities", None)
    if restart is not None:
        restart()
