"""API keys: random secrets shown once at creation and stored only as SHA-256 hashes (they are
long and random, so a fast hash is enough), revocable, named for their owner."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sqlite3
import sys
import time

from relay.admin.commands import (
    Action,
    ConfigOption,
    add_group,
    fail,
    format_time,
    open_store,
    output,
    print_table,
)

PREFIX = "rk_"


def _hash(secret: str) -> bytes:
    # surrogatepass: a header with bytes that are not UTF-8 is just a wrong key
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def create(conn: sqlite3.Connection, name: str) -> str:
    """A new key for ``name``; the secret is returned once and never stored."""
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError("a key name is 1-64 letters, digits, '-' or '_'")
    secret = PREFIX + secrets.token_urlsafe(32)
    try:
        with conn:
            conn.execute("INSERT INTO api_keys VALUES (?, ?, ?, NULL)",
                         (name, _hash(secret), time.time()))
    except sqlite3.IntegrityError:
        raise ValueError(f"a key named {name!r} exists already") from None
    return secret


def revoke(conn: sqlite3.Connection, name: str) -> bool:
    with conn:
        cursor = conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (time.time(), name))
    return cursor.rowcount == 1


def listing(conn: sqlite3.Connection) -> list[tuple[str, float, float | None]]:
    query = "SELECT name, created_at, revoked_at FROM api_keys ORDER BY name"
    return conn.execute(query).fetchall()


def authenticate(conn: sqlite3.Connection, secret: str) -> str | None:
    """The key's name, or None when it is unknown or revoked.

    ``fetchall`` finishes the statement, so no read snapshot stays open on ``conn`` and a key
    revoked from another process stops working at once."""
    rows = conn.execute("SELECT name FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
                        (_hash(secret),)).fetchall()
    return rows[0][0] if rows else None


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    add_group(commands, "api-keys", "create, list and revoke API keys", config_option, [
        Action("create", "create a key and print it (once)", _create, "name"),
        Action("revoke", "revoke a key by name", _revoke, "name"),
        Action("list", "list keys (never their secrets)", _list),
    ])


def _create(args: argparse.Namespace) -> int:
    try:
        secret = create(open_store(args), args.name)
    except ValueError as exc:
        return fail(str(exc))

    def human() -> None:  # the key alone on standard output, for KEY=$(relay api-keys ...)
        print(secret)
        print(f"relay: created API key {args.name!r}; it is shown only this once. Send it as "
              "Authorization: Bearer <key>", file=sys.stderr)

    return output(args, {"name": args.name, "key": secret}, human)


def _revoke(args: argparse.Namespace) -> int:
    if not revoke(open_store(args), args.name):
        return fail(f"no active key named {args.name!r}")
    return output(args, {"name": args.name, "revoked": True},
                  lambda: print(f"revoked {args.name}"))


def _list(args: argparse.Namespace) -> int:
    keys = listing(open_store(args))
    return output(
        args,
        {"api_keys": [{"name": name, "created_at": created, "revoked_at": revoked}
                      for name, created, revoked in keys]},
        lambda: print_table(("NAME", "CREATED", "STATE"), [
            (name, format_time(created), f"revoked {format_time(revoked)}" if revoked
             else "active") for name, created, revoked in keys]))
