"""Queue mode end to end: real SMTP in (smtplib), a real upstream that fails on demand, the
relay's store (a SQLite file, or PostgreSQL with RELAY_TEST_STORE=postgresql), time driven by
a manual clock (tests/clock.py)."""

from __future__ import annotations

import collections
import contextlib
import email
import email.policy
import itertools
import json
import logging
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from relay import cli
from relay import config as config_module
from relay.smtp import delivery
from relay.store import engine
from relay.store.transaction import transaction
from tests import pg
from tests.clients import api_key, call
from tests.clock import ManualClock
from tests.e2e.test_app import start, wait_for_port
from tests.e2e.test_smtp_relay import hold_upstream
from tests.harness import LoopThread, free_port, store_url, wait_until
from tests.webhooks.test_outbox import Receiver
from tests.webhooks.test_outbox import settings as webhook_settings

QUEUE = {"smtp": {"mode": "queue"}}
# The upstream's timeout of tests that hold a copy at the upstream (UpstreamHandler.gate) while
# they move the clock, well past how long they take on a loaded machine.
HOLDING = {"upstream": {"timeout": 300}}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on a loop of its own (tests/webhooks/test_outbox.py)."""
    server = Receiver(LoopThread())
    yield server
    server.stop()
    server.loops.close()


def message(n: int = 0, extra: str = "") -> bytes:
    return (f"From: shop@shop.example\r\nTo: a@example.org\r\nSubject: order {n}\r\n"
            f"Message-ID: <order-{n}@shop.example>\r\n{extra}\r\nYour order {n}.\r\n").encode()


def send(relay, recipients=("a@example.org",), data: bytes | None = None,
         sender: str = "shop@shop.example") -> tuple[int, str]:
    """The relay's reply to DATA (code, text)."""
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for r in recipients:
            client.rcpt(r)
        code, text = client.data(data or message())
        return code, text.decode()


def queue_rows(relay, sql: str, params=()) -> list[tuple]:
    with contextlib.closing(relay.db()) as conn:
        return [tuple(row) for row in conn.execute(sql, params).fetchall()]


def queued(relay) -> int:
    return queue_rows(relay, "SELECT count(*) FROM queue_messages")[0][0]


def attempts(relay, recipient: str) -> int:
    rows = queue_rows(relay, "SELECT attempts FROM queue_recipients WHERE recipient = ?",
                      (recipient,))
    return rows[0][0] if rows else -1


def test_250_means_stored_then_delivered(make_relay, upstream):
    relay = make_relay(QUEUE, upstream=upstream)
    code, text = send(relay, ["a@example.org", "b@example.org"])
    assert code == 250 and "queued as email_" in text
    wait_until(lambda: len(upstream.received) == 1, what="delivery")
    assert sorted(upstream.received[0].rcpt_tos) == ["a@example.org", "b@example.org"]
    assert upstream.received[0].data.endswith(message())  # below the Received line
    wait_until(lambda: queued(relay) == 0, what="the queue emptied")
    assert queue_rows(relay, "SELECT messages, bytes FROM queue_totals") == [(0, 0)]
    email_id = text.split()[-1]
    statuses = queue_rows(relay, "SELECT recipient, status FROM recipients WHERE email_id = ?",
                          (email_id,))
    assert sorted(statuses) == [("a@example.org", "sent"), ("b@example.org", "sent")]


def test_a_malformed_control_header_is_refused_before_it_is_stored(make_relay, upstream):
    relay = make_relay(QUEUE, upstream=upstream)
    code, text = send(relay, data=message(extra="X-Anypost-Track-Opens: maybe\r\n"))
    assert code == 550 and "X-Anypost-Track-Opens" in text
    assert queued(relay) == 0


def test_a_temporary_failure_is_retried_on_the_schedule(make_relay, upstream):
    clock = ManualClock()
    relay = make_relay({**QUEUE, "queue": {"retry_seconds": [60, 300]}}, upstream=upstream,
                       clock=clock)
    upstream.handler.data_reply = "451 4.3.0 upstream busy"
    assert send(relay)[0] == 250
    wait_until(lambda: attempts(relay, "a@example.org") == 1, what="the first attempt")
    clock.advance(relay.loops, 59)
    assert attempts(relay, "a@example.org") == 1  # not due yet
    clock.advance(relay.loops, 1)
    wait_until(lambda: attempts(relay, "a@example.org") == 2, what="the second attempt")
    upstream.handler.data_reply = None
    clock.advance(relay.loops, 299)
    assert attempts(relay, "a@example.org") == 2
    clock.advance(relay.loops, 1)
    wait_until(lambda: len(upstream.received) == 1, what="delivery on the third attempt")
    wait_until(lambda: queued(relay) == 0, what="the queue emptied")


def test_a_wait_named_in_the_reply_is_followed(make_relay, upstream):
    clock = ManualClock()
    relay = make_relay(QUEUE, upstream=upstream, clock=clock)
    upstream.handler.data_reply = "454 4.7.0 Throttling: try again in 5 seconds"
    assert send(relay)[0] == 250
    wait_until(lambda: attempts(relay, "a@example.org") == 1, what="the first attempt")
    upstream.handler.data_reply = None
    clock.advance(relay.loops, 5)
    wait_until(lambda: len(upstream.received) == 1, what="delivery 5 seconds later")


def test_a_5xx_recipient_is_given_up_while_the_others_are_delivered(make_relay, upstream):
    relay = make_relay(QUEUE, upstream=upstream)
    upstream.handler.refuse["nobody@example.org"] = "550 5.1.1 No such user"
    assert send(relay, ["a@example.org", "nobody@example.org"])[0] == 250
    wait_until(lambda: queued(relay) == 0, what="the queue emptied")
    assert [r.rcpt_tos for r in upstream.received] == [["a@example.org"]]


def test_a_message_never_accepted_expires(make_relay, upstream):
    clock = ManualClock()
    relay = make_relay({**QUEUE, "queue": {"retry_seconds": [600], "max_age_hours": 0.5}},
                       upstream=upstream, clock=clock)
    upstream.handler.data_reply = "421 4.4.2 upstream down"
    assert send(relay)[0] == 250
    for attempt in (1, 2, 3):
        wait_until(lambda a=attempt: attempts(relay, "a@example.org") == a,
                   what=f"attempt {attempt}")
        clock.advance(relay.loops, 600)
    # the fourth attempt is at the expiry (30 minutes), and fails: given up
    wait_until(lambda: queued(relay) == 0, what="the message given up")
    assert upstream.received == []
    assert queue_rows(relay, "SELECT status, reply FROM recipients") == [
        ("expired", "421 4.4.2 upstream down")]


def test_a_full_queue_answers_452_and_keeps_nothing(make_relay, upstream):
    relay = make_relay({**QUEUE, "queue": {"max_messages": 1}}, upstream=upstream,
                       clock=ManualClock())
    upstream.handler.data_reply = "451 4.3.0 upstream busy"
    assert send(relay)[0] == 250
    code, text = send(relay, data=message(1))
    assert code == 452 and "queue is full" in text
    assert queue_rows(relay, "SELECT count(*), sum(size) FROM queue_messages") == \
        queue_rows(relay, "SELECT messages, bytes FROM queue_totals")
    assert queued(relay) == 1


def test_max_bytes_bounds_the_queue(make_relay, upstream):
    relay = make_relay({**QUEUE, "queue": {"max_bytes": len(message()) + 10}},
                       upstream=upstream, clock=ManualClock())
    upstream.handler.data_reply = "451 4.3.0 upstream busy"
    assert send(relay)[0] == 250
    assert send(relay, data=message(1))[0] == 452


def test_a_message_larger_than_max_bytes_is_refused_for_good(make_relay, upstream):
    """Found by review: an empty queue answered such a message 452 "the queue is full", which
    a client retries for as long as it keeps trying, and it never fits."""
    relay = make_relay({**QUEUE, "queue": {"max_bytes": len(message()) - 1}},
                       upstream=upstream, clock=ManualClock())
    code, text = send(relay)
    assert code == 552 and "queue.max_bytes" in text
    assert queue_rows(relay, "SELECT messages, bytes FROM queue_totals") == [(0, 0)]


@pytest.mark.sqlite_only  # SQLite's page limit stands for the full disk
def test_a_full_disk_answers_452_and_keeps_nothing(make_relay, upstream):
    relay = make_relay(QUEUE, upstream=upstream)
    writer = relay.services.store.writer
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL, as on a full disk
    big = message() + (b"y" * 70 + b"\r\n") * 3000  # more than the free pages hold
    code, text = send(relay, data=big)
    assert code == 452 and "Insufficient storage" in text
    writer.execute("PRAGMA max_page_count = 1073741823")
    assert queued(relay) == 0
    assert queue_rows(relay, "SELECT messages, bytes FROM queue_totals") == [(0, 0)]
    assert send(relay)[0] == 250  # and it takes mail again once there is room


@pytest.mark.skipif(pg.ENGINE != "postgresql",
                    reason="PostgreSQL's disk_full (SQLite's: the test above)")
def test_a_full_disk_of_postgresql_answers_452_and_keeps_nothing(make_relay, upstream):
    """It answered 451 (as for a store that cannot be written at all): the client was not
    told that the relay ran out of room. The server's error for a full disk, disk_full
    (SQLSTATE 53100), raised by a trigger."""
    relay = make_relay(QUEUE, upstream=upstream)
    with contextlib.closing(relay.db()) as db:
        db.execute("CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN"
                   " RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full';"
                   " END$$")
        db.execute("CREATE TRIGGER full_disk BEFORE INSERT ON queue_messages"
                   " FOR EACH ROW EXECUTE FUNCTION full_disk()")
        code, text = send(relay)
        assert code == 452 and "Insufficient storage" in text
        db.execute("DROP TRIGGER full_disk ON queue_messages")
    assert queued(relay) == 0
    assert queue_rows(relay, "SELECT messages, bytes FROM queue_totals") == [(0, 0)]
    assert send(relay)[0] == 250


@pytest.mark.sqlite_only  # SQLite's one write lock, held by another process past its timeout
def test_a_store_that_cannot_be_written_answers_451(make_relay, upstream):
    relay = make_relay(QUEUE, upstream=upstream)
    relay.services.store.lock_timeout = 0.2
    blocker = sqlite3.connect(relay.config.store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        code, text = send(relay)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert code == 451
    assert queued(relay) == 0
    assert upstream.received == []


def test_max_rate_spaces_the_deliveries(make_relay, upstream):
    clock = ManualClock()
    relay = make_relay({**QUEUE, "upstream": {"max_rate": 2.0}}, upstream=upstream,
                       clock=clock)
    for n in range(6):
        assert send(relay, data=message(n))[0] == 250
    wait_until(lambda: len(upstream.received) == 1, what="the first delivery")
    for step in range(1, 6):
        clock.advance(relay.loops, 0.5)
        wait_until(lambda s=step: len(upstream.received) == 1 + s, what=f"delivery {step}")
        assert len(upstream.received) == 1 + step  # one more per half second, never two
    wait_until(lambda: queued(relay) == 0, what="the queue emptied")


@pytest.mark.parametrize("mode", ["proxy", "queue"])
def test_an_unknown_mode_or_bad_queue_setting_names_the_key(tmp_path, mode):
    from relay import config as config_module
    from relay.errors import ConfigError
    from tests.harness import base_settings
    settings = base_settings(tmp_path)
    settings["smtp"]["mode"] = mode
    assert config_module.parse(settings, "t.toml", tmp_path).smtp.mode == mode
    settings["smtp"]["mode"] = "spool"
    with pytest.raises(ConfigError, match=r"t\.toml: smtp\.mode: expected one of proxy, queue"):
        config_module.parse(settings, "t.toml", tmp_path)
    settings["smtp"]["mode"] = mode
    settings["queue"] = {"retry_seconds": [60, 0]}
    with pytest.raises(ConfigError, match=r"queue\.retry_seconds"):
        config_module.parse(settings, "t.toml", tmp_path)
    settings["queue"] = {}
    settings["upstream"] = {"max_rate": 0}
    with pytest.raises(ConfigError, match=r"upstream\.max_rate: must be greater than 0"):
        config_module.parse(settings, "t.toml", tmp_path)


def test_kill_9_under_load_loses_no_message_that_got_250(tmp_path, upstream):
    """Many sessions send while the upstream is down; the relay is killed with SIGKILL among
    them and started again: every message answered 250 reaches every recipient once, and
    none is delivered twice."""
    config = tmp_path / "relay.toml"
    port = free_port()
    config.write_text(f"""
[smtp]
listen = "127.0.0.1:{port}"
hostname = "relay.test"
mode = "queue"
[queue]
retry_seconds = [0.2]
[upstream]
host = "127.0.0.1"
port = {upstream.port}
tls = "none"
[http]
listen = "127.0.0.1:{free_port()}"
[store]
url = "{store_url(tmp_path)}"
""")
    upstream.handler.data_reply = "451 4.3.2 upstream down"
    process = start("smtp", config)
    accepted: list[int] = []
    enough = threading.Event()
    counter = itertools.count()

    def client() -> None:
        while True:
            n = next(counter)
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                    code = smtp.sendmail("shop@shop.example", ["a@example.org", "b@example.org"],
                                        message(n)) == {}
            except (OSError, smtplib.SMTPException):
                return  # the relay died under this session
            if code:
                accepted.append(n)
            if len(accepted) >= 60:
                enough.set()

    try:
        wait_for_port(port, process)
        with ThreadPoolExecutor(8) as pool:
            sessions = [pool.submit(client) for _ in range(8)]
            assert enough.wait(60), "the relay never accepted 60 messages"
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
            for session in sessions:
                session.result(60)
        assert upstream.received == []  # nothing left before the kill
        upstream.handler.data_reply = None
        process = start("smtp", config)
        wait_for_port(port, process)
        subjects = set(accepted)
        wait_until(lambda: subjects <= delivered(upstream), timeout=60,
                   what="every accepted message delivered")
        with contextlib.closing(connect_store(config)) as db:
            wait_until(lambda: db.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
                       == 0, timeout=60, what="the queue emptied")
    finally:
        process.terminate()
        process.wait(30)
    copies = collections.Counter((order(r.data), rcpt) for r in upstream.received
                                 for rcpt in r.rcpt_tos)
    assert max(copies.values()) == 1, "a recipient got a message twice"
    assert {(n, r) for n in accepted for r in ("a@example.org", "b@example.org")} <= set(copies)


def connect_store(config: Path) -> Any:
    """A connection to the store of the relay started with ``config``."""
    return engine.connect_url(config_module.load(config).store)


def order(data: bytes) -> int:
    return int(re.search(rb"Subject: order (\d+)", data).group(1))


def delivered(upstream) -> set[int]:
    return {order(r.data) for r in upstream.received}


def test_operators_list_hold_release_retry_and_delete_over_the_api(make_relay, upstream):
    clock = ManualClock()
    relay = make_relay(QUEUE, upstream=upstream, http=True, clock=clock)
    key = api_key(relay)
    upstream.handler.data_reply = "451 4.3.0 upstream busy"
    first = send(relay, data=message(1))[1].split()[-1]
    second = send(relay, data=message(2))[1].split()[-1]
    wait_until(lambda: attempts(relay, "a@example.org") == 1
               and len(queue_rows(relay, "SELECT 1 FROM queue_messages WHERE attempts = 1"))
               == 2, what="both tried once")
    status, body = call(relay, key, "GET", "/queue")
    assert status == 200
    assert [m["email_id"] for m in body["messages"]] == [first, second]
    assert body["totals"]["messages"] == 2
    assert {m["state"] for m in body["messages"]} == {"deferred"}
    assert body["messages"][0]["last_reply"] == "451 4.3.0 upstream busy"
    assert call(relay, key, "GET", "/queue?limit=1")[1]["next_cursor"] == first
    assert call(relay, key, "GET", "/queue?state=bogus")[0] == 400

    assert call(relay, key, "POST", f"/queue/{first}/hold")[0] == 200
    status, shown = call(relay, key, "GET", f"/queue/{first}")
    assert shown["state"] == "held"
    assert shown["recipients"][0]["reply"] == "451 4.3.0 upstream busy"
    assert call(relay, key, "GET", "/queue?state=held")[1]["messages"][0]["email_id"] == first

    upstream.handler.data_reply = None
    assert call(relay, key, "POST", "/queue/retry")[1] == {"changed": 1}  # not the held one
    clock.advance(relay.loops, 1)  # the poll that finds what the API changed
    wait_until(lambda: delivered(upstream) == {2}, what="the second delivered")
    assert call(relay, key, "GET", f"/queue/{second}")[0] == 404

    assert call(relay, key, "POST", f"/queue/{first}/release")[0] == 200
    assert call(relay, key, "POST", f"/queue/{first}/retry")[0] == 200
    clock.advance(relay.loops, 1)  # the poll that finds what the API changed
    wait_until(lambda: delivered(upstream) == {1, 2}, what="the first delivered")
    assert call(relay, key, "DELETE", f"/queue/{first}")[0] == 404


def test_the_cli_sees_and_changes_the_queue(make_relay, upstream, tmp_path, capsys):
    relay = make_relay(QUEUE, upstream=upstream, clock=ManualClock())
    upstream.handler.data_reply = "451 4.3.0 upstream busy"
    email_id = send(relay)[1].split()[-1]
    wait_until(lambda: attempts(relay, "a@example.org") == 1, what="the first attempt")
    config = tmp_path / "cli.toml"
    config.write_text(f'[store]\nurl = "{relay.config.store.url}"\n')

    def run(*words: str) -> tuple[int, str]:
        code = cli.main([*words, "--config", str(config)])
        return code, capsys.readouterr().out

    code, out = run("queue", "list")
    assert code == 0 and email_id in out and "deferred" in out
    code, out = run("queue", "show", email_id, "--json")
    assert json.loads(out)["recipients"][0]["state"] == "queued"
    assert run("queue", "hold", email_id)[0] == 0
    assert json.loads(run("queue", "list", "--json", "--state", "held")[1])["messages"]
    assert run("queue", "release", email_id)[0] == 0
    assert json.loads(run("queue", "retry", "--all", "--json")[1]) == {"changed": 1}
    assert run("queue", "delete", email_id)[0] == 0
    assert run("queue", "show", email_id)[0] == 1
    assert queue_rows(relay, "SELECT messages, bytes FROM queue_totals") == [(0, 0)]


def test_delays_and_bounces_are_webhooks_and_bounce_messages(make_relay, upstream, receiver):
    clock = ManualClock()
    receiver.start()
    relay = make_relay({**QUEUE, **webhook_settings(receiver.url),
                        "queue": {"retry_seconds": [600], "max_age_hours": 0.5,
                                  "bounce_messages": True}}, upstream=upstream, clock=clock)
    upstream.handler.refuse.update({"nobody@example.org": "550 5.1.1 No such user",
                                    "busy@example.org": "450 4.2.1 Mailbox busy"})
    code, text = send(relay, ["a@example.org", "nobody@example.org", "busy@example.org"])
    email_id = text.split()[-1]
    wait_until(lambda: len(upstream.received) == 2, what="the copy and a bounce message")
    copy, report = upstream.received
    assert copy.rcpt_tos == ["a@example.org"]
    assert (report.mail_from, report.rcpt_tos) == ("<>", ["shop@shop.example"])
    parsed = email.message_from_bytes(report.data, policy=email.policy.SMTP)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    notice, status, headers = parsed.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    fields = bytes(status.get_payload()[1]) if status.is_multipart() else status.as_bytes()
    assert b"Final-Recipient: rfc822; nobody@example.org" in fields
    assert b"Status: 5.1.1" in fields and b"Action: failed" in fields
    assert b"Subject: order 0" in headers.as_bytes()
    assert "busy@example.org" not in notice.get_content()

    for attempt in (2, 3, 4):  # 600 s apart; the fourth, at the expiry, gives busy@ up
        clock.advance(relay.loops, 600)
        wait_until(lambda a=attempt: attempts(relay, "busy@example.org") in (a, -1),
                   what=f"attempt {attempt}")
    wait_until(lambda: len(upstream.received) == 3, what="the second bounce message")
    assert b"Status: 4.4.7" in upstream.received[2].data
    assert b"Final-Recipient: rfc822; busy@example.org" in upstream.received[2].data

    def events() -> list[dict]:
        return [e for e in receiver.delivered() if e["data"]["email_id"] == email_id]
    wait_until(lambda: len(events()) == 6, what="six events")
    kinds = sorted((e["type"], e["data"]["recipient"], e["data"].get("bounce_type"),
                    e["data"].get("attempt")) for e in events())
    assert kinds == [
        ("email.bounced", "busy@example.org", "expired", 4),
        ("email.bounced", "nobody@example.org", "permanent", 1),
        ("email.delayed", "busy@example.org", None, 1),
        ("email.delayed", "busy@example.org", None, 2),
        ("email.delayed", "busy@example.org", None, 3),
        ("email.sent", "a@example.org", None, None)]
    by_kind = {(e["type"], e["data"].get("attempt")): e["data"] for e in events()}
    delayed = by_kind[("email.delayed", 1)]
    assert delayed["smtp_code"] == 450 and delayed["reply"] == "450 4.2.1 Mailbox busy"
    assert delayed["next_attempt_at"] is not None
    permanent = by_kind[("email.bounced", 1)]
    assert permanent["smtp_code"] == 550 and permanent["subject"] == "order 0"
    # every field of the anypost SDK's Event that a webhook's data carries
    assert {"smtp_code", "bounce_type", "attempt", "bounce_classification", "email_id",
            "message_id", "from", "recipient", "subject", "tags", "campaign",
            "topic"} <= set(permanent)


def test_no_bounce_message_for_a_null_sender(make_relay, upstream):
    relay = make_relay({**QUEUE, "queue": {"bounce_messages": True}}, upstream=upstream)
    upstream.handler.refuse["nobody@example.org"] = "550 5.1.1 No such user"
    assert send(relay, ["a@example.org", "nobody@example.org"], sender="")[0] == 250
    wait_until(lambda: queued(relay) == 0, what="the queue emptied")
    assert [r.rcpt_tos for r in upstream.received] == [["a@example.org"]]


def test_delays_and_bounces_are_listed_as_events_and_in_the_message(make_relay, upstream,
                                                                    tmp_path, capsys):
    """Issue 16: GET /api/v1/events, relay events and the message view show email.delayed
    and email.bounced with their webhook's fields, in time order, by the same cursor."""
    clock = ManualClock()
    relay = make_relay({**QUEUE, "queue": {"retry_seconds": [600]}}, upstream=upstream,
                       http=True, clock=clock)
    key = api_key(relay)
    upstream.handler.data_reply = "451 4.3.0 upstream busy"
    email_id = send(relay)[1].split()[-1]
    wait_until(lambda: attempts(relay, "a@example.org") == 1, what="the first attempt")
    upstream.handler.data_reply = "550 5.1.1 No such user"
    clock.advance(relay.loops, 600)
    wait_until(lambda: queued(relay) == 0, what="the message given up")

    status, body = call(relay, key, "GET", f"/events?email_id={email_id}")
    assert status == 200 and body["next_cursor"] is None
    delayed, bounced = body["events"]
    assert (delayed["type"], delayed["smtp_code"], delayed["attempt"], delayed["reply"]) == (
        "delayed", 451, 1, "451 4.3.0 upstream busy")
    assert delayed["next_attempt_at"] is not None and delayed["recipient"] == "a@example.org"
    assert (bounced["type"], bounced["smtp_code"], bounced["attempt"],
            bounced["bounce_type"], bounced["reply"]) == (
        "bounced", 550, 2, "permanent", "550 5.1.1 No such user")
    assert delayed["id"] < bounced["id"] and not delayed["counted"]
    # one per page, by the same cursor; a type filter picks one kind
    first = call(relay, key, "GET", f"/events?email_id={email_id}&limit=1")[1]
    assert [e["id"] for e in first["events"]] == [delayed["id"]]
    second = call(relay, key, "GET", f"/events?email_id={email_id}&limit=1"
                                     f"&cursor={first['next_cursor']}")[1]
    assert [e["id"] for e in second["events"]] == [bounced["id"]]
    assert second["next_cursor"] is None
    assert [e["id"] for e in call(relay, key, "GET", "/events?type=bounced")[1]["events"]] == [
        bounced["id"]]
    status, shown = call(relay, key, "GET", f"/messages/{email_id}")
    assert status == 200 and shown["events"] == body["events"]
    # nothing counts them: no open, no click
    totals = call(relay, key, "GET", "/stats")[1]["rows"]
    assert all(row["opens"] == row["clicks"] == 0 for row in totals)

    config = tmp_path / "cli.toml"
    config.write_text(f'[store]\nurl = "{relay.config.store.url}"\n')
    assert cli.main(["events", "--email-id", email_id, "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["events"] == body["events"]
    assert cli.main(["events", "--email-id", email_id, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "delayed" in out and "451 4.3.0 upstream busy" in out
    assert "bounced (permanent)" in out and "550 5.1.1 No such user" in out
    assert cli.main(["messages", "show", email_id, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "bounced (permanent)" in out and "attempt 1, next" in out


def in_delivery(*relays) -> int:
    """How many delivery attempts the relays' queue workers have in progress."""
    return sum(len(relay.services.smtp.queue._attempts) for relay in relays)


def test_an_attempt_that_lost_its_lease_records_and_reports_nothing(make_relay, upstream,
                                                                     receiver, caplog):
    """Issue 16: an attempt whose lease ran out while the upstream kept it (and another claim
    took the message over) still wrote its results and its email.delayed: the delay was
    counted and reported twice. Only the attempt holding the lease records."""
    caplog.set_level(logging.INFO, logger="relay.mail")
    clock = ManualClock()
    receiver.start()
    settings = {**QUEUE, **HOLDING, **webhook_settings(receiver.url),
                "queue": {"retry_seconds": [3600]}}
    first = make_relay(settings, upstream=upstream, clock=clock)
    gate = hold_upstream(first.loops, upstream)
    upstream.handler.data_reply = "451 4.3.0 upstream busy"
    assert send(first)[0] == 250
    wait_until(lambda: upstream.handler.held == 1, what="the first attempt at the upstream")
    second = make_relay({**settings, "store": {"url": first.config.store.url}},
                        upstream=upstream, clock=clock)
    clock.advance(first.loops, delivery.LEASE_SECONDS + 1)  # the lease runs out at once
    wait_until(lambda: upstream.handler.held == 2 or "waits: another try" in caplog.text,
               what="the message taken over")
    first.loops.loop.call_soon_threadsafe(gate.set)
    wait_until(lambda: in_delivery(first, second) == 0, what="both attempts ended")
    assert attempts(first, "a@example.org") == 1
    assert queue_rows(first, "SELECT type, attempt FROM delivery_events") == [("delayed", 1)]
    assert queue_rows(first, "SELECT count(*) FROM webhook_events WHERE type = ?",
                      ("email.delayed",)) == [(1,)]


def test_an_attempt_longer_than_a_lease_keeps_it(make_relay, upstream):
    """Issue 16: a lease was never renewed: an attempt that outlasted it (a slow upstream, a
    large fan-out) had its message taken over by another worker, which sent it again."""
    clock = ManualClock()
    settings = {**HOLDING, "smtp": {"mode": "queue", "dedupe_hours": 0}}
    first = make_relay(settings, upstream=upstream, clock=clock)
    gate = hold_upstream(first.loops, upstream)
    assert send(first)[0] == 250
    wait_until(lambda: upstream.handler.held == 1, what="the attempt at the upstream")
    make_relay({**settings, "store": {"url": first.config.store.url}}, upstream=upstream,
               clock=clock)  # a second worker, looking for due messages

    def lease_until() -> float:
        return queue_rows(first, "SELECT lease_until FROM queue_messages")[0][0]
    steps = int(2 * delivery.LEASE_SECONDS / delivery.RENEW_SECONDS)
    for _ in range(steps):  # twice as long as a lease, the other worker looking meanwhile
        clock.advance(first.loops, delivery.RENEW_SECONDS)
        wait_until(lambda: lease_until() == clock.now + delivery.LEASE_SECONDS,
                   what="the lease renewed")
    first.loops.loop.call_soon_threadsafe(gate.set)
    wait_until(lambda: queued(first) == 0, what="the queue emptied")
    assert upstream.handler.held == 1 and len(upstream.received) == 1


def test_an_attempt_taken_over_waits_for_the_one_still_sending(make_relay, upstream, caplog):
    """Issue 16: once a lease ran out (it is renewed, unless the store was away that long),
    the attempt that took the message over sent it at once, while the first one was still
    at the upstream: every recipient got it twice. It waits for the first one's claims, then
    finds its deliveries."""
    caplog.set_level(logging.INFO, logger="relay.mail")
    clock = ManualClock()
    first = make_relay({**QUEUE, **HOLDING}, upstream=upstream, clock=clock)
    gate = hold_upstream(first.loops, upstream)
    assert send(first, ["a@example.org", "b@example.org"])[0] == 250
    wait_until(lambda: upstream.handler.held == 1, what="the first attempt at the upstream")
    second = make_relay({**QUEUE, **HOLDING, "store": {"url": first.config.store.url}},
                        upstream=upstream, clock=clock)
    clock.advance(first.loops, delivery.LEASE_SECONDS + 1)  # the lease runs out at once
    wait_until(lambda: upstream.handler.held == 2 or "waits: another try" in caplog.text,
               what="the message taken over")
    first.loops.loop.call_soon_threadsafe(gate.set)
    wait_until(lambda: queued(first) == 0, what="the queue emptied")
    wait_until(lambda: in_delivery(first, second) == 0, what="both attempts ended")
    assert upstream.handler.held == 1
    assert [sorted(r.rcpt_tos) for r in upstream.received] == [["a@example.org",
                                                                 "b@example.org"]]


RELAYS_SHARING_A_STORE = """
[smtp]
listen = "127.0.0.1:{port}"
hostname = "{name}"
mode = "queue"
[queue]
retry_seconds = [0.2]
[upstream]
host = "127.0.0.1"
port = {upstream}
tls = "none"
[http]
listen = "127.0.0.1:{http}"
[store]
url = "{url}"
"""


def by(data: bytes) -> str:
    """The relay that sent a copy, by its Received line."""
    return re.search(rb"by ([a-z.]+)", data).group(1).decode()


def test_two_relay_processes_sharing_a_store_deliver_each_copy_once(tmp_path, loops, upstream):
    """Issue 16: two relay processes (``relay serve`` and ``relay smtp``) on one store, both
    accepting mail and both delivering the queue: every message either accepted reaches each
    recipient once. The upstream holds the first copies until both processes are sending."""
    url = store_url(tmp_path)
    engine.connect_url(config_module.store_settings(url, "t", "store.url", tmp_path)).close()
    gate = hold_upstream(loops, upstream)
    names = ("a.relay.test", "b.relay.test")
    ports = [free_port(), free_port()]
    processes = []
    for command, name, port in zip(("serve", "smtp"), names, ports, strict=True):
        config = tmp_path / f"{name}.toml"
        config.write_text(RELAYS_SHARING_A_STORE.format(
            port=port, name=name, upstream=upstream.port, http=free_port(), url=url))
        with (tmp_path / f"{name}.log").open("wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "relay", command, "--config", str(config)],
                stdout=subprocess.DEVNULL, stderr=log))
    recipients = ["a@example.org", "b@example.org", "c@example.org"]
    counter = itertools.count()

    def client(port: int) -> list[int]:
        accepted = []
        for _ in range(15):
            n = next(counter)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.sendmail("shop@shop.example", recipients, message(n))
            accepted.append(n)
        return accepted

    try:
        for port, process in zip(ports, processes, strict=True):
            wait_for_port(port, process, timeout=60)
        with ThreadPoolExecutor(4) as pool:
            sessions = [pool.submit(client, port) for port in ports * 2]
            wait_until(lambda: {by(data) for data in upstream.handler.holding} == set(names),
                       timeout=60, what="both relays sending")
            loops.loop.call_soon_threadsafe(gate.set)
            accepted = [n for session in sessions for n in session.result(60)]
        assert len(accepted) == 60
        wait_until(lambda: set(accepted) <= delivered(upstream), timeout=60,
                   what="every accepted message delivered")
        with contextlib.closing(connect_store(tmp_path / f"{names[0]}.toml")) as db:
            wait_until(lambda: db.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
                       == 0, timeout=60, what="the queue emptied")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    copies = collections.Counter((order(r.data), rcpt) for r in upstream.received
                                 for rcpt in r.rcpt_tos)
    assert set(copies) == {(n, r) for n in accepted for r in recipients}
    assert max(copies.values()) == 1, "a recipient got a message twice"
    assert {by(r.data) for r in upstream.received} == set(names)


def test_a_message_being_sent_is_not_deleted_and_a_held_one_names_why(make_relay, upstream,
                                                                       tmp_path, capsys):
    """Found by review: ``delete`` of a message an attempt was sending answered "deleted",
    then the attempt delivered it all the same; ``retry`` of a held message answered "no
    queued message". Both now say what is in the way (API 409, CLI exit 1)."""
    relay = make_relay({**QUEUE, **HOLDING}, upstream=upstream, http=True)
    key = api_key(relay)
    gate = hold_upstream(relay.loops, upstream)
    email_id = send(relay)[1].split()[-1]
    wait_until(lambda: upstream.handler.held == 1, what="the attempt at the upstream")
    status, body = call(relay, key, "DELETE", f"/queue/{email_id}")
    assert status == 409 and "being sent" in body["error"]["message"]
    config = tmp_path / "cli.toml"
    config.write_text(f'[store]\nurl = "{relay.config.store.url}"\n')
    assert cli.main(["queue", "delete", email_id, "--config", str(config)]) == 1
    assert "being sent" in capsys.readouterr().err
    assert call(relay, key, "POST", f"/queue/{email_id}/hold")[0] == 200
    upstream.handler.data_reply = "451 4.3.0 upstream busy"
    relay.loops.loop.call_soon_threadsafe(gate.set)
    wait_until(lambda: attempts(relay, "a@example.org") == 1, what="the attempt ended")
    status, body = call(relay, key, "POST", f"/queue/{email_id}/retry")
    assert status == 409 and "held" in body["error"]["message"]
    assert cli.main(["queue", "retry", email_id, "--config", str(config)]) == 1
    assert "held" in capsys.readouterr().err
    assert call(relay, key, "DELETE", f"/queue/{email_id}")[0] == 200
    assert call(relay, key, "DELETE", f"/queue/{email_id}")[0] == 404
    assert upstream.received == []


def test_a_message_a_killed_relay_left_sending_can_be_deleted(make_relay, upstream, tmp_path):
    """With deletes refused while a lease holds the message, one leased by a relay process
    that no longer runs (kill -9, not started again) is deleted all the same."""
    relay = make_relay(QUEUE, upstream=upstream, clock=ManualClock())
    upstream.handler.data_reply = "451 4.3.0 upstream busy"
    email_id = send(relay)[1].split()[-1]
    wait_until(lambda: attempts(relay, "a@example.org") == 1, what="the first attempt")
    # the lease of a process no longer known
    with contextlib.closing(relay.db()) as conn, transaction(conn):
        conn.execute("UPDATE queue_messages SET lease_owner = 999999, lease_id = 'x',"
                     " lease_until = 9e12")
    config = tmp_path / "cli.toml"
    config.write_text(f'[store]\nurl = "{relay.config.store.url}"\n')
    assert cli.main(["queue", "delete", email_id, "--config", str(config)]) == 0
    assert queued(relay) == 0
