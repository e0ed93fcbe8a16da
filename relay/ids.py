"""Identifiers: the relay's message id is ``email_<uuidv7>``, an event's ``evt_<uuidv7>``
(time-ordered, RFC 9562), and tokens carry a message id as its 16 bytes."""

from __future__ import annotations

import os
import re
import time

PREFIX = "email_"
_VERSION_7 = 0x7 << 76 | 0b10 << 62  # version 7, RFC 9562 variant
_RAND_B = (1 << 62) - 1
_CANONICAL = re.compile(
    re.escape(PREFIX) + r"([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})"
)


def uuid7(ms: int | None = None, rand74: int | None = None) -> str:
    """A version 7 UUID in its canonical spelling: 48 bits of Unix milliseconds (now, unless
    given), the version, 12 random bits, the variant, 62 random bits (``rand74`` gives the 74
    random bits; from the OS, unless given)."""
    if ms is None:
        ms = int(time.time() * 1000)
    if rand74 is None:
        rand74 = int.from_bytes(os.urandom(10), "big") >> 6
    value = (ms & ((1 << 48) - 1)) << 80 | _VERSION_7 | (rand74 >> 62) << 64 | rand74 & _RAND_B
    return _spelled(f"{value:032x}")


def new_email_id() -> str:
    return PREFIX + uuid7()


def email_id_to_bytes(email_id: str) -> bytes:
    """The 16 bytes of an ``email_<uuid>`` id in canonical form (as :func:`new_email_id`
    writes it); ``ValueError`` for any other spelling, so one id has one byte form."""
    match = _CANONICAL.fullmatch(email_id)
    if match is None:
        raise ValueError(f"email id is not in canonical form: {email_id!r}")
    return bytes.fromhex("".join(match.groups()))


def email_id_from_bytes(raw: bytes) -> str:
    return PREFIX + _spelled(raw.hex())


def _spelled(h: str) -> str:
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
