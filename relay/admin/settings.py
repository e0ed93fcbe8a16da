"""Tracking settings at account and sender-domain level, kept in the store (the model:
relay/policy/settings.py; the message level is the control headers, relay/policy/decide.py),
plus what every stored rule shares:

- the **rules generation**: one counter row that every change to settings, tracking domains
  or tags increments in the same transaction. The mail path reads it per message (one
  primary-key lookup) and reloads its cached rules only when it moved, so a change made by
  any process (CLI, API, another relay) applies to the very next message.
- **seed once**: the config file seeds each item (the account defaults, each ``[[domains]]``
  entry, each tracking host, each tag) the first time a relay or a CLI command of that kind
  meets it, and remembers that in ``config_seeds``. From then on the store is the truth:
  editing a seeded item in the config changes nothing (a warning at start says so), and an
  item removed through the CLI or the API stays removed.

CLI: ``relay settings show|set|clear``. API: ``/api/v1/settings`` (see OPERATIONS).
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from aiohttp import web

from relay import config as config_module
from relay.admin.commands import ConfigOption, fail, output, print_table
from relay.admin.http import CONTEXT, Operation, json_body, json_response
from relay.config import Config
from relay.errors import ApiError, InvalidInput
from relay.policy import names
from relay.policy import settings as model
from relay.policy.settings import Account, Domain
from relay.store import engine as store
from relay.store.settings import (
    account,
    delete_domain,
    domain,
    domains,
    put_domain,
    seed_once,
    set_account,
)
from relay.store.transaction import transaction

log = logging.getLogger("relay.settings")


def seed(conn: sqlite3.Connection, config: Config) -> None:
    """Copy the config's account defaults and [[domains]] settings not seeded before."""
    configured = Account(config.tracking.opens, config.tracking.clicks)
    if seed_once(conn, "account", ""):
        set_account(conn, configured)
    elif account(conn) != configured:
        _kept("[tracking] opens/clicks", account(conn), configured)
    for entry in config.domains:
        if seed_once(conn, "domain", entry.name):
            put_domain(conn, entry.settings)
        elif (stored := domain(conn, entry.name)) != entry.settings:
            _kept(f"[[domains]] {entry.name}", stored, entry.settings)


def _kept(item: str, stored: Account | Domain | None, configured: Account | Domain) -> None:
    log.warning("%s: the store keeps %s (changed at run time); the config's %s is not applied"
                " (use `relay settings set` to change it)", item,
                _values(stored) if stored else "no settings", _values(configured))


def open_seeded(args: argparse.Namespace, seed_fn: Callable[[sqlite3.Connection, Config], None]
                ) -> tuple[Config, sqlite3.Connection]:
    """For a CLI command: the config, and its store migrated and seeded by ``seed_fn``."""
    cfg = config_module.load(args.config)
    conn = store.connect_url(cfg.store)
    with transaction(conn):
        seed_fn(conn, cfg)
    return cfg, conn


# --- CLI -----------------------------------------------------------------------------------

_SWITCH = {"on": True, "off": False, "inherit": None}


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    parser = commands.add_parser("settings", help="show and change tracking settings")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="account and sender-domain settings")
    show.set_defaults(run=_show)
    change = actions.add_parser(
        "set", help="change the account's settings, or a sender domain's with --domain")
    change.add_argument("--domain", help="a sender domain (default: the account)")
    change.add_argument("--opens", choices=list(_SWITCH), help="inherit: the account's (domain)")
    change.add_argument("--clicks", choices=list(_SWITCH))
    change.add_argument("--exclude-hosts", metavar="HOSTS",
                        help="comma-separated link hosts never rewritten (domain only; '' clears)")
    change.set_defaults(run=_set)
    clear = actions.add_parser("clear", help="drop a sender domain's settings (inherit all)")
    clear.add_argument("--domain", required=True)
    clear.set_defaults(run=_clear)
    for sub in (show, change, clear):
        config_option(sub)


def _show(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    acct, found = account(conn), list(domains(conn).values())

    def human() -> None:
        print(_describe(acct))
        rows = [(d.name, _word(d.opens), _word(d.clicks), ",".join(d.exclude_hosts) or "-")
                for d in found]
        if rows:
            print_table(("DOMAIN", "OPENS", "CLICKS", "EXCLUDE_HOSTS"), rows)

    return output(args, {"account": account_json(acct),
                         "domains": [domain_json(d) for d in found]}, human)


def _word(value: bool | None) -> str:
    return "inherit" if value is None else ("on" if value else "off")


def _describe(settings: Account | Domain) -> str:
    """One line, as ``relay settings show`` and ``set`` print it."""
    name = "account" if isinstance(settings, Account) else f"domain {settings.name}"
    return f"{name}: {_values(settings)}"


def _values(settings: Account | Domain) -> str:
    words = f"opens={_word(settings.opens)} clicks={_word(settings.clicks)}"
    if isinstance(settings, Domain):
        words += f" exclude_hosts={','.join(settings.exclude_hosts) or '-'}"
    return words


def _set(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    with transaction(conn):
        changed = _set_domain(conn, args) if args.domain else _set_account(conn, args)
    data = domain_json(changed) if isinstance(changed, Domain) else account_json(changed)
    return output(args, data, lambda: print(_describe(changed)))


def _set_account(conn: sqlite3.Connection, args: argparse.Namespace) -> Account:
    if args.exclude_hosts is not None:
        raise InvalidInput("--exclude-hosts is a per-domain setting: add --domain")
    if "inherit" in (args.opens, args.clicks):
        raise InvalidInput("the account has no 'inherit': use on or off")
    old = account(conn)
    new = Account(old.opens if args.opens is None else _SWITCH[args.opens],
                  old.clicks if args.clicks is None else _SWITCH[args.clicks])
    set_account(conn, new)
    return new


def _set_domain(conn: sqlite3.Connection, args: argparse.Namespace) -> Domain:
    name = names.domain_name(args.domain)
    old = domain(conn, name) or Domain(name)
    hosts: object = old.exclude_hosts
    if args.exclude_hosts is not None:
        hosts = [h for h in args.exclude_hosts.split(",") if h.strip()]
    new = model.domain(name, old.opens if args.opens is None else _SWITCH[args.opens],
                       old.clicks if args.clicks is None else _SWITCH[args.clicks], hosts)
    put_domain(conn, new)
    return new


def _clear(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    with transaction(conn):
        found = delete_domain(conn, names.normal(args.domain))
    if not found:
        return fail(f"no settings for domain {args.domain!r}")
    return output(args, {"domain": names.normal(args.domain), "cleared": True},
                  lambda: print(f"cleared {args.domain}: it follows the account's settings"))


# --- API -----------------------------------------------------------------------------------

def _flag(body: dict[str, Any], key: str, *, nullable: bool) -> bool | None:
    value = body.get(key)
    if isinstance(value, bool) or (value is None and nullable):
        return value
    raise InvalidInput(f"{key} must be true or false" + (" or null" if nullable else ""))


def account_json(settings: Account) -> dict[str, Any]:
    return {"opens": settings.opens, "clicks": settings.clicks}


def domain_json(settings: Domain) -> dict[str, Any]:
    return {"domain": settings.name, "opens": settings.opens, "clicks": settings.clicks,
            "exclude_hosts": list(settings.exclude_hosts)}


async def _get_all(request: web.Request) -> web.Response:
    stored_account, stored_domains = await request.app[CONTEXT].store.read(
        lambda conn: (account(conn), domains(conn)))
    return json_response({"account": account_json(stored_account),
                          "domains": [domain_json(d) for d in stored_domains.values()]})


async def _put_account(request: web.Request) -> web.Response:
    body = await json_body(request)
    new = Account(bool(_flag(body, "opens", nullable=False)),
                  bool(_flag(body, "clicks", nullable=False)))
    await request.app[CONTEXT].store.write(lambda conn: set_account(conn, new))
    return json_response(account_json(new))


def _domain_name(request: web.Request) -> str:
    return names.domain_name(request.match_info["domain"])


async def _get_domain(request: web.Request) -> web.Response:
    name = _domain_name(request)
    found = await request.app[CONTEXT].store.read(lambda conn: domain(conn, name))
    if found is None:
        raise ApiError(404, f"no settings for domain {name}: it follows the account's")
    return json_response(domain_json(found))


async def _put_domain(request: web.Request) -> web.Response:
    name = _domain_name(request)
    body = await json_body(request)
    new = model.domain(name, _flag(body, "opens", nullable=True),
                       _flag(body, "clicks", nullable=True), body.get("exclude_hosts", []))
    await request.app[CONTEXT].store.write(lambda conn: put_domain(conn, new))
    return json_response(domain_json(new))


async def _delete_domain(request: web.Request) -> web.Response:
    name = _domain_name(request)
    if not await request.app[CONTEXT].store.write(lambda conn: delete_domain(conn, name)):
        raise ApiError(404, f"no settings for domain {name}")
    return web.Response(status=204)


_DOMAIN_PARAM = [{"name": "domain", "in": "path", "required": True, "schema": {"type": "string"},
                  "description": "the sender domain (the From header's domain)"}]
_ACCOUNT_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["opens", "clicks"],
    "properties": {"opens": {"type": "boolean"}, "clicks": {"type": "boolean"}}}}}}
_DOMAIN_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object",
    "properties": {
        "opens": {"type": "boolean", "nullable": True, "description": "null: the account's"},
        "clicks": {"type": "boolean", "nullable": True, "description": "null: the account's"},
        "exclude_hosts": {"type": "array", "items": {"type": "string"},
                          "description": "link hosts never rewritten"}}}}}}
_TAGS = ["settings"]

OPERATIONS = [
    Operation("GET", "/settings", _get_all, "Account and sender-domain tracking settings",
              "getSettings", tags=_TAGS),
    Operation("PUT", "/settings/account", _put_account,
              "Set the account's tracking defaults (both toggles)", "putAccountSettings",
              request_body=_ACCOUNT_BODY, tags=_TAGS),
    Operation("GET", "/settings/domains/{domain}", _get_domain,
              "One sender domain's tracking settings", "getDomainSettings",
              parameters=_DOMAIN_PARAM, tags=_TAGS),
    Operation("PUT", "/settings/domains/{domain}", _put_domain,
              "Replace a sender domain's settings (omitted toggles: null, the account's)",
              "putDomainSettings", parameters=_DOMAIN_PARAM, request_body=_DOMAIN_BODY,
              tags=_TAGS),
    Operation("DELETE", "/settings/domains/{domain}", _delete_domain,
              "Drop a sender domain's settings: it follows the account's", "deleteDomainSettings",
              parameters=_DOMAIN_PARAM, responses={"204": {"description": "Deleted"}},
              tags=_TAGS),
]
