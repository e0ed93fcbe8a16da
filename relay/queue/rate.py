"""A token bucket: at most ``rate`` sends a second, with bursts of up to ``burst``."""

from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    """``reserve()`` takes a token and says how many seconds to wait before using it; tokens
    reserved ahead are owed, so callers waiting at once are spaced ``1/rate`` apart."""

    def __init__(self, rate: float, clock: Callable[[], float], burst: float = 1.0) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = burst
        self._at = clock()

    def reserve(self) -> float:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
