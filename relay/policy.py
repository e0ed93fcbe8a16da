"""Decide, per message, what to track: read the control headers, then apply the order
account default → sender-domain setting → message header to a snapshot of the stored rules
(relay/rules.py). Pure: no I/O.

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

from relay.domains import VERIFIED, branded_url
from relay.errors import ControlHeaderError, SmtpReplyError
from relay.headers import Header, HeaderBlock
from relay.names import TAG_NAME
from relay.rules import Rules
from relay.settings import Account, Domain

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


def decide(controls: Controls, sender_domain: str, rules: Rules, public_url: str) -> Decision:
    """Refuse an unregistered tag; then what to track (account default, sender-domain setting,
    message headers); then under which host: the sender domain's tracking domain once verified
    (untracked until then), the relay's own ``public_url`` when it has none."""
    if controls.tag_name is not None and controls.tag_name not in rules.tags:
        raise SmtpReplyError(550, "5.7.1", f"X-AliDM-Trace TagName {controls.tag_name!r} is not"
                                           " a registered tag")
    domain = rules.domains.get(sender_domain)
    opens, clicks, source = toggles(rules.account, domain, controls)
    reason = f"{_describe(opens, clicks)} by {source}"
    excluded = frozenset(domain.exclude_hosts) if domain else frozenset()
    tracking = rules.tracking.get(sender_domain)
    if tracking is None:
        return Decision(opens, clicks, reason, public_url, excluded)
    if tracking.state != VERIFIED:
        if opens or clicks:
            why = tracking.reason or "not verified yet"
            reason += (f", delivered untracked: tracking domain {tracking.host} is"
                       f" {tracking.state} ({why})")
        return Decision(False, False, reason, public_url, excluded)
    return Decision(opens, clicks, reason, branded_url(public_url, tracking.host), excluded)


def toggles(account: Account, domain: Domain | None, controls: Controls
            ) -> tuple[bool, bool, str]:
    """Opens and clicks, each from the most specific level that says it, and which level that
    was: the message's headers, else the sender domain's setting, else the account's."""
    opens, clicks, source = account.opens, account.clicks, "account default"
    if domain is not None and (domain.opens is not None or domain.clicks is not None):
        opens = opens if domain.opens is None else domain.opens
        clicks = clicks if domain.clicks is None else domain.clicks
        source = f"domain {domain.name}"
    if controls.opens is not None or controls.clicks is not None:
        opens = opens if controls.opens is None else controls.opens
        clicks = clicks if controls.clicks is None else controls.clicks
        source = "message headers"
    return opens, clicks, source


def _describe(opens: bool, clicks: bool) -> str:
    if opens and clicks:
        return "opens and clicks tracked"
    if opens or clicks:
        return f"{'opens' if opens else 'clicks'} tracked"
    return "tracking off"
