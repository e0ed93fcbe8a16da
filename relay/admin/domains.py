"""Tracking domains (seed 001, 004): a branded host such as ``track.shop.example`` under which
the pixel and the links of one sender domain's mail are served.

A tracking domain is added ``pending`` and becomes ``verified`` when DNS has a CNAME from it to
the relay's tracking host (the host of ``http.public_url``). Until then, mail from its sender
domain is delivered untracked and the message record says why. Each check ends one of three
ways, and only the first two change the state:

- the CNAME points at the tracking host: ``verified``;
- a wrong or missing record (another target, no CNAME, NXDOMAIN): ``failed``, with the reason;
- DNS did not answer (timeout, SERVFAIL, no server reachable): the state is kept and a warning
  logged, so a resolver outage never switches tracking off.

Branded URLs keep the scheme and port of ``http.public_url``: the CNAME sends recipients to the
same endpoint, so whatever terminates TLS there must hold a certificate for every verified host.

The lookup uses dnspython with the resolvers of ``[dns] nameservers`` (default: the system's).
A verified host is re-checked every ``[dns] recheck_interval`` seconds by the process that runs
the HTTP service. CLI: ``relay domains add|verify|list|remove``; API: ``/api/v1/tracking-domains``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sqlite3
import time
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
from aiohttp import web

from relay import metrics
from relay.admin.api import CONTEXT, ApiError, Operation, json_response
from relay.admin.commands import (
    Action,
    ConfigOption,
    add_group,
    fail,
    format_time,
    output,
    print_table,
)
from relay.admin.settings import bump, json_body, open_seeded, seed_once
from relay.config import Config, DnsSettings
from relay.policy import names
from relay.store.engine import Store
from relay.store.transaction import transaction

log = logging.getLogger("relay.domains")

PENDING, VERIFIED, FAILED = "pending", "verified", "failed"
STATES = (PENDING, VERIFIED, FAILED)
MATCH, WRONG, OUTAGE = "match", "wrong", "outage"


@dataclass(frozen=True, slots=True)
class TrackingDomain:
    host: str
    sender_domain: str
    state: str = PENDING
    reason: str | None = None  # why it failed; None unless failed
    last_check: str | None = None  # what the latest check found, an outage included
    checked_at: float | None = None
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Check:
    result: str  # MATCH, WRONG or OUTAGE
    detail: str


# --- pure rules ----------------------------------------------------------------------------

def cname_target(public_url: str) -> str:
    """The relay's tracking host: what a tracking domain's CNAME must point at."""
    return (urlsplit(public_url).hostname or "").lower()


def branded_url(public_url: str, host: str) -> str:
    """``public_url`` with its host replaced by a verified tracking host (port and path kept:
    the tracking host is a CNAME to the same server)."""
    parts = urlsplit(public_url)
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "") + parts.path


def after_check(domain: TrackingDomain, check: Check, now: float) -> TrackingDomain:
    """The state a check leaves: an outage keeps the state (and reason), the rest decide it."""
    if check.result == OUTAGE:
        return replace(domain, last_check=f"DNS unavailable, state kept: {check.detail}",
                       checked_at=now)
    if check.result == MATCH:
        return replace(domain, state=VERIFIED, reason=None, last_check=check.detail,
                       checked_at=now)
    return replace(domain, state=FAILED, reason=check.detail, last_check=check.detail,
                   checked_at=now)


def dns_record(host: str, target: str) -> str:
    return f"{host}. CNAME {target}."


# --- DNS -----------------------------------------------------------------------------------

def make_resolver(settings: DnsSettings) -> dns.asyncresolver.Resolver:
    """The configured nameservers, or the system's (/etc/resolv.conf) when none are set."""
    resolver = dns.asyncresolver.Resolver(configure=not settings.nameservers)
    if settings.nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(a.host, a.port)
                                for a in settings.nameservers]
    resolver.timeout = resolver.lifetime = settings.timeout
    return resolver


async def check(host: str, target: str, resolver: dns.asyncresolver.Resolver) -> Check:
    """Ask DNS for ``host``'s CNAME and compare it with ``target``."""
    if _is_address(target):
        return Check(WRONG, f"the relay's tracking host {target} is an IP address, which no "
                            "CNAME can name: set http.public_url to a host name")
    try:
        answer = await resolver.resolve(host, "CNAME")
    except dns.resolver.NXDOMAIN:
        return Check(WRONG, f"{host} does not exist in DNS (NXDOMAIN); expected "
                            f"{dns_record(host, target)}")
    except dns.resolver.NoAnswer:
        return Check(WRONG, f"{host} has no CNAME record; expected {dns_record(host, target)}")
    except dns.exception.DNSException as exc:  # timeout, SERVFAIL, nothing reachable
        return Check(OUTAGE, f"{type(exc).__name__}: {exc}")
    found = [r.target.to_text(omit_final_dot=True).lower() for r in answer]
    if target in found:
        return Check(MATCH, f"{host} is a CNAME to {target}")
    return Check(WRONG, f"{host} is a CNAME to {found[0]}, expected {target}")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- storage -------------------------------------------------------------------------------

_COLUMNS = "host, sender_domain, state, reason, last_check, checked_at, created_at"


def listing(conn: sqlite3.Connection) -> list[TrackingDomain]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM tracking_domains ORDER BY host").fetchall()
    return [TrackingDomain(*row) for row in rows]


def get(conn: sqlite3.Connection, host: str) -> TrackingDomain | None:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM tracking_domains WHERE host = ?",
                        (names.normal(host),)).fetchall()
    return TrackingDomain(*rows[0]) if rows else None


def add(conn: sqlite3.Connection, host: str, sender_domain: str | None = None
        ) -> TrackingDomain:
    """Validate and add ``host`` (pending) for ``sender_domain`` (default: the host's parent)."""
    sender = names.domain_name(sender_domain or host.partition(".")[2])
    domain = TrackingDomain(names.tracking_host(host, sender), sender, created_at=time.time())
    taken = conn.execute("SELECT host FROM tracking_domains WHERE host = ? OR sender_domain = ?",
                         (domain.host, sender)).fetchall()
    if taken and taken[0][0] == domain.host:
        raise ValueError(f"{domain.host} exists already")
    if taken:
        raise ValueError(f"{sender} already has the tracking domain {taken[0][0]}: remove it first")
    conn.execute(f"INSERT INTO tracking_domains ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 tuple(asdict(domain).values()))
    bump(conn)
    return domain


def remove(conn: sqlite3.Connection, host: str) -> bool:
    removed = conn.execute("DELETE FROM tracking_domains WHERE host = ?",
                           (names.normal(host),)).rowcount == 1
    if removed:
        bump(conn)
    return removed


def record_check(conn: sqlite3.Connection, host: str, result: Check, now: float
                 ) -> TrackingDomain | None:
    """Store what a check found; None when the host was removed meanwhile."""
    before = get(conn, host)
    if before is None:
        return None
    after = after_check(before, result, now)
    conn.execute("UPDATE tracking_domains SET state = ?, reason = ?, last_check = ?,"
                 " checked_at = ? WHERE host = ?",
                 (after.state, after.reason, after.last_check, after.checked_at, after.host))
    if after.state != before.state:
        bump(conn)
    return after


def seed(conn: sqlite3.Connection, config: Config) -> None:
    """Add each ``[[domains]] tracking_host`` not seeded before (pending)."""
    for entry in config.domains:
        if entry.tracking_host and seed_once(conn, "tracking_domain", entry.tracking_host):
            try:
                add(conn, entry.tracking_host, entry.name)
            except ValueError as exc:
                log.warning("[[domains]] %s: tracking_host not added: %s", entry.name, exc)


def report(domain: TrackingDomain, result: Check) -> None:
    """Log and count one check's outcome."""
    metrics.TRACKING_DOMAIN_CHECKS.labels(result.result).inc()
    if result.result == OUTAGE:
        log.warning("tracking domain %s: %s (still %s)", domain.host, result.detail, domain.state)
    elif result.result == WRONG:
        log.warning("tracking domain %s failed: %s", domain.host, result.detail)
    else:
        log.info("tracking domain %s verified: %s", domain.host, result.detail)


async def verify(store: Store, config: Config, host: str,
                 resolver: dns.asyncresolver.Resolver) -> tuple[TrackingDomain, Check] | None:
    """Check one host now and store the outcome; None when there is no such host."""
    result = await check(host.lower(), cname_target(config.http.public_url), resolver)
    after = await store.write(lambda conn: record_check(conn, host, result, time.time()))
    if after is not None:
        report(after, result)
    return None if after is None else (after, result)


async def recheck_all(store: Store, config: Config, resolver: dns.asyncresolver.Resolver
                      ) -> list[tuple[TrackingDomain, Check] | None]:
    hosts = [d.host for d in listing(store.writer)]
    return await asyncio.gather(*(verify(store, config, h, resolver) for h in hosts))


async def recheck_forever(store: Store, config: Config) -> None:
    """Every ``[dns] recheck_interval`` seconds, check every tracking domain."""
    resolver = make_resolver(config.dns)
    while True:
        await asyncio.sleep(config.dns.recheck_interval)
        try:
            await recheck_all(store, config, resolver)
        except Exception:  # the next round tries again; the relay keeps running
            log.exception("re-checking tracking domains failed")


def publish_metrics(store: Store | None) -> None:
    """``relay_tracking_domains{state}``, counted from ``store`` when scraped (None: zero,
    for when the store closes)."""
    def count(state: str) -> int:
        if store is None:
            return 0
        query = "SELECT count(*) FROM tracking_domains WHERE state = ?"
        return store.execute_now(query, (state,))[0][0]

    for state in STATES:
        metrics.TRACKING_DOMAINS.labels(state).set_function(lambda s=state: count(s))


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
    try:
        with transaction(conn):
            domain = add(conn, args.host, args.sender)
    except ValueError as exc:
        return fail(str(exc))

    def human() -> None:
        print(f"added {domain.host} for {domain.sender_domain} (pending). Create this DNS "
              f"record, then run `relay domains verify {domain.host}`:")
        print(f"  {dns_record(domain.host, cname_target(cfg.http.public_url))}")

    return output(args, domain_json(domain, cfg.http.public_url), human)


def _verify(args: argparse.Namespace) -> int:
    cfg, conn = open_seeded(args, seed)
    host = names.normal(args.host)
    if get(conn, host) is None:
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
    found = listing(conn)
    return output(
        args, {"domains": [domain_json(d, cfg.http.public_url) for d in found]},
        lambda: print_table(("HOST", "SENDER", "STATE", "CHECKED", "LAST CHECK"), [
            (d.host, d.sender_domain, d.state, format_time(d.checked_at), d.last_check or "-")
            for d in found]))


def _remove(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    with transaction(conn):
        removed = remove(conn, args.host)
    if not removed:
        return fail(f"no tracking domain {args.host!r}")
    return output(args, {"host": names.normal(args.host), "removed": True},
                  lambda: print(f"removed {args.host}"))


# --- API -----------------------------------------------------------------------------------

def domain_json(domain: TrackingDomain, public_url: str) -> dict[str, Any]:
    target = cname_target(public_url)
    return {**asdict(domain),
            "dns_record": {"type": "CNAME", "name": domain.host, "value": target},
            "base_url": branded_url(public_url, domain.host)}


async def _list_domains(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    return json_response({"domains": [domain_json(d, context.config.http.public_url)
                                      for d in listing(context.store.writer)]})


async def _add_domain(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    body = await json_body(request)
    host, sender = body.get("host"), body.get("sender_domain")
    if not isinstance(host, str) or not isinstance(sender, str | None):
        raise ApiError(400, "host (and sender_domain, if given) must be strings")
    try:
        domain = await context.store.write(lambda conn: add(conn, host, sender))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return json_response(domain_json(domain, context.config.http.public_url), 201)


def _found(request: web.Request) -> TrackingDomain:
    host = request.match_info["host"]
    domain = get(request.app[CONTEXT].store.writer, host)
    if domain is None:
        raise ApiError(404, f"no tracking domain {host!r}")
    return domain


async def _get_domain(request: web.Request) -> web.Response:
    return json_response(domain_json(_found(request), request.app[CONTEXT].config.http.public_url))


async def _verify_domain(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    host = _found(request).host
    outcome = await verify(context.store, context.config, host, make_resolver(context.config.dns))
    if outcome is None:
        raise ApiError(404, f"no tracking domain {host!r}")
    domain, result = outcome
    return json_response({**domain_json(domain, context.config.http.public_url),
                          "check": asdict(result)})


async def _remove_domain(request: web.Request) -> web.Response:
    host = _found(request).host
    await request.app[CONTEXT].store.write(lambda conn: remove(conn, host))
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
