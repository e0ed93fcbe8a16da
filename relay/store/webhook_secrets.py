"""The signing secrets of ``webhook_endpoints``, read for what the ``/v1/webhooks`` API shows of
them (relay/admin/v1_webhooks.py): their first characters, never the rest."""

from __future__ import annotations

import sqlite3

SHOWN = 12  # characters of a secret shown, as Anypost's signing_secret_prefix


def prefixes(conn: sqlite3.Connection) -> dict[str, str]:
    """Each endpoint's name and the first :data:`SHOWN` characters of its secret."""
    return dict(conn.execute(f"SELECT name, substr(secret, 1, {SHOWN}) FROM webhook_endpoints"
                             ).fetchall())
