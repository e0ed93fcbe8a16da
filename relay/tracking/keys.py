"""The keyring of tracking tokens: the configured keys, or one generated on first start and kept
in the store, so links keep working across restarts without any setting."""

from __future__ import annotations

import os
import sqlite3
import time

from relay.config import TrackingSettings
from relay.store import keys as signing_keys
from relay.tracking.tokens import Keyring

GENERATED_KID = "g1"


def load_keyring(settings: TrackingSettings, conn: sqlite3.Connection) -> Keyring:
    """Configured keys plus any generated one (old links made with it keep working); ``conn``
    is in a write transaction (Store.write) or in autocommit mode."""
    keys = dict(signing_keys.stored(conn))
    keys.update({kid: secret.encode() for kid, secret in settings.keys})
    if settings.current_key:
        return Keyring(keys, settings.current_key)
    if GENERATED_KID not in keys:
        keys[GENERATED_KID] = _generate(conn)
    return Keyring(keys, GENERATED_KID)


def _generate(conn: sqlite3.Connection) -> bytes:
    """The generated key: made by the first node to start, read by every other one."""
    return signing_keys.add_once(conn, GENERATED_KID, os.urandom(32), time.time())
