"""The ``relay`` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sqlite3
import sys
from collections.abc import Callable, Sequence

from relay import config as config_module
from relay.admin.commands import NO_CONFIG, config_option, fail, find_config, output
from relay.admin.concepts import CONCEPTS
from relay.config import redact_url
from relay.errors import ConfigError, InvalidInput, StoreError

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        if hasattr(args, "config") and args.config is None:
            args.config = find_config()
            if args.config is None:
                return fail(NO_CONFIG, 2)
        return args.run(args)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    except InvalidInput as exc:
        return fail(str(exc))
    except StoreError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # a store that opened but fails (read-only, corrupt page...)
        print(f"relay: store error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a port already in use, a directory that cannot be written...
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, run, text in (
        ("serve", _serve(smtp=True, http=True), "run the SMTP relay and the HTTP tracker"),
        ("smtp", _serve(smtp=True, http=False), "run the SMTP relay alone"),
        ("http", _serve(smtp=False, http=True), "run the HTTP tracker alone"),
        ("check-config", _check_config, "validate a configuration file"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        config_option(command, json_output=run is _check_config)
        command.set_defaults(run=run)
    hasher = commands.add_parser("hash-password", help="print a password hash for [[smtp.users]]")
    hasher.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input instead of prompting")
    hasher.add_argument("--json", action="store_true", help="print the result as JSON")
    hasher.set_defaults(run=_hash_password)
    for concept in CONCEPTS:
        concept.add_commands(commands, config_option)
    return parser


def _serve(*, smtp: bool, http: bool) -> Command:
    def run(args: argparse.Namespace) -> int:
        from relay.app import LOG_FORMAT, quiet_libraries, serve

        cfg = config_module.load(args.config)
        logging.basicConfig(level=cfg.log_level, format=LOG_FORMAT)
        quiet_libraries(cfg.log_level)
        return asyncio.run(serve(cfg, smtp=smtp, http=http))

    return run


def _check_config(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    upstream = (f"capture folder {cfg.upstream.capture_dir}" if cfg.upstream.capture_dir
                else f"{cfg.upstream.host}:{cfg.upstream.port} ({cfg.upstream.tls})")
    summary = {"file": args.config, "ok": True, "smtp_listen": str(cfg.smtp.listen),
               "upstream": upstream, "http_listen": str(cfg.http.listen),
               "public_url": cfg.http.public_url, "store": redact_url(cfg.store.url)}

    def human() -> None:
        print(f"{args.config}: ok")
        print(f"  smtp on {cfg.smtp.listen}, upstream {upstream}")
        print(f"  http on {cfg.http.listen}, tracking host {cfg.http.public_url}")
        print(f"  store {redact_url(cfg.store.url)}")

    return output(args, summary, human)


def _hash_password(args: argparse.Namespace) -> int:
    from relay.smtp.passwords import hash_password

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            return fail("passwords differ")
    if not password:
        return fail("empty password")
    hashed = hash_password(password)
    return output(args, {"password_hash": hashed}, lambda: print(hashed))
