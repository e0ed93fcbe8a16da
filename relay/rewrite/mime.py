"""MIME structure as byte ranges, so that chosen parts can be replaced and every other byte kept.

``split`` reads the tree of parts without copying or re-serializing anything; the other
functions decode one part's body to text and encode text back as quoted-printable.
"""

from __future__ import annotations

import binascii
import codecs
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from relay.errors import DecodeError
from relay.rewrite import markup
from relay.rewrite.headers import Header, HeaderBlock, parse_header_block

MAX_DEPTH = 32  # nesting beyond this is left alone as one opaque part
QP_LINE = 76  # RFC 2045: at most 76 characters per encoded line, the soft-break "=" included

# The quoted string unrolled ("[^"\\]*(?:\\.[^"\\]*)*" rather than "(?:[^"\\]|\\.)*"): the same
# matches, without a round of a repeated group per character of a long boundary.
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("[^"\\]*(?:\\.[^"\\]*)*"|[^;\s]*)')
_CHARSET_PARAM = re.compile(rb'(?i)(;[ \t\r\n]*)charset\*?[ \t\r\n]*=[ \t\r\n]*("[^"]*"|[^;\s]*)')
_LINE_END = re.compile(rb"\r?\n\Z")
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?=\r?\n|\Z)")
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_QUOTED_PAIR = re.compile(r"\\(.)")


@dataclass(frozen=True, slots=True)
class Part:
    path: str  # "1.2" = second child of the first child; "" is the message itself
    start: int  # offset of the part's first header byte
    headers: HeaderBlock
    end: int  # one past the last body byte (the line break before a delimiter excluded)
    content_type: str  # lower-case "type/subtype"; RFC 2045 default when absent
    params: dict[str, str]
    children: tuple[Part, ...] = ()
    problem: str = ""  # why the structure below this part could not be read
    attachment: bool = False  # disposition "attachment", or a file name given

    @property
    def body_start(self) -> int:
        return self.headers.body_start

    def header(self, name: str) -> Header | None:
        return self.headers.get(name)


def split(raw: bytes, headers: HeaderBlock | None = None) -> Part:
    """The MIME tree of ``raw``, whose header block is ``headers`` when the caller has read
    it already. Never raises: what cannot be read is reported in ``problem``."""
    return _part(raw, 0, len(raw), "", "text/plain", 0, headers)


def leaves(part: Part) -> Iterator[Part]:
    if part.children:
        for child in part.children:
            yield from leaves(child)
    else:
        yield part


def _part(raw: bytes, start: int, end: int, path: str, default_type: str, depth: int,
          headers: HeaderBlock | None = None) -> Part:
    headers = parse_header_block(raw, start) if headers is None else headers
    if headers.body_start > end:  # the header block runs over the delimiter: a broken part
        block = HeaderBlock((), end)
        return Part(path, start, block, end, "application/octet-stream", {}, (), "broken headers")
    content_type, params = _content_type(raw, headers, default_type)
    attachment = _is_attachment(raw, headers, params)
    children: tuple[Part, ...] = ()
    problem = ""
    if content_type.startswith("multipart/"):
        children, problem = _children(
            raw, headers.body_start, end, path, content_type, params, depth
        )
    return Part(path, start, headers, end, content_type, params, children, problem, attachment)


def _children(
    raw: bytes,
    body_start: int,
    end: int,
    path: str,
    content_type: str,
    params: dict[str, str],
    depth: int,
) -> tuple[tuple[Part, ...], str]:
    """The parts of a multipart body, or why it has none."""
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 200:
        return (), "multipart without a usable boundary"
    if depth >= MAX_DEPTH:
        return (), "multipart nested too deeply"
    child_type = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
    children = tuple(
        _part(raw, child_start, child_end, f"{path}.{i}" if path else str(i), child_type, depth + 1)
        for i, (child_start, child_end) in enumerate(
            _child_ranges(raw, body_start, end, boundary), 1
        )
    )
    return children, "" if children else "multipart without parts"


def _is_attachment(raw: bytes, headers: HeaderBlock, params: dict[str, str]) -> bool:
    header = headers.get("content-disposition")
    if header is None:
        return "name" in params
    value = header.raw_value(raw)
    disposition = value.split(";", 1)[0].strip().lower()
    return disposition == "attachment" or "name" in params or "filename" in _params(value)


def _child_ranges(
    raw: bytes, body_start: int, end: int, boundary: str
) -> Iterator[tuple[int, int]]:
    """(start, end) of each body part between the delimiter lines of ``boundary``."""
    marker = b"--" + boundary.encode("utf-8", "surrogateescape")
    child_start = None
    pos = body_start
    while (at := raw.find(marker, pos, end)) >= 0:
        pos = at + len(marker)
        tail = _DELIMITER_TAIL.match(raw, pos, end)
        if tail is None or (at != body_start and raw[at - 1] != 10):  # 10: "\n"
            continue
        if child_start is not None:
            yield child_start, max(child_start, _before_line_break(raw, at))
        if tail.group(1):  # the close delimiter: the rest is the epilogue
            return
        child_start = min(_after_line_break(raw, tail.end()), end)
    if child_start is not None:  # no close delimiter: the last part runs to the end
        yield child_start, end


def _before_line_break(raw: bytes, pos: int) -> int:
    if raw[pos - 1 : pos] == b"\n":
        pos -= 1
        if raw[pos - 1 : pos] == b"\r":
            pos -= 1
    return pos


def _after_line_break(raw: bytes, pos: int) -> int:
    if raw[pos : pos + 1] == b"\r":
        pos += 1
    return pos + 1 if raw[pos : pos + 1] == b"\n" else pos


def _content_type(raw: bytes, headers: HeaderBlock, default: str) -> tuple[str, dict[str, str]]:
    header = headers.get("content-type")
    if header is None:
        return default, {}
    value = header.raw_value(raw)
    main = value.split(";", 1)[0].strip().lower()
    if not _MEDIA_TYPE.fullmatch(main):
        return "text/plain", {}  # RFC 2045: an invalid Content-Type means text/plain
    return main, _params(value)


def _params(value: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, raw_value in _PARAM.findall(value):
        text = raw_value
        if text.startswith('"'):
            text = text[1:-1]
            if "\\" in text:
                text = _QUOTED_PAIR.sub(r"\1", text)
        params.setdefault(name.lower(), text)
    return params


def transfer_decode(raw: bytes, part: Part) -> bytes:
    """The part's body with its Content-Transfer-Encoding undone."""
    header = part.header("content-transfer-encoding")
    encoding = header.raw_value(raw).strip().lower() if header is not None else "7bit"
    body = raw[part.body_start : part.end]
    if encoding in ("7bit", "8bit", "binary", ""):
        return body
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    if encoding == "base64":
        try:
            return binascii.a2b_base64(body)
        except binascii.Error as exc:
            raise DecodeError(f"broken base64: {exc}") from None
    raise DecodeError(f"unknown transfer encoding {encoding[:40]!r}")


def decode_text(data: bytes, charset: str | None) -> str:
    """``data`` as text in its declared charset, read the way mail clients and browsers read it.

    A byte-order mark decides first, whatever the label says, as in browsers. Labels are mapped
    as the WHATWG Encoding Standard does (``iso-8859-1`` and ``us-ascii`` are windows-1252,
    ``gb2312`` is GB18030, ...). Without a declared charset a ``<meta>`` charset in the first
    4096 bytes counts (not one inside a comment), then UTF-8, then windows-1252. Decoding is
    strict: anything that does not decode raises ``DecodeError`` rather than losing bytes.
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)  # a UTF-8 BOM stays: the part is written as UTF-8
            except UnicodeError:
                raise DecodeError(f"not valid {codec} after its byte-order mark") from None
    label = (charset or "").strip().strip('"').lower() or _sniffed_label(data)
    if not label or label.startswith(("utf-16", "utf16")):
        label = "unknown-8bit"
    if not _LABEL.fullmatch(label):
        raise DecodeError(f"unknown charset {label[:40]!r}")
    if label in _ASCII_LABELS and data.isascii():
        return data.decode("ascii")
    errors = []
    for codec in _CODECS.get(label, (label,)):
        try:
            return _decode(data, codec)
        except (UnicodeError, LookupError) as exc:
            errors.append(exc)
    if all(isinstance(exc, LookupError) for exc in errors):
        raise DecodeError(f"unknown charset {label[:40]!r}")
    raise DecodeError(f"not valid {label[:40]}")


def _decode(data: bytes, codec: str) -> str:
    if codec == "windows-1252":  # WHATWG: the five bytes cp1252 leaves undefined map to C1
        return data.decode("latin-1").translate(_WINDOWS_1252)
    if codecs.lookup(codec).name in _NOT_CHARSETS:
        raise LookupError(codec)
    text = data.decode(codec)
    if codec != "utf-8":
        text.encode("utf-8")  # UTF-7 and friends can decode to lone surrogates
    return text


def _sniffed_label(data: bytes) -> str:
    """The label the first ``<meta>`` charset declaration in the first 4096 bytes gives, the
    markup read as the HTML prescan reads it (Latin-1 keeps every byte as one character)."""
    for tag in markup.scan(data[:4096].decode("latin-1")).metas:
        declared = markup.meta_charset(tag)
        if declared is not None:
            return declared.label.strip().lower()
    return ""


_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_LABEL = re.compile(r"[a-z0-9_:.()+-]{1,40}")
_WINDOWS_1252 = {
    i: bytes((i,)).decode("cp1252")
    for i in range(0x80, 0xA0)
    if i not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)
}
_NOT_CHARSETS = {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"}
_ASCII_LABELS = {"us-ascii", "ascii", "us_ascii", "ansi_x3.4-1968", "iso646-us", "unknown-8bit"}
_CODECS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_ASCII_LABELS, ("utf-8", "windows-1252")),
    **dict.fromkeys(
        (
            "iso-8859-1",
            "iso8859-1",
            "iso_8859-1",
            "latin1",
            "latin-1",
            "l1",
            "cp819",
            "windows-1252",
            "cp1252",
            "x-cp1252",
        ),
        ("windows-1252",),
    ),
    **dict.fromkeys(("iso-8859-9", "iso8859-9", "latin5", "l5"), ("cp1254",)),
    **dict.fromkeys(("iso-8859-11", "tis-620"), ("cp874",)),
    **dict.fromkeys(("gb2312", "gbk", "x-gbk", "gb_2312-80", "chinese"), ("gb18030",)),
    **dict.fromkeys(("ks_c_5601-1987", "ks_c_5601", "euc-kr", "windows-949"), ("cp949",)),
    **dict.fromkeys(
        ("shift_jis", "shift-jis", "sjis", "x-sjis", "ms_kanji", "windows-31j"), ("cp932",)
    ),
    **dict.fromkeys(("big5", "big5-hkscs", "x-x-big5"), ("big5hkscs",)),
    "iso-2022-jp": ("iso2022_jp", "iso2022_jp_ext", "iso2022_jp_2"),
}


def header_edits(raw: bytes, part: Part) -> list[tuple[int, int, bytes]]:
    """Edits (start, end, replacement) that declare the part as UTF-8 quoted-printable.

    Only the charset parameter and the transfer encoding value change; a missing
    Content-Transfer-Encoding header is added after Content-Type.
    """
    content_type = part.header("content-type")
    assert content_type is not None  # only declared text/html parts are re-encoded
    edits = []
    value_start, value_end = content_type.colon + 1, _value_end(raw, content_type)
    match = _CHARSET_PARAM.search(raw, value_start, value_end)
    if match:
        edits.append((match.end(1), match.end(), b"charset=UTF-8"))
    else:
        end = value_start + len(raw[value_start:value_end].rstrip())
        edits.append(
            (end, end, b" charset=UTF-8" if raw[end - 1 : end] == b";" else b"; charset=UTF-8")
        )
    encoding = part.header("content-transfer-encoding")
    if encoding is not None:
        edits.append((encoding.colon + 1, _value_end(raw, encoding), b" quoted-printable"))
    else:
        eol = raw[_value_end(raw, content_type) : content_type.end] or line_ending(raw)
        line = b"Content-Transfer-Encoding: quoted-printable" + eol
        edits.append((content_type.end, content_type.end, line))
    return sorted(edits)


def _value_end(raw: bytes, header: Header) -> int:
    """Offset of the line break that ends the header (or its end at end of input)."""
    match = _LINE_END.search(raw, header.start, header.end)
    return match.start() if match else header.end


def line_ending(raw: bytes) -> bytes:
    """The message's line ending, judged by its first line."""
    newline = raw.find(b"\n")
    return b"\n" if newline > 0 and raw[newline - 1] != 13 else b"\r\n"


def qp_encode_parts(parts: list[str], eol: bytes) -> list[bytes]:
    """``parts`` as one UTF-8 quoted-printable text, cut back into one piece per part.

    Every piece but the last ends with a line break (a soft one where the text goes on), so
    QP-safe text put between the pieces (see ``qp_wrap_safe``) starts a line of its own and
    the result is valid quoted-printable that decodes to the parts joined. Line breaks in the
    parts (CRLF or LF; no lone CR) become ``eol``. Lines are at most 76 characters.
    """
    if all(part.isascii() for part in parts):
        data = _QP_CUT.join(part.encode("ascii") for part in parts)
        encoded, cut = _qp_ascii(data, len(parts) - 1), _QP_CUT
    else:  # binascii escapes every byte in C, the cut among them
        data = _QP_CUT.join(part.encode("utf-8") for part in parts)
        if b"\r" in data:
            data = data.replace(b"\r", b"")  # CRLF to LF, since there is no lone CR
        encoded, cut = _fit_lines(binascii.b2a_qp(data, istext=True)), b"=FF"
    if eol != b"\n":
        encoded = encoded.replace(b"\n", eol)
    soft_break = b"=" + eol
    out = _split(encoded, cut)
    for i in range(1, len(out)):
        if out[i - 1] and not out[i - 1].endswith(eol):
            out[i - 1] += soft_break
        if out[i].startswith(soft_break):  # a soft break right after the cut is not needed
            out[i] = out[i][len(soft_break) :]
    return out


def _split(data: bytes, separator: bytes) -> list[bytes]:
    """``data.split(separator)``: for a one-byte separator ``bytes.split`` compares byte by byte
    (three times slower on a 30 KB body cut in a dozen pieces), ``bytes.find`` calls memchr."""
    pieces, start = [], 0
    while (end := data.find(separator, start)) >= 0:
        pieces.append(data[start:end])
        start = end + len(separator)
    pieces.append(data[start:])
    return pieces


def _fit_lines(encoded: bytes) -> bytes:
    """Lines of at most 76 characters: ``binascii.b2a_qp`` writes a space that ends a long line
    as ``=20`` without counting it (77 or 78 characters); such lines get a soft break."""
    lines = encoded.split(b"\n")
    if max(map(len, lines)) <= QP_LINE:
        return encoded
    return b"\n".join(b"=\n".join(_wrap_line(line)) if len(line) > QP_LINE else line
                      for line in lines)


def _wrap_line(line: bytes) -> list[bytes]:
    """A long encoded line in pieces of at most 75 characters, no ``=XX`` escape cut apart."""
    pieces = []
    start = 0
    while len(line) - start > QP_LINE:
        end = start + QP_LINE - 1
        escape = line.rfind(b"=", end - 2, end)
        if escape != -1:
            end = escape
        pieces.append(line[start:end])
        start = end
    pieces.append(line[start:])
    return pieces


def _qp_ascii(data: bytes, cuts: int) -> bytes:
    """Quoted-printable of ASCII ``data`` with ``cuts`` cut bytes in it, which stay as they are.

    Faster than ``binascii.b2a_qp`` on HTML: "=" and line breaks by ``bytes.replace``, the
    lines by one pattern. White space that would end a line is kept by a soft break after it
    (``"a =\n"``), which decodes to the same text as ``"a=20"``.
    """
    data = data.replace(b"=", b"=3D")
    if data.translate(None, _QP_LITERAL) != _QP_CUT * cuts:  # control characters
        data = _QP_CONTROL.sub(_qp_hex, data)
    if b"\r" in data:
        data = data.replace(b"\r", b"")  # CRLF to LF, since there is no lone CR
    pieces = _QP_PIECE.findall(data)
    if not data.endswith((b" ", b"\t")):
        pieces.pop()  # the empty match at the end, where no soft break is wanted
    return b"=\n".join(pieces)


# One match per stretch that ends in a soft break (or at the end of the data); all of it in C.
# Every "=" in the data starts a three-character escape, so a stretch whose last two characters
# are not "=" does not cut one apart. The empty alternative in the possessive repeat of lines is
# for CPython before 3.11.5 (Debian 12 has 3.11.2; see markup.py).
# The long-line alternative comes first behind a lookahead that says exactly when neither of the
# others can match (more than 76 characters left, or 76 ending in white space): on a long line
# the two others would each read 75 characters before failing, for every piece cut from it.
_QP_PIECE = re.compile(
    rb"\n?(?:[^\n]{0,76}+(?<![\t ])\n|)*+"  # lines that need no change
    rb"(?:(?=[^\n]{77}|[^\n]{75}[\t ](?![^\n]))[^\n]{0,73}[^\n=]{2}"  # 75 characters of a long line
    rb"|[^\n]{0,76}+(?<![\t ])\Z"  # the last line
    rb"|[^\n]{0,75}+(?<=[\t ])(?=\n|\Z))"  # a line ending in white space: soft break after it
)
_QP_CUT = b"\xff"  # where the parts meet while they are encoded as one: never part of UTF-8
_QP_LITERAL = bytes(range(0x20, 0x7F)) + b"\t\n\r"
_QP_CONTROL = re.compile(rb"[^\t\n\r -~\xff]")


def _qp_hex(match: re.Match[bytes]) -> bytes:
    return b"=%02X" % match.group()[0]


def qp_wrap_safe(token: str, eol: str) -> bytes:
    """Quoted-printable of a string of QP-safe ASCII characters (no "=", no spaces) that
    starts a line, followed by a soft break so that what comes next starts a line."""
    if len(token) < QP_LINE:
        return (token + "=" + eol).encode("ascii")
    soft_break = "=" + eol
    return (soft_break.join(_QP_SAFE_LINE.findall(token)) + soft_break).encode("ascii")


_QP_SAFE_LINE = re.compile(rf".{{1,{QP_LINE - 1}}}", re.DOTALL)  # the "=" makes it 76


def first_html(raw: bytes, root: Part, decoded: Mapping[str, str] | None = None) -> str | None:
    """The decoded text of the first ``text/html`` part that is not an attachment in the tree
    ``root`` of ``raw`` (what the dashboard's click map shows, relay/store/html_bodies.py);
    None when there is none or it cannot be decoded. ``decoded``: the texts of parts decoded
    already (the rewrite's), by path."""
    for part in leaves(root):
        if part.content_type == "text/html" and not part.attachment and not part.problem:
            if decoded is not None and part.path in decoded:
                return decoded[part.path]
            try:
                return decode_text(transfer_decode(raw, part), part.params.get("charset"))
            except DecodeError:
                return None
    return None
