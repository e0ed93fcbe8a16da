"""The store: the only package that writes SQL.

- ``engine``: the SQLite connection, the group commit (:class:`~relay.store.engine.Store`),
  the migrations; ``transaction``: the one write transaction for code holding its own
  connection; ``retention``: purging and erasure.
- One module of named functions per table group (messages and recipients, events, daily
  counters, the webhook outbox, signing keys, ...). The rest of the relay calls these
  functions and writes no SQL of its own.

The contract of a store function, so that a second engine (PostgreSQL) can run the same ones:

- It is a plain function whose first argument is a connection, and it uses only the DB-API
  subset ``conn.execute(sql, params)`` / ``conn.executemany(sql, rows)`` returning a cursor
  with ``fetchone()``, ``fetchall()``, iteration and ``rowcount``. It never commits: the caller
  decides the transaction (``Store.write``'s group commit, or ``transaction(conn)``).
- Parameters are ``?`` placeholders (an adapter may rewrite them to ``%s``); rows are tuples
  read by position.
- The SQL is the subset SQLite and PostgreSQL share: ``INSERT ... ON CONFLICT (...) DO NOTHING``
  or ``DO UPDATE`` (not ``INSERT OR IGNORE/REPLACE``), no ``julianday``, no SQLite-only
  functions, times as REAL seconds since the epoch computed in Python.
"""
