"""Retention and erasure end to end: mail sent through the relay, opens and clicks made on its
tracker, webhooks delivered to a receiver; then a purge at an explicit cutoff and the erasure of
one recipient, checked row by row in every table; the CLI in a subprocess and the API route."""

from __future__ import annotations

import re
import smtplib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from relay import config as config_module
from relay.admin.retention import erase_in_store
from relay.errors import ConfigError, InvalidInput
from relay.store import engine as store
from relay.store import postgres, queue, retention
from relay.tracking.tokens import sign_click, sign_open
from tests import pg
from tests.clients import api_key, call, cli, write_config
from tests.harness import LoopThread, Relay
from tests.webhooks.test_outbox import FAST, Receiver, get, hook, wait_until

BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"
SALE = "https://shop.example/sale?who=bob%40example.org"
DAY = retention.DAY
PER_RECIPIENT = ("recipients", "deliveries", "events", "engagement")


def send(relay: Relay, recipients: list[str], subject: str) -> str:
    """Sends through the relay; returns the relay's email id from the 250 reply."""
    message = (f"From: <news@shop.example>\r\nTo: list@example.org\r\nSubject: {subject}\r\n"
               f"Message-ID: <{time.time_ns()}@shop.example>\r\nMIME-Version: 1.0\r\n"
               "Content-Type: text/html; charset=utf-8\r\n\r\n"
               f'<html><body><a href="{SALE}">Sale</a></body></html>\r\n').encode()
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo()
        assert client.mail("news@shop.example")[0] == 250
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(message)
    assert code == 250, reply
    return re.search(r"email_[0-9a-f-]{36}", reply.decode()).group()


@dataclass
class World:
    relay: Relay
    old: str  # 10 days old: a@ and c@; a opened, c clicked
    shared: str  # today: a@ and Bob@Example.ORG; Bob opened
    bobs: str  # today: bob@example.org alone; bob clicked

    def open(self, email_id: str, recipient: str) -> None:
        token = sign_open(self.relay.services.keyring, email_id, recipient)
        assert get(f"{self.relay.http_url}/o/{token}", BROWSER) == 200

    def click(self, email_id: str, recipient: str) -> None:
        token = sign_click(self.relay.services.keyring, email_id, recipient, SALE)
        assert get(f"{self.relay.http_url}/c/{token}", BROWSER) == 302


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(LoopThread()).start()
    yield server
    server.stop()
    server.loops.close()


@pytest.fixture
def world(make_relay, upstream, receiver) -> World:
    relay = make_relay({"webhooks": [hook(receiver.url)], "webhook_delivery": FAST,
                        "tracking": {"scanner_window_seconds": 0}}, upstream=upstream, http=True)
    world = World(relay, send(relay, ["a@example.org", "c@example.org"], "Old news"), "", "")
    world.open(world.old, "a@example.org")
    world.click(world.old, "c@example.org")
    delivered(relay, 5)  # 2 sent, 2 opened (c's implied by the click), 1 clicked
    backdate(relay, 10 * DAY)
    world.shared = send(relay, ["a@example.org", "Bob@Example.ORG"], "News")
    world.bobs = send(relay, ["bob@example.org"], "Your order, Bob")
    world.open(world.shared, "Bob@Example.ORG")
    world.click(world.bobs, "bob@example.org")
    delivered(relay, 11)  # + 3 sent, 2 opened (one implied), 1 clicked
    return world


def delivered(relay: Relay, events: int) -> None:
    """Wait until the receiver got ``events`` webhook events and every batch is finished."""
    def done() -> bool:
        with relay.db() as db:
            return db.execute(
                "SELECT (SELECT count(*) FROM webhook_events) = ? AND NOT EXISTS (SELECT 1 FROM "
                "webhook_outbox o LEFT JOIN webhook_batches b ON b.id = o.batch_id "
                "WHERE coalesce(b.state, '') != 'delivered')", (events,)).fetchone()[0]
    wait_until(done, what=f"{events} webhook events delivered")


def backdate(relay: Relay, seconds: float) -> None:
    """Move every timestamp stored so far ``seconds`` into the past."""
    with relay.db() as db:
        for table, column in (("messages", "created_at"), ("recipients", "at"),
                              ("deliveries", "at"), ("events", "at"),
                              ("engagement", "last_at"), ("webhook_events", "occurred_at"),
                              ("webhook_batches", "finished_at"),
                              ("webhook_batches", "created_at"), ("webhook_attempts", "at")):
            db.execute(f"UPDATE {table} SET {column} = {column} - ?", (seconds,))


def rows(relay: Relay) -> dict[str, set[tuple[str, ...]]]:
    """Per table, the (email id, recipient) pairs it holds (the message's for webhook rows)."""
    with relay.db() as db:
        found = {table: set(db.execute(f"SELECT DISTINCT email_id, recipient FROM {table}"))
                 for table in PER_RECIPIENT}
        found["messages"] = set(db.execute("SELECT email_id, subject FROM messages"))
        found["webhook_events"] = set(db.execute(
            "SELECT json_extract(data, '$.email_id'), json_extract(data, '$.recipient') "
            "FROM webhook_events"))
        found["webhook_outbox"] = set(db.execute(
            "SELECT json_extract(e.data, '$.email_id'), json_extract(e.data, '$.recipient') "
            "FROM webhook_outbox o JOIN webhook_events e ON e.id = o.event_id"))
        found["webhook_batches"] = {(str(n),) for (n,) in db.execute(
            "SELECT count(*) FROM webhook_batches")}
        found["webhook_attempts"] = {(str(n),) for (n,) in db.execute(
            "SELECT count(*) FROM webhook_attempts")}
    return {table: {tuple(row) for row in values} for table, values in found.items()}


def stats(relay: Relay) -> dict[str, list[tuple[object, ...]]]:
    with relay.db() as db:
        return {table: [tuple(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY 1, 2")]
                for table in ("stats_daily", "stats_daily_tags", "stats_daily_agents")}


LINK_COUNTERS = ("stats_daily_links", "stats_daily_links_by", "stats_daily_tag_links")


def links(relay: Relay) -> list[str]:
    """The URLs the link counters hold, each table's in turn."""
    with relay.db() as db:
        return [url for table in LINK_COUNTERS
                for (url,) in db.execute(f"SELECT DISTINCT url FROM {table}")]


def after_purge(world: World) -> dict[str, set[tuple[str, ...]]]:
    shared, bobs = world.shared, world.bobs
    people = {(shared, "a@example.org"), (shared, "Bob@Example.ORG"), (bobs, "bob@example.org")}
    opened = {(shared, "Bob@Example.ORG"), (bobs, "bob@example.org")}
    return {"recipients": people, "deliveries": people, "events": opened, "engagement": opened,
            "messages": {(shared, "News"), (bobs, "Your order, Bob")},
            "webhook_events": people | opened, "webhook_outbox": people | opened,
            "webhook_batches": rows_count(world.relay, "webhook_batches", "created_at"),
            "webhook_attempts": rows_count(world.relay, "webhook_attempts", "at")}


def rows_count(relay: Relay, table: str, column: str) -> set[tuple[str, ...]]:
    """The number of rows of ``table`` from the last 5 days, as :func:`rows` shows it."""
    with relay.db() as db:
        query = f"SELECT count(*) FROM {table} WHERE {column} > ?"
        return {(str(db.execute(query, (time.time() - 5 * DAY,)).fetchone()[0]),)}


def erased(world: World) -> dict[str, set[tuple[str, ...]]]:
    """What remains of :func:`after_purge` once bob@example.org (any case) is erased."""
    expected = after_purge(world)
    for table in (*PER_RECIPIENT, "webhook_events", "webhook_outbox"):
        expected[table] = {r for r in expected[table] if r[1].lower() != "bob@example.org"}
    expected["messages"] = {(world.shared, "News")}
    return expected


ERASED_COUNTS = {"events": 3, "delivery_events": 0, "engagement": 3, "deliveries": 2,
                 "send_claims": 0, "recipients": 2,
                 "messages": 1, "html_bodies": 0,
                 "webhook_outbox": 5, "webhook_events": 5, "stats_daily_links": 1,
                 "stats_daily_links_by": 1, "stats_daily_tag_links": 0}


def test_purge_then_erase_leave_exactly_what_they_should(world):
    relay = world.relay
    counters = stats(relay)
    expected = after_purge(world)
    conn = store.connect_url(relay.config.store)
    counts = retention.purge(conn, time.time() - 5 * DAY)
    assert rows(relay) == expected
    assert counts == {"events": 3, "delivery_events": 0, "recipients": 2, "deliveries": 2,
                      "messages": 1,
                      "html_bodies": 0, "engagement": 3,
                      "webhook_attempts": counts["webhook_attempts"],
                      "webhook_outbox": 5, "webhook_batches": counts["webhook_batches"],
                      "webhook_events": 5}
    assert counts["webhook_batches"] >= 1 and counts["webhook_attempts"] >= 1
    assert stats(relay) == counters  # the daily statistics of the purged day survive
    assert retention.purge(conn, time.time() - 5 * DAY) == dict.fromkeys(counts, 0)

    assert links(relay) == [SALE, SALE]  # the message has no tag
    assert retention.erase_recipient(conn, "BOB@example.org") == ERASED_COUNTS
    assert rows(relay) == erased(world)
    assert links(relay) == []  # the URL named the erased address
    assert stats(relay) == counters
    with pytest.raises(InvalidInput):
        retention.erase_recipient(conn, "example.org")


def test_cli_purges_and_erases(world, tmp_path):
    config = write_config(world.relay, tmp_path / "cli.toml")
    expected = after_purge(world)
    purged = cli(config, "purge", "--older-than", "5")
    assert purged.returncode == 0, purged.stderr
    assert re.search(r"^messages\s+1$", purged.stdout, re.M)
    assert re.search(r"^events\s+3$", purged.stdout, re.M)
    assert rows(world.relay) == expected
    done = cli(config, "erase", "Bob@example.ORG")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split() for line in done.stdout.splitlines()[1:])
    assert lines == {table: str(n) for table, n in ERASED_COUNTS.items()}
    assert rows(world.relay) == erased(world)
    bad = cli(config, "erase", "nobody")
    assert bad.returncode == 1 and "not an email address" in bad.stderr


def test_api_erases_a_recipient(world):
    relay = world.relay
    key = api_key(relay)
    before = rows(relay)
    assert call(relay, None, "DELETE", "/recipients/bob@example.org")[0] == 401
    assert call(relay, key, "DELETE", "/recipients/nobody")[0] == 400
    status, body = call(relay, key, "DELETE", "/recipients/BOB%40example.org")
    assert status == 200, body
    assert body == {"recipient": "BOB@example.org", "deleted": ERASED_COUNTS}
    after = rows(relay)
    assert after["messages"] == before["messages"] - {(world.bobs, "Your order, Bob")}
    for table in (*PER_RECIPIENT, "webhook_events", "webhook_outbox"):
        assert after[table] == {r for r in before[table] if r[1].lower() != "bob@example.org"}


def test_retention_days_setting(tmp_path):
    assert config_module.parse({}).retention.days == 0
    assert config_module.parse({"retention": {"days": 30}}).retention.days == 30
    for value in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=r"x\.toml.*retention\.days"):
            config_module.parse({"retention": {"days": value}}, "x.toml")
    with pytest.raises(ConfigError, match=r"retention\.keep"):
        config_module.parse({"retention": {"keep": 1}}, "x.toml")


def test_purge_expired_counts_days_back_from_now(store_settings, store_conn):
    conn = store_conn
    now = time.time()
    for email_id, age in (("email_old", 31), ("email_new", 29)):
        conn.execute("INSERT INTO messages (email_id, sender, sender_domain, track_opens, "
                     "track_clicks, decision, size, created_at) VALUES (?, 's@x', 'x', 1, 1, "
                     "'tracked', 1, ?)", (email_id, now - age * DAY))
    assert retention.purge_expired(store_settings, 30, now)["messages"] == 1
    assert [r[0] for r in conn.execute("SELECT email_id FROM messages")] == ["email_new"]


def test_a_stop_ends_the_purge_before_its_next_chunk(store_conn, monkeypatch):
    """Cancelling the purge task does not stop its thread, and asyncio.run waits for that
    thread before the process exits: a long first purge would outlast systemd's stop."""
    monkeypatch.setattr(retention, "CHUNK", 2)
    conn = store_conn
    conn.executemany(
        "INSERT INTO events (id, type, at, email_id, recipient, user_agent, method, "
        "classification, counted, implied, first_for_recipient, first_for_link) "
        "VALUES (?, 'open', 1.0, 'email_old', 'a@example.org', 'UA', 'GET', 'person', 1, 0, 0, 0)",
        [(f"evt_{n}",) for n in range(5)])

    class StopAfterFirstChunk(threading.Event):
        def is_set(self) -> bool:
            answer = super().is_set()
            self.set()
            return answer

    assert retention.purge(conn, 2.0, StopAfterFirstChunk())["events"] == 2
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    assert retention.purge(conn, 2.0)["events"] == 3  # the next purge finishes the job


def test_erase_deletes_the_claims_naming_the_recipient(store_conn):
    """A claim names its recipient: one a killed process left must not outlive an erasure."""
    conn = store_conn
    conn.executemany("INSERT INTO send_claims VALUES (?, ?, 'email_1', 1, 1000)",
                     [(b"d" * 32, "Bob@Example.ORG"), (b"d" * 32, "ann@example.org")])
    assert retention.erase_recipient(conn, "bob@example.org")["send_claims"] == 1
    assert conn.execute("SELECT recipient FROM send_claims").fetchall() == [("ann@example.org",)]


def test_delivery_events_are_purged_and_erased(store_conn):
    """Queue mode's delays and bounces name their recipient: they age out with the other
    events and go with an erasure."""
    conn = store_conn
    queue.record_events(conn, [
        queue.DeliveryEvent(f"evt_{n}", queue.DELAYED_EVENT, at, "email_1", who, 451, 1,
                            "451 busy", at + 60, None)
        for n, (at, who) in enumerate([(1.0, "old@example.org"), (5.0, "Bob@Example.org"),
                                       (5.0, "ann@example.org")])])
    assert retention.purge(conn, 2.0)["delivery_events"] == 1
    assert retention.erase_recipient(conn, "bob@example.org")["delivery_events"] == 1
    assert conn.execute("SELECT recipient FROM delivery_events").fetchall() == [
        ("ann@example.org",)]


def test_erase_finds_every_case_and_only_whole_addresses(store_conn):
    """SQLite's lower() folds ASCII letters only: JÖRG@… was never found, whatever spelling
    was given. Link counters were matched by substring: erasing ann@… took joann@'s too."""
    conn = store_conn
    conn.execute("INSERT INTO messages (email_id, sender, sender_domain, track_opens, "
                 "track_clicks, decision, size, created_at) VALUES ('email_j', 's@shop.example', "
                 "'shop.example', 1, 1, 'tracked', 1, 0)")
    conn.execute("INSERT INTO recipients VALUES ('email_j', 'JÖRG@Example.org', 'sent', '250', 0)")
    urls = {"https://x.example/?who=ann@example.org": True,
            "https://x.example/?who=Ann%40Example.org&y=1": True,
            "https://x.example/u/ann@example.org/": True,
            "https://x.example/?who=joann@example.org": False,
            "https://x.example/?who=ann@example.org.au": False}
    jorg = "https://x.example/?who=J%C3%96RG%40example.org"
    every = [(url,) for url in (*urls, jorg)]
    conn.executemany("INSERT INTO stats_daily_links VALUES ('2026-11-24', ?, 1, 1)", every)
    conn.executemany("INSERT INTO stats_daily_links_by VALUES ('2026-11-24', 'shop.example', "
                     "'c1', ?, 1, 1)", every)
    conn.executemany("INSERT INTO stats_daily_tag_links VALUES ('2026-11-24', 'spring', ?, 1, 1)",
                     every)
    counts = retention.erase_recipient(conn, "jörg@example.org")
    assert (counts["recipients"], counts["messages"], counts["stats_daily_links"]) == (1, 1, 1)
    assert counts["stats_daily_links_by"] == counts["stats_daily_tag_links"] == 1
    erased = retention.erase_recipient(conn, "ann@example.org")
    assert [erased[table] for table in LINK_COUNTERS] == [3, 3, 3]
    for table in LINK_COUNTERS:
        left = {url for (url,) in conn.execute(f"SELECT url FROM {table}")}
        assert left == {url for url, named in urls.items() if not named}, table


@pytest.mark.skipif(pg.ENGINE != "postgresql", reason="a conflict of PostgreSQL's SERIALIZABLE")
def test_an_erase_chunk_aborted_by_a_conflicting_write_is_run_again(store_settings, store_conn):
    """A click updates bob's engagement row while the erase deletes it: once the click
    commits, PostgreSQL aborts the erase's chunk (could not serialize access), and the chunk
    is run again instead of failing the erase (``relay erase``, the API route)."""
    store_conn.execute("INSERT INTO engagement VALUES ('email_1', 'bob@example.org', 'open', "
                       "1, 1, 1.0)")
    click = pg.connect(store_settings.url)
    click.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
    click.execute("UPDATE engagement SET hits = hits + 1 WHERE recipient = 'bob@example.org'")
    outcome: list[object] = []
    erasing = threading.Thread(target=lambda: outcome.append(
        _erase_or_error(store_settings, "bob@example.org")))
    erasing.start()
    try:
        def erase_waits_for_the_click() -> bool:
            [(waiting,)] = store_conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() AND query LIKE 'DELETE FROM engagement%'"
            ).fetchall()
            return waiting > 0

        wait_until(erase_waits_for_the_click, what="the erase waiting for the click's row")
        click.execute("COMMIT")
    finally:
        click.rollback()
        erasing.join(30)
        click.close()
    assert outcome and isinstance(outcome[0], dict), outcome
    assert outcome[0]["engagement"] == 1
    assert store_conn.execute("SELECT count(*) FROM engagement").fetchone()[0] == 0


def _erase_or_error(settings: config_module.StoreSettings, address: str) -> object:
    try:
        return erase_in_store(settings, address)
    except Exception as exc:  # the test reports it
        return exc


@pytest.mark.skipif(pg.ENGINE != "postgresql", reason="PostgreSQL's migration lock")
def test_the_erase_route_does_not_migrate_the_store_again(store_settings, store_conn):
    """The serving process migrated the store when it started: an erasure (the API route's
    erase_in_store, the hourly purge) does not run the migrations again, so it does not wait
    for another node's migration (which holds the migration lock) to finish."""
    store_conn.execute("INSERT INTO engagement VALUES ('email_1', 'bob@example.org', 'open', "
                       "1, 1, 1.0)")
    migrating = pg.connect(store_settings.url)
    migrating.execute("SELECT pg_advisory_lock(?)", (postgres.MIGRATION_LOCK,))
    outcome: list[object] = []

    def erase_then_purge() -> None:
        outcome.append(_erase_or_error(store_settings, "bob@example.org"))
        outcome.append(retention.purge_expired(store_settings, 1, 3 * DAY))

    erasing = threading.Thread(target=erase_then_purge)
    erasing.start()
    try:
        wait_until(lambda: len(outcome) == 2, what="the erasure and the purge, while another "
                                                    "node migrates")
    finally:
        migrating.close()  # the lock goes with the session
        erasing.join(30)
    assert isinstance(outcome[0], dict) and outcome[0]["engagement"] == 1, outcome
    assert isinstance(outcome[1], dict) and outcome[1]["engagement"] == 0, outcome
