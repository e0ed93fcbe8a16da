"""What one delivery attempt means for one recipient, and when the next one is.

- a ``2xx`` reply: sent.
- a ``5xx`` reply: given up at once (an ``email.bounced`` with ``bounce_type`` ``permanent``).
- a ``4xx`` reply (a connection error or a timeout is one: ``451 4.4.1``): tried again after
  ``queue.retry_seconds[n]`` for the n-th failure (the last wait repeats), or after the wait the
  reply names ("try again in 30 seconds"), but never past the message's expiry; an attempt
  that fails at or after the expiry gives the recipient up (``bounce_type`` ``expired``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SENT = "sent"
RETRY = "retry"
BOUNCED = "bounced"
PERMANENT = "permanent"
EXPIRED = "expired"

# A wait the upstream names in its reply: "try again in 30 seconds", "retry after 5 minutes".
_HINT = re.compile(r"\b(?:try|retry)(?:\s+again)?\s+(?:in|after)\s+(\d{1,6})\s*"
                   r"(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)\b", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600}
# A named wait is followed within these bounds (a reply cannot hold the queue for a day).
HINT_BOUNDS = (1.0, 3600.0)


@dataclass(frozen=True, slots=True)
class Verdict:
    state: str  # SENT, RETRY or BOUNCED
    bounce_type: str | None = None  # PERMANENT or EXPIRED when BOUNCED
    next_at: float | None = None  # when RETRY


def expires_at(received_at: float, max_age_hours: float) -> float:
    return received_at + max_age_hours * 3600


def retry_wait(failures: int, schedule: Sequence[float]) -> float:
    """The wait after the ``failures``-th failed attempt (1 for the first)."""
    return schedule[min(max(failures, 1), len(schedule)) - 1]


def hinted_wait(reply: str) -> float | None:
    """The wait a reply asks for, within :data:`HINT_BOUNDS`; None when it names none."""
    match = _HINT.search(reply)
    if match is None:
        return None
    seconds = int(match.group(1)) * _UNIT[match.group(2)[0].lower()]
    low, high = HINT_BOUNDS
    return min(max(float(seconds), low), high)


def judge(code: int, reply: str, failures: int, now: float, expires: float,
          schedule: Sequence[float]) -> Verdict:
    """The verdict on one recipient's attempt: ``code`` and ``reply`` are the upstream's
    answer, ``failures`` counts this attempt if it failed."""
    if 200 <= code < 300:
        return Verdict(SENT)
    if code >= 500 or code < 400:
        return Verdict(BOUNCED, PERMANENT)
    if now >= expires:
        return Verdict(BOUNCED, EXPIRED)
    wait = hinted_wait(reply)
    if wait is None:
        wait = retry_wait(failures, schedule)
    return Verdict(RETRY, next_at=min(now + wait, expires))
