"""Re-signing with DKIM after the body changed (dkimpy, relaxed/relaxed)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import dkim as dkimpy

from relay.headers import Header
from relay.mime import line_ending

_TAG = re.compile(r"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)")


@dataclass(frozen=True)
class DkimSigner:
    domain: str  # the d= this key signs for
    selector: str
    private_key: bytes  # PEM (RSA) or base64 raw Ed25519, as dkimpy takes it

    def sign(self, message: bytes, include_headers: tuple[bytes, ...] | None = None) -> bytes:
        """``message`` with a new ``DKIM-Signature`` header in front. Raises on an unusable key."""
        signature = dkimpy.sign(
            message,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(include_headers) if include_headers else None,
            linesep=line_ending(message),
        )
        return signature + message


def signature_tags(raw: bytes, header: Header) -> dict[str, str]:
    """The tag=value pairs of a DKIM-Signature header (whitespace inside values removed)."""
    value = header.raw_value(raw)
    return {name: re.sub(r"\s+", "", tag_value) for name, tag_value in _TAG.findall(value.lower())}
