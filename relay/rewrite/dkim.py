"""Re-signing with DKIM after the body changed (dkimpy, relaxed/relaxed)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import dkim as dkimpy

from relay.rewrite.headers import Header, HeaderBlock
from relay.rewrite.mime import line_ending

_TAG = re.compile(r"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)")


@dataclass(frozen=True)
class DkimSigner:
    domain: str  # the d= this key signs for
    selector: str
    private_key: bytes  # an RSA key in PEM (PKCS#1 or PKCS#8): signatures are rsa-sha256

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

    def usable(self) -> bool:
        """Whether this key, domain and selector can sign: checked once at start-up, so that a
        file that is no key shows in ``relay check-config`` rather than once per message."""
        try:
            self.sign(_PROBE)
        except Exception:  # dkimpy raises several unrelated types for bad keys
            return False
        return True


_PROBE = b"From: <probe@relay.invalid>\r\nSubject: probe\r\n\r\nprobe\r\n"


def signature_tags(raw: bytes, header: Header) -> dict[str, str]:
    """The tag=value pairs of a DKIM-Signature header (whitespace inside values removed)."""
    value = header.raw_value(raw)
    return {name: re.sub(r"\s+", "", tag_value) for name, tag_value in _TAG.findall(value.lower())}


def signs_header(raw: bytes, block: HeaderBlock, name: str) -> bool:
    """Whether a DKIM-Signature of the message names header ``name`` in its ``h=`` tag, as
    signers that "oversign" do for headers absent at signing: adding one breaks it."""
    key = name.lower()
    return any(key in signature_tags(raw, header).get("h", "").split(":")
               for header in block.all("dkim-signature"))
