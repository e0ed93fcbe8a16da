"""A clock tests move by hand: ``sleep`` waits until ``advance`` has moved the time past its
deadline, so retries, expiry and rate limits run without real waiting."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable

from relay.clock import Clock
from tests.harness import LoopThread


class ManualClock(Clock):
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Registered at once: the deadline counts from this call, whenever it is awaited."""
        if seconds <= 0:
            return asyncio.sleep(0)
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), future))
        return future

    def _advance(self, seconds: float) -> None:
        self.now += seconds
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def advance(self, loops: LoopThread, seconds: float) -> None:
        """Move the time on by ``seconds`` (from the test's thread) and wake the sleepers."""
        async def advance() -> None:
            self._advance(seconds)
        loops.run(advance())
