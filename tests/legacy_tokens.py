"""Version 1 tokens, made the way relay/tracking/tokens.py made them until version 2 (commit
30ac472): the relay makes none any more but must verify every one already sent, forever.

``FIXED`` are tokens that code made (key ``k1`` = ``b"a" * 32``, ``g1`` = ``bytes(range(32))``,
email id :data:`EMAIL`); ``sign_v1`` reproduces them, so tests can make more.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from relay.tracking.tokens import Keyring

EMAIL = "email_01890a5d-ac96-774b-bcce-b302099a8057"
KEYS = Keyring({"k1": b"a" * 32, "g1": bytes(range(32))}, "k1")

# (key id, recipient, URL or None for the pixel, token)
FIXED = [
    ("k1", "reader@example.org", None,
     "EAJrMQGJCl2slndLvM6zAgmagFcScmVhZGVyQGV4YW1wbGUub3Jna0yIk9Ki7oM1WuZoRjIJUQ"),
    ("k1", "reader@example.org", "https://shop.example/sale?id=7&utm=mail",
     "EgJrMQGJCl2slndLvM6zAgmagFcScmVhZGVyQGV4YW1wbGUub3Jnc2hvcC5leGFtcGxlL3NhbGU_aWQ9NyZ1dG09bW"
     "FpbHG2QRY-APnIpH0vKlIpv1w"),
    ("k1", "reader@example.org", "http://shop.example/",
     "EwJrMQGJCl2slndLvM6zAgmagFcScmVhZGVyQGV4YW1wbGUub3Jnc2hvcC5leGFtcGxlL3_KdEdnhv1wZc37aZNMFoU"),
    ("g1", "Jörg.Müller@bücher.example", "https://shop.example/größe-42?q=鞋",
     "EgJnMQGJCl2slndLvM6zAgmagFcdSsO2cmcuTcO8bGxlckBiw7xjaGVyLmV4YW1wbGVzaG9wLmV4YW1wbGUvZ3LDts"
     "OfZS00Mj9xPemei1J9H0Nlh0K2xr9o6TJtUHY"),
    ("g1", "r@x", "mailto:x@y",
     "EQJnMQGJCl2slndLvM6zAgmagFcDckB4bWFpbHRvOnhAeSOR9ZG9QCA5FNP2vJFIpNo"),
    ("g1", "", None, "EAJnMQGJCl2slndLvM6zAgmagFcAlHM0uPbIImBjahrxXck-Hw"),
    ("k1", "reader@example.org", "https://www.example.com/" + "p" * 200,
     "EgJrMQGJCl2slndLvM6zAgmagFcScmVhZGVyQGV4YW1wbGUub3Jnd3d3LmV4YW1wbGUuY29tL3BwcHBwcHBwcHBwcH"
     "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBw"
     "cHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH"
     "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBw3MI122zXjG48_aNFStLaXA"),
]


def sign_v1(keyring: Keyring, email_id: str, recipient: str, url: str | None = None) -> str:
    """A version 1 token under the keyring's current key: the pixel's, or a click's."""
    kid = keyring.current.encode("ascii")
    kind, rest = 0, ""
    if url is not None:
        kind, rest = 1, url
        for prefix_kind, prefix in ((2, "https://"), (3, "http://")):
            if url.startswith(prefix):
                kind, rest = prefix_kind, url[len(prefix):]
                break
    uuid = bytes.fromhex(email_id.removeprefix("email_").replace("-", ""))
    rcpt = recipient.encode("utf-8")
    body = b"".join((bytes((0x10 | kind, len(kid))), kid, uuid, _varint(len(rcpt)), rcpt,
                     rest.encode("utf-8")))
    mac = hmac.digest(keyring.keys[keyring.current], body, hashlib.sha256)[:16]
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
