"""Bare CR and LF in DATA: made CRLF (only clients that may relay reach DATA), and never
a way to smuggle a second message past the relay (SMTP smuggling, 2023; aiosmtpd's own
``test_smtpsmuggling.py``). Real clients against the running relay and the harness upstream."""

from __future__ import annotations

import itertools
import re
import smtplib
import socket
from email.message import EmailMessage

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.harness import Relay, without_received

FAKE_ENDS = [b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\n"]
HEAD = (b"From: App <app@shop.example>\r\nTo: a@example.org\r\nSubject: Smuggling\r\n"
        b"Message-ID: <smuggle@shop.example>\r\n\r\nTesting")
SMUGGLED = (b"MAIL FROM:<evil@shop.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
            b"From: evil@shop.example\r\nSubject: smuggled\r\n\r\nNO SMUGGLING\r\n")


def session(relay: Relay, data: bytes) -> list[tuple[int, bytes]]:
    """One transaction whose DATA is ``data`` sent as it is (no stuffing, no line-ending
    fixes) and then ``.\\r\\n``; then QUIT. Every reply the relay gave after the 354."""
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("app@shop.example")[0] == 250
        assert client.rcpt("a@example.org")[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(data + b".\r\n")
        replies = [client.getreply()]
        client.putcmd("quit")
        while (reply := client.getreply())[0] != 221:  # a smuggled command's reply, if any
            replies.append(reply)
        client.close()
    return replies


def only_crlf(data: bytes) -> bool:
    return b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")


def lines_read_as(data: bytes) -> bytes:
    """What the relay makes of the DATA ``data`` (up to, not with, the final ``.\\r\\n``):
    CRLF, a bare CR and a bare LF each end a line, and a line's first dot is stuffing."""
    lines = re.split(rb"\r\n|\r|\n", data)[:-1]
    return b"".join(line.removeprefix(b".") + b"\r\n" for line in lines)


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_a_fake_end_of_data_from_a_trusted_client_stays_in_one_message(make_relay, upstream,
                                                                       fake_end):
    relay = make_relay(upstream=upstream)
    data = HEAD + fake_end + SMUGGLED
    replies = session(relay, data)
    assert [code for code, _ in replies] == [250]
    [copy] = upstream.received
    assert copy.rcpt_tos == ["a@example.org"]
    assert only_crlf(copy.data)
    assert b"NO SMUGGLING" in copy.data
    assert without_received(copy.data) == lines_read_as(data)


def test_aiosmtpd_smuggling_test_message_stays_in_one_message(make_relay, upstream):
    """The message of aiosmtpd's test_smtpsmuggling.py, sent the same way."""
    relay = make_relay(upstream=upstream)
    data = (b"From: Anne Person <anne@example.com>\r\nTo: Bart Person <bart@example.com>\r\n"
            b"Subject: A test\r\nMessage-ID: <ant>\r\n\r\nTesting\n.\r\nNO SMUGGLING\n\r\n")
    assert [code for code, _ in session(relay, data)] == [250]
    [copy] = upstream.received
    assert copy.data.endswith(b"Testing\r\n\r\nNO SMUGGLING\r\n\r\n")
    assert only_crlf(copy.data)


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_a_client_that_may_not_relay_never_reaches_data(make_relay, upstream, fake_end):
    """Bare line endings are made CRLF, never refused: only clients that may relay reach DATA
    (handle_MAIL refuses the others), so a smuggling attempt from anyone else is a stream of
    refused commands and nothing reaches the upstream."""
    relay = make_relay({"smtp": {"allowed_networks": []}}, upstream=upstream)
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<app@shop.example>\r\n"
                     b"RCPT TO:<a@example.org>\r\nDATA\r\n" + HEAD + fake_end + SMUGGLED
                     + b".\r\nQUIT\r\n")
        replies = b""
        while data := sock.recv(4096):  # aiosmtpd closes after too many bogus commands
            replies += data
    codes = re.findall(rb"^(\d{3}) ", replies, re.M)
    assert codes[2:5] == [b"554", b"503", b"503"]  # MAIL, RCPT, DATA after greeting, EHLO
    assert not {b"250", b"354"} & set(codes[2:])
    assert upstream.received == []


def test_smtplib_sending_as_bytes_with_bare_lf_is_delivered_with_crlf(make_relay, upstream):
    """``smtp.sendmail(from, to, msg.as_bytes())``: the email package ends lines with LF,
    smtplib dot-stuffs the lines that follow one and adds CRLF.CRLF."""
    relay = make_relay(upstream=upstream)
    msg = EmailMessage()
    msg["From"] = "App <app@shop.example>"
    msg["To"] = "a@example.org"
    msg["Subject"] = "Python idiom"
    msg["Message-ID"] = "<idiom@shop.example>"
    msg.set_content("Hello,\n.\n..two dots\n.leading dot\nbye\n")
    raw = msg.as_bytes()
    assert b"\r" not in raw
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        assert client.sendmail("app@shop.example", ["a@example.org"], raw) == {}
    [copy] = upstream.received
    assert only_crlf(copy.data)
    # smtplib ends the data with CRLF after the message's own final LF: one empty line more
    assert without_received(copy.data) == raw.replace(b"\n", b"\r\n") + b"\r\n"


PIECES = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b" ", b"From: x"])


def test_any_mix_of_line_endings_and_dots_arrives_as_one_crlf_message(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    sent = itertools.count()
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo("client.test")

        @settings(max_examples=150, deadline=None)
        @given(st.lists(PIECES, max_size=30).map(b"".join))
        def check(body: bytes) -> None:
            # each example a message of its own (the same bytes again would be a retry)
            data = f"Message-ID: <{next(sent)}@shop.example>\r\n".encode() + body + b"\r\n"
            # the client's data ends at the first CRLF.CRLF, counting the CRLF after DATA
            assume((b"\r\n" + data + b".\r\n").find(b"\r\n.\r\n") == len(data))
            upstream.received.clear()
            assert client.mail("app@shop.example")[0] == 250
            assert client.rcpt("a@example.org")[0] == 250
            client.putcmd("data")
            assert client.getreply()[0] == 354
            client.send(data + b".\r\n")
            code, text = client.getreply()
            assert code == 250, text
            [copy] = upstream.received
            assert only_crlf(copy.data)
            assert without_received(copy.data) == lines_read_as(data)
            assert client.noop()[0] == 250  # nothing smuggled is waiting to be answered

        check()
