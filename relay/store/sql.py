"""SQL text the store's modules build at run time, in the dialect both engines take."""

from __future__ import annotations

from collections.abc import Sized


def placeholders(values: Sized) -> str:
    """One ``?`` per value, for ``x IN (...)``; for none, ``NULL``, which nothing equals:
    PostgreSQL takes no empty list, and ``x IN (NULL)`` is never true, as ``x IN ()`` is
    never in SQLite. Not for ``NOT IN``, which is never true either with ``NULL``."""
    return ", ".join("?" * len(values)) or "NULL"
