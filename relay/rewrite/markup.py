"""Find, in decoded HTML, the spans the rewrite edits: link ``href`` values, ``<meta>`` charset
declarations and the last ``</body>``. Nothing is parsed into a tree or written back out.

The scanner follows the WHATWG tokenizer where it decides what is markup: comments (``<!-->``
and ``--!>`` included), bogus comments (``<!...>``, ``<?...>``, ``</ ...>``, which covers the
doctype and ``<![if !mso]>``), quoted and unquoted attribute values (a ``>`` inside quotes does
not end a tag), and the raw text of ``script``, ``style``, ``textarea``, ``title``, ``xmp``,
``iframe``, ``noembed`` and ``noframes``, with the escapes of script data (``<!--<script>``
inside a script). ``<plaintext>`` makes the rest of the document text: the scan is stuck there.
One compiled pattern skips everything uninteresting in C; Python only sees ``<a>``, ``<area>``,
``<meta>`` and ``</body>``.

Not modelled: foreign content. Inside ``<svg>`` or ``<math>``, ``<![CDATA[`` opens a section of
text that ends at ``]]>``; the scanner ends it at its first ``>``, as in HTML content, so an
``<a href>`` written after a ``>`` inside such a section is taken for a link.
"""

from __future__ import annotations

import functools
import html
import re
import sys
from dataclasses import dataclass
from html.entities import html5
from typing import NamedTuple

_WS = r"\t\n\f\r "


def _all_but(excluded: str) -> str:
    """A character class of every code point but the (ASCII) ``excluded``, spelled as positive
    ranges: sre tests a negated class of several characters (``[^...]``) two to four times
    slower per character than the same class written positively. A class of one, ``[^<]``,
    stays as it is: sre counts those in a tight loop."""
    ranges, start = [], 0
    for code in sorted({ord(char) for char in excluded}):
        if code > start:
            ranges.append((start, code - 1))
        start = code + 1
    ranges.append((start, sys.maxunicode))
    return "[" + "".join(
        _escape(low) if low == high else f"{_escape(low)}-{_escape(high)}" for low, high in ranges
    ) + "]"


def _escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\U{code:08x}"


_NAME_CHAR = _all_but("\t\n\f\r />")  # tag names; the first character of attribute names
_ATTR_NAME_CHAR = _all_but("\t\n\f\r />=")
_PLAIN_NAME_CHAR = _all_but("\t\n\f\r />=\"'")
_UNQUOTED_CHAR = _all_but("\t\n\f\r >")  # an unquoted attribute value
# For CPython before 3.11.5 (Debian 12 has 3.11.2): when a round of a possessive repeat of a group
# fails, it keeps the input position where the round gave up (gh-106052), so ``(?:x|<(?!a))*+<a``
# does not match "<a". Every group repeated with ``*+`` here therefore ends in an empty
# alternative, ``(?:...|)*+``: a round never fails, and the repeat ends on the empty round. Optional
# groups are ``(?:...|)`` rather than ``(?:...)?+`` for the same reason, which means the same here:
# each ends a possessive round or its pattern, so nothing can backtrack into it. The atomic
# ``(?>(?:...)*)`` works too, but makes scan() 15% slower on 3.11.7.
# A value that opens a quote needs its closing quote: a tag whose quote never closes runs to
# the end of the document, as in browsers, and matches nothing here.
_ATTRS = (
    rf"(?:[{_WS}/]*+{_NAME_CHAR}{_ATTR_NAME_CHAR}*+"
    rf"""(?:[{_WS}]*+=[{_WS}]*+(?:"[^"]*+"|'[^']*+'|(?!["']){_UNQUOTED_CHAR}*+)|(?![{_WS}]*+=))"""
    rf"|)*+[{_WS}/]*+>"
)
_RAW_TEXT = ("script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes")
_INTERESTING_START = ("a", "area", "meta")
_FAST_ATTRS = (  # the usual name="value" list; anything unusual falls back to _ATTRS
    rf"""(?:[{_WS}/]++{_PLAIN_NAME_CHAR}++(?:="[^"]*+"|)|)*+[{_WS}/]*+>"""
)
# A comment ends at the first "-->" or "--!>". Not ".*?--!?>": a lazy repeat tries the rest of
# the pattern after every character, and Outlook's conditional comments hold whole style sheets.
_COMMENT = r"<!--(?:>|->|[^-]*+(?:-(?!-!?>)[^-]*+|)*+--!?>)"
# Script data escapes: inside a script, "<!--" starts an escape that "-->" ends (its dashes may
# be those of "<!--"); within it, "<script" starts a double escape, in which "</script" does
# not end the script but the double escape, and "-->" ends both.
_SCRIPT = rf"(?i:script)[{_WS}/>]"
_ESCAPED_TEXT = r"[^-<]++|-(?!->)"  # text of an escape that does not end it
_DOUBLE_ESCAPE = rf"<(?={_SCRIPT})(?:{_ESCAPED_TEXT}|<(?!/{_SCRIPT})|)*+"
_SCRIPT_ESCAPE = (
    rf"<!(?=--)(?:{_ESCAPED_TEXT}|<(?!/?{_SCRIPT})|{_DOUBLE_ESCAPE}(?:</(?={_SCRIPT})|)|)*+"
    r"(?:-->|)"
)
_BORING = "|".join(  # markup to skip, most frequent first: ordinary end tags, then start tags
    (
        rf"</(?!(?i:body)[{_WS}/>])[A-Za-z]{_NAME_CHAR}*+(?:>|{_ATTRS})",  # ">": the usual end
        rf"<(?!(?i:{'|'.join(_INTERESTING_START + _RAW_TEXT)}|plaintext)[{_WS}/>])"
        rf"[A-Za-z]{_NAME_CHAR}*+(?:{_FAST_ATTRS}|{_ATTRS})",
        _COMMENT,
        *(
            rf"<(?i:{name})(?=[{_WS}/>]){_ATTRS}"
            rf"(?:[^<]++|{_SCRIPT_ESCAPE if name == 'script' else '(?!)'}"
            rf"|<(?!/(?i:{name})[{_WS}/>])|)*+(?=</(?i:{name})[{_WS}/>])"
            for name in _RAW_TEXT
        ),
        r"<!(?!--)[^>]*+>|<\?[^>]*+>|</[^A-Za-z>][^>]*+>|</>",
        r"<(?![A-Za-z!?/])",  # a "<" that opens nothing is text
    )
)
# Each round of the repeat takes the text before a piece of markup with it: half as many rounds
# as text and markup taken in turns, and sre pays for every round.
_NEXT = re.compile(
    rf"(?:[^<]*+(?:{_BORING})|)*+[^<]*+(?:"
    rf"(?P<tag><(?P<name>(?i:{'|'.join(_INTERESTING_START)}))(?=[{_WS}/>]){_ATTRS})"
    rf"|(?P<body></(?i:body)(?=[{_WS}/>]){_ATTRS})"
    r"|(?P<stuck><)"
    r"|\Z)",
    re.ASCII | re.DOTALL,
)
_ATTR = re.compile(  # 1: name; the value in 2: "double", 3: 'single', 4: bare
    rf"[{_WS}/]*+({_NAME_CHAR}{_ATTR_NAME_CHAR}*+)"
    rf"""(?:[{_WS}]*+=[{_WS}]*+(?:"([^"]*+)"|'([^']*+)'|({_UNQUOTED_CHAR}*+))|)"""
)
_CHARREF = re.compile(r"&(?:#[xX]([0-9A-Fa-f]+);?|#([0-9]+);?|([A-Za-z][A-Za-z0-9]*)(;?))")
_QUOTES = {2: '"', 3: "'", 4: ""}  # by group number in _ATTR
_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class Attr(NamedTuple):
    name: str  # ASCII-lower-cased, as the tokenizer does
    value: str | None  # as written (still HTML-escaped); None for a bare attribute
    start: int  # span of the value in the document, quotes excluded
    end: int
    quote: str  # '"', "'" or "" (unquoted or bare)


class Tag(NamedTuple):
    name: str
    start: int
    end: int
    attrs: dict[str, Attr]  # the first of each name wins, as in browsers


@dataclass(frozen=True, slots=True)
class Markup:
    links: tuple[Tag, ...]  # <a> and <area> start tags with an href, in document order
    metas: tuple[Tag, ...]
    body_close: int | None  # offset of the last </body> end tag
    stuck_at: int | None  # where an unterminated tag, comment or raw text swallows the rest


def scan(text: str) -> Markup:
    links: list[Tag] = []
    metas: list[Tag] = []
    body_close = stuck_at = None
    pos = 0
    while True:
        match = _NEXT.match(text, pos)
        assert match is not None  # the pattern always ends with a non-failing alternative
        found = match.lastgroup  # "tag", "body", "stuck", or None at the end
        if found == "tag":
            tag = _tag(text, match)
            if tag.name == "meta":
                metas.append(tag)
            elif "href" in tag.attrs:
                links.append(tag)
        elif found == "body":
            body_close = match.start("body")
        else:
            if found == "stuck":
                stuck_at = match.start("stuck")
            break
        pos = match.end()
    return Markup(tuple(links), tuple(metas), body_close, stuck_at)


# Tags and attributes are built with tuple.__new__, as NamedTuple._make does: the generated
# __new__ is Python code, and a link tag can have a dozen attributes.
_new_attr = functools.partial(tuple.__new__, Attr)
_new_tag = functools.partial(tuple.__new__, Tag)


def _tag(text: str, match: re.Match[str]) -> Tag:
    attrs: dict[str, Attr] = {}
    for attr in _ATTR.finditer(text, match.end("name"), match.end() - 1):
        name = _ascii_lower(attr[1])
        if name in attrs:
            continue
        kind = attr.lastindex  # the value's group (quoted or not), or 1 when there is none
        if kind == 2:  # the usual name="value" first
            attrs[name] = _new_attr((name, attr[2], attr.start(2), attr.end(2), '"'))
        elif kind == 1:
            end = attr.end()
            attrs[name] = _new_attr((name, None, end, end, ""))
        else:
            attrs[name] = _new_attr(
                (name, attr[kind], attr.start(kind), attr.end(kind), _QUOTES[kind])
            )
    return _new_tag((_ascii_lower(match["name"]), match.start("tag"), match.end(), attrs))


def _ascii_lower(name: str) -> str:
    if name.islower():  # most names are; no upper-case letter at all
        return name
    return name.lower() if name.isascii() else name.translate(_ASCII_UPPER)


class Declared(NamedTuple):
    label: str  # as written
    start: int  # its span in the document
    end: int


def meta_charset(tag: Tag) -> Declared | None:
    """The charset a ``<meta>`` declares: ``charset=``, or ``http-equiv="Content-Type"`` with a
    ``charset=`` in its ``content``."""
    charset = tag.attrs.get("charset")
    if charset is not None and charset.value is not None:
        return Declared(charset.value, charset.start, charset.end)
    http_equiv, content = tag.attrs.get("http-equiv"), tag.attrs.get("content")
    if http_equiv is None or content is None or content.value is None:
        return None
    if unescape_attr(http_equiv.value or "").strip().lower() != "content-type":
        return None
    found = _CONTENT_CHARSET.search(content.value)
    if found is None:
        return None
    return Declared(found[1], content.start + found.start(1), content.start + found.end(1))


_CONTENT_CHARSET = re.compile(r"(?i)charset[\t\n\f\r ]*=[\t\n\f\r ]*[\"']?([^\t\n\f\r ;\"']+)")


def unescape_attr(value: str) -> str:
    """An attribute value with character references resolved as the HTML tokenizer does in
    attributes: a legacy named reference without ";" (``&copy``) followed by "=" or an
    alphanumeric stays literal, so ``?a=1&copy=2`` keeps its ``&copy``."""
    if "&" not in value:
        return value
    return _CHARREF.sub(_charref, value)


def _charref(match: re.Match[str]) -> str:
    name, semicolon = match.group(3), match.group(4)
    if name is None:  # numeric: html.unescape knows the replacements, given sane lengths
        digits = (match.group(1) or match.group(2)).lstrip("0")
        return "\ufffd" if len(digits) > 8 else html.unescape(match.group())
    if semicolon and name + ";" in html5:
        return html5[name + ";"]
    following = match.string[match.end() : match.end() + 1]
    if not semicolon and name in html5 and following != "=":
        return html5[name]
    return match.group()
