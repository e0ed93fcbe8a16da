"""Log lines for events that can repeat thousands of times a second (failed accepts, floods):
the first one of each kind is logged, the rest within ``interval`` seconds are counted and
reported with the next line of that kind, so an attack cannot fill the disk with logs.

Both listeners use it: the SMTP limits (relay/smtp/guard.py) and the loop's accept failures
(``install_accept_handler``), which asyncio would otherwise log with a traceback each time.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import Any

# asyncio's message when accept() fails for lack of descriptors or memory (selector_events.py,
# Python 3.11-3.13); it stops accepting on that socket for a second, then tries again
ACCEPT_FAILED = "socket.accept() out of system resource"
ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ThrottledLog:
    """``log(key, level, message, *args)`` writes at most one line per ``key`` every
    ``interval`` seconds (on ``clock``); the lines it held back are counted in the next one."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys  # a key per client address must not grow without bound
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, level: int, message: str, *args: object,
                 exc_info: bool = False) -> bool:
        """Log unless a line of this ``key`` was logged less than ``interval`` ago; whether
        it logged. ``exc_info``: with the traceback of the exception being handled."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= self.max_keys:
            self._forget(now)
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            message += f" (and {held} more like it held back since the last line)"
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def _forget(self, now: float) -> None:
        """Drop the keys whose interval has passed (their held-back counts are lost), or
        all of them when none has."""
        stale = [k for k, t in self._last.items() if now - t >= self.interval]
        for key in stale or list(self._last):
            self._last.pop(key, None)
            self._held.pop(key, None)


def install_accept_handler(loop: asyncio.AbstractEventLoop, throttled: ThrottledLog
                           ) -> Callable[[], None]:
    """Log accept() failures (out of descriptors: EMFILE) on ``loop`` through ``throttled``,
    one line per interval instead of a traceback per failed accept; every other exception
    goes to the handler that was there before (or asyncio's default). Returns what puts the
    previous handler back."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (context.get("message") == ACCEPT_FAILED and isinstance(exc, OSError)
                and exc.errno in ACCEPT_ERRNOS):
            sock = context.get("socket")
            where = _sockname(sock)
            throttled(f"accept {where}", logging.ERROR,
                      "cannot accept connections on %s: %s (out of file descriptors? raise "
                      "LimitNOFILE, or lower max_connections)", where, exc.strerror)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)


def _sockname(sock: object) -> str:
    try:
        host, port = sock.getsockname()[:2]  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError, TypeError):
        return "a listening socket"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
