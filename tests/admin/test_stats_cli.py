"""``relay stats`` and ``relay events`` over a store filled as in test_stats.py."""

from __future__ import annotations

import json

import pytest

from relay import cli
from relay.stats.maths import day_of
from relay.tracking.bots import CLICK, OPEN
from tests.stats.test_stats import SENT_AT, add_message, hit, record

DAY = day_of(SENT_AT)


@pytest.fixture
def config(tmp_path, store_settings, store_conn):
    conn = store_conn
    add_message(conn, "email_a", "news@shop.example", ["x@gmail.com", "y@hotmail.com"],
                tag_name="spring", campaign="c1")
    record(conn, [hit(OPEN, "email_a", "x@gmail.com", SENT_AT + 60),
                  hit(CLICK, "email_a", "y@hotmail.com", SENT_AT + 90, url="https://a.example/"),
                  hit(OPEN, "email_a", "x@gmail.com", SENT_AT + 95, agent="curl/8.5.0")])
    path = tmp_path / "relay.toml"
    path.write_text(f'[store]\nurl = "{store_settings.url}"\n')
    return str(path)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_table_and_json(config, capsys):
    code, out, _ = run(capsys, "stats", "--since", DAY, "--until", DAY, "--config", config)
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["day", "sent", "opens"]
    assert row.split() == [DAY, "2", "2", "2", "1", "1", "100.0", "50.0", "50.0"]
    code, out, _ = run(capsys, "stats", "--since", DAY, "--until", DAY, "--by", "campaign",
                       "--json", "--config", config)
    body = json.loads(out)
    assert [(r["key"], r["sent"], r["unique_clicks"]) for r in body["rows"]] == [("c1", 2, 1)]
    code, out, _ = run(capsys, "stats", "--since", DAY, "--until", DAY, "--by", "url",
                       "--config", config)
    assert "https://a.example/" in out.splitlines()[1]


def test_stats_bad_window_is_refused(config, capsys):
    code, _, err = run(capsys, "stats", "--since", "2026-13-01", "--config", config)
    assert code == 1 and "since" in err


def test_events_table_json_and_machine_traffic(config, capsys):
    window = ("--since", DAY, "--until", DAY, "--config", config)
    code, out, _ = run(capsys, "events", *window)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["time", "type", "classification"]
    assert len(lines) == 5  # x's open, y's implied open and click; not curl, but it says so:
    assert lines[4] == ("1 machine event hidden (prefetches, link scanners, automation such as "
                        "curl or scripts); add --all to list them")
    code, out, _ = run(capsys, "events", "--json", *window)
    assert json.loads(out)["machine_events_hidden"] == 1
    code, out, _ = run(capsys, "events", "--all", "--json", *window)
    events = json.loads(out)["events"]
    assert len(events) == 4 and {e["classification"] for e in events} == {"person",
                                                                           "automation"}
    code, out, _ = run(capsys, "events", "--all", "--limit", "3", "--json", *window)
    page = json.loads(out)
    code, out, _ = run(capsys, "events", "--all", "--json", "--cursor", page["next_cursor"],
                       *window)
    assert [e["id"] for e in page["events"] + json.loads(out)["events"]] == [
        e["id"] for e in events]
    code, out, _ = run(capsys, "events", "--type", "click", "--recipient", "y@hotmail.com",
                       *window)
    assert len(out.splitlines()) == 2 and "https://a.example/" in out


def test_events_default_window_is_the_last_day(config, capsys):
    code, out, _ = run(capsys, "events", "--config", config)
    assert code == 0 and out.startswith("no events since ")  # the events are older
