"""Decide, per message, what to track: read the control headers, then apply the order
account default → sender-domain setting → message header to a snapshot of the stored rules
(relay/policy/rules.py). Pure: no I/O.

Control headers (all removed before forwarding):

- ``X-AliDM-Trace``: base64 of a JSON object ``{"TagName", "OpenTrace", "LinkTrace"}``
  with values "1"/"0"; when the header is present an omitted key means off.
- ``X-Anypost-Track-Opens`` / ``X-Anypost-Track-Clicks``: true/false, 1/0, yes/no. They win
  over ``X-AliDM-Trace`` for their own toggle when both are present.
- ``X-Anypost-Tags`` (comma-separated, at most 10), ``X-Anypost-Campaign``, ``X-Anypost-Topic``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from relay.errors import ControlHeaderError, SmtpReplyError
from relay.policy.domains import VERIFIED, branded_url
from relay.policy.names import TAG_NAME
from relay.policy.rules import Rules
from relay.policy.settings import Account, Domain
from relay.rewrite.headers import Header, HeaderBlock

ALIDM_TRACE = "X-AliDM-Trace"
TRACK_OPENS = "X-Anypost-Track-Opens"
TRACK_CLICKS = "X-Anypost-Track-Clicks"
TAGS = "X-Anypost-Tags"
CAMPAIGN = "X-Anypost-Campaign"
TOPIC = "X-Anypost-Topic"
CONTROL_HEADERS = frozenset(
    h.lower() for h in (ALIDM_TRACE, TRACK_OPENS, TRACK_CLICKS, TAGS, CAMPAIGN, TOPIC)
)

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
# X-Anypost-Tags and -Campaign; why this is not names.TAG_NAME: see there
_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOPIC = re.compile(r"[a-z0-9_.-]{1,64}")
MAX_TAGS = 10


@dataclass(frozen=True, slots=True)
class Controls:
    """What the message's own headers ask for; None means 'not said'."""

    opens: bool | None = None
    clicks: bool | None = None
    tag_name: str | None = None
    tags: tuple[str, ...] = ()
    campaign: str | None = None
    topic: str | None = None
    headers: tuple[Header, ...] = ()  # the control headers found, to remove
    # the header that set opens / clicks, when one did (for the decision's reason)
    opens_header: str | None = None
    clicks_header: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    opens: bool
    clicks: bool
    reason: str
    base_url: str
    excluded_hosts: frozenset[str] = frozenset()

    @property
    def tracking(self) -> bool:
        return self.opens or self.clicks

    @property
    def label(self) -> str:
        parts = [name for name, on in (("opens", self.opens), ("clicks", self.clicks)) if on]
        return "+".join(parts) or "none"


@dataclass(frozen=True, slots=True)
class Https:
    """Where new links may use ``https://``: the port of ``http.tls_listen`` and the
    host whose certificate the config names (``http.tls_cert``); hosts with a certificate in
    the store come with the rules (:attr:`Rules.secure_hosts`)."""

    port: int
    hosts: frozenset[str] = frozenset()


def tracking_base(url: str, secure: frozenset[str], https: Https | None) -> str:
    """``url`` (an http(s) base URL without query) on ``https://`` and the TLS listener's port
    when its host has a certificate; as it is otherwise. Links already sent keep their
    scheme: http ones keep working on the plain listener."""
    parts = urlsplit(url)
    if https is None or parts.scheme == "https" or not (
            parts.hostname in https.hosts or parts.hostname in secure):
        return url
    port = "" if https.port == 443 else f":{https.port}"
    return f"https://{parts.hostname}{port}{parts.path}"


def read_controls(raw: bytes, block: HeaderBlock) -> Controls:
    """Parse every control header; a malformed one raises ControlHeaderError naming it."""
    found = tuple(h for h in block.headers if h.key in CONTROL_HEADERS)
    if not found:
        return Controls()
    values: dict[str, str] = {}
    for header in found:  # RFC 2047 words decoded: "=?utf-8?q?true?=" is a true
        value = header.value(raw)
        if values.setdefault(header.key, value) != value:
            raise ControlHeaderError(header.name, "given more than once, with different values")
    opens, clicks, tag_name = _alidm(values.get(ALIDM_TRACE.lower()))
    alidm = ALIDM_TRACE if opens is not None else None
    opens = _toggle(TRACK_OPENS, values.get(TRACK_OPENS.lower()), opens)
    clicks = _toggle(TRACK_CLICKS, values.get(TRACK_CLICKS.lower()), clicks)
    return Controls(
        opens=opens,
        clicks=clicks,
        tag_name=tag_name,
        tags=_tags(values.get(TAGS.lower())),
        campaign=_single(CAMPAIGN, values.get(CAMPAIGN.lower()), _TAG),
        topic=_single(TOPIC, values.get(TOPIC.lower()), _TOPIC),
        headers=found,
        opens_header=TRACK_OPENS if TRACK_OPENS.lower() in values else alidm,
        clicks_header=TRACK_CLICKS if TRACK_CLICKS.lower() in values else alidm,
    )


def _alidm(value: str | None) -> tuple[bool | None, bool | None, str | None]:
    if value is None:
        return None, None, None
    try:
        decoded = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ControlHeaderError(ALIDM_TRACE, "not valid base64") from None
    try:
        trace = json.loads(decoded)
    except (UnicodeDecodeError, ValueError):
        raise ControlHeaderError(ALIDM_TRACE, "base64 does not hold a JSON object") from None
    if not isinstance(trace, dict):
        raise ControlHeaderError(ALIDM_TRACE, "base64 does not hold a JSON object")
    unknown = sorted(set(trace) - {"TagName", "OpenTrace", "LinkTrace"})
    if unknown:
        raise ControlHeaderError(ALIDM_TRACE, f"unknown key {unknown[0]!r}")
    tag_name = trace.get("TagName")
    if tag_name is not None and not (isinstance(tag_name, str) and TAG_NAME.fullmatch(tag_name)):
        raise ControlHeaderError(ALIDM_TRACE, f"TagName {tag_name!r} is not a valid tag name")
    return _trace_flag(trace, "OpenTrace"), _trace_flag(trace, "LinkTrace"), tag_name or None


def _trace_flag(trace: dict[str, object], key: str) -> bool:
    value = trace.get(key, "0")
    if value in ("1", 1) and value is not True:
        return True
    if value in ("0", 0) and value is not False:
        return False
    raise ControlHeaderError(ALIDM_TRACE, f'{key} must be "1" or "0", got {value!r}')


def _toggle(header: str, value: str | None, fallback: bool | None) -> bool | None:
    if value is None:
        return fallback
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ControlHeaderError(header, f"expected true or false, got {value!r}")


def _tags(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    tags = tuple(t.strip() for t in value.split(",") if t.strip())
    if len(tags) > MAX_TAGS:
        raise ControlHeaderError(TAGS, f"at most {MAX_TAGS} tags, got {len(tags)}")
    for tag in tags:
        if not _TAG.fullmatch(tag):
            raise ControlHeaderError(TAGS, f"tag {tag!r} does not match {_TAG.pattern}")
    return tuple(dict.fromkeys(tags))


def _single(header: str, value: str | None, pattern: re.Pattern[str]) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not pattern.fullmatch(value):
        raise ControlHeaderError(header, f"{value!r} does not match {pattern.pattern}")
    return value


def decide(controls: Controls, sender_domain: str, rules: Rules, public_url: str,
           https: Https | None = None) -> Decision:
    """Refuse an unregistered tag; then what to track (account default, sender-domain setting,
    message headers); then under which host: the sender domain's tracking domain once verified
    (untracked until then), the relay's own ``public_url`` when it has none; on https when
    that host has a certificate (:func:`tracking_base`)."""
    if controls.tag_name is not None and controls.tag_name not in rules.tags:
        raise SmtpReplyError(550, "5.7.1", f"X-AliDM-Trace TagName {controls.tag_name!r} is not"
                                           " a registered tag")
    domain = rules.domains.get(sender_domain)
    opens, clicks, opens_source, clicks_source = toggles(rules.account, domain, controls)
    reason = describe(opens, clicks, opens_source, clicks_source)
    excluded = frozenset(domain.exclude_hosts) if domain else frozenset()
    tracking = rules.tracking.get(sender_domain)
    if tracking is None:
        return Decision(opens, clicks, reason,
                        tracking_base(public_url, rules.secure_hosts, https), excluded)
    if tracking.state != VERIFIED:
        if opens or clicks:
            why = tracking.reason or "not verified yet"
            reason += (f", delivered untracked: tracking domain {tracking.host} is"
                       f" {tracking.state} ({why})")
        return Decision(False, False, reason, public_url, excluded)
    base = tracking_base(branded_url(public_url, tracking.host), rules.secure_hosts, https)
    return Decision(opens, clicks, reason, base, excluded)


def toggles(account: Account, domain: Domain | None, controls: Controls
            ) -> tuple[bool, bool, str, str]:
    """Opens and clicks, each from the most specific level that says it, and which level that
    was for each: the message's header (named), else the sender domain's setting, else the
    account's."""
    name = domain.name if domain else ""
    opens, opens_source = _level(account.opens, domain.opens if domain else None, name,
                                 controls.opens, controls.opens_header)
    clicks, clicks_source = _level(account.clicks, domain.clicks if domain else None, name,
                                   controls.clicks, controls.clicks_header)
    return opens, clicks, opens_source, clicks_source


def _level(account: bool, domain: bool | None, domain_name: str, message: bool | None,
           header: str | None) -> tuple[bool, str]:
    if message is not None:
        return message, f"message header {header}" if header else "message headers"
    if domain is not None:
        return domain, f"domain {domain_name}"
    return account, "account default"


def describe(opens: bool, clicks: bool, opens_source: str, clicks_source: str) -> str:
    """The decision in words, naming what decided each toggle: "opens and clicks tracked by
    account default", "opens tracked by message header X-Anypost-Track-Opens, clicks off by
    domain shop.example"."""
    if opens_source == clicks_source:
        if opens and clicks:
            return f"opens and clicks tracked by {opens_source}"
        if opens or clicks:
            return f"{'opens' if opens else 'clicks'} tracked by {opens_source}"
        return f"tracking off by {opens_source}"
    return ", ".join(f"{name} {'tracked' if on else 'off'} by {source}" for name, on, source in
                     sorted((("opens", opens, opens_source), ("clicks", clicks, clicks_source)),
                            key=lambda part: not part[1]))
