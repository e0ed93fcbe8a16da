"""Delivery status notifications (relay/queue/dsn.py): an RFC 3464 report the stdlib parses."""

from __future__ import annotations

import email
import email.policy

from relay.queue import dsn
from relay.queue.schedule import EXPIRED, PERMANENT

ORIGINAL = (b"From: shop@shop.example\r\nTo: a@example.org\r\nSubject: Order 7\r\n\r\n"
            b"Secret body text\r\n")


def report(*failed: dsn.Failed) -> email.message.EmailMessage:
    data = dsn.build("relay.test", "shop@shop.example", "email_x", 1_800_000_000.0, failed,
                     ORIGINAL, 1_800_003_600.0, "b0und4ry", "<r@relay.test>")
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    return email.message_from_bytes(data, policy=email.policy.SMTP)


def test_a_report_has_the_three_parts_and_never_the_body():
    parsed = report(dsn.Failed("nobody@example.org", "550 5.1.1 No such user", PERMANENT, 1.0),
                    dsn.Failed("jörg@example.org", "451 4.3.0 busy", EXPIRED, 2.0))
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["To"] == "shop@shop.example" and parsed["Auto-Submitted"] == "auto-replied"
    notice, status, headers = parsed.get_payload()
    assert "<nobody@example.org>: 550 5.1.1 No such user" in notice.get_content()
    assert status.get_content_type() == "message/delivery-status"
    raw = status.as_bytes()
    assert b"Reporting-MTA: dns; relay.test" in raw
    assert b"Final-Recipient: rfc822; nobody@example.org" in raw and b"Status: 5.1.1" in raw
    assert "Final-Recipient: utf-8; jörg@example.org".encode() in raw
    assert b"Status: 4.4.7" in raw
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: Order 7" in headers.as_bytes()
    assert b"Secret body text" not in parsed.as_bytes()


def test_the_status_is_the_replys_permanent_code_or_a_default():
    assert dsn.status(dsn.Failed("a@b", "554 5.7.1 spam", PERMANENT, 0)) == "5.7.1"
    assert dsn.status(dsn.Failed("a@b", "550 rejected", PERMANENT, 0)) == "5.0.0"
    assert dsn.status(dsn.Failed("a@b", "450 4.2.1 busy", EXPIRED, 0)) == "4.4.7"
