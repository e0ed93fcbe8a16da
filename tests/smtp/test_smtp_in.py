"""The DATA reader's pure checks, against the obvious slow versions."""

from __future__ import annotations

import asyncio
import ssl

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.server import abort, crlf_line_endings, has_long_line


def naive_long_line(body: bytes, limit: int) -> bool:
    """Over a dot-stuffed body: a line's first dot is stuffing."""
    lines = body.split(b"\n")
    return any(len(line.removesuffix(b"\r").removeprefix(b".")) > limit for line in lines)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 60)), max_size=40),
       st.integers(1, 40))
def test_has_long_line_matches_the_naive_check(lines, limit):
    body = b"\r\n".join(b"." * dots + b"x" * n for dots, n in lines)
    assert has_long_line(body, limit) == naive_long_line(body, limit)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_has_long_line_on_any_bytes(body, limit):
    assert has_long_line(body, limit) == naive_long_line(body, limit)


def test_limit_is_exact_at_998():
    assert not has_long_line(b"a" * 998 + b"\r\nb\r\n", 998)
    assert has_long_line(b"b\r\n" + b"a" * 999 + b"\r\n", 998)


def test_the_dot_of_dot_stuffing_is_not_counted():
    assert not has_long_line(b"b\r\n." + b"." * 998 + b"\r\n", 998)
    assert has_long_line(b".." + b"a" * 998 + b"\r\n", 998)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"a"]), max_size=30))
def test_line_endings_made_crlf_leave_no_end_of_data_inside(pieces):
    """Whatever the client sent, the result is CRLF only and validly dot-stuffed: no line
    is a lone dot, so even forwarded as it is it could not end the upstream's DATA early."""
    body = crlf_line_endings(b"".join(pieces) + b"\r\n")
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
    assert b"\r\n.\r\n" not in body
    assert not body.startswith(b".\r\n")
    assert crlf_line_endings(body) == body


def test_abort_of_a_tls_connection_closed_twice(certificate):
    """A stop met a STARTTLS session its QUIT had closed twice: asyncio's TLS transport
    then has no protocol left and its ``abort()`` raised out of the relay's shutdown (on
    Debian's Python 3.11.2; 3.11.7's ``abort()`` checks)."""
    cert, key = certificate

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server_side: asyncio.Future[asyncio.BaseTransport] = loop.create_future()

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                server_side.set_result(transport)

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        listener = await loop.create_server(Protocol, "127.0.0.1", 0, ssl=context)
        port = listener.sockets[0].getsockname()[1]
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        transport = await server_side
        transport.close()
        transport.close()
        abort(transport)  # raised AttributeError
        writer.close()
        listener.close()
        await listener.wait_closed()

    asyncio.run(run())
