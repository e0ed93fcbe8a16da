"""``relay users add|list|remove``: the people who may sign in to the dashboard
(relay/admin/dashboard/). Passwords are hashed as SMTP users' are (relay/smtp/passwords.py);
adding a user who exists changes the password and ends that user's sessions."""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time

from relay.admin.commands import Action, ConfigOption, add_group, fail, open_store, output
from relay.smtp.passwords import hash_password
from relay.store import users
from relay.store.transaction import transaction

NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
MAX_PASSWORD = 1024  # characters; scrypt hashes anything, a limit keeps a login cheap to read


def name_problem(name: str) -> str | None:
    if NAME.fullmatch(name):
        return None
    return "a user name is 1-64 letters, digits, '.', '_', '@', '+' or '-'"


def read_password() -> str | None:
    """From standard input when it is not a terminal (one line), else prompted twice; None
    (after saying why) when the two differ."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != password:
        print("relay: passwords differ", file=sys.stderr)
        return None
    return password


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    add_group(commands, "users", "people who sign in to the dashboard", config_option, [
        Action("add", "add a user, or set a user's password (read from standard input when "
                      "it is not a terminal, else prompted twice)", _add, "name"),
        Action("list", "list the users", _list),
        Action("remove", "remove a user and end their sessions", _remove, "name"),
    ])


def _add(args: argparse.Namespace) -> int:
    problem = name_problem(args.name)
    if problem:
        return fail(problem, 2)
    conn = open_store(args)
    password = read_password()
    if password is None:
        return 1
    if not password:
        return fail("empty password")
    if len(password) > MAX_PASSWORD:
        return fail(f"a password has at most {MAX_PASSWORD} characters")
    hashed = hash_password(password)
    with transaction(conn):
        new = users.set_user(conn, args.name, hashed, time.time())
    verb = "added" if new else "password changed, sessions ended:"
    return output(args, {"name": args.name, "added": new},
                  lambda: print(f"user {verb} {args.name}"))


def _list(args: argparse.Namespace) -> int:
    names = users.user_names(open_store(args))
    return output(args, {"users": names}, lambda: print("\n".join(names) or "no users"))


def _remove(args: argparse.Namespace) -> int:
    conn = open_store(args)
    with transaction(conn):
        removed = users.remove_user(conn, args.name)
    if not removed:
        return fail(f"no user {args.name!r}")
    return output(args, {"name": args.name, "removed": True},
                  lambda: print(f"user removed: {args.name}"))
