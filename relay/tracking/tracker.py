"""The tracking HTTP service: the open pixel, click redirects, health and metrics.

``GET /o/<token>``  the 43-byte transparent GIF, always ``200``: a token that does not verify
                    (or any other path under ``/o/``) just records nothing.
``GET /c/<token>``  ``302`` to the token's URL in its ASCII form (relay/rewrite/urls.py: IDNA host,
                    UTF-8 percent-encoding), where a browser would go for a direct click; a
                    token that does not verify (or is not a click token, or whose URL is not
                    an http(s) URL a browser follows) gets ``404`` JSON, never a redirect.
``HEAD`` on both    the same answer without a body; stored as scanner traffic, never counted.
``GET /healthz``    ``200`` JSON when the store answers, ``503`` otherwise.
``GET /metrics``    Prometheus text of :data:`relay.metrics.REGISTRY`, only for clients in
                    ``http.metrics_allowed_networks`` (the address as events record it, so
                    ``X-Forwarded-For`` only from trusted proxies); ``403`` JSON for others.

Other errors (an unknown path, a method not allowed) are JSON too: ``{"error": "<reason>"}``.

Every pixel and redirect is answered only after its events are committed (group commit, see
relay/tracking/events.py). If the write fails the recipient still gets the pixel or the redirect (a
broken link would hurt them, not the sender); the failure is counted in
``relay_tracking_write_errors_total`` and logged at most once a minute with the number held back
(relay/throttle.py): while the store is away every hit fails.

The hot path does no logging and no per-request allocation beyond the event: tokens are
verified in place, classification verdicts and send times are cached, response headers are
prebuilt, and metric children are resolved once.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from functools import lru_cache
from time import time

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from relay import metrics
from relay.addresses import Network, parse_ip
from relay.config import Config
from relay.errors import InvalidToken
from relay.rewrite.urls import location
from relay.store import engine
from relay.store.engine import Store
from relay.throttle import ThrottledLog
from relay.tracking.bots import (
    CLICK,
    DEFAULT_NETWORKS,
    OPEN,
    Classifier,
    networks_of,
)
from relay.tracking.enrich import open_enricher
from relay.tracking.events import Hit, Listener, Recorder
from relay.tracking.tokens import ClickTarget, Keyring, OpenTarget, verify

log = logging.getLogger("relay.tracker")

RECORDER = web.AppKey("recorder", Recorder)

# GIF89a, 1x1, one transparent pixel: 43 bytes.
PIXEL = b"".join((
    b"GIF89a",
    b"\x01\x00\x01\x00\x80\x00\x00",  # 1x1 screen, 2-colour global table, background 0
    b"\x00\x00\x00\xff\xff\xff",  # the table: black, white
    b"\x21\xf9\x04\x01\x00\x00\x00\x00",  # graphic control: colour 0 is transparent
    b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00",  # image at 0,0, 1x1, no local table
    b"\x02\x02\x44\x01\x00",  # LZW, minimum code size 2: clear, 0, end
    b"\x3b",  # trailer
))
NO_STORE = "no-store, private"
_PIXEL_HEADERS = {"Content-Type": "image/gif", "Cache-Control": NO_STORE}
_NOT_FOUND = b'{"error": "unknown or invalid link"}'
MAX_USER_AGENT = 1024  # characters stored; real ones are a few hundred


def build_app(config: Config, store: Store, keyring: Keyring, *,
              listeners: Sequence[Listener] = ()) -> web.Application:
    """The tracking service; ``listeners`` write in each event's transaction (events.py)."""
    networks = DEFAULT_NETWORKS + networks_of(config.tracking.scanner_networks)
    classifier = Classifier(networks, config.tracking.scanner_window_seconds,
                            flood_hits=config.tracking.flood_hits,
                            flood_seconds=config.tracking.flood_seconds)
    enricher = open_enricher(config.geo, config.privacy, config.source)
    recorder = Recorder(store, classifier, listeners=listeners, enricher=enricher)
    tracker = Tracker(store, keyring, recorder, config.http.trusted_proxies,
                      config.http.metrics_allowed_networks)
    app = web.Application(middlewares=[_json_errors])
    app[RECORDER] = recorder

    async def close_enricher(_: web.Application) -> None:
        enricher.close()

    app.on_cleanup.append(close_enricher)
    app.router.add_get("/o/{token:.*}", tracker.open)
    app.router.add_get("/c/{token:.*}", tracker.click)
    app.router.add_get("/healthz", tracker.healthz)
    app.router.add_get("/metrics", tracker.metrics)
    metrics.STORE_COMMITS.set_function(lambda: store.batches)
    metrics.STORE_LAST_BATCH_SIZE.set_function(lambda: store.last_batch_size)
    return app


class Tracker:
    def __init__(self, store: Store, keyring: Keyring, recorder: Recorder,
                 trusted_proxies: tuple[Network, ...],
                 metrics_networks: tuple[Network, ...] = ()) -> None:
        self.store = store
        self.keyring = keyring
        self.recorder = recorder
        self.trusted_proxies = trusted_proxies
        self.metrics_networks = metrics_networks
        self._is_trusted = lru_cache(maxsize=1024)(self._trusted)
        self._requests: dict[tuple[str, int], Counter] = {}
        self._opened = metrics.HTTP_REQUESTS.labels("open", 200)
        self._redirected = metrics.HTTP_REQUESTS.labels("click", 302)
        # while the store is away every hit fails: a line per interval, not a traceback per hit
        self._lost = ThrottledLog(log)

    async def open(self, request: web.Request) -> web.Response:
        target = self._target(request)
        if isinstance(target, OpenTarget):
            await self._record(request, OPEN, target.email_id, target.recipient, None)
        self._opened.inc()
        return web.Response(body=PIXEL, headers=_PIXEL_HEADERS)

    async def click(self, request: web.Request) -> web.Response:
        target = self._target(request)
        where = location(target.url) if isinstance(target, ClickTarget) else None
        if where is None:
            self._count("click", 404)
            return web.Response(status=404, body=_NOT_FOUND, content_type="application/json")
        assert isinstance(target, ClickTarget)
        await self._record(request, CLICK, target.email_id, target.recipient, target.url)
        self._redirected.inc()
        return web.Response(status=302, headers={"Location": where, "Cache-Control": NO_STORE})

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            await self.store.read(engine.check)
        except sqlite3.Error as exc:
            self._count("healthz", 503)
            return web.json_response({"status": "unavailable", "store": str(exc)}, status=503)
        self._count("healthz", 200)
        return web.json_response({"status": "ok", "store": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        address = parse_ip(self._client_ip(request))
        if address is None or not any(address in net for net in self.metrics_networks):
            self._count("metrics", 403)
            return web.json_response({"error": "forbidden: not in http.metrics_allowed_networks"},
                                     status=403)
        for refresh in metrics.BEFORE_SCRAPE:
            await refresh()
        self._count("metrics", 200)
        return web.Response(body=generate_latest(metrics.REGISTRY),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _target(self, request: web.Request) -> OpenTarget | ClickTarget | None:
        try:
            return verify(self.keyring, request.match_info["token"])
        except InvalidToken:
            return None

    async def _record(self, request: web.Request, kind: str, email_id: str, recipient: str,
                      url: str | None) -> None:
        hit = Hit(kind, time(), email_id, recipient, url, self._client_ip(request),
                  user_agent(request.headers.get("User-Agent", "")), request.method)
        try:
            await self.recorder.record(hit)
        except sqlite3.OperationalError as exc:  # the store unavailable (PostgreSQL away, a
            # full disk): answer anyway, the recipient must not pay for a store failure
            metrics.TRACKING_WRITE_ERRORS.inc()
            self._lost("unavailable", logging.ERROR,
                       "%s of %s by %s not recorded: the store is unavailable: %s",
                       kind, email_id, recipient, " ".join(str(exc).split()))
        except Exception:
            metrics.TRACKING_WRITE_ERRORS.inc()
            self._lost("failed", logging.ERROR, "%s of %s by %s not recorded",
                       kind, email_id, recipient, exc_info=True)

    def _client_ip(self, request: web.Request) -> str | None:
        peer = request.remote
        if not self.trusted_proxies:
            return peer
        forwarded = request.headers.getall("X-Forwarded-For", ())
        return client_ip(peer, ",".join(forwarded), self._is_trusted)

    def _trusted(self, ip: str) -> bool:
        return in_networks(ip, self.trusted_proxies)

    def _count(self, route: str, status: int) -> None:
        counter = self._requests.get((route, status))
        if counter is None:
            counter = self._requests[route, status] = metrics.HTTP_REQUESTS.labels(route, status)
        counter.inc()


def in_networks(ip: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``ip`` is an address in one of ``networks`` (``http.trusted_proxies``)."""
    address = parse_ip(ip)
    return address is not None and any(address in net for net in networks)


def client_ip(peer: str | None, forwarded_for: str, trusted: Callable[[str], bool]) -> str | None:
    """The client's address: the TCP peer, unless it is a trusted proxy; then ``X-Forwarded-For``
    walked right to left, skipping trusted hops, up to the first address not trusted. An entry
    that is not an address ends the walk at the last hop that could be vouched for."""
    if peer is None or not forwarded_for or not trusted(peer):
        return peer
    hop = peer
    for entry in reversed(forwarded_for.split(",")):
        candidate = entry.strip()
        if parse_ip(candidate) is None:
            return hop
        if not trusted(candidate):
            return candidate
        hop = candidate
    return hop


def user_agent(header: str) -> str:
    """The header as text that can be stored: aiohttp keeps bytes that are not UTF-8 as lone
    surrogates, which SQLite refuses (and with them the whole group commit); they become
    U+FFFD. Cut to :data:`MAX_USER_AGENT` characters."""
    if not header.isascii():
        header = header.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return header[:MAX_USER_AGENT]


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own error pages (an unknown path, a method not allowed) as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {name: value for name, value in exc.headers.items()
                   if name.lower() != "content-type"}
        return web.json_response({"error": exc.reason}, status=exc.status, headers=headers)
