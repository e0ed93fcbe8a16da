"""Recognising retries (relay/smtp/dedupe.py): by content, not Message-ID alone; a Message-ID for
messages without one; one try at a time per message and recipient, across worker processes."""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.rewrite.headers import parse_header_block
from relay.smtp import dedupe, processes
from relay.smtp.dedupe import Claims, content_digest, settle, take, trace_end
from relay.smtp.processes import Process
from relay.store import engine as store_module
from relay.store import messages
from tests.e2e.test_app import wait_for_port
from tests.e2e.test_smtp_relay import hold_upstream, last_reply
from tests.harness import UpstreamServer, free_port, wait_until, without_received

SHARED_ID = "Message-ID: <1234@example.com>\r\n"
# Distinct messages with one Message-ID, as in CPython's test_email corpus (msg_02, msg_03,
# msg_05, msg_06 there all carry this one) and as applications send them (a fixed template
# header, a resend that copies headers).
SHARING = [
    (f"From: app@shop.example\r\nTo: a@example.org\r\nSubject: {subject}\r\n{SHARED_ID}"
     f"Content-Type: text/plain\r\n\r\n{body}\r\n").encode()
    for subject, body in [("Ping", "Hello"), ("Ping", "Hello again"), ("Report", "Hello"),
                          ("Invoice", "Your invoice")]
]
RECIPIENTS = ["a@example.org", "b@example.org"]


def test_distinct_messages_sharing_a_message_id_are_all_delivered(make_relay, upstream):
    """They were taken for retries of the first: 250 each, only the first delivered."""
    relay = make_relay(upstream=upstream)
    for message in SHARING:
        assert last_reply(relay, "app@shop.example", RECIPIENTS, message)[0] == 250
    assert [without_received(r.data) for r in upstream.received] == SHARING
    assert all(r.rcpt_tos == RECIPIENTS for r in upstream.received)
    with relay.db() as db:
        statuses = [r[0] for r in db.execute("SELECT status FROM recipients")]
    assert statuses == ["sent"] * 8


@pytest.mark.parametrize("retry_prefix", [
    b"",  # byte-identical
    b"Received: from mta.client.test by mta2.client.test; Thu, 3 Dec 2026 13:00:00 +0000\r\n",
    b"Return-Path: <app@shop.example>\r\nReceived: from a by b; Thu, 3 Dec 2026 13:00 +0000\r\n",
])
def test_a_retry_reaches_only_the_recipients_that_did_not_get_it(make_relay, upstream,
                                                                 retry_prefix):
    relay = make_relay(upstream=upstream)
    first = SHARING[0]
    upstream.handler.refuse["b@example.org"] = "450 4.2.1 Mailbox busy"
    assert last_reply(relay, "app@shop.example", RECIPIENTS, first)[0] == 451
    upstream.handler.refuse.clear()
    # another message with the same Message-ID meanwhile: delivered in full, and no retry
    # of the first counts its deliveries
    assert last_reply(relay, "app@shop.example", RECIPIENTS, SHARING[1])[0] == 250
    assert last_reply(relay, "app@shop.example", RECIPIENTS, retry_prefix + first)[0] == 250
    assert [(without_received(r.data), r.rcpt_tos) for r in upstream.received] == [
        (first, ["a@example.org"]), (SHARING[1], RECIPIENTS),
        (retry_prefix + first, ["b@example.org"])]
    # and a third try reaches nobody
    assert last_reply(relay, "app@shop.example", RECIPIENTS, first)[0] == 250
    assert len(upstream.received) == 3


def test_a_header_below_the_trace_block_makes_another_message(make_relay, upstream):
    """Only the leading trace fields are set aside: an attempt counter further down could as
    well be content, so the message is sent again."""
    relay = make_relay(upstream=upstream)
    first = SHARING[0]
    later = first.replace(SHARED_ID.encode(), SHARED_ID.encode() + b"X-Attempt: 2\r\n")
    moved = first.replace(b"To:", b"Received: from a by b; Thu, 3 Dec 2026 13:00 +0000\r\nTo:")
    for message in (first, later, moved):
        assert last_reply(relay, "app@shop.example", ["a@example.org"], message)[0] == 250
    assert len(upstream.received) == 3


NO_ID = (b"From: app@shop.example\r\nTo: a@example.org\r\nSubject: No id\r\n"
         b"Content-Type: text/plain\r\n\r\nHello\r\n")


def test_a_message_without_message_id_gets_one_and_its_retry_is_recognised(make_relay,
                                                                           upstream):
    """It got none, so a client's retry was delivered twice."""
    relay = make_relay(upstream=upstream)
    upstream.handler.refuse["b@example.org"] = "450 4.2.1 Mailbox busy"
    assert last_reply(relay, "app@shop.example", RECIPIENTS, NO_ID)[0] == 451
    upstream.handler.refuse.clear()
    trace = b"Received: from a by b; Thu, 3 Dec 2026 13:00 +0000\r\n"
    assert last_reply(relay, "app@shop.example", RECIPIENTS, trace + NO_ID)[0] == 250
    first, retry = upstream.received
    assert (first.rcpt_tos, retry.rcpt_tos) == (["a@example.org"], ["b@example.org"])
    first_data, retry_data = without_received(first.data), without_received(retry.data)
    added = re.match(rb"Message-ID: <[0-9a-f]{32}@relay\.test>\r\n", first_data)
    assert added is not None, first_data[:80]
    assert first_data == added.group() + NO_ID  # spliced in, every other byte kept
    assert retry_data == trace + added.group() + NO_ID  # below the trace block
    with relay.db() as db:
        ids = {r[0] for r in db.execute("SELECT message_id FROM messages")}
    assert ids == {added.group()[12:-2].decode()}


def test_the_same_alert_without_message_id_is_a_retry_for_minutes_only(make_relay, upstream,
                                                                      caplog):
    """Monitoring scripts send the same text (no Message-ID, no Date) again and again: every
    repeat for smtp.dedupe_hours (72 h) was dropped. A retry of it comes within minutes; a
    message with a Message-ID is still remembered for hours. Each duplicate is logged."""
    relay = make_relay(upstream=upstream)
    claims = relay.services.smtp.handler.pipeline.claims
    with_id = NO_ID.replace(b"Subject:", b"Message-ID: <alert@shop.example>\r\nSubject:")
    caplog.set_level(logging.INFO, logger="relay.mail")
    for message in (NO_ID, with_id):
        assert last_reply(relay, "app@shop.example", ["a@example.org"], message)[0] == 250
    first = [r.getMessage().split()[0] for r in caplog.records
             if r.getMessage().startswith("email_")]
    caplog.clear()
    for message in (NO_ID, with_id):  # a client's retry, at once: not sent again
        assert last_reply(relay, "app@shop.example", ["a@example.org"], message)[0] == 250
    assert len(upstream.received) == 2
    retries = [r.getMessage() for r in caplog.records if " is a retry of " in r.getMessage()]
    assert [m.split(" is a retry of ")[1].split(":")[0] for m in retries] == first
    assert all(r.levelno == logging.INFO for r in caplog.records if " is a retry" in r.message)
    claims.clock = lambda: time.time() + dedupe.NO_MESSAGE_ID_SECONDS + 1
    for message in (NO_ID, with_id):  # the alert again eleven minutes later: news
        assert last_reply(relay, "app@shop.example", ["a@example.org"], message)[0] == 250
    assert [without_received(m.data).endswith(NO_ID) for m in upstream.received] == [
        True, False, True]


def test_no_message_id_is_added_where_a_dkim_signature_covers_its_absence(make_relay, upstream):
    relay = make_relay(upstream=upstream)
    signed = (b"DKIM-Signature: v=1; a=rsa-sha256; d=shop.example; s=s1;\r\n"
              b"\th=from:to:subject:Message-Id; bh=x; b=y\r\n" + NO_ID)
    assert last_reply(relay, "app@shop.example", RECIPIENTS, signed)[0] == 250
    [copy] = upstream.received
    assert without_received(copy.data) == signed


def test_a_message_without_message_id_and_tracked_gets_one_in_every_copy(make_relay, upstream):
    relay = make_relay({"tracking": {"opens": True}}, upstream=upstream)
    html = NO_ID.replace(b"text/plain", b"text/html").replace(b"Hello", b"<p>Hello</p>")
    assert last_reply(relay, "app@shop.example", RECIPIENTS, html)[0] == 250
    ids = {re.match(rb"Message-ID: (<[0-9a-f]{32}@relay\.test>)\r\n",
                    without_received(r.data)).group(1)
           for r in upstream.received}
    assert len(upstream.received) == 2 and len(ids) == 1


trace_line = st.sampled_from([
    b"Received: from a by b; Thu, 3 Dec 2026 13:00 +0000\r\n",
    b"Received: from relay.example (relay.example [192.0.2.1])\r\n\tby mx.example; x\r\n",
    b"Return-Path: <app@shop.example>\r\n",
    b"RECEIVED: by c\r\n",
])


@given(st.lists(trace_line, max_size=4), st.lists(trace_line, max_size=4),
       st.integers(min_value=0, max_value=len(SHARING[0]) - 1))
def test_the_digest_ignores_the_trace_block_and_nothing_else(first, second, flipped):
    message = SHARING[0]
    one, two = b"".join(first) + message, b"".join(second) + message
    assert content_digest(one, parse_header_block(one)) == content_digest(
        two, parse_header_block(two))
    changed = bytearray(message)
    changed[flipped] ^= 0x01
    three = b"".join(first) + bytes(changed)
    assert content_digest(three, parse_header_block(three)) != content_digest(
        one, parse_header_block(one))
    assert trace_end(parse_header_block(one)) == len(b"".join(first))


def store_connection(path: Path) -> sqlite3.Connection:
    conn = store_module.connect(path)
    store_module.migrate(conn)
    return conn


class Child:
    """Another relay process of this host, as the store knows it: a real process (so its
    liveness is real) with a row of ``processes``."""

    def __init__(self, conn: sqlite3.Connection, now: float = 1000.0) -> None:
        self.popen = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                      stdin=subprocess.PIPE)
        here = processes.current()
        process = Process(here.host, here.boot_id, self.popen.pid,
                          processes._start_ticks(self.popen.pid))
        self.me = processes.Registered(messages.add_process(
            conn, process.host, process.boot_id, process.pid, process.started, now), process)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()


@pytest.fixture
def children():
    made: list[Child] = []
    yield lambda conn: made.append(Child(conn)) or made[-1]
    for child in made:
        child.kill()


def process_ids(conn: sqlite3.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT id FROM processes ORDER BY id")]


def test_a_claim_holds_off_other_tries_until_settled_or_its_process_stops(tmp_path, children):
    """A try of a process killed mid-send loses its claims to the next try at once: its pid
    and start time say it stopped (there was a 60 s lease, during which the retry waited)."""
    conn = store_connection(tmp_path / "relay.db")
    digest, window, now = b"d" * 32, 3600.0, 1000.0
    me, other = processes.register(conn, now), children(conn)
    mine = take(conn, digest, RECIPIENTS, "email_1", other.me, now, window)
    assert mine is not None and mine.held and mine.pending == RECIPIENTS
    assert take(conn, digest, ["b@example.org"], "email_2", me, now + 1, window) is None
    assert take(conn, b"e" * 32, RECIPIENTS, "email_3", me, now + 1, window) is not None
    # settled: the delivered recipient is a duplicate, the other one free
    settle(conn, mine, "<x@shop.example>", ["a@example.org"], now + 2, remember=True)
    after = take(conn, digest, RECIPIENTS, "email_2", me, now + 3, window)
    assert after is not None
    assert (after.pending, after.duplicates) == (["b@example.org"], ["a@example.org"])
    settle(conn, after, "<x@shop.example>", [], now + 3, remember=True)  # b not reached
    # a try of the other process holds a recipient; the process is killed: taken over at once
    assert take(conn, b"f" * 32, RECIPIENTS, "email_4", other.me, now + 4, window) is not None
    assert take(conn, b"f" * 32, RECIPIENTS, "email_5", me, now + 5, window) is None
    other.kill()
    taken = take(conn, b"f" * 32, RECIPIENTS, "email_5", me, now + 5, window)
    assert taken is not None and taken.pending == RECIPIENTS
    assert process_ids(conn) == [me.id]  # its row is gone with it
    # and the deliveries are forgotten after the window
    gone = take(conn, digest, RECIPIENTS, "email_6", me, now + 3 + window, window)
    assert gone is not None and gone.pending == RECIPIENTS


def test_a_claim_of_a_process_on_another_host_holds_while_its_heartbeat_is_fresh(tmp_path):
    """Relays of several hosts sharing a store cannot see each other's pids: one is alive
    while it said so within the lease."""
    conn = store_connection(tmp_path / "relay.db")
    me = processes.register(conn, 1000.0)
    far = Process("elsewhere 4026531836", "boot", 4242, "77")
    there = processes.Registered(messages.add_process(conn, far.host, far.boot_id, far.pid,
                                                      far.started, 1000.0), far)
    assert take(conn, b"d" * 32, RECIPIENTS, "email_1", there, 1000.0, 3600.0) is not None
    processes.see(conn, there, 1030.0)
    lapse = 1030.0 + processes.LEASE_SECONDS
    assert take(conn, b"d" * 32, RECIPIENTS, "email_2", me, lapse - 0.5, 3600.0) is None
    taken = take(conn, b"d" * 32, RECIPIENTS, "email_2", me, lapse, 3600.0)
    assert taken is not None and taken.pending == RECIPIENTS
    assert process_ids(conn) == [me.id]


async def claims_left(store: store_module.Store) -> list[str]:
    return [row[0] for row in store.writer.execute("SELECT recipient FROM send_claims")]


async def test_a_sweep_forgets_the_processes_that_stopped_with_their_claims(tmp_path,
                                                                             children):
    """At start, before relay messages reads, and on each heartbeat: claims that no try
    needs do not outlive their process (erasure and retention do not look there), and the
    processes table keeps only the processes that run (it grew by a row per start)."""
    store = await store_module.Store.open(tmp_path / "relay.db")
    try:
        gone, running = children(store.writer), children(store.writer)
        take(store.writer, b"d" * 32, ["secret@victim.example"], "email_1", gone.me, 1000.0,
             3600.0)
        take(store.writer, b"e" * 32, ["c@example.org"], "email_2", running.me, 1000.0, 3600.0)
        gone.kill()
        assert processes.sweep(store.writer) == 0  # it had no message 'sending'
        assert await claims_left(store) == ["c@example.org"]
        assert process_ids(store.writer) == [running.me.id]
    finally:
        await store.close()


async def test_the_heartbeat_forgets_stopped_processes_when_no_try_comes(tmp_path, children,
                                                                         monkeypatch):
    monkeypatch.setattr(processes, "HEARTBEAT_SECONDS", 0.01)
    store = await store_module.Store.open(tmp_path / "relay.db")
    try:
        gone = children(store.writer)
        take(store.writer, b"d" * 32, ["secret@victim.example"], "email_1", gone.me, 1000.0,
             3600.0)
        claims = Claims(store, 3600.0, processes.register(store.writer))
        await claims.release(await claims.acquire(b"e" * 32, ["c@example.org"], "email_2"))
        assert await claims_left(store) == ["secret@victim.example"]
        gone.kill()
        for _ in range(500):
            if not await claims_left(store):
                break
            await asyncio.sleep(0.01)
        assert await claims_left(store) == []
        assert process_ids(store.writer) == [claims.me.id]
    finally:
        await store.close()


def test_a_database_remembering_by_message_id_is_migrated(tmp_path, monkeypatch):
    path = tmp_path / "relay.db"
    before = {k: v for k, v in store_module.MIGRATIONS.items() if k < "0031"}
    monkeypatch.setattr(store_module, "MIGRATIONS", before)
    conn = store_connection(path)
    conn.execute("INSERT INTO deliveries VALUES ('<1234@example.com>', 'a@example.org',"
                 " 'email_1', 1000.0)")
    monkeypatch.undo()
    assert store_module.migrate(conn)[0] == "0031_deliveries_by_content"  # and any later
    columns = [r[1] for r in conn.execute("PRAGMA table_info(deliveries)")]
    assert columns == ["digest", "recipient", "message_id", "email_id", "at"]
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0
    me = processes.register(conn, 1001.0)
    assert take(conn, b"d" * 32, RECIPIENTS, "email_2", me, 1001.0, 3600.0) is not None


WORKERS_CONFIG = """
[smtp]
listen = "127.0.0.1:{port}"
hostname = "relay.test"
workers = 2
[upstream]
host = "127.0.0.1"
port = {upstream}
tls = "none"
[http]
listen = "127.0.0.1:{http}"
public_url = "http://127.0.0.1:{http}"
[store]
url = "sqlite:///relay.db"
"""
CLIENTS = 8


def test_the_same_message_from_many_connections_to_two_workers_goes_out_once(tmp_path, loops):
    """The guard for a retry arriving while the first try is being sent was per process:
    with smtp.workers = 2, a try reaching the other process sent every copy again."""
    upstream = UpstreamServer(loops)
    upstream.start()
    gate = hold_upstream(loops, upstream)
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(WORKERS_CONFIG.format(port=port, upstream=upstream.port, http=free_port()))
    log = tmp_path / "relay.log"
    recipients = ["a@example.org", "b@example.org", "c@example.org"]
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "relay", "smtp", "--config",
                                    str(config)], stderr=stderr, cwd=tmp_path)
    try:
        wait_for_port(port, process)
        wait_until(lambda: log.read_text().count("smtp listening") == 2, timeout=30,
                   what="both processes listening")

        def send(_: int) -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
                client.ehlo()
                client.mail("app@shop.example")
                for rcpt in recipients:
                    client.rcpt(rcpt)
                return client.data(SHARING[0])

        with ThreadPoolExecutor(CLIENTS) as pool:
            replies = pool.map(send, range(CLIENTS))

            def waiting() -> int:
                return log.read_text().count(" waits: another try")
            wait_until(lambda: upstream.handler.held > 1 or waiting() == CLIENTS - 1,
                       timeout=30, what="one try at the upstream and the others waiting")
            loops.loop.call_soon_threadsafe(gate.set)
            codes = [code for code, _ in replies]
        assert codes == [250] * CLIENTS
        assert [r.rcpt_tos for r in upstream.received] == [recipients]
    finally:
        process.terminate()
        process.wait(30)
        upstream.stop()
