"""Enriched events: what the tracker (over HTTP) and the recorder store, the device / client /
country counters (against their rebuild oracle), the native statistics grouped by them, the
events API's JSON, webhook data and the ``relay events`` table."""

from __future__ import annotations

import ipaddress
import json
import sqlite3
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay import cli
from relay.config import StoreSettings, WebhookEndpoint, parse
from relay.ids import new_email_id
from relay.stats import breakdown, queries, rollup
from relay.stats.maths import day_of
from relay.store import engine as store
from relay.store.engine import Store
from relay.store.transaction import transaction
from relay.tracking.bots import CLICK, OPEN, Classifier, networks_of
from relay.tracking.enrich import AgentParser, Enricher, GeoDatabase
from relay.tracking.events import Event, Hit, Recorder
from relay.tracking.tokens import Keyring, sign_open
from relay.tracking.tracker import build_app
from relay.webhooks.outbox import Outbox, sync_endpoints
from tests.geodb import write_database
from tests.stats.test_stats import SENT_AT, add_message

DAY = day_of(SENT_AT)
DETAILS = "0030_event_details"
STATS_OS = "0063_stats_os"
TODAY = DAY
IPHONE_MAIL = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
               "(KHTML, like Gecko) Mobile/15E148")
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.10827; Pro)"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/126.0.0.0 Safari/537.36")
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com " \
              "GoogleImageProxy)"
BERLIN, ROUEN, TOKYO, PORTLAND = "203.0.113.9", "203.0.113.130", "198.51.100.7", "2001:db8:1::5"


@pytest.fixture(scope="module")
def geo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_database(tmp_path_factory.mktemp("geo") / "city.mmdb")


@pytest.fixture
def conn(store_conn: sqlite3.Connection) -> sqlite3.Connection:
    return store_conn


def recorder(geo_path: Path, *, anonymize: bool = False, scanners: tuple[str, ...] = (),
             listeners: tuple = ()) -> Recorder:
    networks = networks_of(tuple(ipaddress.ip_network(n) for n in scanners))
    enricher = Enricher(AgentParser(), GeoDatabase(geo_path), anonymize=anonymize)
    return Recorder(None, Classifier(networks, scanner_window_seconds=0),  # type: ignore[arg-type]
                    listeners=listeners, enricher=enricher)


def record(conn: sqlite3.Connection, rec: Recorder, hits: list[Hit]) -> list[list[Event]]:
    with transaction(conn):  # as Store.write runs it: PostgreSQL has no savepoint outside one
        return rec.write(conn, hits)


def hit(kind: str, recipient: str, agent: str, ip: str, *, at: float = SENT_AT + 3600,
        url: str | None = None, email_id: str = "email_a") -> Hit:
    return Hit(kind, at, email_id, recipient, url, ip, agent)


@pytest.mark.sqlite_only  # reads through Store.execute_now, the SQLite store's writer
async def test_the_tracker_stores_enriched_events_with_the_address_anonymized(
        tmp_path: Path, geo_path: Path) -> None:
    config = parse({
        "store": {"url": f"sqlite:///{tmp_path / 'relay.db'}"},
        "http": {"trusted_proxies": ["127.0.0.0/8"]},
        "tracking": {"keys": {"k1": "k" * 40}, "scanner_window_seconds": 0},
        "geo": {"database": str(geo_path)},
        "privacy": {"anonymize_ip": True},
    })
    keyring = Keyring({"k1": b"k" * 40}, "k1")
    db = await Store.open(config.store.path)
    try:
        async with TestClient(TestServer(build_app(config, db, keyring))) as client:
            response = await client.get(
                "/o/" + sign_open(keyring, new_email_id(), "ann@example.net"),
                headers={"User-Agent": IPHONE_MAIL, "X-Forwarded-For": ROUEN})
            assert response.status == 200
        assert db.execute_now("SELECT ip, device, client, os, country, region, city "
                              "FROM events") == [("203.0.113.0", "mobile", "Apple Mail",
                                                  "iOS 17.5", "FR", "Normandy", "Rouen")]
    finally:
        await db.close()


def test_events_carry_device_client_os_and_location(conn: sqlite3.Connection,
                                                    geo_path: Path) -> None:
    add_message(conn, "email_a", "news@shop.example", ["ann@example.net"])
    [events] = record(conn, recorder(geo_path), [
        hit(CLICK, "ann@example.net", IPHONE_MAIL, BERLIN, url="https://shop.example/a")])
    expected = ("mobile", "Apple Mail", "iOS 17.5", "DE", "Berlin", "Berlin")
    assert [e.type for e in events] == [OPEN, CLICK]  # the implied open is enriched too
    assert all(e[-6:] == expected and e.ip == BERLIN for e in events)
    stored = conn.execute("SELECT ip, device, client, os, country, region, city FROM events"
                          ).fetchall()
    assert stored == [(BERLIN, *expected)] * 2


def test_anonymized_address_is_stored_after_the_bot_rules_and_the_lookup_used_it(
        conn: sqlite3.Connection, geo_path: Path) -> None:
    add_message(conn, "email_a", "news@shop.example", ["ann@example.net"])
    # 203.0.113.130 is a scanner and in Rouen; its /24 (203.0.113.0) would be neither.
    rec = recorder(geo_path, anonymize=True, scanners=("203.0.113.128/25",))
    [[scanner], [person]] = record(conn, rec, [
        hit(OPEN, "ann@example.net", CHROME, ROUEN),
        hit(OPEN, "ann@example.net", CHROME, PORTLAND, at=SENT_AT + 7200)])
    assert (scanner.classification, scanner.country, scanner.ip) == ("scanner", "FR",
                                                                     "203.0.113.0")
    assert (person.classification, person.country, person.ip) == ("person", "US",
                                                                  "2001:db8:1::")
    assert {row[0] for row in conn.execute("SELECT ip FROM events")} == {"203.0.113.0",
                                                                        "2001:db8:1::"}


@pytest.fixture
def filled(conn: sqlite3.Connection, geo_path: Path) -> sqlite3.Connection:
    add_message(conn, "email_a", "news@shop.example",
                ["ann@example.net", "bob@gmail.com", "cy@example.org"])
    add_message(conn, "email_b", "news@shop.example", ["ann@example.net"],
                at=SENT_AT - 86400)
    rec = recorder(geo_path, listeners=(rollup.Rollup(), breakdown.Breakdown()))
    t = SENT_AT + 3600
    record(conn, rec, [
        hit(OPEN, "ann@example.net", IPHONE_MAIL, BERLIN, at=t),
        hit(OPEN, "ann@example.net", OUTLOOK, ROUEN, at=t + 60),
        hit(CLICK, "ann@example.net", CHROME, ROUEN, at=t + 90, url="https://shop.example/a"),
        hit(OPEN, "bob@gmail.com", GMAIL_PROXY, "66.249.84.1", at=t + 100),
        hit(CLICK, "cy@example.org", CHROME, TOKYO, at=t + 200, url="https://shop.example/b"),
        hit(OPEN, "cy@example.org", "curl/8.5.0", TOKYO, at=t + 300),  # automation: not counted
        hit(OPEN, "ann@example.net", OUTLOOK, PORTLAND, at=t + 400, email_id="email_b"),
        hit(OPEN, "dee@example.net", CHROME, BERLIN, at=t + 500, email_id="email_unknown"),
    ])
    return conn


def agents_table(conn: sqlite3.Connection) -> list[tuple]:
    return sorted(conn.execute("SELECT * FROM stats_daily_agents").fetchall())


def test_counters_by_device_client_and_country(filled: sqlite3.Connection) -> None:
    # day, device, client, country: opens, unique opens, clicks, unique clicks; a unique open
    # or click is filed under the recipient's first one; cy's click implies an open
    assert agents_table(filled) == [
        ("2026-03-14", "desktop", "Outlook 2019", "US", 1, 1, 0, 0),
        ("2026-03-15", "desktop", "Chrome 126", "FR", 0, 0, 1, 1),
        ("2026-03-15", "desktop", "Chrome 126", "JP", 1, 1, 1, 1),
        ("2026-03-15", "desktop", "Outlook 2019", "FR", 1, 0, 0, 0),
        ("2026-03-15", "mobile", "Apple Mail", "DE", 1, 1, 0, 0),
        ("2026-03-15", "proxy", "GmailImageProxy", "", 1, 1, 0, 0),
    ]


def os_table(conn: sqlite3.Connection) -> list[tuple]:
    return sorted(conn.execute("SELECT * FROM stats_daily_os").fetchall())


def test_counters_by_os(filled: sqlite3.Connection) -> None:
    # day, OS: opens, unique opens, clicks, unique clicks, filed as by device (above); the
    # Gmail image proxy says Windows XP
    assert os_table(filled) == [
        ("2026-03-14", "Windows 10", 1, 1, 0, 0),
        ("2026-03-15", "Windows 10", 2, 1, 2, 2),
        ("2026-03-15", "Windows XP", 1, 1, 0, 0),
        ("2026-03-15", "iOS 17.5", 1, 1, 0, 0),
    ]


def test_counters_match_a_rebuild_from_the_events(filled: sqlite3.Connection) -> None:
    kept = agents_table(filled), os_table(filled)
    breakdown.rebuild(filled)
    assert (agents_table(filled), os_table(filled)) == kept


@pytest.mark.sqlite_only  # migrates a SQLite connection again (store.migrate)
def test_the_os_migration_counts_the_events_recorded_before_it(
        filled: sqlite3.Connection) -> None:
    """A store migrated before ``0063_stats_os``: its events, with their os, counted by it as
    the listener would have."""
    kept = os_table(filled)
    filled.execute("DROP VIEW stats_daily_os_sent")
    filled.execute("DROP TABLE stats_daily_os")
    filled.execute("DELETE FROM migrations WHERE name = ?", (STATS_OS,))
    assert store.migrate(filled) == [STATS_OS]
    assert os_table(filled) == kept


def test_the_migration_counts_earlier_events_under_unknown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {name: sql for name, sql in store.MIGRATIONS.items() if name < DETAILS}
    monkeypatch.setattr(store, "MIGRATIONS", before)
    conn = store.connect(tmp_path / "old.db")
    store.migrate(conn)
    add_message(conn, "email_a", "news@shop.example", ["ann@example.net", "bob@gmail.com"])
    t = SENT_AT + 3600
    conn.executemany(f"INSERT INTO events VALUES ({', '.join('?' * 16)})", [  # the old columns
        ("evt_1", OPEN, t, "email_a", "ann@example.net", None, BERLIN, IPHONE_MAIL, "GET",
         "person", None, None, 1, 0, 1, 0),
        ("evt_2", OPEN, t, "email_a", "bob@gmail.com", None, ROUEN, CHROME, "GET", "person",
         None, None, 1, 1, 1, 0),
        ("evt_3", CLICK, t, "email_a", "bob@gmail.com", "https://shop.example/a", ROUEN,
         CHROME, "GET", "person", None, None, 1, 0, 1, 1),
        ("evt_4", OPEN, t, "email_a", "bob@gmail.com", None, ROUEN, "curl/8.5.0", "GET",
         "automation", "curl", "library", 0, 0, 0, 0),
    ])
    monkeypatch.undo()
    assert store.migrate(conn)[:1] == [DETAILS]
    assert agents_table(conn) == [(DAY, "", "", "", 2, 2, 1, 1)]
    assert os_table(conn) == [(DAY, "", 2, 2, 1, 1)]
    assert conn.execute("SELECT DISTINCT device, country FROM events").fetchall() == [
        (None, None)]


def stats(conn: sqlite3.Connection, group_by: str) -> dict:
    q = queries.parse_stats({"group_by": group_by, "since": "2026-03-14",
                             "until": "2026-03-15"}, TODAY)  # type: ignore[arg-type]
    sql = queries.stats_query(q)
    return queries.stats_body(q, conn.execute(sql.sql, sql.params).fetchall())


def test_native_statistics_grouped_by_device_client_and_country(
        filled: sqlite3.Connection) -> None:
    by_device = {row["key"]: (row["opens"], row["unique_opens"], row["clicks"],
                              row["unique_clicks"]) for row in stats(filled, "device")["rows"]}
    assert by_device == {"desktop": (3, 2, 2, 2), "mobile": (1, 1, 0, 0), "proxy": (1, 1, 0, 0)}
    by_client = [row["key"] for row in stats(filled, "client")["rows"]]
    assert by_client[0] == "Chrome 126"  # most opens and clicks first
    assert set(by_client) == {"Chrome 126", "Outlook 2019", "Apple Mail", "GmailImageProxy"}
    countries = {row["key"]: row for row in stats(filled, "country")["rows"]}
    assert set(countries) == {"DE", "FR", "JP", "US", None}  # None: the proxy's, unknown
    jp = countries["JP"]
    assert (jp["sent"], jp["open_rate"], jp["click_to_open_rate"]) == (0, None, 1.0)
    by_os = {row["key"]: (row["sent"], row["opens"], row["unique_opens"], row["clicks"],
                          row["unique_clicks"]) for row in stats(filled, "os")["rows"]}
    assert by_os == {"Windows 10": (0, 3, 2, 2, 2), "Windows XP": (0, 1, 1, 0, 0),
                     "iOS 17.5": (0, 1, 1, 0, 0)}
    assert [row["key"] for row in stats(filled, "os")["rows"]][0] == "Windows 10"


def test_events_api_json_has_the_details(filled: sqlite3.Connection) -> None:
    f = queries.parse_events({"email_id": "email_a", "type": "click"})
    sql = queries.events_query(f)
    [first, second] = queries.events_body(f, filled.execute(sql.sql, sql.params).fetchall()
                                          )["events"]
    assert {k: first[k] for k in ("device", "client", "os", "geo")} == {
        "device": "desktop", "client": "Chrome 126", "os": "Windows 10",
        "geo": {"country": "FR", "region": "Normandy", "city": "Rouen"}}
    assert second["geo"] == {"country": "JP", "region": None, "city": None}


def test_webhook_data_has_device_client_os_and_geo(conn: sqlite3.Connection,
                                                   geo_path: Path) -> None:
    add_message(conn, "email_a", "news@shop.example", ["ann@example.net"])
    sync_endpoints(conn, [WebhookEndpoint("crm", "https://crm.example/hook", "s" * 32)],
                   SENT_AT)
    rec = recorder(geo_path, listeners=(Outbox(),))
    record(conn, rec, [hit(OPEN, "ann@example.net", IPHONE_MAIL, BERLIN),
                       hit(OPEN, "ann@example.net", GMAIL_PROXY, "66.249.84.1",
                           at=SENT_AT + 7200)])
    [mail, proxy] = [json.loads(row[0]) for row in conn.execute(
        "SELECT data FROM webhook_events ORDER BY id")]
    assert {k: mail[k] for k in ("device", "client", "os", "geo")} == {
        "device": "mobile", "client": "Apple Mail", "os": "iOS 17.5",
        "geo": {"country": "DE", "region": "Berlin", "city": "Berlin"}}
    assert (proxy["device"], proxy["geo"], proxy["tracking"]["bot"]["kind"]) == (
        "proxy", None, "proxy")


def test_cli_events_table_shows_device_client_and_location(
        filled: sqlite3.Connection, tmp_path: Path, store_settings: StoreSettings,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[store]\nurl = "{store_settings.url}"\n')
    assert cli.main(["events", "--config", str(config), "--since", "2026-03-15",
                     "--email-id", "email_a", "--type", "click"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-3:] == ["device", "client", "location"]
    assert "desktop" in out[1] and "Chrome 126" in out[1] and "FR, Normandy, Rouen" in out[1]
    assert out[2].rstrip().endswith("JP")


@pytest.mark.sqlite_only  # counts the statements with sqlite3's trace callback
def test_a_hit_reads_its_message_once_for_every_listener(conn: sqlite3.Connection,
                                                         geo_path: Path) -> None:
    """The classifier (the time since sending), the counters and the webhook outbox all need
    the message's row: the recorder reads it once and hands it to each listener."""
    add_message(conn, "email_a", "news@shop.example", ["ann@example.net", "bob@gmail.com"])
    sync_endpoints(conn, [WebhookEndpoint("crm", "https://crm.example/hook", "s" * 32)],
                   SENT_AT)
    rec = recorder(geo_path, listeners=(rollup.Rollup(), breakdown.Breakdown(), Outbox()))
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    record(conn, rec, [hit(CLICK, "ann@example.net", CHROME, BERLIN, url="https://shop.example/a"),
                       hit(OPEN, "bob@gmail.com", IPHONE_MAIL, ROUEN)])
    conn.set_trace_callback(None)
    assert len([s for s in statements if "FROM messages" in s]) == 1
    assert conn.execute("SELECT count(*) FROM webhook_events").fetchone() == (3,)
    assert conn.execute("SELECT sum(opens), sum(clicks) FROM stats_daily").fetchone() == (2, 1)
    assert conn.execute("SELECT sum(opens), sum(clicks) FROM stats_daily_agents"
                        ).fetchone() == (2, 1)
    assert conn.execute("SELECT sum(opens), sum(clicks) FROM stats_daily_os").fetchone() == (2, 1)
