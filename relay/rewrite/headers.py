"""The header block of a raw message as byte ranges, so headers can be read and removed
without re-serializing anything else."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.header import decode_header, make_header
from typing import NamedTuple

_FOLD = re.compile(r"\r?\n[ \t]")
FOLD_AT = 78  # where a header line is folded if its words allow (RFC 5322 2.1.1)
# A byte that is not UTF-8, kept by surrogateescape (as Header values and aiosmtpd's command
# arguments keep them), or a lone surrogate a UTF-7 word decodes to
NOT_UTF8 = re.compile("[\ud800-\udfff]")


class Header(NamedTuple):
    name: str
    start: int  # offset of the header's first byte in the message
    end: int  # offset just past its last line ending (continuations included)
    colon: int  # offset of the ':' after the name
    key: str  # the name in lower case

    def raw_value(self, raw: bytes) -> str:
        """The value, unfolded, undecoded (RFC 2047 words left as they are)."""
        text = raw[self.colon + 1 : self.end].decode("utf-8", "surrogateescape")
        if 0 <= text.find("\n") < len(text) - 1:  # a line break before the last: folded
            text = _FOLD.sub(" ", text)
        return text.strip()

    def value(self, raw: bytes) -> str:
        """The value as text: unfolded, RFC 2047 encoded words decoded, and each byte that is
        not UTF-8 (a raw Latin-1 header, say) as U+FFFD, not a lone surrogate, which SQLite
        refuses."""
        text = _decode_words(self.raw_value(raw))
        return text if text.isascii() else NOT_UTF8.sub("\N{REPLACEMENT CHARACTER}", text)


def _decode_words(text: str) -> str:
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


# As NamedTuple._make does, without the generated __new__, which is Python code: every
# message has a dozen headers or more.
_new_header = functools.partial(tuple.__new__, Header)


@dataclass(frozen=True, slots=True)
class HeaderBlock:
    headers: tuple[Header, ...]
    body_start: int  # offset of the first body byte (after the blank line)

    def get(self, name: str) -> Header | None:
        key = name.lower()
        for header in self.headers:
            if header.key == key:
                return header
        return None

    def all(self, name: str) -> list[Header]:
        key = name.lower()
        return [h for h in self.headers if h.key == key]

    def without(self, doomed: Iterable[Header]) -> HeaderBlock:
        """This block as it reads in the message :func:`remove_headers` makes of it and
        ``doomed``: the other headers moved back by the bytes cut before them."""
        gone = set(doomed)
        if not gone:
            return self
        kept: list[Header] = []
        cut = 0
        for header in self.headers:
            if header in gone:
                cut += header.end - header.start
            else:
                kept.append(header._replace(start=header.start - cut, end=header.end - cut,
                                            colon=header.colon - cut))
        return HeaderBlock(tuple(kept), self.body_start - cut)


def parse_header_block(raw: bytes, start: int = 0) -> HeaderBlock:
    """Split the header block that begins at ``start``.

    Lines that are neither a ``name:`` header nor a continuation end the block, as the first
    blank line does; malformed input never raises.
    """
    headers: list[Header] = []
    pos = start
    while match := _HEADER.match(raw, pos):
        name = match[1].decode("ascii")
        end = match.end()
        headers.append(_new_header((name, pos, end, match.end(2) - 1, name.lower())))
        pos = end
    if raw.startswith(b"\r\n", pos):
        pos += 2
    elif raw.startswith(b"\n", pos):
        pos += 1
    return HeaderBlock(tuple(headers), pos)


# A header: printable ASCII but ':' for the name (RFC 5322 2.2), blanks before the colon
# allowed (obs-optional, 4.5.3: receiving servers take ``Name :`` as a header too), then its
# continuation lines.
_HEADER = re.compile(rb"([!-9;-~]++)([ \t]*+:)[^\n]*+(?:\n[ \t][^\n]*+)*+\n?")


def remove_headers(raw: bytes, doomed: Iterable[Header]) -> bytes:
    """``raw`` with the given headers' bytes cut out and every other byte kept."""
    spans = sorted((h.start, h.end) for h in doomed)
    if not spans:
        return raw
    pieces = []
    pos = 0
    for start, end in spans:
        pieces.append(raw[pos:start])
        pos = end
    pieces.append(raw[pos:])
    return b"".join(pieces)


def insert_field(raw: bytes, block: HeaderBlock, field: bytes, at: int
                 ) -> tuple[bytes, HeaderBlock]:
    """:func:`prepend_headers` of one whole ``field`` at ``at`` (a header's start, or the end
    of the block's headers), and ``block``, the header block of ``raw``, as it reads then."""
    out = prepend_headers(raw, [field], at)
    if raw[at : at + 1] in (b" ", b"\t") or raw[at - 1 : at] not in (b"", b"\n"):
        # a line after it taken as its continuation, or the line before it without a line
        # ending (the end of a message that is all headers): the field is not a line of its own
        return out, parse_header_block(out)
    match = _HEADER.match(field)
    assert match is not None and match.end() == len(field), "one whole header field"
    name = match[1].decode("ascii")
    added = _new_header((name, at, at + len(field), at + match.end(2) - 1, name.lower()))
    size = len(field)
    headers = [h if h.start < at else h._replace(start=h.start + size, end=h.end + size,
                                                 colon=h.colon + size)
               for h in block.headers]
    headers.insert(sum(h.start < at for h in block.headers), added)
    return out, HeaderBlock(tuple(headers), block.body_start + size)


def header_field(name: str, chunks: Sequence[str]) -> bytes:
    """A whole ``Name: value`` field ending in CRLF, the value ``chunks`` joined by spaces and
    folded between two of them (RFC 5322 2.2.3) where the line would pass ``FOLD_AT``
    characters; a chunk is never split."""
    lines = [f"{name}:"]
    for chunk in chunks:
        if len(lines[-1]) + 1 + len(chunk) > FOLD_AT and len(lines[-1]) > len(name) + 1:
            lines.append(f" {chunk}")
        else:
            lines[-1] += f" {chunk}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def prepend_headers(raw: bytes, fields: Iterable[bytes], at: int = 0) -> bytes:
    """``raw`` (CRLF line endings) with whole header fields (from :func:`header_field`) in
    front of its first header (or of the header at offset ``at``: below a trace block, say),
    in the order given; every byte of ``raw`` is kept, and so is
    any DKIM signature over it (a verifier takes the last instance of a signed header name,
    so a field added on top is never one it signed). A message whose first line starts with
    a space or tab (no header before it to continue) gets it read as part of the last field
    added, as in every mail server that adds a Received line."""
    return b"".join((raw[:at], *fields, raw[at:]))
