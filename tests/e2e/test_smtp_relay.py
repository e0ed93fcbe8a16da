"""The mail path end to end: real SMTP clients (smtplib, swaks) → the relay → a real upstream
SMTP server (aiosmtpd) or the capture folder."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import shutil
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import urllib.error
import urllib.request
from typing import BinaryIO

import pytest

from relay.smtp import server as smtp_in
from relay.smtp.passwords import hash_password
from tests.clients import decoded
from tests.harness import Relay, UpstreamServer, wait_until, without_received

PLAIN = (
    b"From: App <app@shop.example>\r\n"
    b"To: a@example.org\r\n"
    b"Subject: Plain\r\n"
    b"Message-ID: <plain-1@shop.example>\r\n"
    b"X-Anypost-Tags: welcome,onboarding\r\n"
    b"X-Anypost-Campaign: spring-2026\r\n"
    b"X-Anypost-Topic: news.weekly\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"this line looks like the end:\r\n"
    b".\r\n"
    b"..and this one starts with dots\r\n"
    b". also this\r\n"
    b"\r\n.\r\n"
    b"end\r\n"
)

HTML = (
    "From: News <news@shop.example>\r\n"
    "To: list@example.org\r\n"
    "Subject: News\r\n"
    "Message-ID: <{mid}@shop.example>\r\n"
    "{extra}"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 7bit\r\n"
    "\r\n"
    "<html><body><p>Hi</p><a href=\"https://shop.example/sale?a=1&amp;b=2\">Sale</a>"
    "<a href=\"mailto:help@shop.example\">Help</a></body></html>\r\n"
)


def html_message(mid: str = "html-1", extra: str = "") -> bytes:
    return HTML.format(mid=mid, extra=extra).encode()


def send(relay: Relay, sender: str, recipients: list[str], message: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        return client.sendmail(sender, recipients, message)


def last_reply(relay: Relay, sender: str, recipients: list[str], message: bytes
               ) -> tuple[int, bytes]:
    """The DATA reply, whatever it is (smtplib raises on failures)."""
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo()
        code, _ = client.mail(sender)
        assert code == 250
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        return client.data(message)


def test_untracked_mail_arrives_byte_identical_without_control_headers(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
        client.ehlo()
        client.mail("app@shop.example")
        client.rcpt("a@example.org")
        code, text = client.data(PLAIN)
    assert code == 250
    assert re.search(rb"email_[0-9a-f-]{36}", text)
    [copy] = upstream.received
    expected = re.sub(rb"X-Anypost-[A-Za-z]+: [^\r]*\r\n", b"", PLAIN)
    assert without_received(copy.data) == expected
    assert copy.rcpt_tos == ["a@example.org"]
    assert b"X-Anypost" not in copy.data


def test_message_is_recorded_with_its_decision(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    code, text = last_reply(relay, "app@shop.example", ["a@example.org"], PLAIN)
    email_id = re.search(rb"email_[0-9a-f-]{36}", text).group().decode()
    with relay.db() as db:
        row = db.execute("SELECT * FROM messages WHERE email_id = ?", (email_id,)).fetchone()
        rcpt = db.execute("SELECT * FROM recipients WHERE email_id = ?", (email_id,)).fetchall()
    assert row["message_id"] == "<plain-1@shop.example>"
    assert row["sender"] == "app@shop.example"
    assert row["subject"] == "Plain"
    assert json.loads(row["tags"]) == ["welcome", "onboarding"]
    assert (row["campaign"], row["topic"]) == ("spring-2026", "news.weekly")
    assert row["track_opens"] == row["track_clicks"] == 0
    assert "tracking off by account default" in row["decision"]
    assert [(r["recipient"], r["status"]) for r in rcpt] == [("a@example.org", "sent")]


def test_tracked_mail_to_three_recipients_arrives_as_three_copies(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    recipients = ["a@example.org", "b@example.org", "c@example.net"]
    extra = "X-Anypost-Track-Opens: true\r\nX-Anypost-Track-Clicks: true\r\n"
    send(relay, "news@shop.example", recipients, html_message(extra=extra))
    assert sorted(r.rcpt_tos[0] for r in upstream.received) == recipients
    tokens = set()
    for copy in upstream.received:
        assert len(copy.rcpt_tos) == 1
        assert b"X-Anypost" not in copy.data
        found = re.findall(r"http://track\.test/[oc]/([A-Za-z0-9_-]+)", decoded(copy.data))
        assert len(found) == 2  # the pixel and the one http link; mailto untouched
        tokens.update(found)
    assert len(tokens) == 6


def test_alidm_trace_header_turns_tracking_on(make_relay, upstream):
    relay = make_relay({"tracking": {"tags": ["Test"]}}, upstream=upstream)
    trace = base64.b64encode(b'{"TagName": "Test", "OpenTrace": "1", "LinkTrace": "0"}')
    send(relay, "news@shop.example", ["a@example.org"],
         html_message(extra=f"X-AliDM-Trace: {trace.decode()}\r\n"))
    body = decoded(upstream.received[0].data)
    assert b"X-AliDM-Trace" not in upstream.received[0].data
    assert len(re.findall(r"http://track\.test/o/", body)) == 1
    assert "http://track.test/c/" not in body
    with relay.db() as db:
        row = db.execute("SELECT tag_name, track_opens, track_clicks FROM messages").fetchone()
    assert tuple(row) == ("Test", 1, 0)


def test_upstream_down_gives_451_and_a_retry_goes_through(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    upstream.stop()
    code, text = last_reply(relay, "app@shop.example", ["a@example.org"], PLAIN)
    assert code == 451
    assert b"Upstream unreachable" in text
    upstream.start()
    assert send(relay, "app@shop.example", ["a@example.org"], PLAIN) == {}
    assert len(upstream.received) == 1


def test_a_451_does_not_name_the_upstream_to_the_client(make_relay, upstream, caplog):
    """The client learns that the upstream is unreachable; where it is stays in the log."""
    relay = make_relay(upstream=upstream)
    upstream.stop()
    caplog.set_level(logging.WARNING, logger="relay.upstream")
    code, text = last_reply(relay, "app@shop.example", ["a@example.org"], PLAIN)
    assert (code, text) == (451, b"4.4.1 Upstream unreachable, try again later")
    [record] = caplog.records
    assert f"upstream 127.0.0.1:{upstream.port} failed for 1 recipient(s)" in record.getMessage()


def test_one_refused_recipient_is_reported_and_the_others_delivered(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    upstream.handler.refuse["bad@example.org"] = "550 5.1.1 No such user"
    extra = "X-Anypost-Track-Clicks: true\r\n"
    recipients = ["a@example.org", "bad@example.org", "b@example.org"]
    code, text = last_reply(relay, "news@shop.example", recipients,
                            html_message("partial-1", extra))
    assert code == 550
    assert b"bad@example.org: 550 5.1.1 No such user" in text
    assert b"Delivered to 2 of 3" in text
    assert sorted(r.rcpt_tos[0] for r in upstream.received) == ["a@example.org", "b@example.org"]


def test_a_retry_does_not_deliver_twice(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    upstream.handler.refuse["b@example.org"] = "450 4.2.1 Mailbox busy"
    recipients = ["a@example.org", "b@example.org"]
    code, text = last_reply(relay, "app@shop.example", recipients, PLAIN)
    assert code == 451
    assert b"Delivered to 1 of 2" in text
    assert b"b@example.org: 450 4.2.1 Mailbox busy" in text
    assert [r.rcpt_tos for r in upstream.received] == [["a@example.org"]]
    upstream.handler.refuse.clear()
    code, _ = last_reply(relay, "app@shop.example", recipients, PLAIN)
    assert code == 250
    assert [r.rcpt_tos for r in upstream.received] == [["a@example.org"], ["b@example.org"]]
    last_reply(relay, "app@shop.example", recipients, PLAIN)
    assert len(upstream.received) == 2


def test_client_outside_allowed_networks_is_refused(make_relay, upstream):
    relay = make_relay({"smtp": {"allowed_networks": ["192.0.2.0/24"]}}, upstream=upstream)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
        client.ehlo()
        code, text = client.mail("app@shop.example")
    assert code == 554
    assert b"Relay access denied" in text
    assert upstream.received == []


def test_an_auth_session_logs_no_deprecation_warning(make_relay, upstream, certificate,
                                                    caplog):
    """aiosmtpd's Session.login_data property warned on every successful AUTH."""
    cert, key = certificate
    relay = make_relay({"smtp": {
        "allowed_networks": [], "tls_cert": str(cert), "tls_key": str(key),
        "users": [{"name": "app", "password_hash": hash_password("s3cret")}]}},
        upstream=upstream)
    caplog.set_level(logging.INFO)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.login("app", "s3cret")
        assert client.sendmail("app@shop.example", ["a@example.org"], PLAIN) == {}
    assert any("auth ok for 'app'" in r.getMessage() for r in caplog.records)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_auth_is_offered_only_after_starttls(make_relay, upstream, certificate):
    cert, key = certificate
    relay = make_relay({"smtp": {
        "allowed_networks": [], "tls_cert": str(cert), "tls_key": str(key),
        "users": [{"name": "app", "password_hash": hash_password("s3cret")}]}},
        upstream=upstream)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        assert client.mail("app@shop.example")[0] == 530
        client.rset()
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("app", "wrong")
        client.login("app", "s3cret")
        assert client.sendmail("app@shop.example", ["a@example.org"], PLAIN) == {}
    assert len(upstream.received) == 1


@pytest.mark.parametrize(("header", "value", "problem"), [
    ("X-AliDM-Trace", "not*base64!", b"not valid base64"),
    ("X-AliDM-Trace", base64.b64encode(b"[1, 2]").decode(), b"JSON object"),
    ("X-AliDM-Trace", base64.b64encode(b"{broken").decode(), b"JSON object"),
    ("X-AliDM-Trace", base64.b64encode(b'{"OpenTrace": "yes"}').decode(), b"OpenTrace"),
    ("X-AliDM-Trace", base64.b64encode(b'{"Opentrace": "1"}').decode(), b"unknown key"),
    ("X-Anypost-Track-Opens", "maybe", b"expected true or false"),
    ("X-Anypost-Track-Clicks", "", b"expected true or false"),
    ("X-Anypost-Tags", ",".join(f"t{i}" for i in range(11)), b"at most 10 tags"),
    ("X-Anypost-Tags", "good,bad tag", b"'bad tag'"),
    ("X-Anypost-Campaign", "x" * 65, b"does not match"),
    ("X-Anypost-Topic", "Upper", b"does not match"),
])
def test_malformed_control_header_is_refused_naming_it(make_relay, upstream, header, value,
                                                       problem):
    relay = make_relay(upstream=upstream)
    message = html_message(extra=f"{header}: {value}\r\n")
    code, text = last_reply(relay, "news@shop.example", ["a@example.org"], message)
    assert 500 <= code < 600
    assert f"Malformed {header} header".encode() in text
    assert problem in text
    assert upstream.received == []


def test_oversize_message_gets_552(make_relay, upstream):
    relay = make_relay({"smtp": {"max_message_size": 2000}}, upstream=upstream)
    big = PLAIN + b"x" * 70 + b"\r\n" + (b"y" * 76 + b"\r\n") * 100
    code, text = last_reply(relay, "app@shop.example", ["a@example.org"], big)
    assert code == 552
    assert upstream.received == []
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "2000"


def test_too_many_recipients_get_452(make_relay, upstream):
    relay = make_relay({"smtp": {"max_recipients": 2}}, upstream=upstream)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
        client.ehlo()
        client.mail("app@shop.example")
        assert client.rcpt("a@example.org")[0] == 250
        assert client.rcpt("b@example.org")[0] == 250
        code, text = client.rcpt("c@example.org")
    assert code == 452
    assert b"Too many recipients" in text


def test_postmaster_without_a_domain_is_the_relay_hosts_postmaster(make_relay, upstream):
    """RFC 5321 4.5.1: RCPT TO:<Postmaster> must be accepted (it got 501)."""
    relay = make_relay(upstream=upstream)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo()
        client.mail("app@shop.example")
        assert client.rcpt("<Postmaster>")[0] == 250
        assert client.data(PLAIN)[0] == 250
    assert [r.rcpt_tos for r in upstream.received] == [["postmaster@relay.test"]]


def test_overlong_line_gets_500(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    message = PLAIN + b"z" * 1200 + b"\r\n"
    code, text = last_reply(relay, "app@shop.example", ["a@example.org"], message)
    assert code == 500
    assert b"Line too long" in text
    assert upstream.received == []


def test_capture_folder_gets_one_file_per_copy(make_relay, tmp_path):
    outbox = tmp_path / "outbox"
    relay = make_relay({"upstream": {"capture_dir": str(outbox)}})
    extra = "X-Anypost-Track-Opens: true\r\n"
    send(relay, "news@shop.example", ["a@example.org", "b@example.org"],
         html_message(extra=extra))
    envelopes = sorted(json.loads(p.read_text())["rcpt_tos"][0] for p in outbox.glob("*.json"))
    assert envelopes == ["a@example.org", "b@example.org"]
    for eml in outbox.glob("*.eml"):
        assert "http://track.test/o/" in decoded(eml.read_bytes())


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_delivers_through_the_relay(make_relay, upstream, tmp_path):
    relay = make_relay(upstream=upstream)
    message = tmp_path / "m.eml"
    message.write_bytes(PLAIN)
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{relay.smtp_port}", "--from", "app@shop.example",
         "--to", "a@example.org", "--data", f"@{message}"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<-  250 2\.0\.0 Ok: queued as email_", result.stdout)
    expected = re.sub(rb"X-Anypost-[A-Za-z]+: [^\r]*\r\n", b"", PLAIN)
    # swaks sends one CRLF of its own before the final dot
    assert without_received(upstream.received[0].data) == expected + b"\r\n"


def test_smtputf8_is_passed_on_and_refused_when_the_upstream_lacks_it(make_relay, loops):
    for supported in (True, False):
        utf8_message = ("From: Zoë <zoë@shop.example>\r\nTo: b@example.org\r\nSubject: é\r\n"
                        f"Message-ID: <é-{supported}@shop.example>\r\n\r\nhi\r\n")
        server = UpstreamServer(loops, smtputf8=supported)
        server.start()
        try:
            relay = make_relay(upstream=server)
            with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
                client.ehlo()
                assert client.has_extn("smtputf8")
                code, text = client.mail("zoë@shop.example", ["SMTPUTF8"])
                assert code == 250
                assert client.rcpt("b@example.org")[0] == 250
                code, text = client.data(utf8_message.encode())
            if supported:
                assert code == 250
                assert server.received[0].mail_options == ["SMTPUTF8"]
                assert without_received(server.received[0].data) == utf8_message.encode()
            else:
                assert code == 553
                assert b"does not support SMTPUTF8" in text
                assert server.received == []
        finally:
            server.stop()


def test_implicit_tls_listener(make_relay, upstream, certificate):
    cert, key = certificate
    relay = make_relay({"smtp": {"tls_cert": str(cert), "tls_key": str(key),
                                 "tls_listen": "127.0.0.1:0"}}, upstream=upstream)
    tls_port = relay.services.smtp.ports[1]
    context = ssl._create_unverified_context()
    with smtplib.SMTP_SSL("127.0.0.1", tls_port, context=context) as client:
        assert client.sendmail("app@shop.example", ["a@example.org"], PLAIN) == {}
    assert len(upstream.received) == 1


def test_envelope_address_with_a_control_character_is_refused_at_the_command(make_relay,
                                                                             upstream):
    """A bare CR is not a line ending for aiosmtpd; the upstream client refuses it, so
    accepting it would end every try in a 451 (and a resend to the other recipients). Bytes
    that are not UTF-8 could not be stored once the upstream had the message."""
    relay = make_relay(upstream=upstream)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
        client.ehlo()
        client.send('MAIL FROM:<"a\rRSET"@shop.example>\r\n')
        assert client.getreply()[0] == 553
        client.send(b"MAIL FROM:<caf\xe9@shop.example>\r\n")
        assert client.getreply()[0] == 553
        assert client.mail("app@shop.example")[0] == 250
        client.send('RCPT TO:<"b\rRCPT TO:<evil@x.example>"@example.org>\r\n')
        assert client.getreply()[0] == 553
        client.send('RCPT TO:<"b\x00"@example.org>\r\n')
        assert client.getreply()[0] == 553
        client.send(b"RCPT TO:<caf\xe9@example.org>\r\n")  # Latin-1, not UTF-8
        assert client.getreply() == (553, b"5.1.3 Bad recipient address syntax: "
                                          b"the address is not valid UTF-8")
        assert client.rcpt("a@example.org")[0] == 250
        assert client.data(PLAIN)[0] == 250
    [copy] = upstream.received
    assert copy.mail_from == "app@shop.example"
    assert copy.rcpt_tos == ["a@example.org"]



def test_control_headers_after_a_header_with_space_before_its_colon_are_removed(
        make_relay, upstream):
    """RFC 5322 4.5.3 (obs-optional): ``Subject : x`` is a header line, and receiving
    servers read it as one, so the header block does not end there."""
    relay = make_relay(upstream=upstream)
    message = (b"From: App <app@shop.example>\r\nSubject : Hi\r\nX-Anypost-Tags: secret\r\n"
               b"x-anypost-campaign:\r\n spring\r\nX-AliDM-Trace\t: e30=\r\n"
               b"Message-ID: <colon-1@shop.example>\r\n\r\nbody\r\n")
    send(relay, "app@shop.example", ["a@example.org"], message)
    [copy] = upstream.received
    assert without_received(copy.data) == (b"From: App <app@shop.example>\r\nSubject : Hi\r\n"
                                           b"Message-ID: <colon-1@shop.example>\r\n\r\nbody\r\n")
    row = relay.db().execute("SELECT subject, campaign FROM messages").fetchone()
    assert tuple(row) == ("Hi", "spring")


def test_upstream_with_starttls_and_auth(make_relay, loops, certificate):
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = UpstreamServer(loops, tls=context, login=("relay", "upstream-secret"))
    server.start()
    try:
        settings = {"host": "127.0.0.1", "port": server.port, "tls": "starttls",
                    "verify_certificate": False, "username": "relay"}
        relay = make_relay({"upstream": {**settings, "password": "upstream-secret"}})
        assert send(relay, "app@shop.example", ["a@example.org"], PLAIN) == {}
        assert send(relay, "app@shop.example", ["b@example.org"], PLAIN) == {}
        assert [r.rcpt_tos for r in server.received] == [["a@example.org"], ["b@example.org"]]
        wrong = make_relay({"upstream": {**settings, "password": "wrong"}})
        code, text = last_reply(wrong, "app@shop.example", ["c@example.org"], PLAIN)
        assert code == 451  # the client keeps the message while the operator fixes the config
        assert b"Upstream unreachable" in text
        assert len(server.received) == 2
    finally:
        server.stop()


def test_stop_drops_a_session_left_in_data_instead_of_waiting_for_it(make_relay, loops):
    """From Python 3.12.1 ``Server.wait_closed`` waits for every open connection: a client
    idling mid-DATA would hold the relay's stop for ``smtp.timeout`` (300 s by default)."""
    relay = make_relay()
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
        replies = start_data(sock)
        sock.sendall(b"Subject: half\r\n\r\nhalf a body\r\n")

        async def stop() -> None:
            async with asyncio.timeout(10):
                await relay.services.smtp.stop()

        loops.run(stop())
        assert read_to_close(replies) == b""


def start_data(sock: socket.socket) -> BinaryIO:
    """Over a raw socket, open a transaction up to DATA's 354; the replies are read from
    what it returns."""
    replies = sock.makefile("rb")

    def command(line: bytes) -> bytes:
        sock.sendall(line + b"\r\n")
        while (reply := replies.readline())[3:4] == b"-":
            pass
        return reply

    assert replies.readline().startswith(b"220")
    assert command(b"EHLO client.test").startswith(b"250")
    assert command(b"MAIL FROM:<news@shop.example>").startswith(b"250")
    assert command(b"RCPT TO:<a@example.org>").startswith(b"250")
    assert command(b"DATA").startswith(b"354")
    return replies


def send_raw(sock: socket.socket, message: bytes) -> BinaryIO:
    """Hand one message to the relay over a raw socket, up to the end of DATA."""
    replies = start_data(sock)
    sock.sendall(message + b".\r\n")
    return replies


def hold_upstream(loops, upstream: UpstreamServer) -> asyncio.Event:
    async def make() -> asyncio.Event:
        return asyncio.Event()
    gate = loops.run(make())
    upstream.handler.gate = gate
    return gate


def wait_until_held(upstream: UpstreamServer) -> None:
    wait_until(lambda: upstream.handler.held, timeout=10, what="the message at the upstream")


def read_to_close(replies: BinaryIO) -> bytes:
    """What the relay still sends before it ends the session (a reset ends it too)."""
    try:
        return replies.read()
    except ConnectionResetError:
        return b""


def test_a_click_while_the_message_is_being_delivered_meets_the_scanner_window(
        make_relay, loops, upstream):
    """Link scanners at the recipient's gateway click as the copy arrives, while the relay
    still delivers. The message's row was written only after every copy went out, so the
    tracker did not know when it was sent: the click counted as a person's, took the
    recipient's first flags and went out as a webhook."""
    gate = hold_upstream(loops, upstream)
    relay = make_relay({"tracking": {"scanner_window_seconds": 60}}, upstream=upstream,
                       http=True)
    message = (b"From: News <news@shop.example>\r\nTo: a@example.org\r\nSubject: Sale\r\n"
               b"X-Anypost-Track-Clicks: true\r\nContent-Type: text/html\r\n\r\n"
               b'<html><body><a href="https://shop.example/sale">Sale</a></body></html>\r\n')
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
        replies = send_raw(sock, message)
        wait_until_held(upstream)
        [click] = re.findall(r"http://track\.test(/c/[A-Za-z0-9_-]+)",
                             decoded(upstream.handler.holding[0]))
        request = urllib.request.Request(relay.http_url + click, headers={
            "User-Agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Gecko/20100101 Firefox/128.0"})
        with contextlib.suppress(urllib.error.HTTPError):  # the redirect is not followed
            urllib.request.build_opener(NoRedirect).open(request, timeout=10)
        loops.loop.call_soon_threadsafe(gate.set)
        assert replies.readline().startswith(b"250")
    with relay.db() as db:
        rows = db.execute("SELECT type, classification, counted FROM events").fetchall()
    assert [tuple(row) for row in rows] == [("click", "scanner", 0)]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object) -> None:
        return None


def test_a_client_that_hangs_up_during_delivery_does_not_cut_it(make_relay, loops, upstream):
    """aiosmtpd cancels the session of a client that hangs up; the delivery was cancelled with
    it, after the upstream had the copy and before its record: the retry sent it again."""
    gate = hold_upstream(loops, upstream)
    relay = make_relay(upstream=upstream)
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
        send_raw(sock, html_message("hang-up-1"))
        wait_until_held(upstream)
    sessions = relay.services.smtp.sessions
    wait_until(lambda: not any(s.transport for s in sessions), what="the relay to see the hang-up")
    loops.loop.call_soon_threadsafe(gate.set)
    with relay.db() as db:
        wait_until(lambda: db.execute("SELECT status FROM recipients WHERE status != 'sending'"
                                      ).fetchall(), what="the delivery's record")
        assert [tuple(r) for r in db.execute("SELECT status FROM recipients")] == [("sent",)]
    assert len(upstream.received) == 1


@pytest.mark.sqlite_only  # test_postgres.py has the outage of PostgreSQL
def test_a_store_that_cannot_be_written_defers_the_message_before_sending(make_relay,
                                                                         upstream):
    """It was forwarded anyway and answered 250, with no record: no dedupe for the client's
    retries, no webhook. A mail server whose queue cannot be written answers 4xx."""
    relay = make_relay(upstream=upstream)
    relay.services.store.lock_timeout = 0.2
    lock = sqlite3.connect(relay.config.store.path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo()
        client.mail("app@shop.example")
        client.rcpt("a@example.org")
        code, text = client.data(html_message("locked-1"))
        assert (code, text) == (451, b"4.3.0 The relay cannot record messages right now; "
                                     b"not sent, try again later")
        lock.execute("COMMIT")
        assert client.sendmail("app@shop.example", ["a@example.org"],
                               html_message("locked-1")) == {}
    lock.close()
    assert len(upstream.received) == 1


def test_a_retry_while_the_first_try_is_still_sending_is_not_sent_twice(make_relay, loops,
                                                                         upstream):
    """The duplicate check saw only deliveries already recorded: a client retrying while its
    first try waited on a slow upstream got every copy sent again."""
    gate = hold_upstream(loops, upstream)
    relay = make_relay(upstream=upstream)
    sessions = relay.services.smtp.sessions
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as first, \
            socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as retry:
        first_replies = send_raw(first, html_message("retry-1"))
        wait_until_held(upstream)
        retry_replies = send_raw(retry, html_message("retry-1"))
        wait_until(lambda: sum(s.delivering for s in sessions) == 2, what="both in DATA")
        loops.loop.call_soon_threadsafe(gate.set)
        assert first_replies.readline().startswith(b"250")
        assert retry_replies.readline().startswith(b"250")
    assert len(upstream.received) == 1
    with relay.db() as db:
        statuses = sorted(r[0] for r in db.execute("SELECT status FROM recipients"))
    assert statuses == ["duplicate", "sent"]


def test_stop_lets_a_message_being_delivered_finish_and_answer(make_relay, loops, upstream):
    """Dropping a session whose copy the upstream already took would lose the 250, and
    the client's retry could deliver it twice."""
    gate = hold_upstream(loops, upstream)
    relay = make_relay(upstream=upstream)
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
        replies = send_raw(sock, html_message("drain-1"))
        wait_until_held(upstream)
        stopping = asyncio.run_coroutine_threadsafe(relay.services.smtp.stop(), loops.loop)
        loops.run(asyncio.sleep(0.2))  # the stop has run as far as it goes on its own
        assert not stopping.done()
        loops.loop.call_soon_threadsafe(gate.set)
        assert replies.readline().startswith(b"250")
        assert replies.read() == b""  # then the relay closed the session
        stopping.result(10)
    assert len(upstream.received) == 1


def test_stop_aborts_a_delivery_that_outlasts_the_grace_period(make_relay, loops, upstream,
                                                               monkeypatch):
    monkeypatch.setattr(smtp_in, "DRAIN_SECONDS", 0.2)
    gate = hold_upstream(loops, upstream)
    relay = make_relay(upstream=upstream)
    try:
        with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
            replies = send_raw(sock, html_message("drain-2"))
            wait_until_held(upstream)
            stopping = asyncio.run_coroutine_threadsafe(relay.services.smtp.stop(),
                                                        loops.loop)
            stopping.result(10)
            assert read_to_close(replies) == b""  # no reply: the session was dropped
    finally:
        loops.loop.call_soon_threadsafe(gate.set)


def test_a_pooled_connection_that_died_is_replaced_and_the_message_sent(make_relay, upstream):
    """The relay finds out only when it uses the connection: it must try a fresh one."""
    relay = make_relay(upstream=upstream)
    assert send(relay, "app@shop.example", ["a@example.org"], PLAIN) == {}
    upstream.handler.drop_next_mail = True
    code, text = last_reply(relay, "app@shop.example", ["b@example.org"], PLAIN)
    assert (code, text[:6]) == (250, b"2.0.0 ")
    assert [r.rcpt_tos for r in upstream.received] == [["a@example.org"], ["b@example.org"]]


def test_a_pooled_connection_the_upstream_timed_out_is_replaced(make_relay, loops):
    """Postfix ends a connection idle for its smtpd_timeout with a 421 and a close."""
    server = UpstreamServer(loops, timeout=0.5)
    server.start()
    try:
        relay = make_relay(upstream=server)
        assert send(relay, "app@shop.example", ["a@example.org"], PLAIN) == {}
        wait_until(lambda: server.handler.timed_out, timeout=10, what="the upstream timeout")
        assert last_reply(relay, "app@shop.example", ["b@example.org"], PLAIN)[0] == 250
        assert [r.rcpt_tos for r in server.received] == [["a@example.org"], ["b@example.org"]]
    finally:
        server.stop()


def test_a_null_reverse_path_is_forwarded_as_one(make_relay, upstream):
    """Bounces and delivery notifications are sent with MAIL FROM:<> (RFC 5321 4.5.5)."""
    relay = make_relay(upstream=upstream)
    code, text = last_reply(relay, "", ["a@example.org"], PLAIN)
    assert code == 250, text
    [copy] = upstream.received
    assert copy.mail_from == "<>"  # aiosmtpd's spelling of the empty reverse-path
    assert relay.db().execute("SELECT sender FROM messages").fetchone()[0] == ""


def test_a_refused_data_command_leaves_the_pooled_connection_clean(make_relay, upstream):
    """After a non-354 reply to DATA the upstream keeps the transaction until RSET; the
    next message on that connection would meet '503 nested MAIL command'."""
    relay = make_relay(upstream=upstream)
    upstream.handler.data_command_reply = "451 4.3.0 Data-stage policy unavailable"
    code, text = last_reply(relay, "app@shop.example", ["a@example.org"], PLAIN)
    assert (code, text) == (451, b"4.3.0 Data-stage policy unavailable")
    assert last_reply(relay, "app@shop.example", ["b@example.org"], PLAIN)[0] == 250
    assert [r.rcpt_tos for r in upstream.received] == [["b@example.org"]]


def test_every_2xx_rcpt_reply_gets_the_message(make_relay, upstream):
    """252 (RFC 5321 3.5.3) accepts the recipient: a 250 to the client without sending the
    message to the upstream would lose it."""
    relay = make_relay(upstream=upstream)
    upstream.handler.refuse["b@example.org"] = "252 2.1.5 Cannot VRFY user, but will accept"
    assert last_reply(relay, "app@shop.example", ["b@example.org"], PLAIN)[0] == 250
    [copy] = upstream.received
    assert copy.rcpt_tos == ["b@example.org"]


def test_a_998_character_line_starting_with_a_dot_is_accepted(make_relay, upstream):
    """The dot added by dot-stuffing is not part of the line (RFC 5321 4.5.3.1.6)."""
    relay = make_relay(upstream=upstream)
    line = b"." + b"x" * 997
    message = (b"From: a@shop.example\r\nSubject: dots\r\nMessage-ID: <dots-1@shop.example>\r\n"
               b"\r\n" + line + b"\r\n")
    assert last_reply(relay, "app@shop.example", ["a@example.org"], message)[0] == 250
    assert without_received(upstream.received[0].data) == message
    code, text = last_reply(relay, "app@shop.example", ["a@example.org"],
                            message.replace(line, b"." + line))
    assert code == 500
    assert b"Line too long" in text


LATIN1 = (b"From: a@shop.example\r\nTo: b@example.org\r\nSubject: caf\xe9 cr\xe8me\r\n"
          b"Message-ID: <latin1-1@shop.example>\r\n\r\nhi\r\n")


def test_a_raw_8bit_header_is_delivered_once_and_recorded(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    for _ in range(2):  # a client that did not get the 250 tries again
        assert last_reply(relay, "app@shop.example", ["b@example.org"], LATIN1)[0] == 250
    assert len(upstream.received) == 1
    assert without_received(upstream.received[0].data) == LATIN1
    subjects = [row[0] for row in relay.db().execute("SELECT subject FROM messages")]
    assert subjects == ["caf\N{REPLACEMENT CHARACTER} cr\N{REPLACEMENT CHARACTER}me"] * 2


@pytest.mark.sqlite_only  # a SQLite trigger makes the write fail
def test_a_message_the_store_could_not_record_is_still_answered_as_delivered(make_relay,
                                                                             upstream):
    """'451 not sent' after the upstream took the message would make the client send it
    again: the reply follows the upstream's."""
    relay = make_relay(upstream=upstream)
    with relay.db() as db:  # the row before sending is written; the answers after it are not
        db.execute("CREATE TRIGGER full BEFORE INSERT ON recipients WHEN NEW.status != "
                   "'sending' BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    code, text = last_reply(relay, "app@shop.example", ["a@example.org"], PLAIN)
    assert (code, text[:6]) == (250, b"2.0.0 ")
    assert len(upstream.received) == 1
    with relay.db() as db:  # until this process restarts (then: unknown)
        assert [tuple(r) for r in db.execute("SELECT status FROM recipients")] == [("sending",)]


def test_a_flood_of_commands_ends_the_session(make_relay, upstream, monkeypatch):
    """Each command restarts the idle timeout: without a budget per command, one client could
    hold a session forever."""
    budget = 50
    monkeypatch.setattr(smtp_in, "MESSAGES_PER_SESSION", budget)
    relay = make_relay({"smtp": {"max_recipients": 2}}, upstream=upstream)
    floods = [(b"NOOP", budget), (b"RCPT TO:<a@example.org>", budget * 2)]
    for command, allowed in floods:
        with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
            replies = sock.makefile("rb")
            sock.sendall(b"HELO client.test\r\nMAIL FROM:<app@shop.example>\r\n"
                         + (command + b"\r\n") * (allowed + 1))
            lines = read_to_close(replies).splitlines()
        assert len(lines) == 3 + allowed + 1
        assert lines[-1].startswith(b"421 4.7.0 ")
    assert upstream.received == []


def test_the_idle_timeout_does_not_run_while_the_relay_delivers(make_relay, loops, upstream):
    """The session waits for the relay, not for the client: dropping it once the upstream
    holds the message would lose the reply, and the client would send the message again."""
    gate = hold_upstream(loops, upstream)
    relay = make_relay({"smtp": {"timeout": 0.5}}, upstream=upstream)
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
        replies = send_raw(sock, html_message("slow-1"))
        wait_until_held(upstream)
        with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as idle:
            assert idle.recv(100).startswith(b"220")
            # a whole timeout has passed
            assert read_to_close(idle.makefile("rb")).startswith(b"421 4.4.2 ")
        loops.loop.call_soon_threadsafe(gate.set)
        assert replies.readline().startswith(b"250 2.0.0 Ok")
        # idle again: the timeout runs again
        assert read_to_close(replies).startswith(b"421 4.4.2 ")
    assert len(upstream.received) == 1
    assert relay.db().execute("SELECT count(*) FROM deliveries").fetchone()[0] == 1
