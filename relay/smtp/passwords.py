"""Password hashes for SMTP AUTH users: scrypt from the standard library, in one string
``scrypt$n$r$p$salt$hash`` (base64), so the config never holds a clear-text password."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass, field

_N, _R, _P = 2**14, 8, 1
_MAX_MEM = 32 * 1024 * 1024  # the most memory one check may use (OpenSSL's default limit)


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes = field(repr=False)


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAX_MEM,
                            dklen=32)
    return "$".join(["scrypt", str(_N), str(_R), str(_P), _b64(salt), _b64(digest)])


def parse_hash(encoded: str) -> ScryptHash:
    """The parts of a hash from ``hash_password``; ValueError saying what is wrong (never
    quoting the hash) when it is malformed or could never verify."""
    fields = encoded.split("$")
    if len(fields) != 6 or fields[0] != "scrypt":
        raise ValueError("expected scrypt$N$R$P$SALT$HASH")
    try:
        n, r, p = (int(x) for x in fields[1:4])
    except ValueError:
        raise ValueError("N, R and P must be whole numbers") from None
    try:
        salt, digest = (base64.b64decode(x, validate=True) for x in fields[4:])
    except ValueError:
        raise ValueError("SALT and HASH must be base64") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        raise ValueError("N must be a power of 2 above 1, R and P at least 1")
    if not digest:
        raise ValueError("HASH is empty")
    if 128 * r * (n + p + 2) > _MAX_MEM:  # what OpenSSL's scrypt needs for these N, R and P
        raise ValueError(f"N and R need more than the {_MAX_MEM >> 20} MiB scrypt may use")
    return ScryptHash(n, r, p, salt, digest)


def verify_password(password: str, encoded: str) -> bool:
    try:
        h = parse_hash(encoded)
        actual = hashlib.scrypt(password.encode(), salt=h.salt, n=h.n, r=h.r, p=h.p,
                                maxmem=_MAX_MEM, dklen=len(h.digest))
    except ValueError:
        return False
    return hmac.compare_digest(actual, h.digest)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
