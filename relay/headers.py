"""The header block of a raw message as byte ranges, so headers can be read and removed
without re-serializing anything else."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.header import decode_header, make_header

_LINE = re.compile(rb"[^\n]*\n|[^\n]+\Z")
_FOLD = re.compile(r"\r?\n[ \t]")


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    start: int  # offset of the header's first byte in the message
    end: int  # offset just past its last line ending (continuations included)
    colon: int  # offset of the ':' after the name

    @property
    def key(self) -> str:
        return self.name.lower()

    def raw_value(self, raw: bytes) -> str:
        """The value, unfolded, undecoded (RFC 2047 words left as they are)."""
        text = raw[self.colon + 1 : self.end].decode("utf-8", "surrogateescape")
        return _FOLD.sub(" ", text).strip()

    def value(self, raw: bytes) -> str:
        """The value, unfolded, with RFC 2047 encoded words decoded."""
        text = self.raw_value(raw)
        if "=?" not in text:
            return text
        try:
            return str(make_header(decode_header(text)))
        except (ValueError, LookupError, UnicodeError):
            return text


@dataclass(frozen=True, slots=True)
class HeaderBlock:
    headers: tuple[Header, ...]
    body_start: int  # offset of the first body byte (after the blank line)

    def get(self, name: str) -> Header | None:
        key = name.lower()
        return next((h for h in self.headers if h.key == key), None)

    def all(self, name: str) -> list[Header]:
        key = name.lower()
        return [h for h in self.headers if h.key == key]


def parse_header_block(raw: bytes, start: int = 0) -> HeaderBlock:
    """Split the header block that begins at ``start``.

    Lines that are neither a ``name:`` header nor a continuation end the block, as the first
    blank line does; malformed input never raises.
    """
    headers: list[Header] = []
    current: list[int] | None = None  # [start, colon, end] of the header being read
    name = ""
    pos = start
    for match in _LINE.finditer(raw, start):
        line = match.group()
        if line in (b"\r\n", b"\n"):
            pos = match.end()
            break
        if line[:1] in (b" ", b"\t") and current is not None:
            current[2] = match.end()
            pos = match.end()
            continue
        colon = line.find(b":")
        if colon <= 0 or not _is_field_name(line[:colon]):
            break
        if current is not None:
            headers.append(Header(name, current[0], current[2], current[1]))
        name = line[:colon].decode("ascii")
        current = [match.start(), match.start() + colon, match.end()]
        pos = match.end()
    else:
        pos = len(raw)
    if current is not None:
        headers.append(Header(name, current[0], current[2], current[1]))
    return HeaderBlock(tuple(headers), pos)


_FIELD_NAME = re.compile(rb"[!-9;-~]+")  # printable ASCII but ':' (RFC 5322 2.2)


def _is_field_name(name: bytes) -> bool:
    return _FIELD_NAME.fullmatch(name) is not None


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
