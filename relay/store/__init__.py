"""The store: the only package that writes SQL.

- ``engine``: the SQLite connection, the group commit (:class:`~relay.store.engine.Store`),
  the migrations; ``transaction``: the one write transaction for code holding its own
  connection; ``retention``: purging and erasure.
- One module of named functions per table group: ``messages`` (messages, recipients,
  processes), ``deliveries`` (the resend guard's deliveries and claims), ``events`` (events,
  engagement), ``counters`` (the daily statistics), ``outbox`` (the webhook tables), ``keys``
  (signing keys); ``reports`` builds the reads of the statistics, events and messages API.
  The rest of the relay calls these functions and writes no SQL of its own
  (tests/test_layout.py checks it).

The contract of a store function, so that a second engine (PostgreSQL) can run the same ones:

- It is a plain function whose first argument is a connection, and it uses only the DB-API
  subset ``conn.execute(sql, params)`` / ``conn.executemany(sql, rows)`` returning a cursor
  with ``fetchone()``, ``fetchall()``, iteration and ``rowcount``. It never commits: the caller
  decides the transaction (``Store.write``'s group commit, or ``transaction(conn)``).
- The reads that may scan (``reports``) are built as ``Query(sql, params)`` instead, so the
  API runs them on the store's reader (``await Store.fetchall(query.sql, query.params)``) and
  the CLI on its connection: the same contract for the SQL, run by the caller.
- Parameters are ``?`` placeholders (an adapter may rewrite them to ``%s``); rows are tuples
  read by position. A list of values is ``IN ({sql.placeholders(values)})``, never an empty
  ``IN ()``, which PostgreSQL refuses.
- The SQL is the subset SQLite and PostgreSQL share: ``INSERT ... ON CONFLICT (...) DO NOTHING``
  or ``DO UPDATE`` (not ``INSERT OR IGNORE/REPLACE``), no ``julianday``, no SQLite-only
  functions, times as REAL seconds since the epoch computed in Python; ``RETURNING`` where a
  new row's id is needed; in ``DO UPDATE SET`` the old row's columns are named by their table
  (``hits = engagement.hits + 1``: PostgreSQL finds a bare ``hits`` ambiguous).
- What PostgreSQL lacks of the shared SQL, relay/store/postgres.py supplies: the placeholders,
  ``rowid`` and ``temp.`` translated, SQLite's functions (``date``, ``json_each``,
  ``json_extract``), ``relay_lower`` and ``relay_domain`` defined on the server. Where
  SQLite's dialect remains, the module says so: a few index-bound reads of ``reports``.
"""
