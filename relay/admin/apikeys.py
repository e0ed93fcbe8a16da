"""API keys: random secrets shown once at creation and stored only as SHA-256 hashes (they are
long and random, so a fast hash is enough), revocable, named for their owner. A key may do
everything (``full``) or only send mail through ``/v1/`` (``send_only``, as Anypost's keys)."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sqlite3
import sys
from typing import NamedTuple

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
FULL, SEND_ONLY = "full", "send_only"


class ApiKey(NamedTuple):
    name: str
    permissions: str  # FULL or SEND_ONLY


def _hash(secret: str) -> bytes:
    # surrogatepass: a header with bytes that are not UTF-8 is just a wrong key
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def create(conn: sqlite3.Connection, name: str, permissions: str = FULL) -> str:
    """A new key for ``name``; the secret is returned once and never stored."""
    if permissions not in (FULL, SEND_ONLY):
        raise InvalidInput(f"permissions are {FULL} or {SEND_ONLY}")
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidInput("a key name is 1-64 letters, digits, '-' or '_'")
    secret = PREFIX + secrets.token_urlsafe(32)
    with transaction(conn):
        stored.insert(conn, name, _hash(secret), permissions)
    return secret


def revoke(conn: sqlite3.Connection, name: str) -> bool:
    with transaction(conn):
        return stored.revoke(conn, name)


def authenticate(conn: sqlite3.Connection, secret: str) -> ApiKey | None:
    """The key, or None when it is unknown or revoked."""
    found = stored.active(conn, _hash(secret))
    return None if found is None else ApiKey(*found)


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    parsers = add_group(commands, "api-keys", "create, list and revoke API keys",
                        config_option, [
        Action("create", "create a key and print it (once)", _create, "name"),
        Action("revoke", "revoke a key by name", _revoke, "name"),
        Action("list", "list keys (never their secrets)", _list),
    ])
    parsers["create"].add_argument(
        "--send-only", action="store_true",
        help="the key may only send mail (POST /v1/email, /v1/email/batch, GET /v1/whoami)")


def _create(args: argparse.Namespace) -> int:
    permissions = SEND_ONLY if args.send_only else FULL
    secret = create(open_store(args), args.name, permissions)

    def human() -> None:  # the key alone on standard output, for KEY=$(relay api-keys ...)
        print(secret)
        print(f"relay: created API key {args.name!r}; it is shown only this once. Send it as "
              "Authorization: Bearer <key>", file=sys.stderr)

    return output(args, {"name": args.name, "key": secret, "permissions": permissions}, human)


def _revoke(args: argparse.Namespace) -> int:
    if not revoke(open_store(args), args.name):
        return fail(f"no active key named {args.name!r}")
    return output(args, {"name": args.name, "revoked": True},
                  lambda: print(f"revoked {args.name}"))


def _list(args: argparse.Namespace) -> int:
    keys = stored.listing(open_store(args))
    return output(
        args,
        {"api_keys": [{"name": name, "created_at": created, "revoked_at": revoked,
                       "permissions": permissions}
                      for name, created, revoked, permissions in keys]},
        lambda: print_table(("NAME", "CREATED", "STATE", "PERMISSIONS"), [
            (name, format_time(created), f"revoked {format_time(revoked)}" if revoked
             else "active", permissions) for name, created, revoked, permissions in keys]))
