"""The keyring of tracking tokens: the configured keys, or one generated on first start and kept
in the store, so links keep working across restarts without any setting."""

from __future__ import annotations

import os
import sqlite3
import time

from relay.config import TrackingSettings
from relay.tracking.tokens import Keyring

GENERATED_KID = "g1"


def load_keyring(settings: TrackingSettings, conn: sqlite3.Connection) -> Keyring:
    """Configured keys plus any generated one (old links made with it keep working)."""
    keys = {kid: secret for kid, secret in _stored_keys(conn)}
    keys.update({kid: secret.encode() for kid, secret in settings.keys})
    if settings.current_key:
        return Keyring(keys, settings.current_key)
    if GENERATED_KID not in keys:
        keys[GENERATED_KID] = _generate(conn)
    return Keyring(keys, GENERATED_KID)


def _stored_keys(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
    return [(kid, bytes(secret)) for kid, secret in conn.execute(
        "SELECT kid, secret FROM signing_keys ORDER BY created_at")]


def _generate(conn: sqlite3.Connection) -> bytes:
    secret = os.urandom(32)
    with conn:
        conn.execute("INSERT OR IGNORE INTO signing_keys VALUES (?, ?, ?)",
                     (GENERATED_KID, secret, time.time()))
    [(secret,)] = conn.execute("SELECT secret FROM signing_keys WHERE kid = ?",
                               (GENERATED_KID,)).fetchall()
    return bytes(secret)
