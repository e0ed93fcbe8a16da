"""Finding messages (``GET /api/v1/messages``, ``relay messages``) and knowing what became of
each recipient, including after the relay was killed in the middle of a delivery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from relay.smtp import processes
from relay.smtp.processes import Process
from relay.stats import queries
from relay.store import engine as store
from relay.store import messages
from tests.clients import api_key, call, cli, write_config
from tests.e2e.test_app import wait_for_port
from tests.harness import free_port, wait_until


def send(port: int, recipients: list[str], subject: str, message_id: str | None = None,
         sender: str = "news@shop.example") -> tuple[int, str]:
    headers = f"Message-ID: {message_id}\r\n" if message_id else ""
    body = (f"From: {sender}\r\nTo: a@example.org\r\nSubject: {subject}\r\n{headers}\r\n"
            "hello\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        client.mail(sender)
        for r in recipients:
            client.rcpt(r)
        code, text = client.data(body)
    return code, text.decode()


def email_ids(relay, subject: str) -> list[str]:
    """The messages with this subject, oldest first (a refused one's reply names no id)."""
    with relay.db() as db:
        return [row[0] for row in db.execute("SELECT email_id FROM messages WHERE subject = ? "
                                             "ORDER BY email_id", (subject,))]


def listed(relay, key, **params: str) -> list[str]:
    status, body = call(relay, key, "GET", "/messages?" + urllib.parse.urlencode(params))
    assert status == 200, body
    return [m["email_id"] for m in body["messages"]]


def test_messages_are_found_newest_first_by_recipient_message_id_sender_and_status(
        make_relay, upstream, tmp_path):
    relay = make_relay(upstream=upstream, http=True)
    key = api_key(relay)
    upstream.handler.refuse["gone@example.org"] = "550 5.1.1 no such user"
    upstream.handler.refuse["later@example.org"] = "450 4.2.0 try later"
    send(relay.smtp_port, ["a@example.org"], "one", "<one@shop.example>")
    send(relay.smtp_port, ["A@example.org", "gone@example.org"], "two",
         sender="billing@shop.example")
    send(relay.smtp_port, ["later@example.org"], "three", "<three@shop.example>")
    send(relay.smtp_port, ["a@example.org"], "one", "<one@shop.example>")  # a retry of one
    first, again = email_ids(relay, "one")
    [second], [third] = email_ids(relay, "two"), email_ids(relay, "three")

    assert listed(relay, key) == [again, third, second, first]
    assert listed(relay, key, recipient="a@EXAMPLE.org") == [again, second, first]
    assert listed(relay, key, message_id="one@shop.example") == [again, first]
    assert listed(relay, key, message_id="<three@shop.example>") == [third]
    assert listed(relay, key, sender="Billing@shop.example") == [second]
    assert listed(relay, key, status="failed") == [second]
    assert listed(relay, key, status="deferred") == [third]
    assert listed(relay, key, status="duplicate") == [again]
    assert listed(relay, key, status="sent") == [second, first]
    assert listed(relay, key, status="sent", recipient="gone@example.org") == []
    assert listed(relay, key, recipient="a@example.org", sender="news@shop.example",
                  status="sent") == [first]
    assert listed(relay, key, since="2000-01-01", until="2000-01-02") == []
    assert listed(relay, key, since="2000-01-01") == [again, third, second, first]

    status, body = call(relay, key, "GET", "/messages?recipient=gone@example.org")
    [message] = body["messages"]
    assert message["statuses"] == {"sent": 1, "failed": 1}
    assert [(r["recipient"], r["status"]) for r in message["recipients"]] == [
        ("A@example.org", "sent"), ("gone@example.org", "failed")]
    assert "no such user" in message["recipients"][1]["reply"]
    assert "events" not in message and message["subject"] == "two"

    pages, cursor = [], None
    while True:  # two at a time, by the cursor, until next_cursor is null
        query = "/messages?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, body = call(relay, key, "GET", query)
        pages.append([m["email_id"] for m in body["messages"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == [[again, third], [second, first]]

    # the CLI runs the same query and prints the same JSON, or a table
    config = write_config(relay, tmp_path / "cli.toml")
    done = cli(config, "messages", "list", "--recipient", "gone@example.org", "--json")
    assert json.loads(done.stdout) == body_of(relay, key, "recipient=gone@example.org")
    done = cli(config, "messages", "list", "--status", "failed")
    header, row = done.stdout.splitlines()
    assert header.split() == ["received", "email", "id", "sender", "recipients", "status",
                              "subject"]
    assert second in row and "A@example.org +1" in row and "failed 1, sent 1" in row
    shown = cli(config, "messages", "show", second)
    assert "gone@example.org  failed" in shown.stdout and "no opens or clicks" in shown.stdout
    assert cli(config, "messages", "show", "email_nope").stderr == (
        "relay: no message 'email_nope'\n")


def test_messages_are_found_by_a_part_of_their_subject(make_relay, upstream, tmp_path):
    """In any case; ``%``, ``_`` and ``\\`` stand for themselves (not LIKE's wildcards)."""
    relay = make_relay(upstream=upstream, http=True)
    key = api_key(relay)
    for subject in ("Spring sale: 100% off_today", "Spring sale: 1000 off today",
                    "Invoice \\ March", "Invoice"):
        send(relay.smtp_port, ["a@example.org"], subject)
    [sale], [other] = email_ids(relay, "Spring sale: 100% off_today"), email_ids(
        relay, "Spring sale: 1000 off today")
    [backslash], [invoice] = email_ids(relay, "Invoice \\ March"), email_ids(relay, "Invoice")
    assert listed(relay, key, subject="SPRING SALE") == [other, sale]
    assert listed(relay, key, subject="0% off_") == [sale]
    assert listed(relay, key, subject="%") == [sale] == listed(relay, key, subject="_")
    assert listed(relay, key, subject="\\") == [backslash]
    assert listed(relay, key, subject="invoice") == [invoice, backslash]
    assert listed(relay, key, subject="invoice", limit="1") == [invoice]
    assert listed(relay, key, subject="nothing like it") == []
    assert listed(relay, key, subject="sale", since="2000-01-01", until="2000-01-02") == []
    config = write_config(relay, tmp_path / "cli.toml")
    done = cli(config, "messages", "list", "--subject", "0% OFF", "--json")
    assert [m["email_id"] for m in json.loads(done.stdout)["messages"]] == [sale]


def body_of(relay, key, query: str) -> dict:
    status, body = call(relay, key, "GET", f"/messages?{query}")
    assert status == 200
    return body


@pytest.mark.parametrize(("query", "parameter"), [
    ("status=lost", "status"), ("since=yesterday", "since"), ("until=2026-02-30", "until"),
    ("since=2026-02-02&until=2026-02-01", "since"), ("limit=0", "limit"),
    ("limit=1001", "limit"), ("cursor=abc", "cursor"), ("subject=" + "x" * 201, "subject"),
    # an event cursor is not a message cursor
    (f"cursor={queries.encode_cursor('evt_01890a5d-ac96-774b-bcce-b302099a8057')}", "cursor"),
])
def test_bad_parameters_are_400s_naming_them(make_relay, query, parameter):
    relay = make_relay(http=True)
    status, body = call(relay, api_key(relay), "GET", f"/messages?{query}")
    assert status == 400
    assert body["error"]["parameter"] == parameter, body
    assert body["error"]["message"].startswith(f"{parameter}: ")


def test_the_openapi_document_describes_the_search(make_relay):
    relay = make_relay(http=True)
    _, document = call(relay, api_key(relay), "GET", "/openapi.json")
    search = document["paths"]["/messages"]["get"]
    assert {p["name"] for p in search["parameters"]} == {
        "recipient", "message_id", "sender", "subject", "status", "since", "until", "cursor",
        "limit"}
    [status] = [p for p in search["parameters"] if p["name"] == "status"]
    assert status["schema"]["enum"] == list(queries.RECIPIENT_STATUSES)
    assert "unknown: the relay process sending it stopped" in status["schema"]["description"]


# ---- the query plans: every search walks an index in order, none scans or sorts the store

FILTERS = [{}, {"recipient": "a@example.org"}, {"message_id": "<x@y>"},
           {"sender": "news@shop.example"}, {"status": "failed"},
           {"recipient": "a@example.org", "status": "sent"},
           {"sender": "news@shop.example", "status": "unknown"},
           {"since": "2026-01-01", "until": "2026-01-02"},
           {"subject": "sale", "since": "2026-01-01", "until": "2026-01-02"},
           {"recipient": "a@example.org", "since": "2026-01-01",
            "cursor": queries.encode_cursor("email_01890a5d-ac96-774b-bcce-b302099a8057")}]


@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(p) or "all")
def test_every_search_walks_an_index_in_order(tmp_path, params):
    conn = store.connect(tmp_path / "relay.db")
    store.migrate(conn)
    query = queries.messages_query(queries.parse_messages(params))
    plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query.sql}", query.params)]
    # by recipient or status, the page's ids first: only those are read again and sorted
    walk = plan[:plan.index("SCAN p")] if "MATERIALIZE p" in plan else plan
    if "message_id" not in params:  # (the few tries of one Message-ID may be sorted)
        assert not any("TEMP B-TREE" in step for step in walk), plan  # no sort: index order
    if params:  # a filter is a range of an index, never a walk of all of it
        assert not any(step.startswith("SCAN") for step in walk), plan
    else:  # the newest messages, by the email id's index, up to the page's LIMIT
        assert plan == ["SCAN m USING INDEX sqlite_autoindex_messages_1"]
    recipients = queries.recipients_query(["email_a", "email_b"])
    for sql, values in ((recipients.sql, recipients.params),
                        (messages.MARK, ("unknown", "", 0, "sending", 1))):
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", values)]
        assert not any(step.startswith("SCAN") for step in plan), (sql, plan)


# ---- a process's liveness, and only dead processes' messages marked

def test_a_process_is_alive_only_while_that_very_process_runs():
    here, now = processes.current(), 1000.0
    assert processes.alive(here, here, 0.0, now) is True
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = Process(here.host, here.boot_id, child.pid,
                        processes._start_ticks(child.pid))
        assert processes.alive(other, here, 0.0, now) is True
        reused = Process(here.host, here.boot_id, child.pid, "1")  # its pid, another start
        assert processes.alive(reused, here, now, now) is False
    finally:
        child.kill()
        child.wait()
    assert processes.alive(other, here, now, now) is False  # however recently it was seen
    assert processes.alive(Process(here.host, "another boot", here.pid, here.started),
                           here, now, now) is False
    elsewhere = Process("elsewhere", here.boot_id, 1, "1")  # alive while its heartbeat is
    assert processes.alive(elsewhere, here, now - processes.LEASE_SECONDS + 1, now) is True
    assert processes.alive(elsewhere, here, now - processes.LEASE_SECONDS, now) is False


# ---- kill -9 during a delivery: a real `relay serve`, restarted

def serve_config(tmp_path: Path, name: str, upstream_port: int) -> tuple[Path, int, int]:
    smtp_port, http_port = free_port(), free_port()
    config = tmp_path / f"{name}.toml"
    config.write_text(f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
[upstream]
host = "127.0.0.1"
port = {upstream_port}
tls = "none"
[http]
listen = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"
[store]
url = "sqlite:///relay.db"
""")
    return config, smtp_port, http_port


def start_serve(config: Path, smtp_port: int, http_port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_port(smtp_port, process)
    wait_for_port(http_port, process)
    return process


def recipient_status(db: Path, email: str) -> dict[str, str]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT r.recipient, r.status FROM recipients r JOIN messages m "
                            "ON m.email_id = r.email_id WHERE m.subject = ?", (email,))
        return dict(rows.fetchall())
    finally:
        conn.close()


def test_a_delivery_cut_by_kill_9_is_marked_unknown_at_restart_and_only_that_one(
        loops, upstream, tmp_path):
    gate = loops.run(_event())
    upstream.handler.gate = gate  # the upstream holds DATA: the relay waits for its answer
    db = tmp_path / "relay.db"
    config, smtp_port, http_port = serve_config(tmp_path, "a", upstream.port)
    first = start_serve(config, smtp_port, http_port)
    other_config, other_smtp, other_http = serve_config(tmp_path, "b", upstream.port)
    other = None
    clients: list[threading.Thread] = []
    try:
        def held(port: int, subject: str, recipients: list[str]) -> None:
            thread = threading.Thread(target=_send_quietly, args=(port, recipients, subject),
                                      daemon=True)
            thread.start()
            clients.append(thread)

        held(smtp_port, "cut", ["x@example.org", "y@example.org"])
        wait_until(lambda: upstream.handler.held == 1, what="the upstream holding DATA")
        assert recipient_status(db, "cut") == {"x@example.org": "sending",
                                               "y@example.org": "sending"}
        # a second relay on the same store, started while the first is sending, and a CLI
        # command beside them: neither marks what a live process is sending
        other = start_serve(other_config, other_smtp, other_http)
        held(other_smtp, "alive", ["z@example.org"])
        wait_until(lambda: upstream.handler.held == 2, what="the second held DATA")
        listing = cli(config, "messages", "list", "--status", "sending", "--json")
        assert {m["subject"] for m in json.loads(listing.stdout)["messages"]} == {"cut",
                                                                                  "alive"}
        first.send_signal(signal.SIGKILL)
        first.wait(20)
        assert recipient_status(db, "cut") == {"x@example.org": "sending",
                                               "y@example.org": "sending"}
        restarted = start_serve(config, smtp_port, http_port)
        try:
            assert recipient_status(db, "cut") == {"x@example.org": "unknown",
                                                   "y@example.org": "unknown"}
            assert recipient_status(db, "alive") == {"z@example.org": "sending"}
            key = apikeys_create(config)
            status, body = _get(http_port, key, "/messages?status=unknown")
            [message] = body["messages"]
            assert message["subject"] == "cut" and message["statuses"] == {"unknown": 2}
            reply = message["recipients"][0]["reply"]
            assert reply.startswith(f"outcome unknown: the relay process sending it (pid "
                                    f"{first.pid} on ")
            shown = cli(config, "messages", "list", "--status", "unknown")
            assert "unknown" in shown.stdout.splitlines()[1]
            loops.loop.call_soon_threadsafe(gate.set)  # the live relay's delivery completes
            wait_until(lambda: recipient_status(db, "alive") == {"z@example.org": "sent"},
                       what="the second relay's answer recorded")
            assert recipient_status(db, "cut")["x@example.org"] == "unknown"
        finally:
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(20) == 0, restarted.stderr.read()
    finally:
        loops.loop.call_soon_threadsafe(gate.set)
        for process in (first, other):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(20)


async def _event() -> asyncio.Event:
    return asyncio.Event()


def _send_quietly(port: int, recipients: list[str], subject: str) -> None:
    with contextlib.suppress(smtplib.SMTPException, OSError):  # the relay was killed under it
        send(port, recipients, subject)


def apikeys_create(config: Path) -> str:
    done = cli(config, "api-keys", "create", "tests")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _get(port: int, key: str, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1{path}",
                                     headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())
