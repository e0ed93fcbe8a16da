"""Identifiers: the relay's message id is ``email_<uuidv7>`` (time-ordered, RFC 9562)."""

from __future__ import annotations

import os
import time
import uuid

PREFIX = "email_"


def uuid7(now_ms: int | None = None) -> uuid.UUID:
    """A version 7 UUID: 48 bits of Unix milliseconds, then 74 random bits."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def new_email_id() -> str:
    return PREFIX + str(uuid7())


def email_id_to_bytes(email_id: str) -> bytes:
    """The 16 bytes of an ``email_<uuid>`` id, for compact tokens."""
    if not email_id.startswith(PREFIX):
        raise ValueError(f"not an email id: {email_id!r}")
    return uuid.UUID(email_id[len(PREFIX):]).bytes


def email_id_from_bytes(raw: bytes) -> str:
    return PREFIX + str(uuid.UUID(bytes=raw))
