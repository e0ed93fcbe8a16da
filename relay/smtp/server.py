"""SMTP in: the aiosmtpd protocol with a faster DATA reader, and a handler that answers the
hooks (who may relay, how many recipients) and hands each message to the pipeline.

Who may relay: clients from ``smtp.allowed_networks``, or clients that authenticated (AUTH
PLAIN/LOGIN against ``[[smtp.users]]``, offered only under TLS unless
``auth_require_tls = false``). Everyone else gets ``530`` (AUTH is possible) or ``554``
(it is not): this is never an open relay.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import weakref
from collections.abc import Sequence

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from relay import metrics
from relay.addresses import parse_ip
from relay.certs.contexts import CertificateSet
from relay.clock import Clock
from relay.config import Config, SmtpSettings
from relay.limits import ConnectionLimits
from relay.rewrite.headers import NOT_UTF8
from relay.smtp import trace
from relay.smtp.delivery import AttemptListener, QueueWorker
from relay.smtp.guard import Logins, admit, limit_reached, peer_host, peer_key
from relay.smtp.pipeline import Incoming, MailPipeline
from relay.smtp.upstream import stuff
from relay.store.engine import Store

log = logging.getLogger("relay.smtp")

DATA_END = b".\r\n"
# <local@domain> with a dot-atom local part and a plain domain, then the parameters
_PLAIN_PATH = re.compile(r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,255})>(.*)\Z")
# Control characters (a bare CR among them: aiosmtpd ends command lines at LF only), which no
# address may carry to the upstream
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# How long stop() lets the messages being delivered finish and be answered, well under
# systemd's 90 s stop timeout.
DRAIN_SECONDS = 30.0
# How often one session may give each command (past that: 421 and the end of the session).
# Every command restarts the idle timeout, so without a budget a client could hold a session
# forever. Messages per session as Exim's smtp_accept_max_per_connection; the commands a
# client may give once per message share that budget, the others get aiosmtpd's default.
MESSAGES_PER_SESSION = 1000
PER_MESSAGE_COMMANDS = ("EHLO", "HELO", "MAIL", "DATA", "RSET", "NOOP")
OTHER_COMMANDS_PER_SESSION = 20
# Beside that budget, one for errors: every 4xx/5xx reply (an empty line's 500, an unknown
# command's, a refused address...) counts, and the 20th ends the session with 421, as Postfix's
# smtpd_hard_error_limit. A delivered message starts the count again (Postfix: errors "without
# delivering mail"). Not counted: 452 for too many recipients, which RFC 5321 4.5.3.1.10 has
# clients expect (they send the rest in another transaction; Postfix does not count it either),
# and the 421 that ends a session anyway.
ERRORS_PER_SESSION = 20
NOT_ERRORS = ("452 4.5.3", "421")


class RelaySMTP(SMTP):
    """aiosmtpd's state machine with a DATA phase that reads the message in large pieces.

    The stock DATA loop reads line by line; this one asks the stream for everything up to the
    next ``.\\r\\n`` and checks whether that dot starts a line, so a 40 KB message costs a
    handful of reads. The body is kept as received (dot-stuffed), and checked afterwards for
    size, line length and bare CR or LF. The end of DATA is only ``CRLF.CRLF``; a bare CR or
    LF is a line ending to some servers, a way to smuggle a second message past a relay. So
    the upstream gets CRLF only: from clients the handler trusts they are made CRLF (as
    Postfix's ``smtpd_forbid_bare_newline = normalize``), from others the message is refused.
    """

    # The stream's buffer limit: how much readuntil() may look at before giving up. Command
    # lines are still held to aiosmtpd's command_size_limit.
    line_length_limit = 64 * 1024

    def __init__(self, handler: RelayHandler, *, max_line_length: int,
                 max_data_seconds: float, limits: ConnectionLimits, **kwargs: object):
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self.limits = limits
        self._client: str | None = None  # counted in ``limits`` while the connection is open
        self._refused = False
        self.max_line_length = max_line_length
        self.max_data_seconds = max_data_seconds
        # While DATA is read: when the last bytes arrived (loop time), and the upload's deadline
        self._received_at = 0.0
        self._upload_deadline: asyncio.TimerHandle | None = None
        self.delivering = False  # in the DATA hook or writing its reply
        self.stopping = False  # set by SmtpService.stop(): end the session after the reply
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.errors = 0  # error replies since the session began or last delivered a message

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection (aiosmtpd calls this again at STARTTLS)
            client, refusal = admit(self.limits, transport.get_extra_info("peername"))
            if refusal is not None:  # answered and closed before any session starts
                self._refused = True
                transport.write(refusal.encode() + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
            self._client = client
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._client is not None:
            self.limits.release(self._client)
            self._client = None
        if not self._refused:
            super().connection_lost(error)
        if not self.closed.done():
            self.closed.set_result(None)

    async def push(self, status: str | bytes) -> None:
        """Every reply goes through here (aiosmtpd's public ``push``), the ones aiosmtpd's own
        command loop gives too (an empty line's ``500``, which no hook sees): the place to
        count errors against ``ERRORS_PER_SESSION``."""
        await super().push(status)
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        if text[:1] not in ("4", "5") or text.startswith(NOT_ERRORS):
            if self.delivering and text[:1] == "2":
                self.errors = 0  # a delivered message
            return
        if self.transport is None or self.transport.is_closing():
            return
        self.errors += 1
        if self.errors >= ERRORS_PER_SESSION:
            peer = peer_key(self.session.peer) if self.session else "?"
            limit_reached("errors", peer, "%s made %d errors in one session: closed it",
                          peer, self.errors)
            await super().push("421 4.7.0 Too many errors: closing the session")
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._received_at = self.loop.time()
        super().data_received(data)

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle timer went off (``_timeout_cb``, ``_reset_timeout`` and
        ``_timeout_duration`` are aiosmtpd privates, pinned by tests/e2e/test_smtp_guard.py).

        During DATA, ``smtp.timeout`` is idleness, not the upload's age: a client still
        sending gets the rest of a timeout from its last bytes (a 20 MB message at 50 KB/s
        takes 7 minutes). Otherwise the session ends with Postfix's 421, not a silent close.
        """
        if self._upload_deadline is not None:
            idle = self.loop.time() - self._received_at
            if idle < self._timeout_duration:
                self._reset_timeout(self._timeout_duration - idle)
                return
        self._end(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    def _upload_too_long(self) -> None:
        peer = peer_key(self.session.peer) if self.session else "?"
        limit_reached("data_seconds", peer, "%s took more than %.0f s to send a message: "
                      "closed the session", peer, self.max_data_seconds)
        self._end(f"421 4.4.2 {self.hostname} Error: the message took longer than "
                  f"{self.max_data_seconds:.0f} s to send (smtp.max_data_seconds)")

    def _end(self, reply: str) -> None:
        """Send ``reply`` and close, from a timer; a client that reads nothing (its buffer
        full) is aborted rather than waited for."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
        if self.transport.get_write_buffer_size():  # type: ignore[attr-defined]
            self.transport.abort()  # type: ignore[attr-defined]
        else:
            self.transport.close()

    def __dir__(self) -> list[str]:
        """aiosmtpd finds its ``smtp_*`` commands and ``auth_*`` mechanisms by scanning
        ``dir(self)`` for every new connection, a tenth of a short session's time; the answer
        is the same for every instance, so it is computed once per class."""
        return list(_names(type(self), ("smtp_", "auth_")))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common ``<local@domain> PARAMS`` form without the stdlib's RFC 5322 parser (a
        noticeable share of a short session); anything else goes the stock way."""
        match = _PLAIN_PATH.match(arg)
        if match is None:
            return super()._getaddr(arg)
        return match.group(1), match.group(2)

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body, too_big = await self._read_data()
        body, problem = (body, "552 5.3.4 Message too big") if too_big else self._check_body(body)
        if problem:
            log.info("refused from=%s peer=%s: %s", self.envelope.mail_from,
                     self.session.peer if self.session else None, problem)
            metrics.SMTP_MESSAGES.labels("refused").inc()
            self._set_post_data_state()
            await self.push(problem)
            return
        self.envelope.original_content = body
        self.envelope.content = body
        self.delivering = True
        # The idle timeout is the client's: while the relay delivers, the client waits for it,
        # and dropping the session once the upstream holds the message would lose the reply
        # (and the client would send the message again). Each upstream step has its own
        # ``upstream.timeout``.
        self._pause_timeout()
        try:
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push(status)
        finally:
            self.delivering = False
            if self.transport is not None:
                if self.stopping:
                    self.transport.close()  # sends the reply, then ends the session
                else:
                    self._reset_timeout()

    def _pause_timeout(self) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    async def _read_data(self) -> tuple[bytes, bool]:
        """Everything up to the line holding a lone dot; past the size limit only counted.
        Within ``max_data_seconds``, and ``smtp.timeout`` from the last bytes received."""
        self._received_at = self.loop.time()
        self._upload_deadline = self.loop.call_later(self.max_data_seconds,
                                                     self._upload_too_long)
        try:
            return await self._read_data_pieces()
        finally:
            self._upload_deadline.cancel()
            self._upload_deadline = None

    async def _read_data_pieces(self) -> tuple[bytes, bool]:
        pieces: list[bytes] = []
        size = 0
        limit = self.data_size_limit or 0
        last = b"\r\n"  # the DATA command's line ending precedes the first line
        while True:
            try:
                piece = await self._reader.readuntil(DATA_END)
            except asyncio.LimitOverrunError as exc:
                piece = await self._reader.readexactly(exc.consumed)
            except asyncio.IncompleteReadError as exc:
                raise ConnectionResetError("connection closed during DATA") from exc
            if piece.endswith(DATA_END) and _ends_line(last, piece):
                piece = piece[: -len(DATA_END)]
                size += len(piece)
                if not (limit and size > limit):
                    pieces.append(piece)
                break
            size += len(piece)
            if limit and size > limit:
                pieces.clear()
            else:
                pieces.append(piece)
            last = (last + piece)[-2:]
        return b"".join(pieces), bool(limit and size > limit)

    def _check_body(self, body: bytes) -> tuple[bytes, str | None]:
        """The body to deliver (line endings made CRLF), or the reply that refuses it. Only a
        client that may relay gets here (``RelayHandler.handle_MAIL`` refuses the others), so
        its bare CR and LF are line endings, as Postfix's ``smtpd_forbid_bare_newline =
        normalize`` takes them."""
        crlf = body.count(b"\r\n")
        if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
            body = crlf_line_endings(body)
        if has_long_line(body, self.max_line_length):
            return body, (f"500 5.5.2 Line too long: message lines must be at most "
                          f"{self.max_line_length} characters (RFC 5322 2.1.1)")
        return body, None


class RelaySession(Session):
    """aiosmtpd's session, with ``login_data`` a plain attribute: aiosmtpd sets it after
    every successful AUTH, and its own property logs "Session.login_data is deprecated" each
    time. The user name is in ``auth_data`` (``RelayHandler.authenticate``)."""

    login_data: object = None


@functools.cache
def _names(cls: type, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name in dir(cls) if name.startswith(prefixes))


def _ends_line(before: bytes, piece: bytes) -> bool:
    """Whether the ``.\\r\\n`` that ends ``piece`` is a line of its own."""
    head = piece[:-len(DATA_END)]
    tail = (before + head)[-2:] if len(head) < 2 else head[-2:]
    return tail == b"\r\n"


def unstuff(stuffed: bytes) -> bytes:
    """RFC 5321 4.5.2: remove the first dot of every line that starts with one."""
    body = stuffed.replace(b"\r\n.", b"\r\n")
    return body[1:] if body.startswith(b".") else body


def crlf_line_endings(stuffed: bytes) -> bytes:
    """The dot-stuffed DATA ``stuffed`` with every bare CR and bare LF made CRLF, stuffed
    again so that it holds no line of a lone dot.

    Each of them ends a line, as for the clients that send them (smtplib sending
    ``msg.as_bytes()`` ends lines with LF, and dot-stuffs the lines that follow one): so the
    first dot of a line that follows one is dot-stuffing, as after a CRLF. A lone ``.`` after a
    bare line ending is not the end of DATA (only ``CRLF.CRLF`` is): it becomes an empty line,
    and whatever follows it stays in this message.
    """
    crlf = stuffed.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return stuff(unstuff(crlf))


def has_long_line(body: bytes, limit: int) -> bool:
    """Whether a line of the dot-stuffed ``body`` holds more than ``limit`` characters before
    its CRLF, not counting the dot that stuffing adds to a line starting with one (RFC 5321
    4.5.3.1.6 limits the line as sent, before stuffing).

    Such a line is a run of at least ``limit + 2`` bytes without LF, so it covers one of the
    windows of ``(limit + 2) // 2`` bytes laid end to end over the body: look for LF in each
    window (a C-speed ``find``), and measure a line exactly only where a window has none.
    """
    if len(body) <= limit:
        return False
    width = (limit + 2) // 2
    for start in range(0, len(body), width):
        if body.find(b"\n", start, start + width) != -1:
            continue
        line_start = body.rfind(b"\n", 0, start) + 1
        line_end = body.find(b"\n", start)
        line_end = len(body) if line_end == -1 else line_end
        if body[line_end - 1 : line_end] == b"\r":
            line_end -= 1
        if body[line_start : line_start + 1] == b".":
            line_start += 1
        if line_end - line_start > limit:
            return True
    return False


class RelayHandler:
    """aiosmtpd hooks: relay permission, recipient limit, and the message to the pipeline."""

    def __init__(self, settings: SmtpSettings, pipeline: MailPipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.logins = Logins(settings)
        self.deliveries: set[asyncio.Task[str]] = set()  # messages being sent and recorded

    def __dir__(self) -> list[str]:
        """What aiosmtpd looks for in the handler of every new connection, its ``handle_*``
        hooks and ``auth_*`` mechanisms (as :meth:`RelaySMTP.__dir__`): scanning all its
        attributes took half the time of setting up a connection."""
        return list(_names(type(self), ("handle_", "auth_")))

    def trusted(self, session: Session | None) -> bool:
        """Whether the client may relay: it authenticated or comes from allowed_networks."""
        return session is not None and bool(session.authenticated or self._allowed(session.peer))

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if not self.trusted(session):
            if self.settings.users:
                return "530 5.7.0 Authentication required"
            return "554 5.7.1 Relay access denied: this client may not send through the relay"
        problem = _address_problem(address)
        if problem:
            return f"553 5.1.7 Bad sender address syntax: {problem}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return (f"452 4.5.3 Too many recipients: at most {self.settings.max_recipients} "
                    f"per message, send the rest in another message")
        if address.lower() == "postmaster":  # RFC 5321 4.5.1: taken without a domain
            address = f"postmaster@{self.settings.server_name}"
        elif "@" not in address:
            return "501 5.1.3 Bad recipient address syntax: expected user@domain"
        problem = _address_problem(address)
        if problem:
            return f"553 5.1.3 Bad recipient address syntax: {problem}"
        if address not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        # aiosmtpd keeps the null reverse-path of bounces as "<>" (it takes an empty one for
        # no MAIL yet); the upstream client writes "" as MAIL FROM:<> and refuses "<>"
        sender = envelope.mail_from or ""
        incoming = Incoming(
            sender="" if sender == "<>" else sender,
            recipients=list(envelope.rcpt_tos),
            message=unstuff(envelope.original_content),
            mail_options=list(envelope.mail_options),
            peer=str(session.peer[0]) if session.peer else "",
            helo=session.host_name or "",
            protocol=trace.protocol(
                esmtp=session.extended_smtp, authenticated=bool(session.authenticated),
                tls=server.transport is not None
                and server.transport.get_extra_info("ssl_object") is not None,
                utf8="SMTPUTF8" in (o.upper() for o in envelope.mail_options)),
        )
        delivery = asyncio.create_task(self.pipeline.process(incoming))
        self.deliveries.add(delivery)
        delivery.add_done_callback(self.deliveries.discard)
        # Shielded: when a client hangs up, aiosmtpd cancels its session, and a delivery cut
        # in two would leave copies at the upstream without their record, so the client's
        # retry would send them again. It goes on to the end; only the reply is lost.
        return await asyncio.shield(delivery)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """aiosmtpd's mechanism hooks (see relay/smtp/guard.py: the password check runs off
        the event loop, within a budget of failures per client address)."""
        return await self.logins.plain(server, args)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self.logins.login(server, args)

    def _allowed(self, peer: object) -> bool:
        if not isinstance(peer, tuple) or not peer:
            return False
        address = parse_ip(peer_host(peer))
        return address is not None and any(address in net
                                           for net in self.settings.allowed_networks)


class SmtpService:
    """The SMTP listeners (plain with optional STARTTLS, optional implicit TLS)."""

    def __init__(self, config: Config, store: Store, pipeline: MailPipeline,
                 clock: Clock | None = None,
                 attempt_listeners: Sequence[AttemptListener] = (),
                 certificates: CertificateSet | None = None) -> None:
        """``pipeline``: the mail path this service shares with the send API (relay/app.py),
        whose owner closes its upstream. ``clock``: the queue's time (tests drive it)."""
        self.config = config
        clock = clock or Clock()
        self.certificates = certificates  # smtp.tls_acme: STARTTLS with the store's
        pipeline.clock = clock.time
        self.upstream = pipeline.upstream
        self.handler = RelayHandler(config.smtp, pipeline)
        self.queue: QueueWorker | None = None  # queue mode's deliveries
        if config.smtp.mode == "queue":
            self.queue = QueueWorker(config, store, pipeline, clock, attempt_listeners)
            pipeline.on_queued = self.queue.wake
        self.servers: list[asyncio.AbstractServer] = []
        self.sessions: weakref.WeakSet[RelaySMTP] = weakref.WeakSet()
        self.call_limits = _call_limits(config.smtp.max_recipients)
        self.limits = ConnectionLimits(config.smtp.max_connections,
                                       config.smtp.max_connections_per_ip,
                                       exempt=config.smtp.allowed_networks)

    async def start(self) -> None:
        settings = self.config.smtp
        tls = _tls_context(settings)
        if settings.tls_acme and self.certificates is not None:
            tls = self.certificates.server_context(settings.server_name)
        listeners: list[tuple[object, ssl.SSLContext | None]] = [(settings.listen, None)]
        if settings.tls_listen is not None:
            listeners.append((settings.tls_listen, tls))
        loop = asyncio.get_running_loop()
        if self.queue is not None:
            self.queue.start()
        for address, implicit in listeners:
            server = await loop.create_server(
                functools.partial(self._protocol, tls, implicit is not None),
                address.host, address.port, ssl=implicit,  # type: ignore[attr-defined]
                reuse_port=settings.workers > 1 or None)
            self.servers.append(server)
            log.info("smtp listening on %s%s", address, " (implicit TLS)" if implicit else "")

    def _protocol(self, tls: ssl.SSLContext | None, implicit: bool) -> RelaySMTP:
        s = self.config.smtp
        session = RelaySMTP(
            self.handler,
            max_line_length=s.max_line_length,
            max_data_seconds=s.max_data_seconds,
            limits=self.limits,
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            hostname=s.server_name,
            ident="tracking-relay",
            tls_context=None if implicit or not self._certified() else tls,
            timeout=s.timeout,
            command_call_limit=self.call_limits,
            auth_require_tls=s.auth_require_tls and not implicit,
            loop=asyncio.get_running_loop(),
        )
        self.sessions.add(session)
        return session

    def _certified(self) -> bool:
        """With smtp.tls_acme, STARTTLS is offered once the host's certificate is there."""
        s = self.config.smtp
        return not s.tls_acme or (self.certificates is not None
                                  and self.certificates.has(s.server_name))

    @property
    def ports(self) -> Sequence[int]:
        return [s.sockets[0].getsockname()[1] for s in self.servers]

    async def stop(self) -> None:
        """Stop listening, let the messages being delivered finish, and drop the other
        sessions (their clients try again later, as after any lost connection).

        A session in the DATA hook may already have handed its message to the upstream:
        dropping it would lose the reply, and the client's retry could send the copies
        twice (the dedupe record may not be written yet). So it gets up to
        ``DRAIN_SECONDS`` to finish, answer and close (a close flushes the reply); what is
        still open then is aborted. The others are aborted at once: from Python 3.12.1
        ``wait_closed`` waits for every connection to end, and an idle or half-sent session
        would hold the stop for up to ``smtp.timeout``; on 3.11 they would outlive the
        store. Aborted, not closed: a close waits to flush replies that a client which
        stopped reading never takes. Deliveries whose client hung up are waited for within
        the same drain; whatever outlives it is cancelled."""
        for server in self.servers:
            server.close()
        draining: list[asyncio.Future[object]] = [*self.handler.deliveries]  # hung-up ones too
        for session in list(self.sessions):
            if session.transport is None:
                continue
            if session.delivering:
                session.stopping = True
                draining.append(session.closed)
            else:
                abort(session.transport)
        if draining:
            try:
                async with asyncio.timeout(DRAIN_SECONDS):
                    await asyncio.wait(draining)
            except TimeoutError:
                log.warning("stop: aborting %d delivering session(s) still open after %s s",
                            sum(not f.done() for f in draining), DRAIN_SECONDS)
        for session in list(self.sessions):
            if session.transport is not None:
                abort(session.transport)
        for server in self.servers:
            await server.wait_closed()
        late = list(self.handler.deliveries)  # what outlived the drain ends here
        for delivery in late:
            delivery.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if self.queue is not None:
            await self.queue.stop()
        self.handler.logins.close()


def abort(transport: asyncio.BaseTransport) -> None:
    """Drop a connection now. A TLS transport closed twice (a QUIT's close, then the
    session's own) has let go of its protocol, and Debian 12's Python 3.11.2 ``abort()`` on
    it raises ``AttributeError`` (3.11.7 checks); such a connection is already ending, so
    there is nothing to drop."""
    try:
        transport.abort()  # type: ignore[attr-defined]
    except AttributeError:
        if not transport.is_closing():
            raise


def _address_problem(address: str) -> str:
    """Why an envelope address is refused, or "". A control character (a bare CR) would make
    the upstream client refuse it; bytes that are not UTF-8 could be neither stored nor signed
    into a token, after the upstream took the message."""
    if _CONTROL.search(address):
        return "control character in the address"
    if NOT_UTF8.search(address):
        return "the address is not valid UTF-8"
    return ""


def _call_limits(max_recipients: int) -> dict[str, int]:
    limits = dict.fromkeys(PER_MESSAGE_COMMANDS, MESSAGES_PER_SESSION)
    return {**limits, "RCPT": MESSAGES_PER_SESSION * max_recipients,
            "*": OTHER_COMMANDS_PER_SESSION}


def _tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context
