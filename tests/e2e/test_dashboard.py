"""The dashboard over real HTTP against the running relay: a user added with the real
``relay users add`` (password on standard input), mail sent through the relay's SMTP port,
opens and clicks made on its tracker, and the pages read with a cookie-keeping HTTP client
(requests). Sign-in, sessions, CSRF, failures, ``http.admin_listen``, the numbers against
the API's, escaping of what senders and links control, the click map, the HTML kept once."""

from __future__ import annotations

import html
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from markupsafe import escape

from relay.admin import apikeys
from relay.app import http_port
from relay.store import engine as store
from relay.store import retention
from relay.tracking.tokens import sign_click, sign_open
from tests.clock import ManualClock
from tests.e2e.test_stats_api import BROWSER, TODAY, hit
from tests.harness import Relay, wait_until

PASSWORD = "correct horse battery staple"
SALE = "https://shop.example/sale"
PAY = "https://pay.example/now"
# A link whose URL carries markup: written in single quotes, so the double quote is its own
EVIL_URL = 'https://shop.example/x?a="><img src=x onerror=alert(1)>'
EVIL_SUBJECT = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
SPRING = "eyJUYWdOYW1lIjoic3ByaW5nIiwiT3BlblRyYWNlIjoiMSIsIkxpbmtUcmFjZSI6IjEifQ=="


def body(extra: str = "") -> str:
    return (f'<html><body><p>Hello</p><a href="{SALE}">Sale</a> <a href="{PAY}">Pay</a>'
            f"{extra}</body></html>")


def send(relay: Relay, recipients: list[str], subject: str = "News", headers: str = "",
         html_body: str | None = None) -> str:
    msg = (f"From: <news@shop.example>\r\nTo: list@example.org\r\nSubject: {subject}\r\n"
           f"Message-ID: <{time.time_ns()}@shop.example>\r\n{headers}"
           "X-Anypost-Track-Opens: true\r\nX-Anypost-Track-Clicks: true\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           f"{html_body or body()}\r\n").encode()
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo()
        assert client.mail("news@shop.example")[0] == 250
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(msg)
    assert code == 250, reply
    return re.search(r"email_[0-9a-f-]{36}", reply.decode()).group()


def add_user(relay: Relay, tmp_path: Path, name: str = "alice",
             password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "cli.toml"
    config.write_text(f'[store]\nurl = "{relay.config.store.url}"\n')
    return subprocess.run([sys.executable, "-m", "relay", "users", "add", name, "--config",
                           str(config)], input=password + "\n", capture_output=True,
                          text=True, timeout=60)


class Client:
    """A browser-like HTTP client of the dashboard: keeps cookies, follows no redirect."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.base + path, allow_redirects=False, timeout=10, **kw)

    def post(self, path: str, data: dict[str, str], **kw: Any) -> requests.Response:
        return self.http.post(self.base + path, data=data, allow_redirects=False, timeout=10,
                              **kw)

    def csrf(self, path: str) -> str:
        page = self.get(path)
        assert page.status_code == 200, page.text
        return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)

    def sign_in(self, name: str = "alice", password: str = PASSWORD) -> requests.Response:
        return self.post("/ui/login", {"name": name, "password": password,
                                       "csrf": self.csrf("/ui/login")})


class ProxiedClient(Client):
    """A browser behind a proxy that ends TLS: it sends its Secure cookies (which requests
    keeps for https only) on the proxy's plain-http hop."""

    def _cookies(self) -> dict[str, str]:
        jar = "; ".join(f"{c.name}={c.value}" for c in self.http.cookies)
        return {"Cookie": jar} if jar else {}

    def get(self, path: str, **kw: Any) -> requests.Response:
        return super().get(path, headers=self._cookies(), **kw)

    def post(self, path: str, data: dict[str, str], **kw: Any) -> requests.Response:
        return super().post(path, data, headers=self._cookies(), **kw)


@pytest.fixture
def relay(make_relay, upstream, tmp_path) -> Relay:
    relay = make_relay({"tracking": {"scanner_window_seconds": 0, "tags": ["spring"]},
                        "smtp": {"auth_failure_delay": 0.3, "auth_max_failures": 3}},
                       upstream=upstream, http=True)
    done = add_user(relay, tmp_path)
    assert done.returncode == 0, done.stderr
    return relay


@pytest.fixture
def client(relay) -> Client:
    client = Client(relay.http_url)
    assert client.sign_in().status_code == 303
    return client


PAGES = ["/ui/", "/ui/overview", "/ui/links", "/ui/messages", "/ui/messages/email_x",
         "/ui/messages/email_x/clickmap", "/ui/messages/email_x/frame"]


def test_no_page_without_a_session(relay):
    anonymous = Client(relay.http_url)
    for path in PAGES:
        answer = anonymous.get(path)
        assert answer.status_code == 303 and answer.headers["Location"] == "/ui/login", path
    assert anonymous.post("/ui/logout", {"csrf": "x"}).status_code == 403
    assert anonymous.get("/ui/login").status_code == 200  # the form itself is public


def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(relay):
    client = Client(relay.http_url)
    answer = client.sign_in()
    assert answer.status_code == 303 and answer.headers["Location"] == "/ui/overview"
    cookie = next(c for c in answer.raw.headers.getlist("Set-Cookie")
                  if c.startswith("relay_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
    assert "Secure" not in cookie  # plain http here; under https it is Secure
    assert client.get("/ui/overview").status_code == 200
    stolen = dict(client.http.cookies)
    answer = client.post("/ui/logout", {"csrf": client.csrf("/ui/overview")})
    assert answer.status_code == 303
    replay = requests.get(relay.http_url + "/ui/overview", cookies=stolen,
                          allow_redirects=False, timeout=10)
    assert replay.status_code == 303  # the session ended in the store, not just the browser


def test_the_store_holds_no_session_token_nor_password(relay, client):
    token = client.http.cookies["relay_session"]
    dump = relay.dump()
    assert token not in dump and PASSWORD not in dump
    assert "scrypt$" in dump


def test_wrong_passwords_are_answered_ever_later_then_refused(relay):
    client = Client(relay.http_url)
    times = []
    for _ in range(2):
        started = time.monotonic()
        answer = client.sign_in(password="wrong")
        times.append(time.monotonic() - started)
        assert answer.status_code == 401 and "Wrong name or password" in answer.text
    assert times[1] >= 0.3  # the second failure waits auth_failure_delay
    assert client.sign_in(password="wrong").status_code == 429  # the 3rd: refused from now on
    answer = client.sign_in()  # even with the right password
    assert answer.status_code == 429 and "try again in" in answer.text
    assert "relay_session" not in client.http.cookies
    unknown = Client(relay.http_url).sign_in(name="mallory")
    assert unknown.status_code == 429  # the same address


def test_cross_site_posts_are_refused(relay, client):
    token = client.csrf("/ui/overview")
    assert client.post("/ui/logout", {}).status_code == 403
    assert client.post("/ui/logout", {"csrf": "guessed"}).status_code == 403
    evil = {"Origin": "http://evil.example"}
    assert client.post("/ui/logout", {"csrf": token}, headers=evil).status_code == 403
    assert client.get("/ui/overview").status_code == 200  # still signed in
    # the sign-in form too (login CSRF): its token must match the cookie set with the form
    other = Client(relay.http_url)
    forged = other.post("/ui/login", {"name": "alice", "password": PASSWORD, "csrf": "x"})
    assert forged.status_code == 403 and "relay_session" not in other.http.cookies


def test_behind_a_trusted_tls_proxy_sign_in_works_with_a_secure_cookie(make_relay, upstream,
                                                                         tmp_path):
    """A proxy in http.trusted_proxies ending TLS: the browser's posts say ``Origin: https://``
    (its host), the cookie must be Secure, and each client's failures are its own."""
    relay = make_relay({"http": {"trusted_proxies": ["127.0.0.1/32"]},
                        "smtp": {"auth_failure_delay": 0, "auth_max_failures": 2}},
                       upstream=upstream, http=True)
    assert add_user(relay, tmp_path).returncode == 0

    def browser(ip: str) -> Client:
        client = ProxiedClient(relay.http_url)
        client.http.headers.update({"X-Forwarded-Proto": "https", "X-Forwarded-For": ip,
                                    "X-Forwarded-Host": "dash.example",
                                    "Origin": "https://dash.example"})
        return client

    attacker = browser("198.51.100.66")
    for _ in range(2):
        assert attacker.sign_in(password="wrong").status_code in (401, 429)
    assert attacker.sign_in().status_code == 429  # that client is refused for now...
    alice = browser("203.0.113.5")
    answer = alice.sign_in()  # ... not everyone behind the proxy
    assert answer.status_code == 303, answer.text
    cookie = next(c for c in answer.raw.headers.getlist("Set-Cookie")
                  if c.startswith("relay_session="))
    assert "Secure" in cookie
    assert alice.post("/ui/logout", {"csrf": alice.csrf("/ui/overview")}).status_code == 303
    # from a peer not trusted, the headers are ignored: its own scheme and host count
    untrusted = make_relay({}, upstream=upstream, http=True)
    assert add_user(untrusted, tmp_path).returncode == 0
    forged = Client(untrusted.http_url)
    forged.http.headers.update({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
                                "Origin": "https://evil.example"})
    assert forged.sign_in().status_code == 403


def test_a_form_post_is_at_most_64_kib(relay, client):
    """Before a session too: the sign-in form takes no more than the dashboard's forms need."""
    other = Client(relay.http_url)
    big = other.post("/ui/login", {"name": "alice", "password": "x" * 70_000,
                                   "csrf": other.csrf("/ui/login")})
    assert big.status_code == 413 and "Something went wrong" in big.text
    token = client.csrf("/ui/operations")
    big = client.post("/ui/operations/webhooks/replay", {"csrf": token, "batch_id": "x" * 70_000})
    assert big.status_code == 413


def test_sessions_expire(make_relay, upstream, tmp_path):
    relay = make_relay({"dashboard": {"session_hours": 0.0003}}, upstream=upstream, http=True)
    assert add_user(relay, tmp_path).returncode == 0
    client = Client(relay.http_url)
    assert client.sign_in().status_code == 303
    assert client.get("/ui/overview").status_code == 200
    wait_until(lambda: client.get("/ui/overview").status_code == 303, 10, "expiry")


def test_users_add_changes_a_password_and_ends_sessions(relay, client, tmp_path):
    done = add_user(relay, tmp_path, password="another one")
    assert done.returncode == 0 and "password changed" in done.stdout
    assert client.get("/ui/overview").status_code == 303
    assert Client(relay.http_url).sign_in(password="another one").status_code == 303
    bad = add_user(relay, tmp_path, name="<bad>")
    assert bad.returncode == 2 and "user name" in bad.stderr
    empty = add_user(relay, tmp_path, name="bob", password="")
    assert empty.returncode == 1 and "empty password" in empty.stderr


def metrics(page: str) -> dict[str, str]:
    return dict(re.findall(r'data-metric="(\w+)">([^<]*)<', page))


def api_stats(relay: Relay, **params: str) -> dict[str, Any]:
    key = apikeys.create(store.connect_url(relay.config.store), f"k{time.time_ns()}")
    answer = requests.get(f"{relay.http_url}/api/v1/stats", params=params, timeout=10,
                          headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    rows = answer.json()["rows"]
    return {name: sum(row[name] for row in rows) for name in
            ("sent", "opens", "unique_opens", "clicks", "unique_clicks")}


def test_overview_numbers_are_the_apis_and_follow_the_filters(relay, client):
    tagged = send(relay, ["a@example.org", "b@example.org"], headers=f"X-AliDM-Trace: {SPRING}\r\n"
                  "X-Anypost-Campaign: c1\r\n")
    other = send(relay, ["c@example.org"])
    keyring = relay.services.keyring
    assert hit(relay, "/o/" + sign_open(keyring, tagged, "a@example.org"), BROWSER) == 200
    assert hit(relay, "/c/" + sign_click(keyring, tagged, "a@example.org", SALE), BROWSER) == 302
    assert hit(relay, "/o/" + sign_open(keyring, other, "c@example.org"), BROWSER) == 200
    assert hit(relay, "/o/" + sign_open(keyring, other, "c@example.org"), "curl/8.5.0") == 200
    everything = metrics(client.get(f"/ui/overview?since={TODAY}&until={TODAY}").text)
    assert everything["sent"] == "3" and everything["unique_opens"] == "2"
    assert everything["unique_clicks"] == "1" and everything["click_to_open_rate"] == "50.00%"
    api = api_stats(relay, since=TODAY, until=TODAY)
    assert {k: everything[k] for k in api} == {k: str(v) for k, v in api.items()}
    for flt in ({"tag": "spring"}, {"campaign": "c1"}, {"sender_domain": "shop.example"}):
        page = client.get("/ui/overview", params={"since": TODAY, "until": TODAY, **flt})
        shown, api = metrics(page.text), api_stats(relay, since=TODAY, until=TODAY, **flt)
        assert {k: shown[k] for k in api} == {k: str(v) for k, v in api.items()}, flt
    assert metrics(client.get("/ui/overview", params={"tag": "spring"}).text)["sent"] == "2"
    page = client.get("/ui/overview", params={"tag": "spring", "campaign": "c1"})
    assert page.status_code == 400 and "goes with no other filter" in page.text
    # machine traffic, by reason: the curl open
    machine = re.search(r'<tr data-kind="automation">(.*?)</tr>', page.text + client.get(
        "/ui/overview").text, re.S)
    assert machine and "<td>1</td><td>0</td>" in machine.group(1)


def test_what_senders_and_links_control_shows_as_text(relay, client):
    email_id = send(relay, ["x@example.org"], subject=EVIL_SUBJECT,
                    html_body=body(f"<a href='{EVIL_URL}'>evil</a>"))
    keyring = relay.services.keyring
    assert hit(relay, "/c/" + sign_click(keyring, email_id, "x@example.org", EVIL_URL),
               BROWSER) == 302
    pages = [client.get(path).text for path in (
        "/ui/messages?recipient=x@example.org", f"/ui/messages/{email_id}", "/ui/links",
        f"/ui/messages/{email_id}/clickmap")]
    for page in pages:
        assert "<script>alert" not in page and "<img src=x" not in page
    assert escape(EVIL_SUBJECT) in pages[0] and escape(EVIL_SUBJECT) in pages[1]
    assert escape(EVIL_URL) in pages[2] and escape(EVIL_URL) in pages[3]


def test_message_search_and_page_tell_the_story(relay, client):
    email_id = send(relay, ["find.me@example.org", "other@example.org"], subject="Findable")
    keyring = relay.services.keyring
    assert hit(relay, "/o/" + sign_open(keyring, email_id, "find.me@example.org"),
               "curl/8.5.0") == 200
    found = client.get("/ui/messages", params={"recipient": "FIND.ME@example.org"})
    assert f'href="/ui/messages/{email_id}"' in found.text and "Findable" in found.text
    by_id = client.get("/ui/messages", params={"email_id": email_id})
    assert by_id.status_code == 303 and by_id.headers["Location"] == f"/ui/messages/{email_id}"
    page = client.get(f"/ui/messages/{email_id}").text
    assert "find.me@example.org" in page and "250" in page  # the upstream's answer
    timeline = page[page.index("Timeline"):]
    assert "automation" in timeline and "curl" in timeline  # classified, with the reason


def test_a_typed_email_id_goes_to_its_page_whatever_it_holds(client):
    for typed, location in (("email_x", "/ui/messages/email_x"),
                            ("a\r\nSet-Cookie: x=1", "/ui/messages/a%0D%0ASet-Cookie%3A%20x%3D1"),
                            ("../../api/v1/stats", "/ui/messages/..%2F..%2Fapi%2Fv1%2Fstats")):
        answer = client.get("/ui/messages", params={"email_id": typed})
        assert answer.status_code == 303 and answer.headers["Location"] == location, typed
        for page in (location, location + "/clickmap", location + "/frame"):
            answer = client.get(page)
            assert answer.status_code == 404, page
            assert "Something went wrong" in answer.text, page
    # a NUL: PostgreSQL's text holds none (a 500 there), so it is refused on every store
    for page in ("/ui/messages?email_id=a%00b", "/ui/messages/a%00b", "/ui/overview?tag=a%00",
                 "/ui/clickmap/frame?tag=a%00", "/ui/messages?recipient=a%00"):
        answer = client.get(page)
        assert answer.status_code == 400 and "NUL" in answer.text, page
    answer = client.post("/ui/operations/webhooks/replay",
                         {"csrf": client.csrf("/ui/operations"), "batch_id": "a\x00"})
    assert answer.status_code == 400 and "NUL" in answer.text
    answer = client.post("/ui/operations/domains/a%0D%0Ab/verify",
                         {"csrf": client.csrf("/ui/operations")})
    assert answer.status_code == 404 and "No tracking domain" in answer.text


def test_message_search_by_subject(relay, client):
    """A part of the subject, in any case; % and _ are themselves, not LIKE's wildcards."""
    sale = send(relay, ["a@example.org"], subject="Spring sale: 100% off_today")
    other = send(relay, ["b@example.org"], subject="Spring sale: 1000 off today")
    send(relay, ["c@example.org"], subject="Invoice")

    def found(subject: str) -> list[str]:
        page = client.get("/ui/messages", params={"subject": subject})
        assert page.status_code == 200, page.text
        return re.findall(r'href="/ui/messages/(email_[^"/]+)"', page.text)

    assert found("SPRING SALE") == [other, sale]  # newest first
    assert found("100% off_") == [sale]
    assert found("%") == [sale] and found("_") == [sale]
    assert found("nothing like it") == []
    form = client.get("/ui/messages", params={"subject": "SPRING SALE"}).text
    assert 'value="SPRING SALE"' in form
    too_long = client.get("/ui/messages", params={"subject": "x" * 201})
    assert too_long.status_code == 400 and "subject" in too_long.text


def frame_badges(frame: str) -> dict[str, int]:
    """href -> the clicks drawn on it."""
    return {html.unescape(href): int(n) for href, n in re.findall(
        r"""<a href=["']([^"']*)["']>(?:<span[^>]*data-clicks="(\d+)")""", frame)}


def test_click_map_draws_each_links_clicks_on_it(relay, client):
    email_id = send(relay, ["a@example.org", "b@example.org", "c@example.org"])
    keyring = relay.services.keyring
    # one click per recipient: a second link within a second is a scanner's (tracking/bots.py)
    for recipient, url in (("a@example.org", SALE), ("b@example.org", SALE),
                           ("c@example.org", PAY)):
        assert hit(relay, "/c/" + sign_click(keyring, email_id, recipient, url), BROWSER) == 302
    assert hit(relay, "/c/" + sign_click(keyring, email_id, "a@example.org", PAY),
               "curl/8.5.0") == 302  # a machine: not drawn
    page = client.get(f"/ui/messages/{email_id}/clickmap")
    assert page.status_code == 200 and 'sandbox=""' in page.text
    frame = client.get(f"/ui/messages/{email_id}/frame")
    assert frame.headers["Content-Security-Policy"].startswith("sandbox;")
    assert frame_badges(frame.text) == {SALE: 2, PAY: 1}
    assert "67%" in frame.text and "33%" in frame.text
    assert frame.text.startswith("<html><body><p>Hello</p>")  # the message as written


def test_a_campaigns_or_tags_click_map_counts_its_messages_with_the_same_html(relay, client):
    """The HTML of the group's first message kept, with the clicks of each message of the
    group that had that HTML; not those of its messages with other HTML, nor of the same HTML
    sent outside the group."""
    untracked = send(relay, ["z@example.org"], headers="X-Anypost-Campaign: c1\r\n",
                     html_body="<p>no link</p>")
    with relay.db() as db:  # sent before its HTML was kept (or with keep_html off)
        db.execute("DELETE FROM message_html WHERE email_id = ?", (untracked,))
    spring = f"X-AliDM-Trace: {SPRING}\r\nX-Anypost-Campaign: c1\r\n"
    first = send(relay, ["a@example.org"], headers=spring)
    second = send(relay, ["b@example.org"], headers=spring)
    other_html = send(relay, ["c@example.org"], headers=spring,
                      html_body=body("<p>another version</p>"))
    outside = send(relay, ["d@example.org"])  # the same HTML, in no campaign
    tagged_only = send(relay, ["e@example.org"], headers="X-Anypost-Campaign: c2\r\n"
                       "X-Anypost-Tags: autumn, spring-extra\r\n", html_body=body("<p>2</p>"))
    keyring = relay.services.keyring
    for email_id, recipient, url in ((first, "a@example.org", SALE),
                                     (second, "b@example.org", SALE),
                                     (other_html, "c@example.org", SALE),
                                     (outside, "d@example.org", PAY),
                                     (tagged_only, "e@example.org", PAY)):
        assert hit(relay, "/c/" + sign_click(keyring, email_id, recipient, url), BROWSER) == 302
    assert hit(relay, "/c/" + sign_click(keyring, second, "b@example.org", PAY),
               "curl/8.5.0") == 302  # a machine: not counted
    for query, email_id, sharing, badges in (
            ({"campaign": "c1"}, first, 2, {SALE: 2, PAY: 0}),
            ({"tag": "spring"}, first, 2, {SALE: 2, PAY: 0}),
            ({"campaign": "c2"}, tagged_only, 1, {SALE: 0, PAY: 1}),
            ({"tag": "autumn"}, tagged_only, 1, {SALE: 0, PAY: 1})):
        page = client.get("/ui/clickmap", params=query)
        assert page.status_code == 200, (query, page.text)
        assert f'href="/ui/messages/{email_id}"' in page.text
        counted = re.search(r'<p class="counted">(.*?)</p>', page.text, re.S).group(1)
        assert f"{sharing} message{'s' if sharing > 1 else ''} of this" in counted, counted
        frame_src = html.unescape(re.search(r'<iframe class="clickmap" src="([^"]+)"',
                                            page.text).group(1))
        frame = client.get(frame_src)
        assert frame.headers["Content-Security-Policy"].startswith("sandbox;")
        assert frame_badges(frame.text) == badges, query
    none = client.get("/ui/clickmap", params={"tag": "<b>nope</b>"})
    assert none.status_code == 404 and "&lt;b&gt;nope&lt;/b&gt;" in none.text
    assert client.get("/ui/clickmap/frame", params={"tag": "nope"}).status_code == 404
    assert client.get("/ui/clickmap").status_code == 400
    evil = client.get("/ui/clickmap", params={"campaign": EVIL_SUBJECT})
    assert evil.status_code == 404 and "<script>alert" not in evil.text
    assert "/ui/clickmap" in client.get("/ui/links").text  # the form that asks for it


def test_html_is_kept_once_and_purged_with_its_messages(relay, client):
    first, second = (send(relay, [f"{n}@example.org"]) for n in ("one", "two"))
    with relay.db() as db:
        assert db.execute("SELECT count(*) FROM html_bodies").fetchone()[0] == 1
        assert db.execute("SELECT count(*) FROM message_html").fetchone()[0] == 2
    conn = store.connect_url(relay.config.store)
    retention.erase_recipient(conn, "one@example.org")
    assert client.get(f"/ui/messages/{first}/frame").status_code == 404
    assert client.get(f"/ui/messages/{second}/frame").status_code == 200
    retention.purge(conn, time.time() + 1)
    with relay.db() as db:
        assert db.execute("SELECT count(*) FROM html_bodies").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM message_html").fetchone()[0] == 0


def test_keep_html_false_keeps_none(make_relay, upstream, tmp_path):
    relay = make_relay({"dashboard": {"keep_html": False}}, upstream=upstream, http=True)
    send(relay, ["a@example.org"])
    with relay.db() as db:
        assert db.execute("SELECT count(*) FROM html_bodies").fetchone()[0] == 0


def test_admin_listen_moves_the_api_and_dashboard_off_the_public_host(make_relay, upstream,
                                                                      tmp_path):
    relay = make_relay({"http": {"admin_listen": "127.0.0.1:0"}}, upstream=upstream,
                       http=True)
    assert add_user(relay, tmp_path).returncode == 0
    admin = f"http://127.0.0.1:{http_port(relay.services.admin_http)}"
    public = relay.http_url
    for path, status in (("/ui/login", 200), ("/api/v1/openapi.json", 401)):
        assert requests.get(public + path, timeout=10).status_code == 404, path
        assert requests.get(admin + path, timeout=10).status_code == status, path
    assert requests.get(public + "/healthz", timeout=10).status_code == 200
    email_id = send(relay, ["a@example.org"])
    assert hit(relay, "/o/" + sign_open(relay.services.keyring, email_id, "a@example.org"),
               BROWSER) == 200
    assert Client(admin).sign_in().status_code == 303


def test_static_files_and_security_headers(relay, client):
    script = client.get("/ui/static/uPlot.iife.min.js")
    assert script.status_code == 200 and "uPlot" in script.text
    assert "MIT" in client.get("/ui/static/uPlot.LICENSE").text
    page = client.get("/ui/overview")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp and page.headers["X-Frame-Options"] == "DENY"
    assert "https://" not in page.text.split("<main>")[0]  # nothing from the internet


TRACK_HOST = "track.shop.example"
SECRET = "whsec_" + "A" * 32


def test_a_domain_is_verified_and_a_failed_delivery_replayed_from_the_page(
        make_relay, upstream, dns_server, tmp_path):
    relay = make_relay({
        "domains": [{"name": "shop.example", "tracking_host": TRACK_HOST}],
        "dns": {"nameservers": [dns_server.address], "timeout": 0.3},
        "webhooks": [{"name": "crm", "url": "http://127.0.0.1:9/in", "secret": SECRET,
                      "allow_private": True}],
    }, upstream=upstream, http=True)
    assert add_user(relay, tmp_path).returncode == 0
    with relay.db() as db:  # a batch the endpoint refused until the retries ran out
        db.execute("INSERT INTO webhook_events VALUES ('evt_1', 'email.sent', 0, '{}')")
        db.execute("INSERT INTO webhook_outbox (endpoint, event_id, batch_id)"
                   " VALUES ('crm', 'evt_1', 'bat_1')")
        db.execute("INSERT INTO webhook_batches (id, endpoint, state, events, attempts,"
                   " next_at, deadline, created_at, last_status, last_error) VALUES"
                   " ('bat_1', 'crm', 'failed', 1, 16, 0, 0, 0, 500, 'HTTP 500')")
    client = Client(relay.http_url)
    assert client.sign_in().status_code == 303
    page = client.get("/ui/operations").text
    assert f"{TRACK_HOST}. CNAME track.test." in page and ">pending<" in page
    assert "bat_1" in page and "HTTP 500" in page and SECRET not in page
    token = client.csrf("/ui/operations")
    verify = f"/ui/operations/domains/{TRACK_HOST}/verify"
    assert client.post(verify, {}).status_code == 403  # no token: nothing checked
    dns_server.cname(TRACK_HOST, "track.test")
    answer = client.post(verify, {"csrf": token})
    assert answer.status_code == 303
    page = client.get(answer.headers["Location"]).text
    assert ">verified<" in page and f"{TRACK_HOST}: verified" in page
    answer = client.post("/ui/operations/webhooks/replay", {"csrf": token, "batch_id": "bat_1"})
    assert "1 delivery queued again" in client.get(answer.headers["Location"]).text
    with relay.db() as db:
        assert db.execute("SELECT state FROM webhook_batches").fetchone()[0] == "pending"


def test_where_and_how(relay, client):
    email_id = send(relay, ["a@example.org"])
    iphone = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko) Mobile/15E148")
    assert hit(relay, "/o/" + sign_open(relay.services.keyring, email_id, "a@example.org"),
               iphone) == 200
    page = client.get("/ui/audience").text
    device = page[page.index('data-group="device"'):page.index('data-group="client"')]
    assert re.search(r'<th scope="row">mobile</th><td>1</td><td>1</td>', device), device
    system = page[page.index('data-group="os"'):page.index('data-group="country"')]
    assert re.search(r'<th scope="row">iOS 17.5</th><td>1</td><td>1</td>', system), system
    with relay.db() as db:  # a name no parser gives, to see it shown as text
        db.execute("INSERT INTO stats_daily_os VALUES (?, ?, 1, 1, 0, 0)", (TODAY, EVIL_SUBJECT))
    page = client.get("/ui/audience").text
    assert "<script>alert" not in page and f'<th scope="row">{escape(EVIL_SUBJECT)}</th>' in page


def test_a_message_page_shows_its_queue_attempts_and_delivery_events(make_relay, upstream,
                                                                     tmp_path):
    """Queue mode: the recipient the upstream deferred is still queued (its attempts shown),
    the one it refused bounced; both delivery events are on the timeline, the upstream's
    words (markup included) as text."""
    relay = make_relay({"smtp": {"mode": "queue"}, "queue": {"retry_seconds": [600]}},
                       upstream=upstream, http=True, clock=ManualClock())
    assert add_user(relay, tmp_path).returncode == 0
    upstream.handler.data_reply = "451 4.3.0 busy <script>alert(1)</script>"
    upstream.handler.refuse["gone@example.org"] = "550 5.1.1 No such user"
    email_id = send(relay, ["a@example.org", "gone@example.org"])
    wait_until(lambda: relay.db().execute("SELECT count(*) FROM delivery_events").fetchone()[0]
               == 2, 10, "the first attempt's delivery events")
    client = Client(relay.http_url)
    assert client.sign_in().status_code == 303
    page = client.get(f"/ui/messages/{email_id}").text
    assert 'data-state="deferred"' in page and "1 attempt so far" in page
    queued = page[page.index('class="queue-recipients"'):page.index("Timeline")]
    assert re.search(r"<td>a@example.org</td><td>queued</td><td>1</td>", queued), queued
    timeline = page[page.index("Timeline"):]
    delayed = re.search(r'<tr class="delivery" data-type="delayed">(.*?)</tr>', timeline, re.S)
    bounced = re.search(r'<tr class="delivery" data-type="bounced">(.*?)</tr>', timeline, re.S)
    assert delayed and "a@example.org" in delayed.group(1)
    assert "attempt 1, SMTP 451" in delayed.group(1) and "next attempt" in delayed.group(1)
    assert bounced and "gone@example.org" in bounced.group(1)
    assert "SMTP 550 (permanent)" in bounced.group(1) and "No such user" in bounced.group(1)
    assert "<script>alert" not in page and escape("<script>alert(1)</script>") in page


UPSTREAM_PASSWORD = "upstream-password-never-shown"


def test_operations_shows_the_settings_in_force_never_a_secret(make_relay, upstream, tmp_path):
    relay = make_relay({
        "upstream": {"username": EVIL_SUBJECT, "password": UPSTREAM_PASSWORD},
        "webhooks": [{"name": "crm", "url": "http://127.0.0.1:9/in", "secret": SECRET,
                      "allow_private": True}],
    }, upstream=upstream, http=True)
    assert add_user(relay, tmp_path).returncode == 0
    client = Client(relay.http_url)
    assert client.sign_in().status_code == 303
    page = client.get("/ui/operations").text
    settings = dict(re.findall(r'<tr><th scope="row"><code>([^<]+)</code></th><td>([^<]*)</td>',
                               page))
    assert settings["smtp.mode"] == "proxy" and settings["queue.max_age_hours"] == "72.0"
    assert settings["upstream.port"] == str(upstream.port)  # the file's value
    assert settings["dashboard.session_hours"] == "12.0"  # a default
    assert settings["store.url"] == str(escape(relay.config.store.url))  # as written
    assert settings["upstream.password"] == settings["webhooks[0].secret"] == \
        settings["tracking.keys"] == "(set, not shown)"
    assert UPSTREAM_PASSWORD not in page and SECRET not in page and "k" * 32 not in page
    assert settings["upstream.username"] == str(escape(EVIL_SUBJECT))  # as text
    assert "<script>alert" not in page
    assert 'id="queue-h"' not in page  # proxy mode: no queue


def test_the_queue_on_the_operations_page_and_its_buttons(make_relay, upstream, tmp_path):
    clock = ManualClock()
    relay = make_relay({"smtp": {"mode": "queue"}, "queue": {"retry_seconds": [600]}},
                       upstream=upstream, http=True, clock=clock)
    assert add_user(relay, tmp_path).returncode == 0
    upstream.handler.data_reply = "451 4.3.0 busy <script>alert(1)</script>"
    first = send(relay, ["a@example.org"])
    second = send(relay, ["b@example.org"])
    wait_until(lambda: relay.db().execute(
        "SELECT count(*) FROM queue_messages WHERE attempts = 1").fetchone()[0] == 2, 10,
        "both tried once")
    clock.advance(relay.loops, 90)
    client = Client(relay.http_url)
    assert client.sign_in().status_code == 303

    def shown() -> tuple[dict[str, str], dict[str, list[str]]]:
        page = client.get("/ui/operations").text
        assert "<script>alert" not in page
        tables = {state: re.findall(r'<tr data-email="([^"]+)">', page[page.index(
            f'<table class="queued" data-state="{state}">'):].split("</table>")[0])
            for state in ("deferred", "held")}
        return dict(re.findall(r'data-queue="(\w+)">([^<]*)<', page)), tables

    counts, tables = shown()
    assert counts == {"waiting": "0", "deferred": "2", "sending": "0", "held": "0",
                      "bytes": counts["bytes"], "oldest": "1 min"}
    assert int(counts["bytes"]) > 0 and tables == {"deferred": [first, second], "held": []}
    token = client.csrf("/ui/operations")
    assert client.post(f"/ui/operations/queue/{first}/hold", {}).status_code == 403
    assert client.post(f"/ui/operations/queue/{first}/bogus", {"csrf": token}
                       ).status_code == 404
    answer = client.post(f"/ui/operations/queue/{first}/hold", {"csrf": token})
    assert answer.status_code == 303
    assert f"{first}: held" in client.get(answer.headers["Location"]).text
    counts, tables = shown()
    assert (counts["held"], counts["deferred"]) == ("1", "1")
    assert tables == {"deferred": [second], "held": [first]}
    answer = client.post(f"/ui/operations/queue/{first}/retry", {"csrf": token})
    assert f"{first}: not in the queue or held" in client.get(answer.headers["Location"]).text
    upstream.handler.data_reply = None
    answer = client.post("/ui/operations/queue/retry", {"csrf": token})
    assert "1 message due now" in client.get(answer.headers["Location"]).text
    clock.advance(relay.loops, 1)  # the poll that finds the change
    wait_until(lambda: shown()[1] == {"deferred": [], "held": [first]}, 10, "second sent")
    client.post(f"/ui/operations/queue/{first}/release", {"csrf": token})
    answer = client.post(f"/ui/operations/queue/{first}/retry", {"csrf": token})
    assert f"{first}: due now" in client.get(answer.headers["Location"]).text
    clock.advance(relay.loops, 1)
    wait_until(lambda: shown()[0]["oldest"] == "–", 10, "the queue emptied")
    assert len(upstream.received) == 2


def api_links(relay: Relay, **params: str) -> dict[str, tuple[int, int]]:
    key = apikeys.create(store.connect_url(relay.config.store), f"k{time.time_ns()}")
    answer = requests.get(f"{relay.http_url}/api/v1/stats/links", params=params, timeout=10,
                          headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return {link["url"]: (link["clicks"], link["unique_clicks"])
            for link in answer.json()["links"]}


def test_links_follow_the_overviews_filters_as_the_api_does(relay, client):
    tagged = send(relay, ["a@example.org", "b@example.org"],
                  headers=f"X-AliDM-Trace: {SPRING}\r\nX-Anypost-Campaign: c1\r\n")
    other = send(relay, ["c@example.org"], headers="X-Anypost-Campaign: c2\r\n")
    keyring = relay.services.keyring
    for email_id, recipient, url in ((tagged, "a@example.org", SALE),
                                     (tagged, "b@example.org", SALE),
                                     (other, "c@example.org", PAY)):
        assert hit(relay, "/c/" + sign_click(keyring, email_id, recipient, url), BROWSER) == 302
    for flt, expected in (({}, {SALE: (2, 2), PAY: (1, 1)}),
                          ({"tag": "spring"}, {SALE: (2, 2)}),
                          ({"campaign": "c2"}, {PAY: (1, 1)}),
                          ({"sender_domain": "Shop.Example"}, {SALE: (2, 2), PAY: (1, 1)}),
                          ({"sender_domain": "shop.example", "campaign": "c1"}, {SALE: (2, 2)}),
                          ({"campaign": "nope"}, {})):
        params = {"since": TODAY, "until": TODAY, **flt}
        page = client.get("/ui/links", params=params)
        assert page.status_code == 200, page.text
        shown = {html.unescape(url): (int(clicks), int(unique)) for url, clicks, unique in
                 re.findall(r'<tr><td class="url">([^<]*)</td><td>(\d+)</td><td>(\d+)</td>',
                            page.text)}
        assert shown == api_links(relay, **params) == expected, flt
        for name, value in flt.items():
            assert f'name="{name}" value="{value}"' in page.text
    both = client.get("/ui/links", params={"tag": "spring", "campaign": "c1"})
    assert both.status_code == 400 and "goes with no other filter" in both.text
    evil = client.get("/ui/links", params={"tag": EVIL_SUBJECT})
    assert evil.status_code == 200 and "<script>alert" not in evil.text
