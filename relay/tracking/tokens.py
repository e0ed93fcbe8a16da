"""Tracking tokens: self-contained, opaque, authenticated, never expiring.

A token is URL-safe base64 (no padding) of::

    head      1 byte    version 2 (high nibble), key id length - 1 (low nibble)
    key id    1-16 bytes (ASCII)
    siv       16 bytes  AES-SIV's synthetic IV, which is also its authentication tag
    sealed    rest      the payload, encrypted

and the payload, which nobody without the key can read::

    kind      1 byte    open, or click (and which scheme prefix was left out of the URL)
    email id  16 bytes  the UUID of ``email_<uuid>``
    rcpt len  varint    then the recipient (UTF-8)
    url       rest      clicks only (UTF-8), an opaque string to this module

The cipher is AES-SIV (RFC 5297, AES-256 in its 512-bit key form), with the head and the key id
as associated data. It is a deterministic AEAD: it needs no nonce, and its 16-byte synthetic IV
is the whole overhead, the size of the version 1 MAC, so a token is exactly as long as the
version 1 token of the same link. The price of determinism is that equal payloads give equal
tokens; a payload holds the message id and the recipient, so that tells only that two links of
one message to one recipient go to the same URL, which version 1 tokens told as well (and the
mail itself shows). The alternatives need a 12-byte nonce in every token (16 more characters):
AES-GCM-SIV survives a repeated nonce, ChaCha20-Poly1305 does not (a repeat shows the XOR of two
payloads and allows forgeries; random 96-bit nonces are safe for only about 2**32 tokens a key).
What a token still shows: its version, the key id, and its length (the recipient's and the
URL's lengths together).

Keys: the AES-SIV key is derived with HKDF-SHA256 from the key id's secret, the same secret that
signed version 1 tokens, so keys rotate as before (new tokens use the current key, old ones keep
opening while their key stays in the keyring) and there is no second secret to keep.

Version 1 tokens (readable payload, then HMAC-SHA256 truncated to 128 bits) are no longer made,
but every one already sent keeps verifying forever; see :func:`_verify_v1`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay.errors import InvalidToken
from relay.ids import email_id_from_bytes, email_id_to_bytes

VERSION = 2
SIV_SIZE = 16
MAX_TOKEN_CHARS = 8192  # far above any real URL; bounds the work done on hostile input
_HKDF_INFO = b"relay tracking token v2 AES-SIV"

_V1 = 1
_V1_MAC_SIZE = 16

_OPEN = 0
_CLICK = 1  # URL stored as is
_CLICK_HTTPS = 2  # "https://" left out
_CLICK_HTTP = 3  # "http://" left out
_PREFIXES = {_CLICK_HTTPS: "https://", _CLICK_HTTP: "http://"}

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Keyring:
    keys: Mapping[str, bytes]  # key id -> secret (>= 16 bytes)
    current: str  # the key id that seals new tokens
    # key id (ASCII bytes) -> the AES-SIV derived from its secret, built once
    ciphers: Mapping[bytes, AESSIV] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for kid, secret in self.keys.items():
            if not _KEY_ID.fullmatch(kid):
                raise ValueError(f"key id must match [A-Za-z0-9_-]{{1,16}}: {kid!r}")
            if len(secret) < 16:
                raise ValueError(f"key {kid!r} is shorter than 16 bytes")
        if self.current not in self.keys:
            raise ValueError(f"current key {self.current!r} is not in the keyring")
        ciphers = {kid.encode("ascii"): AESSIV(_derive(secret))
                   for kid, secret in self.keys.items()}
        object.__setattr__(self, "ciphers", ciphers)


def _derive(secret: bytes) -> bytes:
    """The 64-byte AES-SIV key of a keyring secret (which itself is the version 1 HMAC key)."""
    return HKDF(algorithm=SHA256(), length=64, salt=None, info=_HKDF_INFO).derive(secret)


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
    """Makes many tokens for one (email id, recipient) under the current key: the clear head,
    the payload's shared part and the cipher are looked up and packed once."""

    __slots__ = ("_ad", "_cipher", "_head", "_shared")

    def __init__(self, keyring: Keyring, email_id: str, recipient: str) -> None:
        uuid = email_id_to_bytes(email_id)
        kid = keyring.current.encode("ascii")
        rcpt = recipient.encode("utf-8")
        self._head = bytes((VERSION << 4 | len(kid) - 1,)) + kid
        self._ad = [self._head]
        self._cipher = keyring.ciphers[kid]
        self._shared = b"".join((uuid, _varint(len(rcpt)), rcpt))

    def open(self) -> str:
        return self._seal(_OPEN, b"")

    def click(self, url: str) -> str:
        kind = _CLICK
        for prefix_kind, prefix in _PREFIXES.items():
            if url.startswith(prefix):
                kind, url = prefix_kind, url[len(prefix) :]
                break
        return self._seal(kind, url.encode("utf-8"))

    def _seal(self, kind: int, url: bytes) -> str:
        sealed = self._cipher.encrypt(b"".join((bytes((kind,)), self._shared, url)), self._ad)
        return base64.urlsafe_b64encode(self._head + sealed).rstrip(b"=").decode("ascii")


def open_url(base_url: str, token: str) -> str:
    return f"{base_url}/o/{token}"


def click_url(base_url: str, token: str) -> str:
    return f"{base_url}/c/{token}"


def verify(keyring: Keyring, token: str) -> OpenTarget | ClickTarget:
    """The target a token was made for; ``InvalidToken`` for anything else, whatever the input.
    Both versions are accepted: the first byte's high nibble says which."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _TOKEN.fullmatch(token):
        raise InvalidToken("malformed token")
    data = _b64decode(token)
    version = data[0] >> 4
    if version == VERSION:
        return _open(keyring, data)
    if version == _V1:
        return _verify_v1(keyring, data)
    raise InvalidToken("malformed token")


def _open(keyring: Keyring, data: bytes) -> OpenTarget | ClickTarget:
    kid_end = 2 + (data[0] & 0x0F)
    if len(data) < kid_end + SIV_SIZE + 1 + 16 + 1:
        raise InvalidToken("malformed token")
    cipher = keyring.ciphers.get(data[1:kid_end])
    if cipher is None:
        raise InvalidToken("unknown key")
    try:
        payload = cipher.decrypt(data[kid_end:], [data[:kid_end]])
    except InvalidTag:
        raise InvalidToken("bad token") from None
    return _parse(payload, payload[0], 1)


def _verify_v1(keyring: Keyring, data: bytes) -> OpenTarget | ClickTarget:
    """A version 1 token: head (version 1, kind), key id length and key id, the payload in
    clear from the email id on, then HMAC-SHA256 of all that under the raw secret, truncated."""
    if len(data) < 2 + 1 + 16 + 1 + _V1_MAC_SIZE:
        raise InvalidToken("malformed token")
    kid_end = 2 + data[1]
    try:
        key = keyring.keys[data[2:kid_end].decode("ascii")]
    except (KeyError, UnicodeDecodeError):
        raise InvalidToken("unknown key") from None
    body, mac = data[:-_V1_MAC_SIZE], data[-_V1_MAC_SIZE:]
    if not hmac.compare_digest(hmac.digest(key, body, hashlib.sha256)[:_V1_MAC_SIZE], mac):
        raise InvalidToken("bad signature")
    return _parse(body, data[0] & 0x0F, kid_end)


def _parse(body: bytes, kind: int, pos: int) -> OpenTarget | ClickTarget:
    """Decode a payload from ``pos`` on, once it is known to be authentic."""
    if len(body) < pos + 16:
        raise InvalidToken("malformed token")
    email_id = email_id_from_bytes(body[pos : pos + 16])
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
