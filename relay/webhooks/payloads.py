"""Webhook payloads, signatures and the retry schedule: pure functions, no I/O.

A delivery is one POST of a batch of events in Anypost's envelope::

    {"batch_id": "bat_...", "timestamp": 1767225600,
     "events": [{"id": "evt_...", "type": "email.opened", "occurred_at": "...Z",
                 "data": {"email_id": ..., "recipient": ..., ...}}]}

signed twice with the endpoint's secret (``whsec_`` + base64, as Standard Webhooks has it):

``Anypost-Signature``  ``t=<unix>,v1=<hex HMAC-SHA256 over "t.body">``, keyed with the secret
                       string's UTF-8 bytes, as the ``anypost`` SDK's verify_webhook_signature
                       checks it.
``webhook-id``,        Standard Webhooks: ``v1,<base64 HMAC-SHA256 over "id.t.body">`` keyed
``webhook-timestamp``, with the secret's decoded bytes; the id is the batch id.
``webhook-signature``

``batch_id`` and the event ids stay the same on every retry of a batch; ``timestamp`` is the
signing time of each attempt, so a receiver's freshness check passes on late retries too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

SENT = "email.sent"
OPENED = "email.opened"
CLICKED = "email.clicked"
DELAYED = "email.delayed"  # queue mode: a temporary failure, tried again later
BOUNCED = "email.bounced"  # queue mode: given up (bounce_type permanent or expired)
EVENT_TYPES = (SENT, OPENED, CLICKED, DELAYED, BOUNCED)

BATCH_PREFIX = "bat_"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = (24, 64)  # the range Standard Webhooks recommends
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
USER_AGENT = "tracking-relay-webhooks/1"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Seconds an attempt may wait for its answer, the config file and the API alike: a process that
# dies mid-attempt holds the batch (and the endpoint's later events) until its lease, this
# timeout plus LEASE_MARGIN, runs out (relay/webhooks/outbox.py).
MAX_TIMEOUT = 60.0


def endpoint_problem(name: str, url: str, secret: str, events: Sequence[str], timeout: float
                     ) -> tuple[str, str] | None:
    """The first field of a webhook endpoint that is wrong and what is wrong with it, or None:
    the one check of ``[[webhooks]]`` tables, ``relay webhooks add`` and
    ``POST /api/v1/webhooks``. Never echoes the secret."""
    for key, problem in (("name", None if NAME.fullmatch(name) else
                          f"expected 1-64 letters, digits, '-' or '_', got {name!r}"),
                         ("url", url_problem(url)),
                         ("secret", secret_problem(secret)),
                         ("events", events_problem(events)),
                         ("timeout", None if 0 < timeout <= MAX_TIMEOUT else
                          f"seconds, more than 0 and at most {MAX_TIMEOUT:g}")):
        if problem:
            return key, problem
    return None


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_problem(secret: str) -> str | None:
    """What is wrong with a signing secret, or None when it is usable."""
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX!r} (Standard Webhooks format)"
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except binascii.Error:
        return f"must be {SECRET_PREFIX!r} followed by base64"
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        return f"must decode to {low}-{high} bytes, got {len(key)}"
    return None


MAX_URL_CHARS = 2048


def url_problem(url: str) -> str | None:
    """What is wrong with a target URL, or None. Addresses are checked when delivering."""
    if len(url) > MAX_URL_CHARS:
        return f"the URL is longer than {MAX_URL_CHARS} characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http(s) URL, got {url!r}"
    if parts.username is not None or parts.password is not None:
        return "credentials in the URL are not supported; sign with the secret instead"
    if not _HOST.fullmatch(parts.hostname):
        return f"not a host name: {parts.hostname!r}"
    try:
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError:
        return f"not a port: {parts.netloc.rpartition(':')[2]!r}"
    return None


# A name (international ones too) or an IP literal: no spaces, controls or URL delimiters.
_HOST = re.compile(r"[^\x00-\x20\x7f\"#%/:<>?@\[\\\]^`{|}]+|[0-9a-f:.]+")


def events_problem(events: Sequence[str]) -> str | None:
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        return f"unknown event {unknown[0]!r}; expected some of {', '.join(EVENT_TYPES)}"
    if not events:
        return "subscribe to at least one event"
    return None


def refused_address(address: IpAddress) -> bool:
    """True for loopback, private, link-local, shared, reserved and multicast addresses:
    anything that is not a plain public unicast address. An IPv6 address that carries an IPv4
    one (mapped, NAT64, 6to4, Teredo, IPv4-compatible) is judged by the IPv4 address it
    reaches: 64:ff9b::a9fe:a9fe is 169.254.169.254 behind a NAT64 gateway."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local or address in _LOCAL_NAT64:
            return True
        address = _carried_ipv4(address) or address
    return not address.is_global or address.is_multicast


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, for local use
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _carried_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def literal_address(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


# --- event data ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What every event of a message repeats about the send."""

    email_id: str
    message_id: str | None
    sender: str | None
    subject: str | None
    tags: tuple[str, ...]
    campaign: str | None
    topic: str | None


def all_tags(tag_name: str | None, tags: Sequence[str]) -> tuple[str, ...]:
    """The Alibaba ``TagName`` and the ``X-Anypost-Tags``, as one list without repeats."""
    return tuple(dict.fromkeys(([tag_name] if tag_name else []) + list(tags)))


def event_data(message: MessageFacts, recipient: str, *, ip: str | None = None,
               user_agent: str | None = None, url: str | None = None,
               bot: Mapping[str, str] | None = None,
               details: Mapping[str, Any] | None = None,
               delivery: Mapping[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "email_id": message.email_id,
        "message_id": message.message_id,
        "from": message.sender,
        "recipient": recipient,
        "subject": message.subject,
        "tags": list(message.tags),
        "campaign": message.campaign,
        "topic": message.topic,
    }
    if user_agent is not None:
        data["ip"] = ip
        data["user_agent"] = user_agent
    if url is not None:
        data["url"] = url
    if details is not None:  # device, client, os, geo (relay/tracking/events.py)
        data.update(details)
    if delivery is not None:  # smtp_code, attempt, reply, ... (delivery_fields)
        data.update(delivery)
    if bot is not None:
        data["tracking"] = {"bot": dict(bot)}
    return data


def delivery_fields(smtp_code: int, attempt: int, reply: str, *,
                    next_attempt_at: float | None = None,
                    bounce_type: str | None = None) -> dict[str, Any]:
    """What ``email.delayed`` and ``email.bounced`` add, with the ``anypost`` SDK's names
    (``smtp_code``, ``attempt``, ``bounce_type``, ``bounce_classification``), the reply, and
    for a delay when the next attempt is."""
    fields: dict[str, Any] = {"smtp_code": smtp_code, "attempt": attempt, "reply": reply}
    if bounce_type is None:
        fields["next_attempt_at"] = iso_time(next_attempt_at) if next_attempt_at else None
    else:
        fields["bounce_type"] = bounce_type
        fields["bounce_classification"] = None
    return fields


def iso_time(at: float) -> str:
    """``2026-01-01T00:00:00.000Z``"""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


# --- envelope and signatures --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: str
    type: str
    occurred_at: float
    data: str  # JSON, as stored when the event was recorded


def envelope(batch_id: str, timestamp: int, events: Sequence[StoredEvent]) -> bytes:
    """The request body: compact UTF-8 JSON."""
    return json.dumps({
        "batch_id": batch_id,
        "timestamp": timestamp,
        "events": [{"id": e.id, "type": e.type, "occurred_at": iso_time(e.occurred_at),
                    "data": json.loads(e.data)} for e in events],
    }, ensure_ascii=False, separators=(",", ":")).encode()


def signature_headers(secret: str, batch_id: str, timestamp: int, body: bytes
                      ) -> dict[str, str]:
    anypost = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    key = base64.b64decode(secret[len(SECRET_PREFIX):])
    signed = b"%s.%d.%s" % (batch_id.encode(), timestamp, body)
    standard = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Anypost-Signature": f"t={timestamp},v1={anypost}",
        "webhook-id": batch_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{standard}",
    }


# --- retries ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Schedule:
    """Exponential backoff with jitter: the n-th retry waits ``base * 2**(n-1)``, at most
    ``cap``, scaled by a random factor in [0.5, 1); no retry is planned past ``deadline``
    seconds after the batch was formed."""

    base: float = 30.0
    cap: float = 3 * 3600.0
    deadline: float = 24 * 3600.0

    def delay(self, attempts: int, random: Callable[[], float]) -> float:
        exponential = self.base * 2.0 ** min(attempts - 1, 40)
        return min(self.cap, exponential) * (0.5 + random() / 2)


@dataclass(frozen=True, slots=True)
class Result:
    """One attempt as the worker saw it: an HTTP status, or an error before any."""

    status: int | None
    error: str | None = None
    retry_after: float | None = None  # seconds, from the Retry-After header

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410


DELIVERED, PENDING, FAILED = "delivered", "pending", "failed"


def next_step(result: Result, attempts: int, now: float, deadline: float, schedule: Schedule,
              random: Callable[[], float]) -> tuple[str, float | None]:
    """The batch's state after an attempt, and when to try again (None: never)."""
    if result.ok:
        return DELIVERED, None
    if result.gone:
        return FAILED, None
    wait = result.retry_after
    if wait is None:
        wait = schedule.delay(attempts, random)
    else:  # at least the first backoff: "Retry-After: 0" must not start a loop of attempts
        wait = min(max(wait, schedule.base), schedule.cap)
    if now + wait > deadline:
        return FAILED, None
    return PENDING, now + wait


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²", which isdigit() takes and float() not
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
