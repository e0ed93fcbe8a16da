"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright), against
the running relay: mail sent through its SMTP port, opens and clicks made on its tracker, a
user added with ``relay users add``. Signing in through the form, the overview's numbers
against the API's (with and without a tag filter), the chart drawn under the strict
Content-Security-Policy, the links filtered by a tag, the click map's counts on the right links
(a message's, and a tag's), a search and a message's timeline, opens by device and OS, a
tracking domain verified and a failed webhook delivery replayed from the operations page; in
queue mode the queue there (a message held and released) with the settings in force, and a
message's queue attempts and delivery events; markup in subjects, links, settings and the
upstream's replies shown as text, a cross-site form post refused, and axe-core (as bundled by
axe-playwright-python) finding no serious or critical violation on any page. Screenshots of
each page go to ``$RELAY_ARTIFACTS`` (default ``test-artifacts/screenshots/`` under the
repository, where CI keeps its output: .ci/run says so before the tests).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.tracking.tokens import sign_click, sign_open
from tests.clock import ManualClock
from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.e2e.test_dashboard import (
    EVIL_SUBJECT,
    EVIL_URL,
    PASSWORD,
    PAY,
    SALE,
    SECRET,
    SPRING,
    add_user,
    api_stats,
    body,
    send,
)
from tests.e2e.test_stats_api import BROWSER, TODAY, hit
from tests.harness import LoopThread, Relay, wait_until

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(f"Chromium is not installed ({CHROMIUM}; apt-get install chromium)",
                allow_module_level=True)

TRACK_HOST = "track.brand.example"
ARTIFACTS = Path(os.environ.get("RELAY_ARTIFACTS")
                 or Path(__file__).parents[2] / "test-artifacts" / "screenshots")
SERIOUS = ("serious", "critical")


class Mail:
    tagged: str
    plain: str
    evil: str


@pytest.fixture
def world(make_relay, upstream, tmp_path, dns_server) -> tuple[Relay, Mail]:
    relay = make_relay({
        "tracking": {"scanner_window_seconds": 0, "tags": ["spring"]},
        # another sender domain: mail from shop.example stays tracked by the default host
        "domains": [{"name": "brand.example", "tracking_host": TRACK_HOST}],
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
    mail = Mail()
    mail.tagged = send(relay, ["a@example.org", "b@example.org", "c@example.org"],
                       subject="Spring sale", headers=f"X-AliDM-Trace: {SPRING}\r\n")
    mail.plain = send(relay, ["d@example.org"], subject="Receipt")
    mail.evil = send(relay, ["e@example.org"], subject=EVIL_SUBJECT,
                     html_body=body(f"<a href='{EVIL_URL}'>evil</a>"))
    keyring = relay.services.keyring
    for email_id, recipient, url in ((mail.tagged, "a@example.org", SALE),
                                     (mail.tagged, "b@example.org", SALE),
                                     (mail.tagged, "c@example.org", PAY),
                                     (mail.evil, "e@example.org", EVIL_URL)):
        assert hit(relay, "/c/" + sign_click(keyring, email_id, recipient, url), BROWSER) == 302
    assert hit(relay, "/o/" + sign_open(keyring, mail.plain, "d@example.org"), BROWSER) == 200
    assert hit(relay, "/o/" + sign_open(keyring, mail.plain, "d@example.org"),
               "curl/8.5.0") == 200  # machine traffic
    return relay, mail


@pytest.fixture
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Evil:
    """Another origin (another port of the loopback host: the same site, so the session cookie
    is sent) serving a page that posts a form to the dashboard as soon as it loads."""

    def __init__(self, loops: LoopThread, target: str) -> None:
        self.page = (b'<!doctype html><title>evil</title><body onload="document.forms[0]'
                     b'.submit()"><form method="post" action="' + target.encode() +
                     b'/ui/logout"><input name="csrf" value="guessed"></form>')
        self.server = loops.run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(self.page), self.page))
        await writer.drain()
        writer.close()


def shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def accessible(page: object) -> None:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    bad = [(v["id"], v["impact"], v["help"]) for v in results.response["violations"]
           if v["impact"] in SERIOUS]
    assert not bad, (page.url, bad)


def numbers(page: object) -> dict[str, str]:
    return {name: page.locator(f'[data-metric="{name}"]').inner_text()
            for name in ("sent", "opens", "unique_opens", "clicks", "unique_clicks")}


def test_the_dashboard_in_chromium(world, browser, loops, dns_server):
    relay, mail = world
    base = relay.http_url
    page = browser.new_page()
    dialogs: list[str] = []
    problems: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

    # signing in: every page sends a stranger to the form first
    page.goto(f"{base}/ui/overview")
    assert page.url == f"{base}/ui/login"
    accessible(page)
    shot(page, "login")
    page.get_by_label("Name").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/ui/overview")

    # the overview: the API's numbers, the chart drawn, a tag filter changing both
    page.goto(f"{base}/ui/overview?since={TODAY}&until={TODAY}")
    page.locator('#chart[data-drawn="true"] canvas').wait_for()
    shown = numbers(page)
    assert shown == {k: str(v) for k, v in api_stats(relay, since=TODAY, until=TODAY).items()}
    assert shown["sent"] == "5" and shown["unique_clicks"] == "4"
    assert page.locator('tr[data-kind="automation"]').count() == 1
    accessible(page)
    shot(page, "overview")
    page.get_by_label("Tag").fill("spring")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url("**tag=spring**")
    page.locator('#chart[data-drawn="true"] canvas').wait_for()
    tagged = numbers(page)
    assert tagged == {k: str(v) for k, v in
                      api_stats(relay, since=TODAY, until=TODAY, tag="spring").items()}
    assert tagged["sent"] == "3" and tagged != shown

    # links: the markup in a URL is text
    page.goto(f"{base}/ui/links")
    assert page.get_by_role("cell", name=EVIL_URL).count() == 1
    accessible(page)
    shot(page, "links")
    # filtered as the overview is: the tag's links only
    page.locator("#tag").fill("spring")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url("**/ui/links?**tag=spring**")
    links = page.locator("table.links tbody tr")
    assert links.count() == 2 and links.filter(has_text=EVIL_URL).count() == 0
    assert links.filter(has_text=SALE).locator("td").nth(1).inner_text() == "2"
    accessible(page)
    shot(page, "links-tag")

    # a search finds a recipient; the message's page lists its recipients and events
    page.goto(f"{base}/ui/messages")
    page.get_by_label("Recipient").fill("a@example.org")
    page.get_by_role("button", name="Search").click()
    page.get_by_role("link", name="Spring sale").click()
    page.wait_for_url(f"{base}/ui/messages/{mail.tagged}")
    timeline = page.locator("table.timeline tbody tr")
    assert timeline.count() == 6  # three clicks, each with the open it implies
    assert timeline.filter(has_text="click").count() == 3
    assert page.locator("table.recipients tbody tr").count() == 3
    accessible(page)
    shot(page, "message")

    # the click map: each link's counted clicks on it, in the sandboxed frame
    page.get_by_role("link", name="Click map").click()
    frame = page.frame_locator("iframe.clickmap")
    frame.locator("a").first.wait_for()
    drawn = {frame.locator("a").nth(i).get_attribute("href"):
             frame.locator("a").nth(i).locator("span[data-clicks]").get_attribute("data-clicks")
             for i in range(frame.locator("a").count())}
    assert drawn == {SALE: "2", PAY: "1"}
    accessible(page)
    shot(page, "clickmap")

    # a tag's click map, asked for from the links page: its messages with that HTML counted
    page.goto(f"{base}/ui/links")
    page.locator("#map_tag").fill("spring")
    page.get_by_role("button", name="Open its click map").click()
    page.wait_for_url("**/ui/clickmap?**tag=spring**")
    assert "1 message of this tag" in page.locator("p.counted").inner_text()
    frame = page.frame_locator("iframe.clickmap")
    frame.locator("a").first.wait_for()
    assert {frame.locator("a").nth(i).get_attribute("href"): frame.locator("a").nth(i).locator(
        "span[data-clicks]").get_attribute("data-clicks")
        for i in range(frame.locator("a").count())} == {SALE: "2", PAY: "1"}
    accessible(page)
    shot(page, "clickmap-tag")

    # markup in a subject is text, and no script of it runs
    page.goto(f"{base}/ui/messages?recipient=e@example.org")
    assert page.get_by_role("link", name=EVIL_SUBJECT).count() == 1
    page.get_by_role("link", name=EVIL_SUBJECT).click()
    assert page.get_by_role("heading", name=EVIL_SUBJECT).count() == 1
    page.goto(f"{base}/ui/messages/{mail.evil}/clickmap")
    page.frame_locator("iframe.clickmap").locator("a").first.wait_for()
    accessible(page)
    assert dialogs == []

    # where and how
    page.goto(f"{base}/ui/audience")
    assert page.locator('table[data-group="device"] tbody tr').count() >= 1
    systems = page.locator('table[data-group="os"]')
    assert systems.get_by_role("columnheader", name="OS").count() == 1
    assert systems.get_by_role("rowheader").count() >= 1
    accessible(page)
    shot(page, "audience")

    # operations: a domain verified, a failed webhook delivery replayed, from the page
    page.goto(f"{base}/ui/operations")
    assert page.locator(f'tr[data-host="{TRACK_HOST}"] .state').inner_text() == "pending"
    accessible(page)
    shot(page, "operations")
    dns_server.cname(TRACK_HOST, "track.test")
    page.get_by_role("button", name=f"Verify {TRACK_HOST}").click()
    page.wait_for_url("**/ui/operations?done=**")
    assert page.locator(f'tr[data-host="{TRACK_HOST}"] .state').inner_text() == "verified"
    page.get_by_role("button", name="Replay bat_1").click()
    page.wait_for_url("**/ui/operations?done=**")
    assert page.get_by_role("status").inner_text() == "1 delivery queued again"
    with relay.db() as db:
        assert db.execute("SELECT state FROM webhook_batches").fetchone()[0] == "pending"
    assert SECRET not in page.content()

    # a cross-site form post (from another origin of this host) is refused
    evil = Evil(loops, base)
    try:
        page.goto(evil.url)
        page.wait_for_url(f"{base}/ui/logout")
        assert "Cross-site request refused" in page.content()
    finally:
        evil.server.close()
    page.goto(f"{base}/ui/overview")
    assert page.url.startswith(f"{base}/ui/overview")  # still signed in

    # signing out
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{base}/ui/login")
    page.goto(f"{base}/ui/overview")
    assert page.url == f"{base}/ui/login"
    assert not [p for p in problems if "Content Security Policy" in p], problems


EVIL_HOOK = 'http://127.0.0.1:9/in?x="><script>alert(3)</script>'


def sign_in(page: object, base: str) -> None:
    page.goto(f"{base}/ui/login")
    page.get_by_label("Name").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/ui/overview")


def test_the_queue_settings_and_delivery_events_in_chromium(make_relay, upstream, tmp_path,
                                                            browser):
    """Queue mode: the operations page's queue (a message held and released from it) and
    settings, and a message's queue attempts and delivery events; the upstream's words, markup
    included, shown as text."""
    relay = make_relay({"smtp": {"mode": "queue"}, "queue": {"retry_seconds": [600]},
                        "webhooks": [{"name": "crm", "url": EVIL_HOOK, "secret": SECRET,
                                      "allow_private": True, "events": ["email.opened"]}]},
                       upstream=upstream, http=True, clock=ManualClock())
    assert add_user(relay, tmp_path).returncode == 0
    upstream.handler.data_reply = f"451 4.3.0 busy {EVIL_SUBJECT}"
    upstream.handler.refuse["gone@example.org"] = "550 5.1.1 No such user"
    email_id = send(relay, ["a@example.org", "gone@example.org"], subject=EVIL_SUBJECT)
    wait_until(lambda: relay.db().execute("SELECT count(*) FROM delivery_events").fetchone()[0]
               == 2, 10, "the first attempt's delivery events")
    base = relay.http_url
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    sign_in(page, base)

    page.goto(f"{base}/ui/operations")
    assert page.locator('[data-queue="deferred"]').inner_text() == "1"
    deferred = page.locator('table[data-state="deferred"] tbody tr')
    assert deferred.count() == 1 and email_id in deferred.inner_text()
    assert EVIL_SUBJECT in deferred.inner_text()  # the last answer, as text
    page.get_by_text("The settings in force").click()
    settings = page.locator("table.settings")
    assert settings.get_by_role("row", name="smtp.mode queue").count() == 1
    assert settings.get_by_role("row", name="webhooks[0].secret (set, not shown)").count() == 1
    assert settings.get_by_role("row", name=f"webhooks[0].url {EVIL_HOOK}").count() == 1
    assert SECRET not in page.content()
    accessible(page)
    shot(page, "operations-queue")
    page.get_by_role("button", name=f"Hold {email_id}").click()
    page.wait_for_url("**/ui/operations?done=**")
    assert page.get_by_role("status").inner_text() == f"{email_id}: held"
    assert page.locator('table[data-state="held"] tbody tr[data-email]').count() == 1
    accessible(page)
    page.get_by_role("button", name=f"Release {email_id}").click()
    page.wait_for_url("**/ui/operations?done=**")
    assert page.get_by_role("status").inner_text() == f"{email_id}: released"

    page.get_by_role("link", name=email_id).click()
    page.wait_for_url(f"{base}/ui/messages/{email_id}")
    queued = page.locator("table.queue-recipients tbody tr")
    assert queued.filter(has_text="a@example.org").filter(has_text="queued").count() == 1
    assert queued.filter(has_text="gone@example.org").filter(has_text="bounced").count() == 1
    delivery = page.locator("table.timeline tr.delivery")
    assert delivery.count() == 2
    assert "attempt 1, SMTP 451" in delivery.filter(has_text="delayed").inner_text()
    assert "SMTP 550 (permanent)" in delivery.filter(has_text="bounced").inner_text()
    assert page.get_by_role("heading", name=EVIL_SUBJECT).count() == 1
    accessible(page)
    shot(page, "message-queue")
    assert dialogs == []
