"""Tracking-domain verification, the I/O half (the rules: relay/policy/domains.py): ask DNS
for a host's CNAME with dnspython and the resolvers of ``[dns] nameservers`` (default: the
system's), store and log the outcome, and re-check every tracking domain every
``[dns] recheck_interval`` seconds in the process that runs the HTTP service."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from functools import partial

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from relay import metrics
from relay.config import Config, DnsSettings
from relay.policy import names
from relay.policy.domains import (
    MATCH,
    OUTAGE,
    STATES,
    WRONG,
    Check,
    TrackingDomain,
    after_check,
    cname_target,
    dns_record,
)
from relay.store import domains as stored
from relay.store.engine import Store

log = logging.getLogger("relay.domains")


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
    if names.is_address(target):
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


def record_check(conn: sqlite3.Connection, host: str, result: Check, now: float
                 ) -> TrackingDomain | None:
    """Store what a check found; None when the host was removed meanwhile."""
    before = stored.get(conn, host)
    if before is None:
        return None
    after = after_check(before, result, now)
    stored.update(conn, before, after)
    return after


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
    hosts = [d.host for d in await store.read(stored.listing)]
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
    """``relay_tracking_domains{state}``, counted from ``store`` before each scrape (None:
    zero, for when the store closes)."""
    metrics.BEFORE_SCRAPE[:] = [] if store is None else [partial(_count_states, store)]
    for state in STATES:
        metrics.TRACKING_DOMAINS.labels(state).set(0)


async def _count_states(store: Store) -> None:
    """The gauges keep their last values while the store cannot be read."""
    try:
        counts = await store.read(lambda conn: {s: stored.count(conn, s) for s in STATES})
    except sqlite3.Error as exc:
        log.warning("tracking domains not counted for /metrics: %s", exc)
        return
    for state, count in counts.items():
        metrics.TRACKING_DOMAINS.labels(state).set(count)
