"""Tracking domains (README, "Tracking domains"): a branded host such as
``track.shop.example`` under which the pixel and the links of one sender domain's mail are
served. The model and its rules; pure (the DNS lookup: relay/admin/dnscheck.py).

A tracking domain is added ``pending`` and becomes ``verified`` when DNS has a CNAME from it to
the relay's tracking host (the host of ``http.public_url``). Until then, mail from its sender
domain is delivered untracked and the message record says why. Each check ends one of three
ways, and only the first two change the state:

- the CNAME points at the tracking host: ``verified``;
- a wrong or missing record (another target, no CNAME, NXDOMAIN): ``failed``, with the reason;
- DNS did not answer (timeout, SERVFAIL, no server reachable): the state is kept and a warning
  logged, so a resolver outage never switches tracking off.

Branded URLs keep the scheme and port of ``http.public_url``: the CNAME sends recipients to the
same endpoint. With ``http.tls_listen`` and ``[acme]`` a verified host gets a certificate of its
own (relay/certs/), and then its new links use https (relay/policy/decide.py tracking_base).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from relay.policy import names

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


def new(host: str, sender_domain: str | None, now: float) -> TrackingDomain:
    """``host`` (pending), validated, for ``sender_domain`` (default: the host's parent)."""
    sender = names.domain_name(sender_domain or host.partition(".")[2])
    return TrackingDomain(names.tracking_host(host, sender), sender, created_at=now)


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
