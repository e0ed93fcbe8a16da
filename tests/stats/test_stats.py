"""Statistics maths and the rollup, without servers: providers, rates, GetTrackList's
parameters and answer, the query builders, and the counters kept on write checked against a
recomputation from the raw tables."""

from __future__ import annotations

import json
import sqlite3
from datetime import date

import pytest

from relay.errors import InvalidParameter
from relay.stats import queries, rollup
from relay.stats.maths import (
    OTHERS,
    Counts,
    day_of,
    esp_of,
    esp_parameter,
    parse_track_list,
    percent,
    ratio,
    track_list_body,
)
from relay.store import reports
from relay.tracking.bots import CLICK, OPEN, Classifier
from relay.tracking.events import Hit, Recorder

TODAY = date(2026, 3, 15)
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36"


@pytest.mark.parametrize(("recipient", "esp"), [
    ("a@gmail.com", "gmail.com"), ("a@GoogleMail.com", "gmail.com"),
    ("a@hotmail.com", "outlook.com"), ("a@live.com", "outlook.com"), ("a@msn.com", "outlook.com"),
    ("a@outlook.com", "outlook.com"), ("a@me.com", "icloud.com"), ("a@mac.com", "icloud.com"),
    ("a@icloud.com", "icloud.com"), ("a@ymail.com", "yahoo.com"), ("a@yahoo.co.uk", "yahoo.com"),
    ("a@example.org", OTHERS), ("a@mail.gmail.com", OTHERS), ("no-at-sign", OTHERS),
])
def test_recipient_domains_map_to_providers(recipient, esp):
    assert esp_of(recipient) == esp


@pytest.mark.parametrize(("value", "esp"), [
    ("gmail.com", "gmail.com"), ("GMAIL.COM", "gmail.com"), ("googlemail.com", "gmail.com"),
    ("hotmail.com", "outlook.com"), ("me.com", "icloud.com"), ("Others", OTHERS),
    ("others", OTHERS), ("yahoo.com", "yahoo.com"),
])
def test_esp_parameter_accepts_providers_and_aliases(value, esp):
    assert esp_parameter(value) == esp


def test_esp_parameter_refuses_unknown_values():
    with pytest.raises(InvalidParameter) as caught:
        esp_parameter("example.org")
    assert caught.value.parameter == "Esp"


def test_rates_and_their_denominators():
    c = Counts(sent=8, opens=10, unique_opens=4, clicks=3, unique_clicks=2)
    assert c.open_rate == 1.25  # opens / sent: a recipient may open many times
    assert c.unique_open_rate == 0.5
    assert c.click_rate == 0.375
    assert c.unique_click_rate == 0.25
    assert c.click_to_open_rate == 0.5  # unique clicks / unique opens
    assert Counts().open_rate is None and Counts().click_to_open_rate is None
    assert ratio(1, 3) == 0.3333


@pytest.mark.parametrize(("part", "whole", "text"), [
    (0, 0, "0"), (0, 5, "0"), (1, 8, "12.5"), (1, 3, "33.33"), (2, 3, "66.67"), (4, 4, "100"),
    (5, 4, "125"), (1, 100000, "0"),
])
def test_track_list_rates_are_percent_strings(part, whole, text):
    assert percent(part, whole) == text


def test_days_are_utc():
    assert day_of(1773619199.9) == "2026-03-15"  # 23:59:59.9 UTC
    assert day_of(1773619200.0) == "2026-03-16"


def params(**extra: str) -> dict[str, str]:
    return {"StartTime": "2026-03-09", "EndTime": "2026-03-15", **extra}


def test_track_list_parameters():
    q = parse_track_list(params(PageSize="3", PageNumber="2", AccountName="News@Shop.example",
                                TagName="spring", Esp="hotmail.com", Offset="1"), TODAY)
    assert (q.start, q.end, q.page_size, q.page_number) == (date(2026, 3, 9), TODAY, 3, 2)
    assert (q.account_name, q.tag_name, q.esp) == ("news@shop.example", "spring", "outlook.com")
    defaults = parse_track_list(params(), TODAY)
    assert (defaults.page_size, defaults.page_number, defaults.esp) == (10, 1, None)


@pytest.mark.parametrize(("given", "parameter"), [
    ({"StartTime": ""}, "StartTime"),
    ({"EndTime": ""}, "EndTime"),
    ({"StartTime": "2026-3-9"}, "StartTime"),
    ({"StartTime": "09/03/2026"}, "StartTime"),
    ({"EndTime": "2026-02-30"}, "EndTime"),
    ({"StartTime": "2026-02-12", "EndTime": "2026-02-13"}, "StartTime"),  # 31 days back
    ({"StartTime": "2026-03-14", "EndTime": "2026-03-13"}, "EndTime"),  # before the start
    ({"StartTime": "2026-03-01", "EndTime": "2026-03-09"}, "EndTime"),  # 8 days apart
    ({"PageSize": "0"}, "PageSize"), ({"PageSize": "101"}, "PageSize"),
    ({"PageSize": "ten"}, "PageSize"), ({"PageNumber": "-1"}, "PageNumber"),
    ({"TagName": "spring"}, "TagName"),  # without AccountName
    ({"AccountName": "not-an-address"}, "AccountName"),
    ({"Esp": "aol.com"}, "Esp"),
    ({"DedicatedIp": "192.0.2.1"}, "DedicatedIp"),
    ({"ConfigSetId": "x"}, "ConfigSetId"),
])
def test_track_list_bad_parameters_are_named(given, parameter):
    with pytest.raises(InvalidParameter) as caught:
        parse_track_list(params(**given), TODAY)
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(f"{parameter}: ")


def test_track_list_limits_are_inclusive():
    parse_track_list(params(StartTime="2026-02-13", EndTime="2026-02-20"), TODAY)  # 30 back, 7 on
    parse_track_list(params(DedicatedIp="", ConfigSetId=" "), TODAY)  # empty: accepted


def test_track_list_body_has_the_seed_shape_one_row_per_day():
    q = parse_track_list(params(PageSize="3", PageNumber="3"), TODAY)
    body = track_list_body(q, {"2026-03-15": Counts(4, 5, 2, 1, 1)}, request_id="R")
    assert body["RequestId"] == "R"
    assert (body["PageNo"], body["PageSize"], body["Total"], body["TotalPages"]) == (3, 3, 7, 3)
    assert set(body) == {"OffsetCreateTimeDesc", "OffsetCreateTime", "RequestId", "PageNo",
                         "PageSize", "Total", "TotalPages", "data"}
    assert body["data"]["stat"] == [{
        "RcptClickRate": "25", "RcptUniqueOpenCount": "2", "RcptClickCount": "1",
        "RcptUniqueClickCount": "1", "CreateTime": "2026-03-15T00:00Z",
        "RcptUniqueOpenRate": "50", "RcptUniqueClickRate": "25", "TotalNumber": "4",
        "RcptOpenRate": "125", "RcptOpenCount": "5",
    }]
    first = track_list_body(parse_track_list(params(PageSize="3"), TODAY), {})
    assert [row["CreateTime"] for row in first["data"]["stat"]] == [
        "2026-03-09T00:00Z", "2026-03-10T00:00Z", "2026-03-11T00:00Z"]
    assert first["data"]["stat"][0]["TotalNumber"] == "0"
    assert first["data"]["stat"][0]["RcptOpenRate"] == "0"
    beyond = track_list_body(parse_track_list(params(PageNumber="9"), TODAY), {})
    assert beyond["data"]["stat"] == [] and beyond["Total"] == 7


def test_cursor_round_trip_and_refusal():
    event_id = "evt_0190f3a2-1b2c-7d3e-8f40-123456789abc"
    assert queries.decode_cursor(queries.encode_cursor(event_id)) == event_id
    for bad in ("", "nonsense", queries.encode_cursor("evt_x"), "!!!!"):
        with pytest.raises(InvalidParameter) as caught:
            queries.decode_cursor(bad)
        assert caught.value.parameter == "cursor"


def test_event_parameters():
    f = queries.parse_events({"since": "2026-03-01", "until": "2026-03-01", "type": "click",
                              "include_machine": "true", "limit": "5"})
    assert f.until - f.since == 86400  # an until day is included whole
    assert (f.type, f.include_machine, f.limit) == ("click", True, 5)
    assert queries.parse_events({"since": "2026-03-01T12:00:00+01:00"}).since == 1772362800
    for bad in ({"type": "bounce"}, {"since": "yesterday"}, {"limit": "0"},
                {"include_machine": "maybe"}, {"since": "2026-03-02", "until": "2026-03-01"}):
        with pytest.raises(InvalidParameter):
            queries.parse_events(bad)


def test_event_id_floor_sorts_before_ids_of_that_millisecond():
    from relay.ids import uuid7

    at = 1773619200.123
    floor = reports.id_floor(at)
    assert floor <= "evt_" + uuid7(int(at * 1000)) < reports.id_floor(at + 0.001) + "~"
    assert "evt_" + uuid7(int(at * 1000) - 1) < floor


def test_stats_parameters_default_to_the_last_30_days():
    q = queries.parse_stats({}, TODAY)
    assert (q.since, q.until, q.group_by) == (date(2026, 2, 14), TODAY, "day")
    for bad, parameter in (({"group_by": "colour"}, "group_by"),
                           ({"since": "2026-03-16"}, "since"),
                           ({"since": "2025-01-01"}, "since"), ({"limit": "5000"}, "limit")):
        with pytest.raises(InvalidParameter) as caught:
            queries.parse_stats(bad, TODAY)
        assert caught.value.parameter == parameter


# ---- the rollup, on a real store of the run's engine ----

SENT_AT = 1773576000.0  # 2026-03-15 12:00 UTC


@pytest.fixture
def conn(store_conn) -> sqlite3.Connection:
    return store_conn


def add_message(conn: sqlite3.Connection, email_id: str, sender: str, recipients: list[str],
                *, tag_name: str | None = None, tags: tuple[str, ...] = (),
                campaign: str | None = None, at: float = SENT_AT, failed: tuple[str, ...] = ()
                ) -> None:
    with conn:
        conn.execute("INSERT INTO messages (email_id, message_id, sender, sender_domain, subject,"
                     " tag_name, tags, campaign, topic, track_opens, track_clicks, decision, size,"
                     " created_at) VALUES (?, ?, ?, ?, 'Hi', ?, ?, ?, NULL, 1, 1, 'on', 10, ?)",
                     (email_id, f"<{email_id}@x>", sender, sender.rpartition("@")[2],
                      tag_name, json.dumps(list(tags)), campaign, at))
        conn.executemany("INSERT INTO recipients VALUES (?, ?, ?, '', ?)",
                         [(email_id, r, "failed" if r in failed else "sent", at)
                          for r in recipients])
        rollup.count_sent(conn, email_id, [r for r in recipients if r not in failed])


def record(conn: sqlite3.Connection, hits: list[Hit]) -> None:
    recorder = Recorder(None, Classifier(scanner_window_seconds=0),  # type: ignore[arg-type]
                        listeners=[rollup.Rollup()])
    with conn:
        recorder.write(conn, hits)


def snapshot(conn: sqlite3.Connection) -> dict[str, list[tuple]]:
    return {table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall())
            for table in ("stats_daily", "stats_daily_tags", "stats_daily_links")}


def hit(kind: str, email_id: str, recipient: str, at: float, *, url: str | None = None,
        agent: str = BROWSER, method: str = "GET") -> Hit:
    return Hit(kind, at, email_id, recipient, url, "198.51.100.7", agent, method)


@pytest.fixture
def filled(conn: sqlite3.Connection) -> sqlite3.Connection:
    add_message(conn, "email_a", "News@Shop.example", ["x@gmail.com", "y@hotmail.com",
                "z@example.org"], tag_name="spring", tags=("spring", "sale"), campaign="c1",
                failed=("z@example.org",))
    add_message(conn, "email_b", "ops@shop.example", ["x@googlemail.com"],
                at=SENT_AT - 86400)
    t = SENT_AT + 3600
    record(conn, [
        hit(OPEN, "email_a", "x@gmail.com", t),
        hit(OPEN, "email_a", "x@gmail.com", t + 60),
        hit(OPEN, "email_a", "x@gmail.com", t + 70, agent="Mozilla/5.0 GoogleImageProxy"),
        hit(CLICK, "email_a", "y@hotmail.com", t + 80, url="https://shop.example/a"),
        hit(CLICK, "email_a", "y@hotmail.com", t + 200, url="https://shop.example/a"),
        hit(CLICK, "email_a", "x@gmail.com", t + 300, url="https://shop.example/b",
            agent="curl/8.5.0"),
        hit(OPEN, "email_a", "x@gmail.com", t + 400, method="HEAD"),
        hit(OPEN, "email_b", "x@googlemail.com", t + 500),
        hit(OPEN, "email_unknown", "q@gmail.com", t + 600),
    ])
    return conn


def test_rollup_counts_counted_events_under_the_send_day(filled):
    rows = {r[:4]: r[6:] for r in filled.execute("SELECT * FROM stats_daily")}
    # sent, opens, unique opens, clicks, unique clicks; z@ failed, curl and HEAD not counted,
    # the proxy open counts, the first click implies an open for y@
    assert rows[("2026-03-15", "news@shop.example", "spring", "gmail.com")] == (1, 3, 1, 0, 0)
    assert rows[("2026-03-15", "news@shop.example", "spring", "outlook.com")] == (1, 1, 1, 2, 1)
    assert rows[("2026-03-14", "ops@shop.example", "", "gmail.com")] == (1, 1, 1, 0, 0)
    assert len(rows) == 3  # nothing for the unknown message
    tags = {r[:2]: r[2:] for r in filled.execute("SELECT * FROM stats_daily_tags")}
    assert tags == {("2026-03-15", "spring"): (2, 4, 2, 2, 1),
                    ("2026-03-15", "sale"): (2, 4, 2, 2, 1)}
    links = filled.execute("SELECT * FROM stats_daily_links").fetchall()
    assert links == [("2026-03-15", "https://shop.example/a", 2, 1)]


def test_rollup_matches_a_rebuild_from_the_raw_tables(filled):
    kept = snapshot(filled)
    rollup.rebuild(filled)
    assert snapshot(filled) == kept


def test_queries_over_the_rollup(filled):
    q = parse_track_list({"StartTime": "2026-03-14", "EndTime": "2026-03-15",
                          "AccountName": "news@shop.example", "Esp": "live.com"}, TODAY)
    sql = queries.track_list_query(q)
    by_day = queries.counts_by_day(filled.execute(sql.sql, sql.params).fetchall())
    assert by_day == {"2026-03-15": Counts(1, 1, 1, 2, 1)}
    stats = queries.parse_stats({"group_by": "tag"}, TODAY)
    sql = queries.stats_query(stats)
    body = queries.stats_body(stats, filled.execute(sql.sql, sql.params).fetchall())
    assert [row["key"] for row in body["rows"]] == ["sale", "spring"]
    assert body["rows"][0]["click_to_open_rate"] == 0.5
    events = queries.parse_events({"email_id": "email_a", "limit": "2"})
    sql = queries.events_query(events)
    page = queries.events_body(events, filled.execute(sql.sql, sql.params).fetchall())
    assert len(page["events"]) == 2 and page["next_cursor"]
    assert all(e["counted"] for e in page["events"])


def test_days_before_year_1000_keep_four_digits():
    # found by schemathesis: strftime writes year 226 as "226", which is no ISO date
    q = queries.parse_stats({"since": "0226-04-15", "until": "0226-05-14"}, TODAY)
    assert q.window() == {"since": "0226-04-15", "until": "0226-05-14"}
    with pytest.raises(InvalidParameter):
        queries.parse_stats({"until": "0001-01-05"}, TODAY)
