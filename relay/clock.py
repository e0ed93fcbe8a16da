"""Time as the relay's time-dependent parts see it: one object to read the time and to wait,
so tests drive queue retries, expiry and rate limits with a clock of their own
(tests/clock.py) instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable


class Clock:
    """The real clock: Unix time, and ``asyncio.sleep``."""

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Done ``seconds`` from now (from this call, not from the first await of it)."""
        return asyncio.sleep(seconds)
