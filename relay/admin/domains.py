"""Tracking domains, managed (the model and its rules: relay/policy/domains.py; the DNS
lookup: relay/admin/dnscheck.py). CLI: ``relay domains add|verify|list|remove``; API:
``/api/v1/tracking-domains``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import time
from dataclasses import asdict
from typing import Any

from aiohttp import web

from relay.admin.commands import (
    Action,
    ConfigOption,
    add_group,
    fail,
    format_time,
    output,
    print_table,
)
from relay.admin.dnscheck import check, make_resolver, record_check, report, verify
from relay.admin.http import CONTEXT, Operation, json_body, json_response
from relay.admin.settings import open_seeded
from relay.certs.plan import FAILED as CERT_FAILED
from relay.certs.plan import Certificate
from relay.config import Config
from relay.errors import ApiError, InvalidInput
from relay.policy import domains as model
from relay.policy import names
from relay.policy.domains import (
    MATCH,
    VERIFIED,
    TrackingDomain,
    branded_url,
    cname_target,
    dns_record,
)
from relay.store import certificates
from relay.store import domains as stored
from relay.store.settings import seed_once
from relay.store.transaction import transaction

log = logging.getLogger("relay.domains")


def add(conn: sqlite3.Connection, host: str, sender_domain: str | None = None
        ) -> TrackingDomain:
    """Validate and add ``host`` (pending) for ``sender_domain`` (default: the host's parent)."""
    domain = model.new(host, sender_domain, time.time())
    stored.add(conn, domain)
    return domain


def seed(conn: sqlite3.Connection, config: Config) -> None:
    """Add each ``[[domains]] tracking_host`` not seeded before (pending)."""
    for entry in config.domains:
        if entry.tracking_host and seed_once(conn, "tracking_domain", entry.tracking_host):
            try:
                add(conn, entry.tracking_host, entry.name)
            except InvalidInput as exc:
                log.warning("[[domains]] %s: tracking_host not added: %s", entry.name, exc)


# --- CLI -----------------------------------------------------------------------------------

def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    parsers = add_group(
        commands, "domains", "tracking domains: add, verify, list, remove", config_option, [
            Action("add", "add a tracking host (pending until verified)", _add, "host"),
            Action("verify", "look up the CNAME now, store the result", _verify, "host"),
            Action("list", "tracking domains and their states", _list),
            Action("remove", "remove a tracking host", _remove, "host"),
        ])
    parsers["add"].add_argument("--sender", metavar="DOMAIN",
                                help="the sender domain it serves (default: the host's parent)")


def _add(args: argparse.Namespace) -> int:
    cfg, conn = open_seeded(args, seed)
    with transaction(conn):
        domain = add(conn, args.host, args.sender)

    def human() -> None:
        print(f"added {domain.host} for {domain.sender_domain} (pending). Create this DNS "
              f"record, then run `relay domains verify {domain.host}`:")
        print(f"  {dns_record(domain.host, cname_target(cfg.http.public_url))}")

    return output(args, domain_json(domain, cfg.http.public_url), human)


def _verify(args: argparse.Namespace) -> int:
    cfg, conn = open_seeded(args, seed)
    host = names.normal(args.host)
    if stored.get(conn, host) is None:
        return fail(f"no tracking domain {args.host!r}")
    result = asyncio.run(check(host, cname_target(cfg.http.public_url), make_resolver(cfg.dns)))
    with transaction(conn):
        domain = record_check(conn, host, result, time.time())
    if domain is None:
        return fail(f"{args.host!r} was removed meanwhile")
    report(domain, result)
    output(args, {**domain_json(domain, cfg.http.public_url), "check": asdict(result)},
           lambda: print(f"{domain.host}: {domain.state} ({result.detail})"))
    return 0 if domain.state == VERIFIED and result.result == MATCH else 1


def _list(args: argparse.Namespace) -> int:
    cfg, conn = open_seeded(args, seed)
    found = stored.listing(conn)
    default = cname_target(cfg.http.public_url)
    default_cert = certificates.get(conn, default)

    def human() -> None:
        print_table(("HOST", "SENDER", "STATE", "CHECKED", "LAST CHECK", "CERTIFICATE"), [
            (d.host, d.sender_domain, d.state, format_time(d.checked_at), d.last_check or "-",
             _certificate_text(certificates.get(conn, d.host))) for d in found])
        if default_cert is not None:
            print(f"default tracking host {default}: certificate "
                  f"{_certificate_text(default_cert)}")

    return output(args, {"domains": [domain_json(d, cfg.http.public_url, conn) for d in found],
                         "default_host": {"host": default,
                                          "certificate": certificate_json(default_cert)}},
                  human)


def _remove(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    with transaction(conn):
        removed = stored.remove(conn, args.host)
    if not removed:
        return fail(f"no tracking domain {args.host!r}")
    return output(args, {"host": names.normal(args.host), "removed": True},
                  lambda: print(f"removed {args.host}"))


# --- API -----------------------------------------------------------------------------------

def domain_json(domain: TrackingDomain, public_url: str,
                conn: sqlite3.Connection | None = None) -> dict[str, Any]:
    """The domain as the API and ``--json`` show it; with ``conn``, its TLS certificate too."""
    target = cname_target(public_url)
    shown = {**asdict(domain),
             "dns_record": {"type": "CNAME", "name": domain.host, "value": target},
             "base_url": branded_url(public_url, domain.host)}
    if conn is not None:
        shown["certificate"] = certificate_json(certificates.get(conn, domain.host))
    return shown


def certificate_json(cert: Certificate | None) -> dict[str, Any] | None:
    """A host's certificate state (relay/certs/): None when none was ordered."""
    if cert is None:
        return None
    return {"state": cert.state, "expires_at": cert.not_after, "reason": cert.reason,
            "failures": cert.failures, "next_try": cert.next_try}


def _certificate_text(cert: Certificate | None) -> str:
    if cert is None:
        return "-"
    text = cert.state
    if cert.not_after is not None:
        text += f", expires {format_time(cert.not_after)}"
    if cert.state == CERT_FAILED and cert.next_try is not None:
        text += f", retry {format_time(cert.next_try)}: {cert.reason}"
    return text


async def _list_domains(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    found = await context.store.read(stored.listing)
    shown = await context.store.read(
        lambda conn: [domain_json(d, context.config.http.public_url, conn) for d in found])
    return json_response({"domains": shown})


async def _add_domain(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    body = await json_body(request)
    host, sender = body.get("host"), body.get("sender_domain")
    if not isinstance(host, str) or not isinstance(sender, str | None):
        raise InvalidInput("host (and sender_domain, if given) must be strings")
    domain = await context.store.write(lambda conn: add(conn, host, sender))
    return json_response(domain_json(domain, context.config.http.public_url), 201)


async def _found(request: web.Request) -> TrackingDomain:
    host = request.match_info["host"]
    domain = await request.app[CONTEXT].store.read(lambda conn: stored.get(conn, host))
    if domain is None:
        raise ApiError(404, f"no tracking domain {host!r}")
    return domain


async def _get_domain(request: web.Request) -> web.Response:
    domain = await _found(request)
    context = request.app[CONTEXT]
    return json_response(await context.store.read(
        lambda conn: domain_json(domain, context.config.http.public_url, conn)))


async def _verify_domain(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    host = (await _found(request)).host
    outcome = await verify(context.store, context.config, host, make_resolver(context.config.dns))
    if outcome is None:
        raise ApiError(404, f"no tracking domain {host!r}")
    domain, result = outcome
    return json_response({**domain_json(domain, context.config.http.public_url),
                          "check": asdict(result)})


async def _remove_domain(request: web.Request) -> web.Response:
    host = (await _found(request)).host
    await request.app[CONTEXT].store.write(lambda conn: stored.remove(conn, host))
    return web.Response(status=204)


_HOST_PARAM = [{"name": "host", "in": "path", "required": True, "schema": {"type": "string"},
                "description": "the tracking host, e.g. track.shop.example"}]
_ADD_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["host"],
    "properties": {"host": {"type": "string"},
                   "sender_domain": {"type": "string",
                                     "description": "default: the host's parent domain"}}}}}}
_TAGS = ["tracking domains"]

OPERATIONS = [
    Operation("GET", "/tracking-domains", _list_domains, "Tracking domains and their states",
              "listTrackingDomains", tags=_TAGS),
    Operation("POST", "/tracking-domains", _add_domain, "Add a tracking domain (pending)",
              "addTrackingDomain", request_body=_ADD_BODY,
              responses={"201": {"description": "Added"}}, tags=_TAGS),
    Operation("GET", "/tracking-domains/{host}", _get_domain, "One tracking domain",
              "getTrackingDomain", parameters=_HOST_PARAM, tags=_TAGS),
    Operation("POST", "/tracking-domains/{host}/verify", _verify_domain,
              "Look up the CNAME now and store the outcome", "verifyTrackingDomain",
              parameters=_HOST_PARAM, tags=_TAGS),
    Operation("DELETE", "/tracking-domains/{host}", _remove_domain, "Remove a tracking domain",
              "removeTrackingDomain", parameters=_HOST_PARAM,
              responses={"204": {"description": "Removed"}}, tags=_TAGS),
]
