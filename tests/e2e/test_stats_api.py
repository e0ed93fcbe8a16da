"""The statistics and events API end to end: mail sent through the relay's SMTP port, opens and
clicks made on its tracker by people, a mailbox proxy and machines, then read back through
GetTrackList and the native routes; the OpenAPI document checked with schemathesis against
the running service."""

from __future__ import annotations

import http.client
import json
import re
import smtplib
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from relay.admin import apikeys
from relay.stats import breakdown, rollup
from relay.store import engine as store
from relay.tracking.tokens import sign_click, sign_open
from tests.harness import Relay

BROWSER = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like "
           "Gecko) Version/17.4 Safari/605.1.15")
GMAIL_PROXY = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
               "(via ggpht.com GoogleImageProxy)")
SALE = "https://shop.example/sale"
TRACE = "eyJUYWdOYW1lIjoic3ByaW5nIiwiT3BlblRyYWNlIjoiMSIsIkxpbmtUcmFjZSI6IjEifQ=="  # spring


def message(sender: str, headers: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: list@example.org\r\nSubject: News\r\n{headers}"
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            f'<html><body><a href="{SALE}">Sale</a></body></html>\r\n').encode()


def send(relay: Relay, sender: str, recipients: list[str], headers: str = "") -> str:
    """Sends through the relay; returns the relay's email id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(message(sender, headers))
    assert code == 250, reply
    return re.search(r"email_[0-9a-f-]{36}", reply.decode()).group()


def hit(relay: Relay, path: str, agent: str, method: str = "GET") -> int:
    """One request on the tracker, redirects not followed."""
    conn = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(relay.http_url).port,
                                      timeout=10)
    conn.request(method, path, headers={"User-Agent": agent})
    status = conn.getresponse().status
    conn.close()
    return status


@dataclass
class World:
    relay: Relay
    key: str
    news: str  # email id: news@ to gmail, hotmail and example.org, tag spring, campaign c1
    ops: str  # email id: ops@ to me.com, untagged

    def get(self, path: str, key: str | None = "") -> tuple[int, Any]:
        request = urllib.request.Request(f"{self.relay.http_url}/api/v1{path}")
        if key is not None:
            request.add_header("Authorization", f"Bearer {key or self.key}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def ok(self, path: str, **params: str) -> Any:
        status, body = self.get(f"{path}?{urllib.parse.urlencode(params)}" if params else path)
        assert status == 200, body
        return body


TODAY = datetime.now(UTC).date().isoformat()


@pytest.fixture
def world(make_relay, upstream) -> World:
    relay = make_relay({"tracking": {"scanner_window_seconds": 0, "tags": ["spring"]}},
                       upstream=upstream, http=True)
    key = apikeys.create(store.connect_url(relay.config.store), "tests")
    news = send(relay, "news@shop.example", ["x@gmail.com", "y@hotmail.com", "z@example.org"],
                f"X-AliDM-Trace: {TRACE}\r\nX-Anypost-Tags: sale\r\n"
                "X-Anypost-Campaign: c1\r\nX-Anypost-Topic: news.weekly\r\n")
    ops = send(relay, "ops@shop.example", ["w@me.com"])
    keyring = relay.services.keyring
    x_open = "/o/" + sign_open(keyring, news, "x@gmail.com")
    assert hit(relay, x_open, BROWSER) == 200
    assert hit(relay, x_open, BROWSER) == 200
    assert hit(relay, x_open, GMAIL_PROXY) == 200  # a mailbox proxy: counted
    assert hit(relay, x_open, BROWSER, "HEAD") == 200  # never counted
    assert hit(relay, "/c/" + sign_click(keyring, news, "y@hotmail.com", SALE), BROWSER) == 302
    assert hit(relay, "/o/" + sign_open(keyring, ops, "w@me.com"), "curl/8.5.0") == 200  # a bot
    return World(relay, key, news, ops)


def track_list(world: World, **params: str) -> tuple[int, Any]:
    query = urllib.parse.urlencode({"StartTime": TODAY, "EndTime": TODAY, **params})
    return world.get(f"/GetTrackList?{query}")


def test_get_track_list_counts_people_and_proxies_only(world):
    status, body = track_list(world)
    assert status == 200, body
    assert re.fullmatch(r"[0-9A-F-]{36}", body["RequestId"])
    assert (body["PageNo"], body["PageSize"], body["Total"], body["TotalPages"]) == (1, 10, 1, 1)
    # 4 copies sent; opens: x twice by browser, once by proxy, y implied by the click
    assert body["data"]["stat"] == [{
        "RcptClickRate": "25", "RcptUniqueOpenCount": "2", "RcptClickCount": "1",
        "RcptUniqueClickCount": "1", "CreateTime": f"{TODAY}T00:00Z",
        "RcptUniqueOpenRate": "50", "RcptUniqueClickRate": "25", "TotalNumber": "4",
        "RcptOpenRate": "100", "RcptOpenCount": "4",
    }]


def test_get_track_list_filters(world):
    def stat(**params: str) -> dict[str, str]:
        status, body = track_list(world, **params)
        assert status == 200, body
        return body["data"]["stat"][0]

    gmail = stat(AccountName="News@shop.example", TagName="spring", Esp="googlemail.com")
    assert (gmail["TotalNumber"], gmail["RcptOpenCount"], gmail["RcptUniqueOpenCount"]) == (
        "1", "3", "1")
    assert stat(AccountName="news@shop.example", Esp="outlook.com")["RcptClickCount"] == "1"
    assert stat(AccountName="news@shop.example", Esp="Others")["TotalNumber"] == "1"
    ops = stat(AccountName="ops@shop.example")
    assert (ops["TotalNumber"], ops["RcptOpenCount"], ops["RcptOpenRate"]) == ("1", "0", "0")
    assert stat(AccountName="ops@shop.example", TagName="spring")["TotalNumber"] == "0"
    assert stat(Esp="icloud.com")["TotalNumber"] == "1"


def test_get_track_list_bad_input_is_a_400_naming_the_parameter(world):
    week_ago = (datetime.now(UTC).date() - timedelta(days=8)).isoformat()
    for params, parameter in (({"StartTime": ""}, "StartTime"),
                              ({"StartTime": "2026/01/01"}, "StartTime"),
                              ({"StartTime": week_ago}, "EndTime"),
                              ({"TagName": "spring"}, "TagName"),
                              ({"Esp": "example.org"}, "Esp"),
                              ({"PageSize": "1000"}, "PageSize"),
                              ({"PageSize": "9" * 5000}, "PageSize"),  # past int()'s limit
                              ({"PageNumber": "1" * 5000}, "PageNumber")):
        status, body = track_list(world, **params)
        assert status == 400, (params, body)
        assert body["error"]["parameter"] == parameter
        assert body["error"]["message"].startswith(parameter)
    status, body = world.get(f"/GetTrackList?StartTime={TODAY}&EndTime={TODAY}", key=None)
    assert status == 401 and body["error"]["status"] == 401


def test_events_filters_and_machine_traffic(world):
    def ids(**params: str) -> list[str]:
        return [e["id"] for e in world.ok("/events", **params)["events"]]

    people = world.ok("/events")["events"]
    # (ids made in the same millisecond are in no particular order: compare as a set)
    assert sorted((e["type"], e["recipient"], e["classification"], e["implied"], e["bot_source"],
                   e["url"]) for e in people) == [
        ("click", "y@hotmail.com", "person", False, None, SALE),
        ("open", "x@gmail.com", "person", False, None, None),
        ("open", "x@gmail.com", "person", False, None, None),
        ("open", "x@gmail.com", "proxy", False, "google", None),
        ("open", "y@hotmail.com", "person", True, None, None)]
    everything = world.ok("/events", include_machine="true")["events"]
    assert len(everything) == 7
    assert {e["classification"] for e in everything} - {"person", "proxy"} == {"scanner",
                                                                               "automation"}
    assert len(ids(type="click")) == 1
    assert len(ids(recipient="x@gmail.com")) == 3
    assert ids(email_id=world.ops) == []
    assert len(ids(email_id=world.ops, include_machine="1")) == 1
    assert len(ids(tag="spring")) == len(ids(tag="sale")) == len(ids(campaign="c1")) == 5
    assert len(ids(topic="news.weekly")) == 5
    assert ids(campaign="c2") == [] == ids(tag="other")
    assert len(ids(since=TODAY, until=TODAY)) == 5
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    assert ids(since=tomorrow) == []
    status, body = world.get("/events?type=bounce")
    assert status == 400 and body["error"]["parameter"] == "type"


def test_events_cursor_pages_through_everything_once(world):
    everything = [e["id"] for e in world.ok("/events", include_machine="true")["events"]]
    assert everything == sorted(everything)  # time-ordered ids, oldest first
    seen: list[str] = []
    params = {"include_machine": "true", "limit": "3"}
    while True:
        page = world.ok("/events", **params)
        seen += [e["id"] for e in page["events"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == everything
    status, body = world.get("/events?cursor=bm9wZQ")
    assert status == 400 and body["error"]["parameter"] == "cursor"


def test_one_message_with_its_recipients_events_and_decision(world):
    body = world.ok(f"/messages/{world.news}")
    assert (body["sender"], body["tag_name"], body["tags"], body["campaign"]) == (
        "news@shop.example", "spring", ["sale"], "c1")
    assert set(body["tracking"]) == {"opens", "clicks", "decision", "links"}
    assert body["tracking"]["decision"]
    assert body["tracking"]["links"] == {"total": 1, "tracked": 1, "untracked": [], "omitted": 0}
    assert [(r["recipient"], r["status"]) for r in body["recipients"]] == [
        ("x@gmail.com", "sent"), ("y@hotmail.com", "sent"), ("z@example.org", "sent")]
    assert len(body["events"]) == 6  # machine traffic included: the HEAD
    status, body = world.get("/messages/email_nope")
    assert status == 404 and body["error"]["status"] == 404


def test_native_statistics_by_group_and_link(world):
    by_day = world.ok("/stats")
    assert by_day["group_by"] == "day" and by_day["until"] == TODAY
    assert by_day["rows"] == [{
        "key": TODAY, "sent": 4, "opens": 4, "unique_opens": 2, "clicks": 1, "unique_clicks": 1,
        "open_rate": 1.0, "unique_open_rate": 0.5, "click_rate": 0.25, "unique_click_rate": 0.25,
        "click_to_open_rate": 0.5}]
    tags = {r["key"]: (r["sent"], r["opens"]) for r in world.ok("/stats", group_by="tag")["rows"]}
    assert tags == {"spring": (3, 4), "sale": (3, 4)}
    campaigns = {r["key"]: r["sent"] for r in world.ok("/stats", group_by="campaign")["rows"]}
    assert campaigns == {"c1": 3, None: 1}
    domains = world.ok("/stats", group_by="sender_domain")["rows"]
    assert [(r["key"], r["sent"]) for r in domains] == [("shop.example", 4)]
    assert world.ok("/stats/links")["links"] == [{"url": SALE, "clicks": 1, "unique_clicks": 1}]
    for flt in ({"tag": "spring"}, {"campaign": "c1"}, {"campaign": "c1",
                                                        "sender_domain": "Shop.Example"}):
        assert world.ok("/stats/links", **flt)["links"] == [
            {"url": SALE, "clicks": 1, "unique_clicks": 1}], flt
    for flt in ({"tag": "other"}, {"campaign": "c2"}, {"sender_domain": "other.example"}):
        assert world.ok("/stats/links", **flt)["links"] == [], flt
    status, body = world.get("/stats/links?tag=spring&campaign=c1")
    assert status == 400 and body["error"]["parameter"] == "tag"
    status, body = world.get("/stats?group_by=colour")
    assert status == 400 and body["error"]["parameter"] == "group_by"


def test_counters_kept_on_write_equal_a_rebuild(world):
    conn = world.relay.db()
    tables = ("stats_daily", "stats_daily_tags", "stats_daily_links", "stats_daily_links_by",
              "stats_daily_tag_links")

    def snapshot() -> dict[str, list[tuple]]:
        return {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}"))) for t in tables}

    kept = snapshot()
    assert all(kept.values())
    if isinstance(conn, sqlite3.Connection):
        conn.isolation_level = None
    rollup.rebuild(conn)
    assert snapshot() == kept


def test_agent_counters_kept_on_write_equal_a_rebuild(world):
    conn = world.relay.db()

    def snapshot() -> list[list[tuple]]:
        return [sorted(map(tuple, conn.execute(f"SELECT * FROM {table}")))
                for table in ("stats_daily_agents", "stats_daily_os")]

    kept = snapshot()
    assert all(kept)  # the world's counted opens and click
    if isinstance(conn, sqlite3.Connection):
        conn.isolation_level = None
    breakdown.rebuild(conn)
    assert snapshot() == kept


OURS = ("GetTrackList", "listEvents", "getMessage", "getStats", "getLinkStats")


def test_openapi_document_matches_the_service(world):
    """schemathesis: generated requests for every statistics and events operation, each
    answer checked against the document (status code, content type, response schema) and
    never a 5xx. Not checked: that every schema-valid request is accepted, since some rules
    span parameters or depend on today (StartTime within 30 days, TagName needs AccountName),
    which OpenAPI cannot state: those answer a documented 400."""
    auth = {"Authorization": f"Bearer {world.key}"}
    schema = schemathesis.openapi.from_url(f"{world.relay.http_url}/api/v1/openapi.json",
                                           headers=auth)
    schema = schema.include(operation_id=list(OURS))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted(op.definition.raw["operationId"] for op in operations) == sorted(OURS)
    base_url = f"{world.relay.http_url}/api/v1"
    for operation in operations:
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            case.call_and_validate(base_url=base_url, headers=auth,
                                   excluded_checks=[positive_data_acceptance])

        check()


def test_the_link_counters_migration_counts_the_clicks_recorded_before_it(world):
    """``0064_link_counters`` on a store that had clicks: its backfill (in the dialect both
    engines share) fills the tables as the listener did."""
    tables = ("stats_daily_links_by", "stats_daily_tag_links")
    with world.relay.db() as conn:
        kept = {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}"))) for t in tables}
        assert all(kept.values())
        for table in tables:
            conn.execute(f"DROP TABLE {table}")
        conn.execute("DELETE FROM migrations WHERE name = '0064_link_counters'")
    conn = store.connect_url(world.relay.config.store)  # migrates
    assert {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}"))) for t in tables} == kept
    conn.close()
