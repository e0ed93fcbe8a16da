"""The Received: line on every forwarded copy (RFC 5321 4.4): read back with Python's email
package, outside every DKIM signature, and switched off by smtp.add_received = false."""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import ssl
import subprocess
import time
from email import message_from_bytes, policy
from email.utils import parsedate_to_datetime
from pathlib import Path

import dkim
import pytest

from relay.smtp import trace
from relay.smtp.passwords import hash_password
from tests.harness import without_received

MESSAGE = (b"From: News <news@shop.example>\r\nTo: list@example.org\r\nSubject: News\r\n"
           b"Message-ID: <news-1@shop.example>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/html; charset=utf-8\r\n{extra}\r\n"
           b'<html><body><a href="https://shop.example/sale">Sale</a></body></html>\r\n')
TRACKED = MESSAGE.replace(b"{extra}", b"X-Anypost-Track-Opens: true\r\n"
                                      b"X-Anypost-Track-Clicks: true\r\n")
UNTRACKED = MESSAGE.replace(b"{extra}", b"")
EMAIL_ID = r"email_[0-9a-f-]{36}"


def received_of(data: bytes) -> str:
    """The copy's first header, which must be a Received line, as Python's email reads it;
    its lines within 78 characters."""
    assert data.startswith(b"Received: ")
    head = data[: data.index(b"\r\n\r\n")]
    assert all(len(line) <= 78 for line in head.split(b"\r\n")[:3])
    message = message_from_bytes(data, policy=policy.default)
    assert message.defects == []
    [first, *_] = message.items()
    assert first[0] == "Received"
    return str(first[1])


def check_date(value: str) -> None:
    when = parsedate_to_datetime(value.rpartition(";")[2].strip())
    assert when.tzinfo is not None
    assert abs(when.timestamp() - time.time()) < 60


def test_every_copy_has_a_received_line(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    recipients = ["a@example.org", "b@example.org", "c@example.net"]
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo("app.client.test")
        assert client.sendmail("news@shop.example", recipients, TRACKED) == {}
        assert client.sendmail("news@shop.example", recipients[:2], UNTRACKED) == {}
    *tracked, untracked = upstream.received
    assert sorted(copy.rcpt_tos[0] for copy in tracked) == recipients
    ids = set()
    for copy in tracked:
        value = received_of(copy.data)
        match = re.fullmatch(rf"from app\.client\.test \(\[127\.0\.0\.1\]\) by relay\.test "
                             rf"with ESMTP id ({EMAIL_ID}) for <{re.escape(copy.rcpt_tos[0])}>; "
                             rf".+", value)
        assert match, value
        ids.add(match[1])
        check_date(value)
    assert len(ids) == 1  # one message, one id
    value = received_of(untracked.data)
    assert re.fullmatch(rf"from app\.client\.test \(\[127\.0\.0\.1\]\) by relay\.test "
                        rf"with ESMTP id {EMAIL_ID}; .+", value), value  # two recipients: no for
    check_date(value)
    assert without_received(untracked.data) == UNTRACKED


def test_the_protocol_says_tls_and_auth(make_relay, upstream, certificate):
    cert, key = certificate
    relay = make_relay({"smtp": {
        "allowed_networks": [], "tls_cert": str(cert), "tls_key": str(key),
        "users": [{"name": "app", "password_hash": hash_password("s3cret")}]}},
        upstream=upstream)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login("app", "s3cret")
        assert client.sendmail("news@shop.example", ["a@example.org"], UNTRACKED) == {}
    assert " with ESMTPSA id " in received_of(upstream.received[0].data)


def test_helo_and_a_name_that_is_no_host_name(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
        replies = sock.makefile("rb")
        sock.sendall(b"HELO not a (host) name\r\nMAIL FROM:<news@shop.example>\r\n"
                     b"RCPT TO:<a@example.org>\r\nDATA\r\n" + UNTRACKED + b".\r\nQUIT\r\n")
        assert replies.read().splitlines()[-2].startswith(b"250 2.0.0 Ok")
    value = received_of(upstream.received[0].data)
    assert value.startswith("from [127.0.0.1] (helo=not?a??host??name) by relay.test "
                            "with SMTP id "), value


def test_add_received_false_leaves_the_message_as_it_came(make_relay, upstream):
    relay = make_relay({"smtp": {"add_received": False}}, upstream=upstream)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        assert client.sendmail("news@shop.example", ["a@example.org"], UNTRACKED) == {}
    assert upstream.received[0].data == UNTRACKED


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """(private key file, DNS TXT record) for a throwaway 1024-bit RSA key."""
    private = tmp_path_factory.mktemp("dkim") / "key.pem"
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(private), "1024"],
                   check=True, capture_output=True)
    public = subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout", "-outform",
                             "DER"], check=True, capture_output=True).stdout
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


@pytest.mark.parametrize("message", [TRACKED, UNTRACKED], ids=["re-signed", "untouched"])
def test_a_dkim_signed_message_still_verifies(make_relay, upstream, dkim_key, message):
    private, record = dkim_key
    relay = make_relay({"dkim": [{"domain": "shop.example", "selector": "sel",
                                  "private_key_file": str(private)}]}, upstream=upstream)
    signed = dkim.sign(message, b"sel", b"shop.example", private.read_bytes(),
                       canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=[b"from", b"to", b"subject"]) + message
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        assert client.sendmail("news@shop.example", ["a@example.org"], signed) == {}
    [copy] = upstream.received
    received_of(copy.data)
    assert (b"/c/" in copy.data) == (message is TRACKED)  # re-signed after the rewrite
    assert dkim.verify(copy.data, dnsfunc=lambda name, timeout=5: record)


@pytest.mark.parametrize(("address", "literal"), [
    ("192.0.2.1", "[192.0.2.1]"),
    ("2001:db8::1", "[IPv6:2001:db8::1]"),
    ("::ffff:192.0.2.1", "[192.0.2.1]"),
    ("fe80::1%eth0", "[IPv6:fe80::1]"),
])
def test_the_client_address_is_an_address_literal(address, literal):
    line = trace.Received(helo="client.test", address=address, by="relay.test",
                          protocol="ESMTP", email_id="email_x", when=0).field(None)
    assert line.startswith(f"Received: from client.test ({literal}) by relay.test".encode())


def test_long_names_are_folded_between_clauses():
    line = trace.Received(helo="h" * 60 + ".test", address="192.0.2.1", by="r" * 70 + ".test",
                          protocol="UTF8SMTPSA", email_id="email_" + "0" * 36,
                          when=0).field("zoë@" + "d" * 60 + ".example")
    lines = line.decode().split("\r\n")
    assert lines[-1] == ""
    assert all(rest.startswith(" ") for rest in lines[1:-1])
    assert [part.strip() for part in lines[:-1]] == [
        f"Received: from {'h' * 60}.test ([192.0.2.1])", f"by {'r' * 70}.test",
        "with UTF8SMTPSA id email_" + "0" * 36, f"for <zoë@{'d' * 60}.example>;",
        lines[-2].strip()]
    assert message_from_bytes(line + b"\r\n", policy=policy.SMTPUTF8)["Received"]


def test_a_non_ascii_recipient_is_named_only_in_smtputf8_mail():
    """A header with UTF-8 in it needs an SMTPUTF8 transaction (RFC 6532); aiosmtpd takes
    such an address without one."""
    for protocol, named in (("ESMTP", False), ("UTF8SMTP", True)):
        line = trace.Received(helo="client.test", address="192.0.2.1", by="relay.test",
                              protocol=protocol, email_id="email_x", when=0).field("zoë@x.test")
        assert ("for <zoë@x.test>;".encode() in line) == named
        assert line.isascii() != named


@pytest.mark.parametrize(("options", "expected"), [
    ({"esmtp": False, "tls": False, "authenticated": False, "utf8": False}, "SMTP"),
    ({"esmtp": True, "tls": False, "authenticated": False, "utf8": False}, "ESMTP"),
    ({"esmtp": True, "tls": True, "authenticated": False, "utf8": False}, "ESMTPS"),
    ({"esmtp": True, "tls": True, "authenticated": True, "utf8": False}, "ESMTPSA"),
    ({"esmtp": True, "tls": False, "authenticated": True, "utf8": False}, "ESMTPA"),
    ({"esmtp": True, "tls": True, "authenticated": True, "utf8": True}, "UTF8SMTPSA"),
])
def test_protocol_names(options, expected):
    assert trace.protocol(**options) == expected

