"""The HTTP listener in front of aiohttp: connection limits, a deadline for the first request,
and malformed requests counted instead of logged as tracebacks.

What aiohttp itself does, and this module relies on: its keep-alive timer
(``keepalive_timeout``, set from ``http.keepalive_timeout``) closes a connection that waits for
its next request longer than that after a response. Bytes of a request head that is not
complete yet do not restart it, so a client trickling a header line every few seconds is
closed by it too. Older aiohttp releases start that timer only after a first response (3.14.5
also starts it when the connection opens), so a connection that sends nothing, or trickles its
first request head, would stay open forever.

What this module adds, whatever aiohttp's version:

- ``http.header_timeout``: a connection has that many seconds to send its first complete
  request head (up to the empty line ending it), or it is closed.
- ``http.max_connections`` and ``http.max_connections_per_ip`` (relay/limits.py): a connection
  past either gets ``503`` with ``Retry-After`` as soon as it is accepted, and is closed; no
  request is read and no aiohttp protocol is made for it.
- TLS (``ssl_context``): the limits above are applied when the connection is accepted, before
  its handshake (a connection past one is closed without the ``503``, which a TLS client
  could not read), and ``http.header_timeout`` covers the handshake and the first request head
  together, so a client that opens connections and never finishes a handshake is held to the
  same bounds as one that never sends a request. A failed handshake is counted in
  ``relay_http_tls_handshake_failures_total`` and logged at ``DEBUG`` only.
- Requests aiohttp cannot parse (bad request line, oversized header, garbage such as TLS sent
  to the plain port) are answered ``400`` by aiohttp as before, counted in
  ``relay_http_malformed_requests_total`` by kind and logged at ``DEBUG`` only. Errors in the
  relay's own handlers still log their traceback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError

from relay import metrics
from relay.limits import ConnectionLimits
from relay.throttle import ThrottledLog

log = logging.getLogger("relay.http")

RETRY_AFTER_SECONDS = 5
_REFUSED_BODY = b'{"error": "too many connections"}'
REFUSAL = b"".join((
    b"HTTP/1.1 503 Service Unavailable\r\n",
    b"Content-Type: application/json\r\n",
    b"Content-Length: %d\r\n" % len(_REFUSED_BODY),
    b"Retry-After: %d\r\n" % RETRY_AFTER_SECONDS,
    b"Connection: close\r\n\r\n",
    _REFUSED_BODY,
))
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")


class GuardedSite(web.BaseSite):
    """A TCP listener for an :class:`aiohttp.web.AppRunner` that puts :class:`_Guard` in front
    of each connection (the runner's ``server`` makes the aiohttp protocol behind it)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 limits: ConnectionLimits, header_timeout: float,
                 reuse_port: bool | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner)
        self.host, self.port, self.reuse_port = host, port, reuse_port
        self.limits = limits
        self.header_timeout = header_timeout
        self.ssl_context = ssl_context
        self.refusals = ThrottledLog(log)
        metrics.HTTP_CONNECTIONS.set_function(lambda: limits.open)

    @property
    def name(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://[{self.host}]:{self.port}" if ":" in self.host else \
            f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Guard(self), self.host, self.port,
                                                backlog=self._backlog, reuse_port=self.reuse_port)

    def make_protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        return server()

    def refused(self, ip: str | None, limit: str) -> None:
        metrics.HTTP_CONNECTIONS_REFUSED.labels(limit).inc()
        self.refusals(f"refused {limit}", logging.WARNING,
                      "http connection from %s refused: %s limit reached (%d open)", ip, limit,
                      self.limits.open)


class _Guard(asyncio.Protocol):
    """One connection: admitted (then, after the TLS handshake if the site has one, passed on
    to aiohttp's protocol) or refused."""

    __slots__ = ("site", "inner", "ip", "timer", "tail", "admitted", "transport", "early")

    def __init__(self, site: GuardedSite) -> None:
        self.site = site
        self.inner: asyncio.Protocol | None = None
        self.ip: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""
        self.admitted = False
        self.transport: asyncio.Transport | None = None  # the one to close: TLS once wrapped
        # what TLS decrypted between the handshake's end and start_tls returning
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if isinstance(peer, tuple) else None
        limit = self.site.limits.admit(self.ip)
        if limit is not None:
            self.site.refused(self.ip, limit)
            if self.site.ssl_context is None:  # a TLS client could not read it: closed only
                transport.write(REFUSAL)
            transport.close()
            return
        self.admitted = True
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.site.header_timeout, self._too_slow)
        if self.site.ssl_context is None:
            self._open(transport)
        else:  # the ClientHello waits in the socket until start_tls reads it
            transport.pause_reading()
            loop.create_task(self._handshake(transport, self.site.ssl_context))

    async def _handshake(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        """Wrap the connection in TLS, this guard staying the protocol that sees its data; the
        header timer (running already) closes it if the handshake takes too long."""
        loop = asyncio.get_running_loop()
        try:
            wrapped = await loop.start_tls(transport, self, context, server_side=True,
                                           ssl_handshake_timeout=self.site.header_timeout)
        except OSError as exc:  # ssl.SSLError and TimeoutError among them
            metrics.HTTP_TLS_HANDSHAKE_FAILURES.inc()
            log.debug("tls handshake with %s failed: %r", self.ip, exc)
            self._release()
            return
        if wrapped is None:  # closed during the handshake (the header timeout)
            self._release()
        elif self.admitted:  # not closed since
            self._open(wrapped)

    def _open(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.inner = self.site.make_protocol()
        self.inner.connection_made(transport)
        early, self.early = self.early, []
        for data in early:
            self.data_received(data)

    def _too_slow(self) -> None:
        self.timer = None
        metrics.HTTP_HEADER_TIMEOUTS.inc()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            if self.admitted:  # TLS: the request came with the handshake's last bytes
                self.early.append(data)
            return
        if self.timer is not None:
            seen = self.tail + data
            if any(end in seen for end in _HEAD_ENDS):
                self.timer.cancel()
                self.timer = None
                self.tail = b""
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.inner is None else self.inner.eof_received()

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self.inner is not None:
            self.inner.connection_lost(exc)
            self.inner = None

    def _release(self) -> None:
        """Give the connection's place back, once, however it ended."""
        if not self.admitted:
            return
        self.admitted = False
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.site.limits.release(self.ip)


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger (pass as ``logger=`` to the runner) with requests it could not
    parse counted and logged at ``DEBUG``: anyone can send them, and a traceback per request
    let any client fill the log. Everything else goes to aiohttp's logger unchanged."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def _malformed(self, msg: Any, args: tuple[Any, ...], exc_info: Any) -> bool:
        if not isinstance(exc_info, HttpProcessingError):
            return False
        metrics.HTTP_MALFORMED.labels(type(exc_info).__name__).inc()
        self.logger.debug(f"{msg}: %s", *args, exc_info)
        return True

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if not self._malformed(msg, args, exc_info):
            super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        # aiohttp logs a bad method on a connection's first request at DEBUG (often TLS or
        # other protocols sent to the port): it is counted all the same
        if not self._malformed(msg, args, kwargs.get("exc_info")):
            super().debug(msg, *args, **kwargs)
