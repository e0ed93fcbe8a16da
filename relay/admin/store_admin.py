"""``relay migrate`` and ``relay store copy`` (what they do: relay/store/engine.py migrate,
relay/store/postgres.py migrate, relay/store/copy.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from relay import config as config_module
from relay.admin.commands import ConfigOption, fail, output, print_table
from relay.config import redact_url
from relay.store import copy as store_copy
from relay.store import engine as store


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    migrator = commands.add_parser(
        "migrate", help="bring the store's schema up to date",
        description="Apply the schema migrations the store of [store] url has not seen "
                    "(nodes starting at once wait for each other; relay serve does it too).")
    config_option(migrator)
    migrator.set_defaults(run=_migrate)
    group = commands.add_parser("store", help="move a store's data").add_subparsers(
        title="actions", metavar="ACTION", required=True)
    copier = group.add_parser(
        "copy", help="copy every row of one store into another, empty one",
        description="Copy messages, events, counters, settings, keys and webhook state from "
                    "--from into --to (both migrated first; --to must be empty), in one "
                    "transaction, checking every table's row count. Stop the relay first.")
    copier.add_argument("--from", dest="source", required=True, metavar="URL",
                        help="sqlite:///PATH or postgresql://...")
    copier.add_argument("--to", dest="target", required=True, metavar="URL")
    copier.add_argument("--json", action="store_true", help="print the result as JSON")
    copier.set_defaults(run=_copy)


def _migrate(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    conn = store.connect_url(cfg.store)  # migrates, and refuses a newer schema
    try:
        names = store.applied_migrations(conn)
    finally:
        conn.close()
    where = redact_url(cfg.store.url)
    return output(args, {"store": where, "migrations": names},
                  lambda: print(f"{where}: schema up to date ({len(names)} migrations)"))


def _copy(args: argparse.Namespace) -> int:
    here = Path(os.getcwd())
    source_settings = config_module.store_settings(args.source, "command line", "--from", here)
    target_settings = config_module.store_settings(args.target, "command line", "--to", here)
    if source_settings.url == target_settings.url:
        return fail("--from and --to name the same store")
    source = store.connect_url(source_settings)
    target = store.connect_url(target_settings)
    try:
        copied = store_copy.copy(source, target)
    except ValueError as exc:
        return fail(f"nothing copied: {exc}")
    finally:
        source.close()
        target.close()
    total = sum(copied.values())
    return output(args, {"copied": copied, "rows": total},
                  lambda: (print_table(["table", "rows"], sorted(copied.items())),
                           print(f"{total} rows copied, counts checked")))
