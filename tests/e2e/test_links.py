"""Each link of a message, tracked or left alone with its reason, end to end: mail through the
relay's SMTP port, then the message's record, its API view and its log line; a database from
before the links column is migrated."""

from __future__ import annotations

import json
import logging
import re
import smtplib
import urllib.request
from pathlib import Path

import pytest

from relay.admin import apikeys
from relay.rewrite.splice import LinkResult, Links
from relay.smtp.pipeline import links_json
from relay.store import engine as store
from tests.harness import Relay

LINKS = [  # (href as written, reason code or "" when tracked)
    ("https://shop.example/größe-42", ""),
    ("https://shop.example/搜索?q=鞋&amp;utm_campaign=frühling", ""),
    ("https://shop.example/?a=1|2&amp;x=[1]", ""),
    ("https://例え.jp/a b", ""),
    ("https://unsubscribe.shop.example/u", "excluded_host"),
    ("mailto:help@shop.example", "not_http"),
    ("https://shop.example:99999/", "malformed"),
    ("{{unsubscribe_url}}", "placeholder"),
]
DETAILS = ["excluded host unsubscribe.shop.example", "mailto: link", "bad port '99999'",
           "template placeholder", "opt-out attribute data-smtpd-no-track"]


def message() -> bytes:
    anchors = "".join(f'<a href="{href}">x</a>\r\n' for href, _ in LINKS)
    anchors += '<a href="https://shop.example/private" data-smtpd-no-track>x</a>\r\n'
    return ("From: News <news@shop.example>\r\nTo: a@example.org\r\nSubject: Links\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            f"<html><body>\r\n{anchors}</body></html>\r\n").encode()


def send(relay: Relay, body: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo()
        client.mail("news@shop.example", ["SMTPUTF8", "BODY=8BITMIME"])
        client.rcpt("a@example.org")
        code, reply = client.data(body)
    assert code == 250, reply
    return re.search(r"email_[0-9a-f-]{36}", reply.decode()).group()


@pytest.fixture
def relay(make_relay, upstream) -> Relay:
    return make_relay({"tracking": {"opens": True, "clicks": True},
                       "domains": [{"name": "shop.example",
                                    "exclude_hosts": ["unsubscribe.shop.example"]}]},
                      upstream=upstream, http=True)


def test_record_api_and_log_line_say_which_links_were_tracked_and_why_not(relay, caplog):
    caplog.set_level(logging.INFO, logger="relay.mail")
    email_id = send(relay, message())
    expected = {
        "total": 9, "tracked": 4, "omitted": 0,
        "untracked": [{"href": href, "reason": reason, "detail": detail}
                      for (href, reason), detail in zip(
                          [*[link for link in LINKS if link[1]],
                           ("https://shop.example/private", "opt_out")], DETAILS, strict=True)],
    }
    with relay.db() as db:
        row = db.execute("SELECT decision, links FROM messages WHERE email_id = ?",
                         (email_id,)).fetchone()
    assert "rewrote 4 of 9 links, pixel inserted" in row["decision"]
    assert json.loads(row["links"]) == expected

    key = apikeys.create(store.connect_url(relay.config.store), "tests")
    request = urllib.request.Request(f"{relay.http_url}/api/v1/messages/{email_id}",
                                     headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    assert body["tracking"]["links"] == expected

    [line] = [r.getMessage() for r in caplog.records if email_id in r.getMessage()]
    assert ("links=\"4/9 tracked, untracked: https://unsubscribe.shop.example/u (excluded host "
            "unsubscribe.shop.example); mailto:help@shop.example (mailto: link); "
            "https://shop.example:99999/ (bad port '99999'); {{unsubscribe_url}} (template "
            "placeholder); https://shop.example/private (opt-out attribute data-smtpd-no-track)\""
            ) in line


def test_an_untracked_links_userinfo_query_and_fragment_are_neither_recorded_nor_logged(
        relay, caplog):
    caplog.set_level(logging.INFO, logger="relay.mail")
    secret = "https://admin:hunter2@intranet.example:99999/reset?token=SECRET123#otp=SECRET456"
    body = message().replace(b"<html><body>\r\n",
                             f'<html><body>\r\n<a href="{secret}">reset</a>\r\n'.encode())
    email_id = send(relay, body)
    with relay.db() as db:
        row = db.execute("SELECT links FROM messages WHERE email_id = ?", (email_id,)).fetchone()
    assert json.loads(row["links"])["untracked"][0] == {
        "href": "https://intranet.example:99999/reset", "reason": "malformed",
        "detail": "bad port '99999'"}
    [line] = [r.getMessage() for r in caplog.records if email_id in r.getMessage()]
    assert "untracked: https://intranet.example:99999/reset (bad port '99999'); " in line
    for text in (row["links"], line):
        assert not {"admin", "hunter2", "token", "SECRET", "otp"} & set(re.findall(r"\w+", text))


def test_links_are_not_recorded_when_clicks_are_off(make_relay, upstream):
    relay = make_relay({"tracking": {"opens": True, "clicks": False}}, upstream=upstream)
    email_id = send(relay, message())
    with relay.db() as db:
        row = db.execute("SELECT decision, links FROM messages WHERE email_id = ?",
                         (email_id,)).fetchone()
    assert row["links"] is None
    assert row["decision"].endswith(": pixel inserted")


def test_a_long_list_of_untracked_links_is_cut() -> None:
    links = Links([LinkResult("https://shop.example/", "https://shop.example/"),
                   *[LinkResult(f"mailto:{n}@x" + "x" * 600, None, "mailto: link", "not_http")
                     for n in range(150)]])
    record = json.loads(links_json(links) or "")
    assert (record["total"], record["tracked"], record["omitted"]) == (151, 1, 50)
    assert len(record["untracked"]) == 100
    assert len(record["untracked"][0]["href"]) == 500


def test_a_database_from_before_gets_the_links_column(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {name: sql for name, sql in store.MIGRATIONS.items()
              if name != "0040_message_links"}
    monkeypatch.setattr(store, "MIGRATIONS", before)
    conn = store.connect(tmp_path / "old.db")
    store.migrate(conn)
    conn.execute("INSERT INTO messages (email_id, sender, sender_domain, track_opens,"
                 " track_clicks, decision, size, created_at) VALUES"
                 " ('email_old', 'a@shop.example', 'shop.example', 1, 1, 'rewrote 1 link', 9, 0)")
    monkeypatch.undo()
    assert store.migrate(conn)[0] == "0040_message_links"
    assert conn.execute("SELECT links FROM messages").fetchall() == [(None,)]
