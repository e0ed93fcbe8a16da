"""Delivery status notifications (RFC 3464) for recipients the queue gave up, sent to the
envelope sender when ``queue.bounce_messages`` is on: a ``multipart/report`` (RFC 6522) with
a note for people, the ``message/delivery-status`` part for programs, and the original
message's header (``text/rfc822-headers``). Bytes in, bytes out, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from relay.queue.schedule import EXPIRED

# RFC 3463 enhanced status codes: the one a reply carries, or these.
_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
EXPIRED_STATUS = "4.4.7"  # delivery time expired
PERMANENT_STATUS = "5.0.0"
SUBJECT = "Undelivered Mail Returned to Sender"


@dataclass(frozen=True, slots=True)
class Failed:
    """One recipient given up: the upstream's last reply and why (schedule.PERMANENT/EXPIRED)."""

    recipient: str
    reply: str
    bounce_type: str
    at: float


def status(failed: Failed) -> str:
    """The recipient's RFC 3463 status: an expired one is 4.4.7, a refused one the code its
    reply carries (else 5.0.0)."""
    if failed.bounce_type == EXPIRED:
        return EXPIRED_STATUS
    match = _ENHANCED.search(failed.reply)
    return match.group(1) if match and match.group(1)[0] == "5" else PERMANENT_STATUS


def header_block(message: bytes) -> bytes:
    """The header section of ``message`` (CRLF line endings), without the blank line."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def build(reporting_mta: str, sender: str, email_id: str, arrived: float,
          failed: Sequence[Failed], original: bytes, now: float, boundary: str,
          message_id: str) -> bytes:
    """The report, CRLF line endings, not dot-stuffed. ``original``: the message as received
    (unstuffed); ``boundary`` and ``message_id``: unique per report (the caller's)."""
    lines = "".join(f"<{f.recipient}>: {_one_line(f.reply)}\r\n" for f in failed)
    note = (f"This is the mail system at host {reporting_mta}.\r\n\r\n"
            f"Your message {email_id} could not be delivered to these recipients:\r\n\r\n"
            f"{lines}\r\n"
            "A recipient marked expired could not be reached for as long as the relay keeps "
            "trying; the others were refused.\r\n")
    per_recipient = "".join(
        f"\r\nFinal-Recipient: {_address_type(f.recipient)}; {f.recipient}\r\n"
        f"Action: failed\r\nStatus: {status(f)}\r\n"
        f"Diagnostic-Code: smtp; {_one_line(f.reply)}\r\n"
        f"Last-Attempt-Date: {_date(f.at)}\r\n" for f in failed)
    report = (f"Reporting-MTA: dns; {reporting_mta}\r\nX-Relay-Email-Id: {email_id}\r\n"
              f"Arrival-Date: {_date(arrived)}\r\n{per_recipient}")
    head = (f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
            f"To: <{sender}>\r\nSubject: {SUBJECT}\r\nDate: {_date(now)}\r\n"
            f"Message-ID: {message_id}\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/report; report-type=delivery-status;\r\n"
            f' boundary="{boundary}"\r\n\r\n')
    body = (f"--{boundary}\r\nContent-Description: Notification\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            f"\r\n{note}\r\n"
            f"--{boundary}\r\nContent-Description: Delivery report\r\n"
            f"Content-Type: message/delivery-status\r\n\r\n{report}\r\n"
            f"--{boundary}\r\nContent-Description: Undelivered message headers\r\n"
            f"Content-Type: text/rfc822-headers\r\n\r\n")
    return ((head + body).encode("utf-8") + header_block(original)
            + f"\r\n--{boundary}--\r\n".encode())


def _address_type(address: str) -> str:
    """RFC 3464's ``rfc822``, or RFC 6533's ``utf-8`` for an address that is not ASCII."""
    return "rfc822" if address.isascii() else "utf-8"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _date(at: float) -> str:
    return format_datetime(datetime.fromtimestamp(at, UTC))
