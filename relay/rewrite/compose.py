"""Compose a MIME message from the parts of a send request (``POST /v1/email``). Pure: no I/O.

The structure is the one mail clients write and every reader understands::

    multipart/mixed                     only with attachments
    ├── multipart/alternative           only with both text and HTML
    │   ├── text/plain
    │   └── multipart/related           only with inline images (a content_id)
    │       ├── text/html
    │       └── image/png  Content-ID: <logo>
    └── application/pdf  attachment; filename*=utf-8''...

Non-ASCII in headers is written as RFC 2047 encoded words, non-ASCII filenames as RFC 2231
parameters (surrounding white space is not kept: unfolding cannot tell it from the
folding), text as 7bit when it is ASCII with short lines and quoted-printable otherwise,
attachments as base64; so every line is at most 78 characters (998 is SMTP's limit) and the
message needs neither 8BITMIME nor SMTPUTF8 from the upstream. Unlike relayed mail (README, "How a
message travels": spliced, never re-serialized), this message is ours to write, so the standard
library's generator writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address
from email.message import MIMEPart
from email.utils import format_datetime

POLICY = email_policy.SMTP  # CRLF, lines folded at 78
# Text parts with lines longer than this are quoted-printable even when ASCII (RFC 5322
# 2.1.1 recommends 78; quoted-printable makes lines of 76).
TEXT_LINE = 78


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content: bytes
    content_type: str = "application/octet-stream"  # "type/subtype"
    params: Mapping[str, str] = field(default_factory=dict)  # e.g. charset
    content_id: str | None = None  # an inline image the HTML names as cid:<content_id>


@dataclass(frozen=True, slots=True)
class Draft:
    """A message to compose, already validated (relay/policy/sending.py)."""

    sender: Address
    to: Sequence[Address]
    subject: str
    cc: Sequence[Address] = ()
    reply_to: Sequence[Address] = ()
    text: str | None = None
    html: str | None = None
    headers: Sequence[tuple[str, str]] = ()  # extra headers, in order
    attachments: Sequence[Attachment] = ()


def compose(draft: Draft, message_id: str, date: datetime) -> bytes:
    """The message's bytes (CRLF line endings), with ``Message-ID: <message_id>`` and
    ``date`` (an aware datetime) as its ``Date``."""
    root = _body(draft)
    top = MIMEPart(policy=POLICY)
    top["From"] = _stripped(draft.sender)
    if draft.to:
        top["To"] = [_stripped(a) for a in draft.to]
    if draft.cc:
        top["Cc"] = [_stripped(a) for a in draft.cc]
    if draft.reply_to:
        top["Reply-To"] = [_stripped(a) for a in draft.reply_to]
    top["Subject"] = draft.subject.strip()
    top["Date"] = format_datetime(date)
    top["Message-ID"] = f"<{message_id}>"
    top["MIME-Version"] = "1.0"
    for name, value in draft.headers:
        top[name] = value.strip()
    for name, value in root.items():  # the body's Content-* headers, below ours
        top[name] = value
    top.set_payload(root.get_payload())
    return top.as_bytes(policy=POLICY)


def _stripped(address: Address) -> Address:
    """A display name is a phrase: the white space between its words is one space."""
    return Address(" ".join(address.display_name.split()), address.username, address.domain)


def _body(draft: Draft) -> MIMEPart:
    inline = [a for a in draft.attachments if a.content_id is not None]
    attached = [a for a in draft.attachments if a.content_id is None]
    html = _text(draft.html, "html") if draft.html is not None else None
    if html is not None and inline:
        html = _multipart("related", [html, *(_file(a) for a in inline)])
    text = _text(draft.text, "plain") if draft.text is not None else None
    if text is not None and html is not None:
        body = _multipart("alternative", [text, html])
    else:
        body = html or text or _text("", "plain")
    if attached:
        body = _multipart("mixed", [body, *(_file(a) for a in attached)])
    return body


def _text(content: str, subtype: str) -> MIMEPart:
    part = MIMEPart(policy=POLICY)
    short = all(len(line) <= TEXT_LINE for line in content.splitlines())
    cte = "7bit" if content.isascii() and short else "quoted-printable"
    part.set_content(content, subtype=subtype, charset="utf-8", cte=cte)
    return part


def _file(attachment: Attachment) -> MIMEPart:
    part = MIMEPart(policy=POLICY)
    maintype, _, subtype = attachment.content_type.partition("/")
    cid = f"<{attachment.content_id}>" if attachment.content_id is not None else None
    part.set_content(attachment.content, maintype, subtype, cte="base64",
                     disposition="inline" if cid else "attachment",
                     filename=attachment.filename.strip(), cid=cid, params=dict(attachment.params))
    return part


def _multipart(subtype: str, parts: list[MIMEPart]) -> MIMEPart:
    container = MIMEPart(policy=POLICY)
    container["Content-Type"] = f"multipart/{subtype}"
    for part in parts:
        container.attach(part)
    return container
