"""The SQLite store: connection, group commit, migrations; retention and erasure."""
