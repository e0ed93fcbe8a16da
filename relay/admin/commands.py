"""What the ``relay`` subcommands share: the --config and --json options, the store, output
helpers.

Concept modules expose ``add_commands(commands, config_option)``; relay/admin/concepts.py lists
them.
Every command that prints a result prints it for people, or with ``--json`` as one JSON
document for machines (:func:`output`); errors go to standard error either way.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relay import config as config_module
from relay.store import engine as store

# Where a command finds its config when --config is not given: this variable, else the first
# file of CONFIG_SEARCH that exists (the second is where the systemd units read it).
CONFIG_ENV = "RELAY_CONFIG"
CONFIG_SEARCH = ("./relay.toml", "/etc/relay/relay.toml")

ConfigOption = Callable[..., None]


def config_option(command: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    """--config, and --json for a command that prints a result."""
    command.add_argument("--config", "-c", metavar="FILE",
                         help=f"configuration file (default: ${CONFIG_ENV}, else the first of "
                              f"{', '.join(CONFIG_SEARCH)} that exists)")
    if json_output:
        command.add_argument("--json", action="store_true",
                             help="print the result as JSON, for scripts")


def find_config() -> str | None:
    """The config file to use when --config is not given, or None when there is none."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return named
    return next((path for path in CONFIG_SEARCH if os.path.isfile(path)), None)


NO_CONFIG = (f"no configuration file: give --config FILE or set {CONFIG_ENV} "
             f"(tried {', '.join(CONFIG_SEARCH)})")


@dataclass(frozen=True)
class Action:
    """One ``relay GROUP ACTION`` subcommand: its name, help, what runs it, and its
    positional argument (if any)."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    argument: str | None = None


def add_group(commands: argparse._SubParsersAction, name: str, help: str,
              config_option: ConfigOption, actions: Sequence[Action]
              ) -> dict[str, argparse.ArgumentParser]:
    """``relay NAME ACTION ...``, each action with --config; returns the action parsers, for
    options of their own."""
    parser = commands.add_parser(name, help=help)
    sub = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    parsers = {}
    for action in actions:
        action_parser = sub.add_parser(action.name, help=action.help)
        if action.argument:
            action_parser.add_argument(action.argument)
        action_parser.set_defaults(run=action.run)
        config_option(action_parser)
        parsers[action.name] = action_parser
    return parsers


def open_store(args: argparse.Namespace) -> sqlite3.Connection:
    """The store named by the --config file, migrated, for a command that reads or writes it."""
    cfg = config_module.load(args.config)
    return store.connect_url(cfg.store)


def fail(message: str, code: int = 1) -> int:
    print(f"relay: {message}", file=sys.stderr)
    return code


def output(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> int:
    """Print a command's result: ``data`` as JSON with --json, else ``human()``'s text."""
    if getattr(args, "json", False):
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        human()
    return 0


def format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp)) + "Z"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain, aligned text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
