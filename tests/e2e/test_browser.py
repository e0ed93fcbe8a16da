"""Tracked links land where a direct click lands, checked with a real Chromium (Debian's
``chromium``, driven by Playwright): every URL of ``data/iri_corpus.txt`` is sent through the
relay, its click link fetched from the running tracker over HTTP, and Chromium

- reads the original link and the redirect's ``Location`` as the same URL (``new URL().href``
  in a UTF-8 page; this covers the https links and international host names), and
- for the link's ``http://`` form (under ``.test``), requests exactly the same URL for a click
  on the original link and for a click on the tracked one (through a loopback proxy that
  records the request line, so no DNS and no outside network is needed).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import html
import http.client
import re
import shutil
import smtplib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import LoopThread, Relay, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 # http:// links are followed as written, not tried over https first
                 "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable"]
CORPUS = [line for line in (Path(__file__).parents[1] / "data" / "iri_corpus.txt").read_text(
    "utf-8").splitlines() if line.strip() and not line.startswith("#")]
PAGE = b'<!doctype html><meta charset="utf-8"><title>links</title><body></body>'

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(f"Chromium is not installed ({CHROMIUM}; apt-get install chromium)",
                allow_module_level=True)


class Recorder:
    """A loopback HTTP server: the test page for requests to itself, and, as Chromium's proxy,
    a 200 for every other request, whose absolute URL it records."""

    def __init__(self, loops: LoopThread) -> None:
        self.loops = loops
        self.requested: list[str] = []
        self.server = loops.run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        method, target, _ = (request_line.decode("latin-1") + "  ").split(" ", 2)
        status, body = b"200 OK", PAGE
        if method == "CONNECT":  # Chromium's own traffic to Google (updates, sign-in)
            status, body = b"502 Bad Gateway", b""
        elif target.startswith("http://"):
            if method == "GET":
                self.requested.append(target)
            body = b"<!doctype html><title>landed</title>"
        writer.write(b"HTTP/1.1 %s\r\nContent-Type: text/html; charset=utf-8\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (status, len(body), body))
        await writer.drain()
        writer.close()

    def close(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()
        self.loops.run(close())


@pytest.fixture
def recorder(loops: LoopThread) -> Iterator[Recorder]:
    server = Recorder(loops)
    yield server
    server.close()


def http_form(url: str) -> str:
    """The link over http, under .test: an https link would be tunnelled past the recording
    proxy, and Chromium upgrades hosts on its HSTS preload list (wikipedia.org) to https."""
    host, rest = re.fullmatch(r"https?://([^/?#]*)(.*)", url, re.DOTALL).groups()
    return f"http://{host}.test{rest}"


def tracked_links(relay: Relay, upstream, urls: list[str]) -> list[str]:
    """Each URL's click link, from the copy the relay delivered upstream."""
    anchors = "".join(f'<a href="{html.escape(url)}">x</a>\r\n' for url in urls)
    message = ("From: News <news@shop.example>\r\nTo: a@example.org\r\nSubject: Links\r\n"
               "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
               "Content-Transfer-Encoding: 8bit\r\n\r\n"
               f"<html><body>\r\n{anchors}</body></html>\r\n").encode()
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.sendmail("news@shop.example", ["a@example.org"], message,
                        ["SMTPUTF8", "BODY=8BITMIME"])
    delivered = email.message_from_bytes(upstream.received[-1].data, policy=email.policy.SMTP)
    body = delivered.get_body(("html",)).get_content()
    links = re.findall(r'href="http://track\.test(/c/[A-Za-z0-9_-]+)"', body)
    assert len(links) == len(urls), body
    return [relay.http_url + path for path in links]


def location(link: str) -> str:
    parts = urllib.parse.urlsplit(link)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", parts.path, headers={"User-Agent": "Mozilla/5.0 test"})
    response = conn.getresponse()
    conn.close()
    assert response.status == 302, link
    return response.headers["Location"]


def test_tracked_links_land_where_a_direct_click_lands(make_relay, upstream, recorder):
    relay = make_relay({"tracking": {"opens": False, "clicks": True}}, upstream=upstream,
                       http=True)
    originals = CORPUS + [http_form(url) for url in CORPUS]
    locations = [location(link) for link in tracked_links(relay, upstream, originals)]
    assert all(where.isascii() and where.isprintable() for where in locations)
    clicks = tracked_links(relay, upstream, [http_form(url) for url in CORPUS])

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, f"--proxy-server={recorder.url}"])
        try:
            page = browser.new_page()
            page.goto(recorder.url + "/page")
            href = page.evaluate("urls => urls.map(u => new URL(u).href)", originals)
            landing = page.evaluate("urls => urls.map(u => new URL(u).href)", locations)
            assert [(u, h) for u, h in zip(originals, landing, strict=True)] == list(
                zip(originals, href, strict=True))
            for url, click in zip(CORPUS, clicks, strict=True):
                direct = click_through(page, recorder, http_form(url))
                assert click_through(page, recorder, click) == direct, url
        finally:
            browser.close()


def click_through(page, recorder: Recorder, href: str) -> str:
    """The URL Chromium requests when a person clicks a link to ``href`` in a UTF-8 page."""
    page.goto(recorder.url + "/page")
    page.evaluate("""href => {
        const a = document.createElement('a');
        a.setAttribute('href', href);
        a.id = 'link';
        a.textContent = 'link';
        document.body.appendChild(a);
    }""", href)
    before = len(recorder.requested)
    page.click("#link")
    return wait_until(lambda: recorder.requested[before:] and recorder.requested[before],
                      what=f"Chromium's request for {href}")
