"""API keys: random secrets shown once at creation and stored only as SHA-256 hashes (they are
long and random, so a fast hash is enough), revocable, named for their owner."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sqlite3
import sys

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
from relay.errors import InvalidInput
from relay.store import apikeys as stored
from relay.store.transaction import transaction

PREFIX = "rk_"


def _hash(secret: str) -> bytes:
    # surrogatepass: a header with bytes that are not UTF-8 is just a wrong key
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def create(conn: sqlite3.Connection, name: str) -> str:
    """A new key for ``name``; the secret is returned once and never stored."""
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidInput("a key name is 1-64 letters, digits, '-' or '_'")
    secret = PREFIX + secrets.token_urlsafe(32)
    with transaction(conn):
        stored.insert(conn, name, _hash(secret))
    return secret


def revoke(conn: sqlite3.Connection, name: str) -> bool:
    with transaction(conn):
        return stored.revoke(conn, name)


def authenticate(conn: sqlite3.Connection, secret: str) -> str | None:
    """The key's name, or None when it is unknown or revoked."""
    return stored.active(conn, _hash(secret))


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    add_group(commands, "api-keys", "create, list and revoke API keys", config_option, [
        Action("create", "create a key and print it (once)", _create, "name"),
        Action("revoke", "revoke a key by name", _revoke, "name"),
        Action("list", "list keys (never their secrets)", _list),
    ])


def _create(args: argparse.Namespace) -> int:
    secret = create(open_store(args), args.name)

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
    keys = stored.listing(open_store(args))
    return output(
        args,
        {"api_keys": [{"name": name, "created_at": created, "revoked_at": revoked}
                      for name, created, revoked in keys]},
        lambda: print_table(("NAME", "CREATED", "STATE"), [
            (name, format_time(created), f"revoked {format_time(revoked)}" if revoked
             else "active") for name, created, revoked in keys]))
