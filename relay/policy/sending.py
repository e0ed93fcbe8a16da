"""What a send request of the Anypost-compatible API (``POST /v1/email``, ``/v1/email/batch``)
may say, and the message it stands for. Pure: no I/O.

A request is read into a :class:`Submission`: the :class:`~relay.rewrite.compose.Draft` to
compose and its envelope. Its ``tracking``, ``tags``, ``campaign`` and ``topic`` become the
control headers an SMTP client would send (``X-Anypost-Track-Opens`` ...), read back here by
:func:`relay.policy.decide.read_controls` (so they follow the same rules) and by the mail path
as for any message: the request's ``tracking`` overrides the sender domain's setting, which
overrides the account's, exactly as the headers do.

Every problem is collected as ``{field path: [problems]}`` (the SDK's ``ValidationError.errors``)
and raised at once as :class:`InvalidRequest`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address
from typing import Any

from relay.errors import ControlHeaderError, InvalidInput, InvalidRequest
from relay.policy import decide
from relay.policy.names import domain_name
from relay.rewrite.compose import Attachment, Draft
from relay.rewrite.headers import parse_header_block

MAX_RECIPIENTS = 50  # to + cc + bcc
MAX_REPLY_TO = 10
MAX_ATTACHMENTS = 20
MAX_HEADERS = 25
MAX_BATCH = 100
MAX_SUBJECT = 998
MAX_FILENAME = 255
MAX_HEADER_VALUE = 998
FIELDS = frozenset({"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html",
                    "headers", "attachments", "tags", "campaign", "topic", "tracking"})
# Anypost features this relay does not have: refused, never silently ignored.
UNSUPPORTED = {
    "template_id": "templates are not supported by this relay: send text and/or html",
    "variables": "template variables are not supported by this relay",
    "ip_pool": "IP pools are not supported by this relay",
    "unsubscribe": "generated unsubscribe links are not supported by this relay",
}
# Headers the request sets through its own fields, or the relay sets: not in ``headers``.
RESERVED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "mime-version",
    "sender", "received", "return-path", "dkim-signature"}) | decide.CONTROL_HEADERS
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 2.2: printable ASCII except ':'
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_MAILBOX = re.compile(r"\s*(?:(?P<name>.*?)\s*<(?P<angle>[^<>]*)>|(?P<bare>[^<>]*?))\s*")
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]{1,127}"
_CONTENT_TYPE = re.compile(rf"(?P<type>{_TOKEN})/(?P<subtype>{_TOKEN})(?P<params>(\s*;.*)?)")
_PARAM = re.compile(rf"\s*;\s*(?P<key>{_TOKEN})=(?P<value>{_TOKEN}|\"[^\"\\\r\n]*\")")
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,250}")
_CONTROL_FIELD = {decide.TAGS: "tags", decide.CAMPAIGN: "campaign", decide.TOPIC: "topic",
                  decide.TRACK_OPENS: "tracking.opens", decide.TRACK_CLICKS: "tracking.clicks"}


@dataclass(frozen=True, slots=True)
class Submission:
    draft: Draft
    sender: str  # the envelope sender (MAIL FROM)
    recipients: tuple[str, ...]  # to, cc and bcc, each once
    sender_domain: str  # lower case, ASCII
    attachment_bytes: int = 0


@dataclass
class _Problems:
    """Problems found so far, by field path."""

    found: dict[str, list[str]] = field(default_factory=dict)

    def add(self, path: str, problem: str) -> None:
        self.found.setdefault(path, []).append(problem)


def read_email(body: object) -> Submission:
    """The submission a ``POST /v1/email`` body stands for; :class:`InvalidRequest` with every
    problem found otherwise."""
    problems = _Problems()
    submission = _email(body, problems)
    if problems.found or submission is None:
        raise InvalidRequest(_summary(problems.found), problems.found)
    return submission


def read_batch(body: object) -> list[dict[str, Any] | InvalidRequest]:
    """The entries of a ``POST /v1/email/batch`` body, each merged with the batch's
    ``defaults`` (:func:`merge`), or the problem of one that cannot be; the batch as a whole
    must have 1-:data:`MAX_BATCH` entries and well-formed defaults, else InvalidRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", {"": ["expected an object"]})
    unknown = sorted(set(body) - {"emails", "defaults"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", {k: ["unknown field"]
                                                                 for k in unknown})
    emails, defaults = body.get("emails"), body.get("defaults", {})
    if not isinstance(emails, list) or not 1 <= len(emails) <= MAX_BATCH:
        raise InvalidRequest(f"emails must be a list of 1-{MAX_BATCH} messages",
                             {"emails": [f"expected 1-{MAX_BATCH} messages"]})
    if not isinstance(defaults, dict):
        raise InvalidRequest("defaults must be an object", {"defaults": ["expected an object"]})
    if "to" in defaults:
        raise InvalidRequest("defaults may not set to: recipients are per entry",
                             {"defaults.to": ["recipients are per entry"]})
    return [merge(defaults, entry) if isinstance(entry, dict)
            else InvalidRequest(f"emails[{i}] must be an object", {"": ["expected an object"]})
            for i, entry in enumerate(emails)]


def merge(defaults: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry with the batch defaults applied, as the SDK documents them: a scalar the entry
    sets wins; lists (``cc``, ``bcc``, ``reply_to``, ``attachments``, ``tags``) are the
    defaults' followed by the entry's; objects (``headers``, ``tracking``) are merged key by
    key, the entry's keys winning. Values of the wrong type are left for validation."""
    merged = dict(defaults)
    for key, value in entry.items():
        before = merged.get(key)
        if key in ("cc", "bcc", "reply_to", "attachments", "tags") and key in merged:
            merged[key] = _as_list(before) + _as_list(value)
        elif key in ("headers", "tracking") and isinstance(before, dict) and isinstance(
                value, dict):
            merged[key] = {**before, **value}
        else:
            merged[key] = value
    return merged


def _as_list(value: object) -> list[Any]:
    if isinstance(value, list):
        return value
    return [value]


def _email(body: object, problems: _Problems) -> Submission | None:
    if not isinstance(body, dict):
        problems.add("", "expected a JSON object")
        return None
    for key in sorted(set(body) - FIELDS):
        problems.add(key, UNSUPPORTED.get(key, "unknown field"))
    sender = _mailbox(body.get("from"), "from", problems, required=True)
    to = _mailboxes(body.get("to"), "to", problems, required=True)
    cc = _mailboxes(body.get("cc"), "cc", problems)
    bcc = _mailboxes(body.get("bcc"), "bcc", problems)
    reply_to = _mailboxes(body.get("reply_to"), "reply_to", problems, single_ok=True,
                          limit=MAX_REPLY_TO)
    recipients = tuple(dict.fromkeys(a.addr_spec for a in (*to, *cc, *bcc)))
    if len(recipients) > MAX_RECIPIENTS:
        problems.add("to", f"at most {MAX_RECIPIENTS} recipients in to, cc and bcc together,"
                           f" got {len(recipients)}")
    subject = _string(body.get("subject"), "subject", problems, MAX_SUBJECT, required=True)
    text = _string(body.get("text"), "text", problems)
    html = _string(body.get("html"), "html", problems)
    if body.get("text") is None and body.get("html") is None:
        problems.add("text", "give text, html or both")
    attachments = _attachments(body.get("attachments"), problems)
    if any(a.content_id for a in attachments) and body.get("html") is None:
        problems.add("attachments", "content_id names an inline image for the html, and "
                                    "there is no html")
    headers = _headers(body.get("headers"), problems) + _controls(body, problems)
    if problems.found or sender is None:
        return None
    draft = Draft(sender=sender, to=to, cc=cc, reply_to=reply_to, subject=subject or "",
                  text=text, html=html, headers=headers, attachments=attachments)
    return Submission(draft, sender.addr_spec, recipients, sender.domain.lower(),
                      sum(len(a.content) for a in attachments))


def _string(value: object, path: str, problems: _Problems, limit: int | None = None,
            required: bool = False) -> str | None:
    if value is None:
        if required:
            problems.add(path, "required")
        return None
    if not isinstance(value, str):
        problems.add(path, "expected a string")
        return None
    if limit is not None and len(value) > limit:
        problems.add(path, f"at most {limit} characters")
    if "\x00" in value:
        problems.add(path, "contains a NUL character")
    return value


def _mailbox(value: object, path: str, problems: _Problems, required: bool = False
             ) -> Address | None:
    """``addr@example.com`` or ``Display Name <addr@example.com>``."""
    text = _string(value, path, problems, MAX_HEADER_VALUE, required=required)
    if text is None:
        return None
    match = _MAILBOX.fullmatch(text)
    if match is None or any(c in text for c in "\r\n"):
        problems.add(path, f"{text!r} is not an address (addr@example.com or Name "
                           "<addr@example.com>)")
        return None
    spec = match["angle"] if match["angle"] is not None else match["bare"]
    name = (match["name"] or "").strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    local, at, domain = spec.strip().rpartition("@")
    if not at or not _LOCAL.fullmatch(local) or len(local) > 64:
        problems.add(path, f"{spec!r} is not an address: expected local-part@domain, the "
                           "local part in ASCII")
        return None
    try:
        domain = domain_name(_ascii_domain(domain))
    except (InvalidInput, ValueError) as exc:
        problems.add(path, f"{spec!r}: {exc}")
        return None
    return Address(display_name=name, username=local, domain=domain)


def _ascii_domain(domain: str) -> str:
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{domain!r} is not a domain name") from None


def _mailboxes(value: object, path: str, problems: _Problems, required: bool = False,
               single_ok: bool = False, limit: int = MAX_RECIPIENTS) -> tuple[Address, ...]:
    if value is None:
        if required:
            problems.add(path, "required: at least one address")
        return ()
    if single_ok and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        problems.add(path, "expected a list of addresses")
        return ()
    if required and not value:
        problems.add(path, "required: at least one address")
    if len(value) > limit:
        problems.add(path, f"at most {limit} addresses")
        return ()
    found = (_mailbox(item, f"{path}[{i}]", problems, required=True)
             for i, item in enumerate(value))
    return tuple(a for a in found if a is not None)


def _headers(value: object, problems: _Problems) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        problems.add("headers", "expected an object of header names to values")
        return ()
    if len(value) > MAX_HEADERS:
        problems.add("headers", f"at most {MAX_HEADERS} headers")
        return ()
    headers = []
    for name, text in value.items():
        path = f"headers.{name}"
        if not _HEADER_NAME.fullmatch(name):
            problems.add(path, "a header name is 1-76 printable ASCII characters, no ':'")
        elif name.lower() in decide.CONTROL_HEADERS:
            problems.add(path, "set tracking, tags, campaign and topic with their own fields")
        elif name.lower() in RESERVED_HEADERS or name.lower().startswith("content-"):
            problems.add(path, "set by the relay or by a field of the request")
        elif not isinstance(text, str):
            problems.add(path, "expected a string")
        elif len(text) > MAX_HEADER_VALUE or any(c in text for c in "\r\n\x00"):
            problems.add(path, f"at most {MAX_HEADER_VALUE} characters, no line breaks")
        else:
            headers.append((name, text))
    return tuple(headers)


def _attachments(value: object, problems: _Problems) -> tuple[Attachment, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ATTACHMENTS:
        problems.add("attachments", f"expected a list of at most {MAX_ATTACHMENTS} attachments")
        return ()
    found = (_attachment(item, f"attachments[{i}]", problems) for i, item in enumerate(value))
    attachments = tuple(a for a in found if a is not None)
    ids = [a.content_id for a in attachments if a.content_id is not None]
    if len(ids) != len(set(ids)):
        problems.add("attachments", "two attachments have the same content_id")
    return attachments


def _attachment(value: object, path: str, problems: _Problems) -> Attachment | None:
    if not isinstance(value, dict):
        problems.add(path, "expected an object with filename and content")
        return None
    for key in sorted(set(value) - {"filename", "content", "content_type", "content_id"}):
        problems.add(f"{path}.{key}", "unknown field")
    filename = _string(value.get("filename"), f"{path}.filename", problems, MAX_FILENAME,
                       required=True)
    if filename is not None and (not filename.strip() or any(
            ord(c) < 32 or c in "/\\\x7f" for c in filename)):
        problems.add(f"{path}.filename", "a file name, without slashes or control characters")
    content = _base64(value.get("content"), f"{path}.content", problems)
    content_type, params = _content_type(value.get("content_type"), f"{path}.content_type",
                                         problems)
    content_id = _string(value.get("content_id"), f"{path}.content_id", problems)
    if content_id is not None and not _CONTENT_ID.fullmatch(content_id):
        problems.add(f"{path}.content_id", "1-250 characters of an addr-spec, without <>")
    if filename is None or content is None or content_type is None:
        return None
    return Attachment(filename, content, content_type, params, content_id)


def _base64(value: object, path: str, problems: _Problems) -> bytes | None:
    if not isinstance(value, str):
        problems.add(path, "required: the file's bytes in base64")
        return None
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        problems.add(path, "not valid base64")
        return None


def _content_type(value: object, path: str, problems: _Problems
                  ) -> tuple[str | None, dict[str, str]]:
    if value is None:
        return "application/octet-stream", {}
    match = _CONTENT_TYPE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        problems.add(path, "expected type/subtype, e.g. application/pdf")
        return None, {}
    if match["type"].lower() in ("multipart", "message"):
        problems.add(path, f"{match['type']}/* is not a file type")
        return None, {}
    params: dict[str, str] = {}
    rest = match["params"]
    for param in _PARAM.finditer(rest):
        params[param["key"].lower()] = param["value"].strip('"')
    if _PARAM.sub("", rest).strip():
        problems.add(path, "parameters are key=value, separated by ';'")
        return None, {}
    return f"{match['type']}/{match['subtype']}".lower(), params


def _controls(body: Mapping[str, Any], problems: _Problems) -> tuple[tuple[str, str], ...]:
    """The control headers the request's tracking, tags, campaign and topic stand for, checked
    by the SMTP path's own reader of them."""
    headers: list[tuple[str, str]] = []
    tracking = body.get("tracking")
    if tracking is not None:
        if not isinstance(tracking, dict):
            problems.add("tracking", "expected an object with opens and/or clicks")
            tracking = {}
        for key in sorted(set(tracking) - {"opens", "clicks"}):
            problems.add(f"tracking.{key}", "unknown field")
        for key, header in (("opens", decide.TRACK_OPENS), ("clicks", decide.TRACK_CLICKS)):
            on = tracking.get(key)
            if on is None:
                continue  # not said: the sender domain's setting, else the account's
            if not isinstance(on, bool):
                problems.add(f"tracking.{key}", "expected true or false")
            else:
                headers.append((header, "true" if on else "false"))
    tags = body.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or not all(isinstance(t, str) and t and "," not in t
                                                 for t in tags):
            problems.add("tags", "expected a list of tags ([A-Za-z0-9_-]{1,64})")
        elif tags:
            headers.append((decide.TAGS, ",".join(tags)))
    for key, header in (("campaign", decide.CAMPAIGN), ("topic", decide.TOPIC)):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, str) or not value or any(c in value for c in "\r\n"):
                problems.add(key, "expected a string")
            else:
                headers.append((header, value))
    _check_controls(headers, problems)
    return tuple(headers)


def _check_controls(headers: Sequence[tuple[str, str]], problems: _Problems) -> None:
    raw = "".join(f"{name}: {value}\r\n" for name, value in headers).encode() + b"\r\n"
    try:
        controls = decide.read_controls(raw, parse_header_block(raw))
    except ControlHeaderError as exc:
        problems.add(_CONTROL_FIELD.get(exc.header, exc.header), exc.text)
        return
    asked = dict(headers).get(decide.TAGS)
    if asked is not None and ",".join(controls.tags) != asked:
        problems.add("tags", "each tag once, without spaces")


def _summary(found: Mapping[str, list[str]]) -> str:
    path, messages = next(iter(found.items()))
    more = len(found) - 1
    where = f"{path}: " if path else ""
    return f"{where}{messages[0]}" + (f" (and {more} more)" if more else "")
