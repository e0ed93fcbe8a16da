"""Tracking tokens: self-contained, signed, never expiring.

A token is URL-safe base64 (no padding) of a compact binary payload followed by its MAC::

    head      1 byte   version (high nibble) and kind (low nibble)
    kid len   1 byte   then the key id (ASCII, 1-16 bytes)
    email id  16 bytes the UUID of ``email_<uuid>``
    rcpt len  varint   then the recipient (UTF-8)
    url       rest     clicks only (UTF-8); the kind says which scheme prefix was left out
    mac       16 bytes HMAC-SHA256 over everything before it, truncated to 128 bits

The key id travels inside the signed payload, so keys rotate: new tokens are signed with the
current key and old tokens keep verifying as long as their key stays in the keyring.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from relay.errors import InvalidToken
from relay.ids import PREFIX

VERSION = 1
MAC_SIZE = 16
MAX_TOKEN_CHARS = 8192  # far above any real URL; bounds the work done on hostile input

_OPEN = 0
_CLICK = 1  # URL stored as is
_CLICK_HTTPS = 2  # "https://" left out
_CLICK_HTTP = 3  # "http://" left out
_PREFIXES = {_CLICK_HTTPS: "https://", _CLICK_HTTP: "http://"}

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_EMAIL_ID = re.compile(
    re.escape(PREFIX) + r"([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})"
)


@dataclass(frozen=True)
class Keyring:
    keys: Mapping[str, bytes]  # key id -> secret (>= 16 bytes)
    current: str  # the key id that signs new tokens

    def __post_init__(self) -> None:
        for kid, secret in self.keys.items():
            if not _KEY_ID.fullmatch(kid):
                raise ValueError(f"key id must match [A-Za-z0-9_-]{{1,16}}: {kid!r}")
            if len(secret) < 16:
                raise ValueError(f"key {kid!r} is shorter than 16 bytes")
        if self.current not in self.keys:
            raise ValueError(f"current key {self.current!r} is not in the keyring")


@dataclass(frozen=True)
class OpenTarget:
    email_id: str
    recipient: str


@dataclass(frozen=True)
class ClickTarget:
    email_id: str
    recipient: str
    url: str


def sign_open(keyring: Keyring, email_id: str, recipient: str) -> str:
    return RecipientSigner(keyring, email_id, recipient).open()


def sign_click(keyring: Keyring, email_id: str, recipient: str, url: str) -> str:
    return RecipientSigner(keyring, email_id, recipient).click(url)


class RecipientSigner:
    """Signs many tokens for one (email id, recipient): the shared payload prefix and the
    HMAC state over it are computed once, which keeps per-recipient rendering fast."""

    __slots__ = ("_head", "_state")

    def __init__(self, keyring: Keyring, email_id: str, recipient: str) -> None:
        uuid = _email_id_bytes(email_id)
        kid = keyring.current.encode("ascii")
        rcpt = recipient.encode("utf-8")
        self._head = b"".join((bytes((len(kid),)), kid, uuid, _varint(len(rcpt)), rcpt))
        self._state = hmac.new(keyring.keys[keyring.current], digestmod=hashlib.sha256)

    def open(self) -> str:
        return self._sign(_OPEN, b"")

    def click(self, url: str) -> str:
        kind = _CLICK
        for prefix_kind, prefix in _PREFIXES.items():
            if url.startswith(prefix):
                kind, url = prefix_kind, url[len(prefix) :]
                break
        return self._sign(kind, url.encode("utf-8"))

    def _sign(self, kind: int, url: bytes) -> str:
        body = b"".join((bytes((VERSION << 4 | kind,)), self._head, url))
        state = self._state.copy()
        state.update(body)
        token = body + state.digest()[:MAC_SIZE]
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")


def _email_id_bytes(email_id: str) -> bytes:
    """The 16 bytes of an ``email_<uuid>`` id in canonical form (as ``new_email_id`` writes it)."""
    match = _EMAIL_ID.fullmatch(email_id)
    if match is None:
        raise ValueError(f"email id is not in canonical form: {email_id!r}")
    return bytes.fromhex("".join(match.groups()))


def open_url(base_url: str, token: str) -> str:
    return f"{base_url}/o/{token}"


def click_url(base_url: str, token: str) -> str:
    return f"{base_url}/c/{token}"


def verify(keyring: Keyring, token: str) -> OpenTarget | ClickTarget:
    """The target a token was signed for; ``InvalidToken`` for anything else, whatever the input."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _TOKEN.fullmatch(token):
        raise InvalidToken("malformed token")
    data = _b64decode(token)
    if len(data) < 2 + 1 + 16 + 1 + MAC_SIZE or data[0] >> 4 != VERSION:
        raise InvalidToken("malformed token")
    kid_end = 2 + data[1]
    try:
        key = keyring.keys[data[2:kid_end].decode("ascii")]
    except (KeyError, UnicodeDecodeError):
        raise InvalidToken("unknown key") from None
    body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not hmac.compare_digest(_mac(key, body), mac):
        raise InvalidToken("bad signature")
    return _parse(body, data[0] & 0x0F, kid_end)


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, body, "sha256")[:MAC_SIZE]


def _parse(body: bytes, kind: int, pos: int) -> OpenTarget | ClickTarget:
    """Decode a payload whose MAC already verified (so it was made by ``_sign``)."""
    if len(body) < pos + 16:
        raise InvalidToken("malformed token")
    email_id = _email_id(body[pos : pos + 16])
    rcpt_len, pos = _read_varint(body, pos + 16)
    rcpt_end = pos + rcpt_len
    if rcpt_end > len(body):
        raise InvalidToken("malformed token")
    try:
        recipient = body[pos:rcpt_end].decode("utf-8")
        url = body[rcpt_end:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidToken("malformed token") from None
    if kind == _OPEN and not url:
        return OpenTarget(email_id, recipient)
    if kind == _CLICK or kind in _PREFIXES:
        return ClickTarget(email_id, recipient, _PREFIXES.get(kind, "") + url)
    raise InvalidToken("malformed token")


def _email_id(raw: bytes) -> str:
    """``email_id_from_bytes`` without building a UUID object (same canonical spelling)."""
    h = raw.hex()
    return f"{PREFIX}{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# Canonical spelling: the bits of the last character beyond the data must be zero. By the
# token's length mod 4: 2 characters carry 1 byte (4 spare bits), 3 carry 2 (2 spare bits).
_SPARE_BITS = {0: 0, 2: 0x0F, 3: 0x03}
_SEXTET = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}


def _b64decode(token: str) -> bytes:
    """Strict: only the canonical spelling of a byte string decodes (no stray low bits).
    ``token`` already matched :data:`_TOKEN` (the URL-safe alphabet only)."""
    spare = _SPARE_BITS.get(len(token) % 4)
    if spare is None or _SEXTET[token[-1]] & spare:
        raise InvalidToken("malformed token")
    try:
        return binascii.a2b_base64(
            token.encode("ascii").translate(_TO_STANDARD) + b"=" * (-len(token) % 4))
    except binascii.Error:
        raise InvalidToken("malformed token") from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Read a canonical LEB128 varint (at most 3 bytes, no redundant trailing zero group)."""
    value = shift = 0
    for i in range(pos, min(pos + 3, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > pos:
                break
            return value, i + 1
        shift += 7
    raise InvalidToken("malformed token")
