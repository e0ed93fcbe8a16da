"""Forwarding: hand one copy of a message to the upstream and report, per recipient, what the
upstream answered.

Two upstreams share one interface: ``SmtpUpstream`` (aiosmtplib, a pool of open connections
reused across messages) and ``CaptureUpstream`` (the embedded default: one ``.eml`` file per
copy in a folder, for a fresh machine with no SMTP provider).

The message handed to :meth:`Upstream.send` has CRLF line endings already; ``SmtpUpstream``
dot-stuffs it (RFC 5321 4.5.2) and writes it as it is: aiosmtplib's ``data()`` would normalise
line endings too, a pass over every byte that this relay does not need.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from relay.clock import Clock
from relay.config import UpstreamSettings
from relay.queue.rate import TokenBucket

log = logging.getLogger("relay.upstream")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True, slots=True)
class Copy:
    """One transaction for the upstream: an envelope and the message."""

    sender: str
    recipients: Sequence[str]
    message: bytes  # CRLF line endings, not dot-stuffed
    mail_options: Sequence[str] = ()
    email_id: str = ""


class Upstream(Protocol):
    async def send(self, copy: Copy) -> dict[str, Reply]:
        """Each recipient's reply (the DATA reply for those whose RCPT was accepted)."""
        ...

    async def close(self) -> None: ...


UNREACHABLE = "4.4.1 Upstream unreachable, try again later"
# Copies larger than this are written to the upstream, and to the capture folder, in chunks
# of this size, so that no copy of them is made on the event loop.
WRITE_CHUNK = 256 * 1024
# How long closing the pool waits for the upstream to answer QUIT on each idle connection.
QUIT_SECONDS = 5.0


def stuff(body: bytes) -> bytes:
    """RFC 5321 4.5.2: a dot more in front of every line that starts with one."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


class CaptureUpstream:
    """Writes each copy to ``<folder>/<email_id>.<n>.eml`` with its envelope beside it in
    ``.json``; the file appears complete or not at all (written, then renamed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._counter = 0

    async def send(self, copy: Copy) -> dict[str, Reply]:
        self._counter += 1
        stem = f"{copy.email_id or 'message'}.{os.getpid()}.{self._counter}"
        envelope = {"mail_from": copy.sender, "rcpt_tos": list(copy.recipients),
                    "email_id": copy.email_id}
        if len(copy.message) > WRITE_CHUNK:  # out of the event loop's way
            await asyncio.to_thread(self._capture, stem, envelope, copy.message)
        else:
            self._capture(stem, envelope, copy.message)
        return {r: Reply(250, f"2.0.0 Captured as {stem}.eml") for r in copy.recipients}

    def _capture(self, stem: str, envelope: dict[str, object], message: bytes) -> None:
        self._write(stem + ".json", json.dumps(envelope).encode())
        self._write(stem + ".eml", message)

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.folder / name)

    async def close(self) -> None:
        return None


class SmtpUpstream:
    """A pool of aiosmtplib connections to one upstream server."""

    def __init__(self, settings: UpstreamSettings, local_hostname: str | None = None) -> None:
        assert settings.host is not None
        self.settings = settings
        self.local_hostname = local_hostname
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(settings.pool_size)

    async def send(self, copy: Copy) -> dict[str, Reply]:
        try:
            try:
                async with self._connection() as smtp:
                    return await self._transaction(smtp, copy)
            except _StaleConnection:
                async with self._connection(fresh=True) as smtp:
                    return await self._transaction(smtp, copy)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            # the details (the upstream's address among them) are for the log, not the client
            log.warning("%s upstream %s:%s failed for %d recipient(s): %s", copy.email_id,
                        self.settings.host, self.settings.port, len(copy.recipients),
                        _describe(exc))
            reply = Reply(451, UNREACHABLE)
            return {r: reply for r in copy.recipients}

    async def close(self) -> None:
        """QUIT the idle connections all at once, each for at most :data:`QUIT_SECONDS`: one
        by one with the upstream timeout, an upstream that stopped answering (or a firewall
        that dropped idle connections) held the relay's stop for ``timeout`` times
        ``pool_size`` seconds (8 minutes by default), far past systemd's stop timeout."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(smtp) for smtp in idle))

    @contextlib.asynccontextmanager
    async def _connection(self, fresh: bool = False) -> AsyncIterator[aiosmtplib.SMTP]:
        """An open connection for one transaction; returned to the pool only if it is clean."""
        async with self._slots:
            smtp = None if fresh else self._take_idle()
            if smtp is None:
                smtp = await self._connect()
            try:
                yield smtp
            except BaseException:
                smtp.close()
                raise
            if smtp.is_connected:
                self._idle.append(smtp)

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        """A pooled connection the upstream has not closed (as far as is known yet)."""
        while self._idle:
            smtp = self._idle.pop()
            if smtp.is_connected:
                return smtp
            smtp.close()
        return None

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host, port=s.port, timeout=s.timeout, local_hostname=self.local_hostname,
            use_tls=s.tls == "implicit", start_tls=s.tls == "starttls",
            validate_certs=s.verify_certificate, tls_context=_tls_context(s),
        )
        await smtp.connect()
        if smtp.is_ehlo_or_helo_needed:
            await smtp.ehlo()  # the extensions are known before the first message
        if s.username is not None and s.password is not None:
            await smtp.login(s.username, s.password)
        return smtp

    async def _transaction(self, smtp: aiosmtplib.SMTP, copy: Copy) -> dict[str, Reply]:
        missing = _missing_extension(smtp, copy.mail_options)
        if missing is not None:
            return {r: missing for r in copy.recipients}
        try:
            await smtp.mail(copy.sender, options=list(copy.mail_options), encoding="utf-8")
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _StaleConnection(f"connection lost before MAIL: {exc}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            await _reset(smtp)
            return {r: Reply(exc.code, exc.message) for r in copy.recipients}
        replies: dict[str, Reply] = {}
        accepted = []
        for recipient in copy.recipients:
            response = await smtp.execute_command(b"RCPT", b"TO:" + _address(recipient))
            replies[recipient] = Reply(response.code, response.message)
            if replies[recipient].ok:  # 252 and the like take the recipient too
                accepted.append(recipient)
        if not accepted:
            await _reset(smtp)
            return replies
        final = await _data(smtp, copy.message, self.settings.timeout)
        replies.update({r: final for r in accepted})
        return replies


def _missing_extension(smtp: aiosmtplib.SMTP, options: Sequence[str]) -> Reply | None:
    """The reply for a message that needs an extension the upstream lacks (RFC 6531, 6152)."""
    wanted = {o.upper() for o in options}
    if "SMTPUTF8" in wanted and not smtp.supports_extension("smtputf8"):
        return Reply(553, "5.6.7 The upstream server does not support SMTPUTF8, which this "
                          "message needs (non-ASCII addresses or headers)")
    if "BODY=8BITMIME" in wanted and not smtp.supports_extension("8bitmime"):
        return Reply(554, "5.6.3 The upstream server does not support 8BITMIME, which this "
                          "message needs (8-bit body)")
    return None


class _StaleConnection(aiosmtplib.SMTPServerDisconnected):
    """A pooled connection the upstream closed while it was idle: nothing was sent on it."""


async def _data(smtp: aiosmtplib.SMTP, message: bytes, timeout: float) -> Reply:
    start = await smtp.execute_command(b"DATA")
    if start.code != 354:
        await _reset(smtp)  # the upstream keeps the envelope until RSET
        return Reply(start.code, start.message)
    if len(message) <= WRITE_CHUNK:
        stuffed = stuff(message)
    else:  # a pass over every byte: out of the event loop's way
        stuffed = await asyncio.to_thread(stuff, message)
    tail = b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n"
    protocol = smtp.protocol
    assert protocol is not None
    if len(stuffed) <= WRITE_CHUNK:
        protocol.write(stuffed + tail)
    else:
        await _write_large(protocol, stuffed)
        protocol.write(tail)
    response = await protocol.read_response(timeout=timeout)
    return Reply(response.code, response.message)


async def _write_large(protocol: SMTPProtocol, data: bytes) -> None:
    """Write ``data`` a chunk at a time, waiting whenever the transport's buffer is full.

    One write of a large copy would have the transport copy all of it that the socket does
    not take at once into its buffer: a copy more of the message in memory, made on the event
    loop (tens of milliseconds for 15 MB). The chunks are views of ``data``, not copies.
    """
    view = memoryview(data)
    for start in range(0, len(data), WRITE_CHUNK):
        protocol.write(view[start : start + WRITE_CHUNK])  # type: ignore[arg-type]
        await protocol._drain_helper()  # aiosmtplib's flow control: returns unless paused


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(TimeoutError, aiosmtplib.SMTPException, OSError):
        await smtp.quit(timeout=QUIT_SECONDS)
    smtp.close()  # when QUIT got no answer


async def _reset(smtp: aiosmtplib.SMTP) -> None:
    """End a failed transaction; a connection where RSET fails is not pooled again (the
    failed transaction's reply stands)."""
    try:
        await smtp.rset()
    except aiosmtplib.SMTPException:
        smtp.close()


def _address(address: str) -> bytes:
    return b"<" + address.encode("utf-8") + b">"


def _tls_context(settings: UpstreamSettings) -> ssl.SSLContext | None:
    if settings.tls == "none":
        return None
    context = ssl.create_default_context()
    if not settings.verify_certificate:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class RateLimited:
    """An upstream sent at most ``upstream.max_rate`` copies a second (relay/queue/rate.py's
    token bucket); a copy waits for its turn before it takes a connection."""

    def __init__(self, upstream: Upstream, rate: float, clock: Clock) -> None:
        self.upstream = upstream
        self.clock = clock
        self.bucket = TokenBucket(rate, clock.time)

    async def send(self, copy: Copy) -> dict[str, Reply]:
        wait = self.bucket.reserve()
        if wait > 0:
            await self.clock.sleep(wait)
        return await self.upstream.send(copy)

    async def close(self) -> None:
        await self.upstream.close()


def build_upstream(settings: UpstreamSettings, local_hostname: str | None = None,
                   clock: Clock | None = None) -> Upstream:
    upstream: Upstream
    if settings.host:
        upstream = SmtpUpstream(settings, local_hostname)
    else:
        assert settings.capture_dir is not None
        upstream = CaptureUpstream(settings.capture_dir)
    if settings.max_rate is not None:
        return RateLimited(upstream, settings.max_rate, clock or Clock())
    return upstream
