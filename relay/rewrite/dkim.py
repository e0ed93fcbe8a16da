"""Re-signing with DKIM after the body changed (dkimpy, relaxed/relaxed).

The signature is dkimpy's, byte for byte, but the body hash is computed here: dkimpy
canonicalizes a body with regular expressions over all of it at once, and the interpreter
lock is held for each of those calls: about 1.5 s for a 15 MB copy of a newsletter, during
which no other thread ran, the event loop's included (bench/fanout_bench.py --dkim). Here the
body is canonicalized a piece of whole lines at a time, and SHA-256 releases the lock while it
hashes each piece.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass

import dkim as dkimpy
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from relay.rewrite.headers import Header, HeaderBlock
from relay.rewrite.mime import line_ending

_TAG = re.compile(r"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)")
# Where dkimpy's parser ends the header: at the first empty line, CRLF or LF.
_EMPTY_LINE = re.compile(rb"\A\r?\n|\n\r?\n")
# RFC 6376 3.4.4, in dkimpy's order: line endings made CRLF, WSP dropped at line ends, runs of
# WSP made one space.
_BARE_LF = re.compile(rb"(?<!\r)\n")
_WSP_AT_END = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")
# How much of the body is canonicalized in one call (whole lines; a longer line is one piece).
BODY_PIECE = 64 * 1024
_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


@dataclass(frozen=True)
class DkimSigner:
    domain: str  # the d= this key signs for
    selector: str
    private_key: bytes  # an RSA key in PEM (PKCS#1 or PKCS#8): signatures are rsa-sha256

    def sign(self, message: bytes, include_headers: tuple[bytes, ...] | None = None) -> bytes:
        """``message`` with a new ``DKIM-Signature`` header in front. Raises on an unusable key."""
        match = _EMPTY_LINE.search(message)
        header = message if match is None else message[:match.start() + (match.start() > 0)]
        body_hash = relaxed_body_hash(message, len(message) if match is None else match.end())
        signer = _Signer(header, linesep=line_ending(message))
        signature = signer.sign_with_body_hash(
            self.selector.encode("ascii"), self.domain.encode("ascii"), self.private_key,
            body_hash, include_headers)
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


class _Signer(dkimpy.DKIM):
    """dkimpy's ``DKIM.sign`` for rsa-sha256 and relaxed/relaxed (no ``i=``, no ``l=``), given
    the body hash rather than the body; the header is hashed and signed by dkimpy itself.
    tests/rewrite/test_dkim.py holds it to dkimpy's output, byte for byte."""

    def sign_with_body_hash(self, selector: bytes, domain: bytes, private_key: bytes,
                            body_hash: bytes, include_headers: tuple[bytes, ...] | None
                            ) -> bytes:
        try:
            key = parse_pem_private_key(private_key)
        except UnparsableKeyError as exc:
            raise dkimpy.KeyFormatError(str(exc)) from exc
        names = tuple(name.lower() for name in (include_headers or self.default_sign_headers()))
        self.include_headers = names
        if b"from" not in names:
            raise dkimpy.ParameterError("The From header field MUST be signed")
        for name in set(names) & self.should_not_sign:
            raise dkimpy.ParameterError(f"The {name!r} header field SHOULD NOT be signed")
        self.hasher = hashlib.sha256
        fields = [
            (b"v", b"1"),
            (b"a", b"rsa-sha256"),
            (b"c", _RELAXED.to_c_value()),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", selector),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(names)),
            (b"bh", body_hash),
            (b"b", b"0" * 60),  # as dkimpy: b= folds onto a line of its own
        ]
        value = self.gen_header(fields, names, _RELAXED, b"DKIM-Signature", key)
        self.domain, self.selector, self.signature_fields = domain, selector, dict(fields)
        return b"DKIM-Signature: " + value


def relaxed_body_hash(message: bytes, start: int, piece: int = BODY_PIECE) -> bytes:
    """The ``bh=`` of ``message[start:]`` (its body) in relaxed canonicalization (RFC 6376
    3.4.4) as dkimpy computes it: line endings made CRLF first, then trailing whitespace of
    each line dropped, runs of whitespace made one space, empty lines at the end dropped, and
    a body that does not end with a line ending given one."""
    digest = hashlib.sha256()
    held = 0  # empty lines last seen: written if a line with content follows
    pos, end = start, len(message)
    while pos < end:
        cut = message.rfind(b"\n", pos, pos + piece) + 1
        if cut <= pos:  # a line longer than a piece
            cut = message.find(b"\n", pos + piece) + 1 or end
        text = _WSP.sub(b" ", _WSP_AT_END.sub(b"\r\n", _BARE_LF.sub(b"\r\n", message[pos:cut])))
        pos = cut
        if not text.endswith(b"\r\n"):  # the last line, without a line ending
            digest.update(b"\r\n" * held + text + b"\r\n")
            break
        content = len(text) - 2
        while content >= 2 and text[content - 2 : content] == b"\r\n":
            content -= 2
        if content == 0:
            held += len(text) // 2
            continue
        digest.update(b"\r\n" * held)
        digest.update(memoryview(text)[: content + 2])
        held = (len(text) - content) // 2 - 1
    return base64.b64encode(digest.digest())


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
