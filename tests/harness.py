"""Test harness: a real upstream SMTP server (aiosmtpd) and the relay, each running on its
own event loop in a background thread, so tests talk to them with real clients (smtplib,
swaks) over loopback."""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay import config as config_module
from relay.app import Services, http_port, running
from relay.clock import Clock
from tests import pg


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(_cancel_others())  # sessions still open on either side end here
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]


@dataclass
class UpstreamHandler:
    """Records what it receives; ``refuse`` maps a recipient to the RCPT reply to give (a
    ``2xx`` one still takes the recipient)."""

    received: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    # The reply to the next DATA command itself instead of 354 (the transaction is kept, as
    # RFC 5321 wants, until the client sends RSET).
    data_command_reply: str | None = None
    # The next MAIL command ends the connection unanswered, as on a connection that died
    # while it sat in the relay's pool.
    drop_next_mail: bool = False
    # Connections the server ended after ``timeout`` idle seconds (with Postfix's 421).
    timed_out: int = 0
    # When set, DATA waits for this event (create it on the loop) before answering; ``held``
    # counts the DATA commands that reached it, ``holding`` has their messages.
    gate: asyncio.Event | None = None
    held: int = 0
    holding: list[bytes] = field(default_factory=list)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        reply = self.refuse.get(address, "250 OK")
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.gate is not None:
            self.held += 1
            self.holding.append(envelope.original_content)
            await self.gate.wait()
        if self.data_reply:
            return self.data_reply
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, list(envelope.mail_options)))
        return "250 2.0.0 Accepted by test upstream"


class UpstreamSMTP(SMTP):
    """aiosmtpd with the misbehaviours the handler asks for."""

    event_handler: UpstreamHandler

    async def smtp_MAIL(self, arg: str) -> None:
        if self.event_handler.drop_next_mail:
            self.event_handler.drop_next_mail = False
            assert self.transport is not None
            self.transport.close()
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        handler = self.event_handler
        reply, handler.data_command_reply = handler.data_command_reply, None
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_DATA(arg)

    def _timeout_cb(self) -> None:
        self.event_handler.timed_out += 1
        self._writer.write(b"421 4.4.2 upstream.test Error: timeout exceeded\r\n")
        super()._timeout_cb()


class UpstreamServer:
    """aiosmtpd as the relay's upstream; optionally STARTTLS-only with AUTH required, and
    ending connections idle for ``timeout`` seconds."""

    def __init__(self, loops: LoopThread, smtputf8: bool = True,
                 tls: ssl.SSLContext | None = None, login: tuple[str, str] | None = None,
                 timeout: float = 300) -> None:
        self.loops = loops
        self.smtputf8 = smtputf8
        self.tls = tls
        self.login = login
        self.timeout = timeout
        self.handler = UpstreamHandler()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def start(self) -> None:
        async def start() -> asyncio.AbstractServer:
            loop = asyncio.get_running_loop()
            return await loop.create_server(
                lambda: UpstreamSMTP(
                    self.handler, enable_SMTPUTF8=self.smtputf8, hostname="upstream.test",
                    tls_context=self.tls, require_starttls=self.tls is not None,
                    auth_required=self.login is not None,
                    authenticator=self._authenticate if self.login else None,
                    timeout=self.timeout, loop=loop), "127.0.0.1", self.port)
        self.server = self.loops.run(start())
        self.port = self.server.sockets[0].getsockname()[1]

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: object) -> AuthResult:
        assert self.login is not None
        name, password = self.login
        ok = (isinstance(auth_data, LoginPassword)
              and (auth_data.login, auth_data.password) == (name.encode(), password.encode()))
        return AuthResult(success=ok, handled=False)

    def stop(self) -> None:
        if self.server is not None:
            server = self.server
            self.server = None

            async def stop() -> None:
                server.close()
                await server.wait_closed()
            self.loops.run(stop())

    @property
    def received(self) -> list[Received]:
        return self.handler.received


class Relay:
    """The relay's services started from a config dict, on the shared loop thread."""

    def __init__(self, loops: LoopThread, config: config_module.Config,
                 smtp: bool = True, http: bool = False, clock: Clock | None = None) -> None:
        self.loops = loops
        self.config = config
        self._context = running(config, smtp=smtp, http=http, clock=clock)
        self.services: Services = loops.run(self._context.__aenter__())

    @property
    def smtp_port(self) -> int:
        assert self.services.smtp is not None
        return self.services.smtp.ports[0]  # type: ignore[attr-defined]

    @property
    def http_url(self) -> str:
        assert self.services.http is not None
        return f"http://127.0.0.1:{http_port(self.services.http)}"

    def db(self) -> sqlite3.Connection:
        if self.config.store.path is None:
            return pg.connect_rows(self.config.store.url)  # type: ignore[return-value]
        conn = sqlite3.connect(self.config.store.path)
        conn.row_factory = sqlite3.Row
        return conn

    def dump(self) -> str:
        """Everything the store holds, as text: SQLite's dump, or each PostgreSQL table's rows."""
        with self.db() as db:
            if isinstance(db, sqlite3.Connection):
                return "\n".join(db.iterdump())
            tables = [name for (name,) in db.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() ORDER BY 1")]
            return "\n".join(f"{table}: {row!r}" for table in tables
                             for row in db.execute(f"SELECT * FROM {table}"))

    def close(self) -> None:
        self.loops.run(self._context.__aexit__(None, None, None))


def without_received(data: bytes) -> bytes:
    """A forwarded copy without the ``Received:`` line the relay puts on top of it (which
    must be there, ending with its date): the message as the relay took it."""
    line = _RECEIVED.match(data)
    assert line, data[:200]
    return data[line.end() :]


_RECEIVED = re.compile(rb"Received: .*?;\s+[^\r\n]* [+-][0-9]{4}\r\n", re.DOTALL)


def free_port() -> int:
    """A loopback port free right now, for a relay started as a subprocess."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store_url(tmp_path: Path) -> str:
    """A SQLite file in ``tmp_path``, or with RELAY_TEST_STORE=postgresql a schema of its own
    (tests/pg.py)."""
    if pg.ENGINE == "postgresql":
        return pg.schema_url()
    return f"sqlite:///{tmp_path / 'relay.db'}"


def base_settings(tmp_path: Path) -> dict[str, Any]:
    return {
        "smtp": {"listen": "127.0.0.1:0", "hostname": "relay.test"},
        "http": {"listen": "127.0.0.1:0", "public_url": "http://track.test"},
        "store": {"url": store_url(tmp_path)},
        "tracking": {"keys": {"k1": "k" * 32}, "current_key": "k1"},
    }


def wait_until(condition: Callable[[], Any], timeout: float = 20, what: str = "condition"
               ) -> Any:
    """Poll ``condition`` until it is true (its value is returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)  # polling a condition, not a synchronisation sleep
    raise AssertionError(f"timed out waiting for {what}")
