"""Links as browsers read them: which ``href`` values are http(s) URLs a click would follow, and
the ASCII form the redirect sends the browser to. Pure: no I/O.

A link is read with the WHATWG URL parser (the one in Chromium, Firefox and Safari) restricted
to ``http`` and ``https``: tabs and newlines are dropped, a backslash is a slash, the host goes
through IDNA (UTS 46, non-transitional: ``faß.de`` stays ``xn--fa-hia.de``), ``0x7f.1`` is the
IPv4 address it spells, dot segments are resolved, and everything else is UTF-8
percent-encoded with the WHATWG percent-encode sets. :attr:`Url.href` is that serialization:
printable ASCII, the exact URL a browser requests for a direct click on the link (in a UTF-8
document: the rewritten HTML is always UTF-8). Only what the browser itself encodes is encoded:
the query keeps ``|``, ``[``, ``]`` and ``{}`` as written, as the URL standard says and
Chromium does (measured: a ``%7C`` there is a different request target than a direct
click's). Sent as the redirect's ``Location``, the browser parses it into the same URL again
(serializing is idempotent), so it lands where a direct click would have.

What cannot be followed from any page is left alone, each with a :class:`Refusal` saying why:
no ``//`` after the scheme (``https:x`` is relative to the page in some clients), no host, a
bad port, a host a browser refuses (forbidden characters, an IPv4 number out of range, a
label IDNA rejects), a scheme other than http(s), a template placeholder, a URL longer than
:data:`MAX_URL_BYTES`.

Host names are mapped with the ``idna`` package's UTS 46 table, which is the Unicode version
it ships; a code point newer than that table is refused as malformed rather than tracked.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

# Why a link was left alone (Refusal.code); rewrite.py adds the reasons that are not the URL's.
EMPTY = "empty"
FRAGMENT = "fragment"
RELATIVE = "relative"
NOT_HTTP = "not_http"
PLACEHOLDER = "placeholder"
MALFORMED = "malformed"
TOO_LONG = "too_long"

# A longer URL would make a click link past what the tracker verifies (tokens.MAX_TOKEN_CHARS)
# and what HTTP servers take in a request line (8 KB).
MAX_URL_BYTES = 4096
TEMPLATE_MARKERS = ("{{", "}}", "{%", "%}", "*|", "|*")
DEFAULT_PORTS = {"http": 80, "https": 443}

C0_OR_SPACE = "".join(map(chr, range(0x21)))  # what browsers strip from both ends of a URL
_TAB_OR_NEWLINE = str.maketrans("", "", "\t\n\r")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_TEMPLATE = re.compile("|".join(re.escape(marker) for marker in TEMPLATE_MARKERS))
_SURROGATE = re.compile("[\ud800-\udfff]")
_AUTHORITY_END = re.compile(r"[/\\?#]")
_SLASHES = re.compile(r"[/\\]")
_PERCENT_BYTE = re.compile(rb"%([0-9A-Fa-f]{2})")
_FORBIDDEN_DOMAIN = re.compile(r"[\x00-\x20#/:<>?@\[\\\]^|%\x7f]")
_DECIMAL = re.compile("[0-9]+")
_OCTAL = re.compile("[0-7]+")
_HEX = re.compile("[0-9A-Fa-f]+")
_DOUBLE_DOT = {"..", ".%2e", "%2e.", "%2e%2e"}
_SINGLE_DOT = {".", "%2e"}
# The usual link: ASCII letters, digits and the characters no percent-encode set holds, no
# dot segment, a host that cannot be an IPv4 number. Its serialization is itself with the
# scheme and host lower-cased and "/" for an empty path (checked against the parser in tests).
_PLAIN = re.compile(
    r"(https?)://((?:(?!xn--)[a-z0-9-]+\.)*(?!xn--)[a-z-][a-z0-9-]*)(?::([0-9]{1,4}))?"
    r"((?:/(?!(?:\.|%2e){1,2}(?:[/?#]|\Z))[A-Za-z0-9\-._~!$&'()*+,;=:@%|\[\]]*)*)"
    r"(\?[A-Za-z0-9\-._~!$&()*+,;=:@%/?\[\]|{}^\\`]*)?(#[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*)?",
    re.IGNORECASE | re.ASCII,  # without ASCII, [a-z] would match the Kelvin sign
)


def _encode_set(characters: str) -> frozenset[int]:
    """A percent-encode set: C0 controls, DEL and the given ASCII characters (every non-ASCII
    code point is encoded as well)."""
    return frozenset([*range(0x20), 0x7F, *map(ord, characters)])


_FRAGMENT_SET = _encode_set(' "<>`')
_QUERY_SET = _encode_set(" \"#<>'")  # the special-query set (http and https)
_PATH_SET = _encode_set(' "#<>?^`{}')
_USERINFO_SET = _encode_set(' "#<>?^`{}/:;=@[\\]|')


@dataclass(frozen=True, slots=True)
class Url:
    href: str  # the ASCII serialization: where a browser goes for this link
    host: str  # as serialized: a lower-case ASCII name (IDNA), dotted IPv4 or [IPv6]


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str  # one of the constants above
    detail: str  # for people: what exactly is wrong

    def __str__(self) -> str:
        return self.detail


def judge(value: str) -> Url | Refusal:
    """An ``href`` value (entity references already decoded): the URL a click on it opens,
    or why it is not tracked."""
    value = value.strip(C0_OR_SPACE)
    if not value:
        return Refusal(EMPTY, "empty href")
    if _TEMPLATE.search(value):
        return Refusal(PLACEHOLDER, "template placeholder")
    if value.startswith("#"):
        return Refusal(FRAGMENT, "fragment link")
    url = parse(value)
    if isinstance(url, Url) and len(value.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES:
        return Refusal(TOO_LONG, f"URL too long to track (over {MAX_URL_BYTES} bytes)")
    return url


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> Url | Refusal:
    """``text`` read as an absolute http(s) URL, the way browsers read it."""
    text = text.strip(C0_OR_SPACE)
    plain = _PLAIN.fullmatch(text)
    if plain is not None and (plain[3] is None or plain[3][0] != "0"):
        scheme, host, port, path = plain[1].lower(), plain[2].lower(), plain[3], plain[4]
        if port is not None and int(port) == DEFAULT_PORTS[scheme]:
            port = None
        rest = text[plain.end(4):]
        authority = f"{host}:{port}" if port is not None else host
        return Url(f"{scheme}://{authority}{path or '/'}{rest}", host)
    return _parse(text)


def location(url: str) -> str | None:
    """Where the redirect for a click token's URL sends the browser; ``None`` when it is no
    http(s) URL a browser would follow (tokens signed before the rewrite judged links this way
    may hold one)."""
    parsed = parse(url)
    return parsed.href if isinstance(parsed, Url) else None


def redacted(href: str) -> str:
    """``href`` as logged and recorded: scheme, host, port and path, without the userinfo
    (``user:password@``), the query and the fragment, which may hold passwords and tokens.
    The authority is found as :func:`parse` finds it (after the scheme and any slashes for
    http(s), after ``//`` otherwise); a link without one (``mailto:``, a relative path) keeps
    its text up to the query."""
    text = href.strip(C0_OR_SPACE).translate(_TAB_OR_NEWLINE)
    scheme_match = _SCHEME.match(text)
    head = scheme_match[0] if scheme_match else ""
    rest = text[len(head):]
    after_slashes = rest.lstrip("/\\")
    slashes = rest[:len(rest) - len(after_slashes)]
    special = scheme_match is not None and scheme_match[1].lower() in DEFAULT_PORTS
    if special or len(slashes) >= 2:
        end = _AUTHORITY_END.search(after_slashes)
        authority, tail = ((after_slashes[:end.start()], after_slashes[end.start():]) if end
                           else (after_slashes, ""))
        rest = slashes + authority.rpartition("@")[2] + tail
    return head + re.split(r"[?#]", rest, maxsplit=1)[0]


def _parse(text: str) -> Url | Refusal:
    text = text.translate(_TAB_OR_NEWLINE)
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    scheme_match = _SCHEME.match(text)
    if scheme_match is None:
        return Refusal(RELATIVE, "relative link")
    scheme = scheme_match[1].lower()
    if scheme not in DEFAULT_PORTS:
        return Refusal(NOT_HTTP, f"{scheme}: link")
    rest = text[scheme_match.end():]
    # Two slashes (either way round) make the authority independent of the page's own URL;
    # "https:x" or "https:/x" is read relative to it by a browser showing the mail on https.
    if not (rest[:1] in ("/", "\\") and rest[1:2] in ("/", "\\")):
        return Refusal(MALFORMED, f"no // after {scheme}:")
    rest = rest.lstrip("/\\")
    end = _AUTHORITY_END.search(rest)
    authority, tail = (rest[:end.start()], rest[end.start():]) if end else (rest, "")
    userinfo, at, hostport = authority.rpartition("@")
    credentials = _credentials(userinfo) if at else ""
    if hostport.startswith("["):
        close = hostport.find("]")
        host_text, after = hostport[:close + 1], hostport[close + 1:] if close >= 0 else ""
        if close < 0 or (after and not after.startswith(":")):
            return Refusal(MALFORMED, "bad IPv6 address")
        port_text = after[1:] if after else None
    else:
        host_text, colon, port_text_raw = hostport.partition(":")
        port_text = port_text_raw if colon else None
    if not host_text:
        return Refusal(MALFORMED, "no host")
    host = _host(host_text)
    if isinstance(host, Refusal):
        return host
    port = ""
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            return Refusal(MALFORMED, f"bad port {port_text[:20]!r}")
        if int(port_text) != DEFAULT_PORTS[scheme]:
            port = f":{int(port_text)}"
    tail, hash_, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    href = f"{scheme}://{credentials}{host}{port}{_path(path)}"
    if question:
        href += "?" + _percent_encode(query, _QUERY_SET)
    if hash_:
        href += "#" + _percent_encode(fragment, _FRAGMENT_SET)
    return Url(href, host)


def _credentials(userinfo: str) -> str:
    username, colon, password = userinfo.partition(":")
    if not username and not password:
        return ""
    text = _percent_encode(username, _USERINFO_SET)
    if password:
        text += ":" + _percent_encode(password, _USERINFO_SET)
    return text + "@"


def _path(path: str) -> str:
    """The path of a special URL: segments split at ``/`` and ``\\``, dot segments resolved."""
    segments: list[str] = []
    parts = _SLASHES.split(path)[1:] if path else [""]
    last = len(parts) - 1
    for index, part in enumerate(parts):
        segment = _percent_encode(part, _PATH_SET)
        folded = segment.lower()
        if folded in _DOUBLE_DOT:
            if segments:
                segments.pop()
            if index == last:
                segments.append("")
        elif folded in _SINGLE_DOT:
            if index == last:
                segments.append("")
        else:
            segments.append(segment)
    return "".join("/" + segment for segment in segments) or "/"


def _percent_encode(text: str, encode_set: frozenset[int]) -> str:
    if text.isascii() and not any(ord(char) in encode_set for char in text):
        return text
    return "".join(
        f"%{byte:02X}" if byte in encode_set or byte > 0x7E else chr(byte)
        for byte in text.encode("utf-8")
    )


def _host(text: str) -> str | Refusal:
    if text.startswith("["):
        return _ipv6(text[1:-1])
    if "%" in text:
        decoded = _PERCENT_BYTE.sub(lambda m: bytes.fromhex(m[1].decode()), text.encode())
        text = decoded.decode("utf-8", "replace")
    domain = _domain_to_ascii(text)
    if isinstance(domain, Refusal):
        return domain
    if _FORBIDDEN_DOMAIN.search(domain):
        return Refusal(MALFORMED, f"forbidden character in host {domain[:80]!r}")
    if _ends_in_number(domain):
        return _ipv4(domain)
    return domain


def _domain_to_ascii(domain: str) -> str | Refusal:
    """UTS 46 ToASCII as the URL standard runs it (non-transitional, no STD3 rules, no DNS
    length checks); an ASCII name without ``xn--`` labels is only lower-cased."""
    if domain.isascii():
        lowered = domain.lower()
        if "xn--" not in lowered:
            return lowered
    try:
        mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False)
        labels = [_label_to_ascii(label) for label in mapped.split(".")]
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        return Refusal(MALFORMED, f"host {domain[:80]!r} is not a valid name: {exc}")
    ascii_domain = ".".join(labels)
    return ascii_domain or Refusal(MALFORMED, "no host")


def _label_to_ascii(label: str) -> str:
    """Punycode for a label UTS 46 mapped (and found no disallowed code point in); a label
    already in punycode must decode to one that mapping leaves as it is, and a label marked
    ``xn--`` must be ASCII. The bidi and joiner rules are not checked: a host that breaks them
    fails in the browser after the redirect exactly as on a direct click."""
    if label.isascii():
        if label.startswith("xn--"):
            decoded = label[4:].encode("ascii").decode("punycode")
            if idna.uts46_remap(decoded, std3_rules=False, transitional=False) != decoded:
                raise ValueError(f"{label} does not decode to a valid label")
        return label
    if label.startswith("xn--"):  # UTS 46 (and so the URL standard): an error, not xn--xn--
        raise ValueError(f"{label} is marked as punycode but is not ASCII")
    return "xn--" + label.encode("punycode").decode("ascii")


def _ends_in_number(domain: str) -> bool:
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    last = parts[-1]
    return bool(last) and (_DECIMAL.fullmatch(last) is not None or _ipv4_number(last) is not None)


def _ipv4_number(part: str) -> int | None:
    """The WHATWG IPv4 number parser: decimal, octal after a leading ``0``, hex after ``0x``,
    each with its own digits only (``int()`` would also take ``0x0x7f``, ``0o17`` or ``1_0``,
    which a browser reads as a name, not as a number)."""
    if part[:2].lower() == "0x":
        digits, pattern, radix = part[2:], _HEX, 16
    elif len(part) > 1 and part[0] == "0":
        digits, pattern, radix = part[1:], _OCTAL, 8
    else:
        digits, pattern, radix = part, _DECIMAL, 10
    if not digits:
        return 0 if radix != 10 else None
    return int(digits, radix) if pattern.fullmatch(digits) else None


def _ipv4(domain: str) -> str | Refusal:
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    numbers = [_ipv4_number(part) if part else None for part in parts]
    bad = Refusal(MALFORMED, f"bad IPv4 address {domain[:80]!r}")
    if len(numbers) > 4 or any(n is None for n in numbers):
        return bad
    values = [n for n in numbers if n is not None]
    if any(n > 255 for n in values[:-1]) or values[-1] >= 256 ** (5 - len(values)):
        return bad
    address = values[-1]
    for index, number in enumerate(values[:-1]):
        address += number * 256 ** (3 - index)
    return str(ipaddress.IPv4Address(address))


def _ipv6(text: str) -> str | Refusal:
    if "%" in text:  # a zone id, which Python takes and browsers do not
        return Refusal(MALFORMED, "bad IPv6 address")
    try:
        packed = ipaddress.IPv6Address(text).packed
    except ValueError:
        return Refusal(MALFORMED, "bad IPv6 address")
    pieces = [int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)]
    # The first longest run of two or more zero pieces becomes "::" (WHATWG IPv6 serializer).
    best_start, best_length, start = -1, 1, None
    for index, piece in enumerate([*pieces, 1]):
        if piece == 0 and start is None:
            start = index
        elif piece != 0 and start is not None:
            if index - start > best_length:
                best_start, best_length = start, index - start
            start = None
    if best_start < 0:
        return "[" + ":".join(f"{piece:x}" for piece in pieces) + "]"
    head = ":".join(f"{piece:x}" for piece in pieces[:best_start])
    tail = ":".join(f"{piece:x}" for piece in pieces[best_start + best_length:])
    return f"[{head}::{tail}]"
