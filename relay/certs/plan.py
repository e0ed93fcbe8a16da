"""What to order and when, pure (no I/O): which hosts want a certificate, when one is due for
renewal, and how long a failed order waits before the next try.

A certificate is renewed :data:`RENEW_BEFORE_DAYS` days before it expires (Let's Encrypt's own
advice for its 90-day certificates). A failed order is tried again after the next of
:data:`RETRY_SECONDS` (the last repeats): Let's Encrypt allows 5 failed validations per host
and hour, so the first tries are spaced to stay under it and the later ones a few times a day.
An older certificate of the host is kept, and served, while a renewal fails.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace

from cryptography import x509

PENDING, VALID, FAILED = "pending", "valid", "failed"
RENEW_BEFORE_DAYS = 30
DAY = 86400.0
RETRY_SECONDS = (300.0, 900.0, 3600.0, 3 * 3600.0, 12 * 3600.0)


@dataclass(frozen=True, slots=True)
class Certificate:
    """One host's certificate as the store keeps it (relay/store/certificates.py)."""

    host: str
    state: str = PENDING  # PENDING (no certificate yet), VALID, FAILED (the last order)
    cert_pem: str | None = None  # the full chain; kept when a renewal fails
    key_pem: str | None = None
    not_after: float | None = None
    reason: str | None = None  # why the last order failed
    failures: int = 0  # failed orders in a row
    next_try: float | None = None  # no order before this time
    updated_at: float = 0.0

    def usable(self, now: float) -> bool:
        return self.cert_pem is not None and (self.not_after or 0.0) > now

    def days_left(self, now: float) -> float | None:
        return None if self.not_after is None else (self.not_after - now) / DAY


def wanted(names: Iterable[str | None]) -> list[str]:
    """The host names that get certificates: DNS names only (no IP address, and no
    ``localhost`` or other one-label name, which no CA can reach to validate HTTP-01: the
    default ``public_url`` would be ordered, and fail, every 12 hours forever), lower-cased,
    each once."""
    hosts: dict[str, None] = {}
    for name in names:
        host = (name or "").lower().rstrip(".")
        if host and not _is_address(host) and "." in host and not host.endswith(".localhost"):
            hosts[host] = None
    return list(hosts)


def due(cert: Certificate | None, now: float) -> bool:
    """Whether to order now: no certificate yet, or one within 30 days of its end, unless a
    failed order's wait is not over."""
    if cert is None:
        return True
    if cert.next_try is not None and now < cert.next_try:
        return False
    if cert.state == VALID and cert.not_after is not None:
        return cert.not_after - RENEW_BEFORE_DAYS * DAY <= now
    return True


def issued(host: str, chain_pem: str, key_pem: str, now: float) -> Certificate:
    return Certificate(host, VALID, chain_pem, key_pem, expiry(chain_pem), updated_at=now)


def failed(cert: Certificate | None, host: str, reason: str, now: float) -> Certificate:
    """The record after a failed order: the reason, the next try; an older certificate kept."""
    before = cert or Certificate(host)
    wait = RETRY_SECONDS[min(before.failures, len(RETRY_SECONDS) - 1)]
    return replace(before, state=FAILED, reason=reason, failures=before.failures + 1,
                   next_try=now + wait, updated_at=now)


def expiry(chain_pem: str) -> float:
    """The end of validity of the first (leaf) certificate of a PEM chain, as a Unix time."""
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    return leaf.not_valid_after_utc.timestamp()


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True
