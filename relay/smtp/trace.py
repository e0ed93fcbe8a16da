"""The trace field the relay adds to every copy it forwards: a ``Received:`` line (RFC 5321
section 4.4), saying from which client, by which host, with which protocol and under which
id the relay took the message."""

from __future__ import annotations

import functools
import ipaddress
import re
from email.utils import formatdate

from relay.addresses import parse_ip
from relay.rewrite.headers import header_field

# An EHLO name that can stand as the From-domain: a host name (underscores and all, as
# Windows machines name themselves) or an address literal; others are shown in a comment.
_HELO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252}[A-Za-z0-9])?\.?"
                   r"|\[[A-Za-z0-9:.]{1,64}\]")
_NOT_IN_COMMENT = re.compile(r"[^!-'*-\[\]-~]")  # printable ASCII but ( ) \ and space


def protocol(*, esmtp: bool, tls: bool, authenticated: bool, utf8: bool) -> str:
    """The ``with`` keyword (RFC 3848, RFC 6531): ``SMTP`` after HELO, else ``ESMTP`` or
    ``UTF8SMTP`` (an SMTPUTF8 transaction), ``S`` for TLS, ``A`` for AUTH."""
    if not esmtp:
        return "SMTP"
    return ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if tls else "") + ("A" if authenticated else "")


class Received:
    """The ``Received:`` field of one message, worked out once; :meth:`field` gives it for
    each copy.

    ``from`` the client's EHLO name and its address as a literal (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``), ``by`` the relay's host name, ``with`` :func:`protocol`, ``id``
    the relay's email id, ``for`` the recipient when the copy has one (and it is ASCII, or
    the transaction SMTPUTF8: an 8-bit header needs it, RFC 6532), then the date.
    """

    __slots__ = ("_clauses", "_date", "_utf8")

    def __init__(self, *, helo: str, address: str, by: str, protocol: str, email_id: str,
                 when: float) -> None:
        literal = _address_literal(address)
        if _HELO.fullmatch(helo):
            origin = f"from {helo} ({literal})" if literal else f"from {helo}"
        else:
            shown = _NOT_IN_COMMENT.sub("?", helo[:64])
            origin = f"from {literal or 'unknown'}" + (f" (helo={shown})" if shown else "")
        self._clauses = (origin, f"by {by}", f"with {protocol}", f"id {email_id}")
        self._date = _date(int(when))
        self._utf8 = protocol.startswith("UTF8")

    def field(self, recipient: str | None) -> bytes:
        """The whole field for a copy to ``recipient`` (None: several), folded, with CRLF."""
        if recipient is None or not (recipient.isascii() or self._utf8):
            *head, last = self._clauses
        else:
            *head, last = (*self._clauses, f"for <{recipient}>")
        return header_field("Received", [*head, f"{last};", self._date])


@functools.lru_cache(maxsize=1)
def _date(second: int) -> str:
    return formatdate(second, localtime=True)


@functools.lru_cache(maxsize=1024)
def _address_literal(address: str) -> str:
    ip = parse_ip(address.split("%")[0])
    if ip is None:
        return ""
    if isinstance(ip, ipaddress.IPv6Address):
        return f"[IPv6:{ip.compressed}]"
    return f"[{ip}]"
