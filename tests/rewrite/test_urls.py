"""relay.rewrite.urls: links judged and serialized as browsers do, checked against examples measured
in Chromium and, for generated URLs, against ada (the WHATWG URL parser in Node.js)."""

from __future__ import annotations

import ada_url
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.rewrite import urls
from relay.rewrite.urls import Refusal, Url, judge, location, parse


@pytest.mark.parametrize(("text", "href"), [
    # the links of issue 13, as Chromium 156 requests them
    ("https://shop.example/größe-42", "https://shop.example/gr%C3%B6%C3%9Fe-42"),
    ("https://shop.example/搜索?q=鞋", "https://shop.example/%E6%90%9C%E7%B4%A2?q=%E9%9E%8B"),
    ("https://shop.example/?utm_campaign=frühling",
     "https://shop.example/?utm_campaign=fr%C3%BChling"),
    ("https://shop.example/?a=1|2", "https://shop.example/?a=1|2"),
    ("https://shop.example/?x=[1]", "https://shop.example/?x=[1]"),
    ("https://shop.example/a b?c d#e f", "https://shop.example/a%20b?c%20d#e%20f"),
    ("https://例え.jp/a", "https://xn--r8jz45g.jp/a"),
    ("https://ru.wikipedia.org/wiki/Москва",
     "https://ru.wikipedia.org/wiki/%D0%9C%D0%BE%D1%81%D0%BA%D0%B2%D0%B0"),
    ("https://москва.рф/", "https://xn--80adxhks.xn--p1ai/"),
    ("https://faß.de/", "https://xn--fa-hia.de/"),  # non-transitional: ß is kept
    ("https://ＥＸＡＭＰＬＥ。com/", "https://example.com/"),  # UTS 46 mapping
    ("http://☃.net/", "http://xn--n3h.net/"),
    # path, query and fragment percent-encode sets
    ("http://h.example/p|x^y`z{}", "http://h.example/p|x%5Ey%60z%7B%7D"),
    ("http://h.example/?'\"<>`{}^\\", "http://h.example/?%27%22%3C%3E`{}^\\"),
    ("http://h.example/#'\"<>`{}", "http://h.example/#'%22%3C%3E%60{}"),
    ("http://h.example/%zz%41", "http://h.example/%zz%41"),
    # what browsers read differently from RFC 3986
    ("HTTP://U:P@Ex.COM:80/a/../b/./c?d#e", "http://U:P@ex.com/b/c?d#e"),
    ("http:\\\\h.example\\a\\b", "http://h.example/a/b"),
    ("https:///h.example/", "https://h.example/"),
    ("  https://h.example/\t\na\r\n  ", "https://h.example/a"),
    ("http://h.example:/x", "http://h.example/x"),
    ("http://h.example:0080", "http://h.example/"),
    ("http://h.example:08080", "http://h.example:8080/"),
    ("https://h.example?q", "https://h.example/?q"),
    ("http://ex%61mple.com/", "http://example.com/"),
    ("http://0x7f.1/", "http://127.0.0.1/"),
    ("http://2130706433/", "http://127.0.0.1/"),
    # a second radix prefix makes a name, not a number (int() would take "0x7f000001")
    ("http://0x0x7f000001/", "http://0x0x7f000001/"),
    ("https://shop.0x0xa9fea9fe/", "https://shop.0x0xa9fea9fe/"),
    ("http://0x0x9%2e/", "http://0x0x9./"),
    ("http://1_0/", "http://1_0/"),
    ("http://[0:0::1]:8080/", "http://[::1]:8080/"),
    ("http://[1:0:0:2::3:0]/", "http://[1::2:0:0:3:0]/"),
    ("http://h.example/%2e%2E/x/.%2e/y", "http://h.example/y"),
])
def test_href(text: str, href: str) -> None:
    parsed = parse(text)
    assert isinstance(parsed, Url), parsed
    assert parsed.href == href
    assert location(text) == href


@pytest.mark.parametrize(("text", "code", "detail"), [
    ("", urls.EMPTY, "empty href"),
    (" \t ", urls.EMPTY, "empty href"),
    ("#top", urls.FRAGMENT, "fragment link"),
    ("/path", urls.RELATIVE, "relative link"),
    ("page.html?a=b:c", urls.RELATIVE, "relative link"),
    ("mailto:a@shop.example", urls.NOT_HTTP, "mailto: link"),
    ("JavaScript:alert(1)", urls.NOT_HTTP, "javascript: link"),
    ("{{ unsubscribe_url }}", urls.PLACEHOLDER, "template placeholder"),
    ("https://shop.example/*|EMAIL|*", urls.PLACEHOLDER, "template placeholder"),
    ("https:shop.example", urls.MALFORMED, "no // after https:"),
    ("http:/shop.example", urls.MALFORMED, "no // after http:"),
    ("https://", urls.MALFORMED, "no host"),
    ("https://user@/x", urls.MALFORMED, "no host"),
    ("https://shop.example:99999/", urls.MALFORMED, "bad port '99999'"),
    ("https://shop.example:8o/", urls.MALFORMED, "bad port '8o'"),
    ("https://shop.example:80:80/", urls.MALFORMED, "bad port '80:80'"),
    ("https://sh op.example/", urls.MALFORMED, "forbidden character in host 'sh op.example'"),
    ("https://a%2fb/", urls.MALFORMED, "forbidden character in host 'a/b'"),
    ("https://1.2.3.999/", urls.MALFORMED, "bad IPv4 address '1.2.3.999'"),
    ("https://shop.1/", urls.MALFORMED, "bad IPv4 address 'shop.1'"),
    ("http://00o177.0.0.1/", urls.MALFORMED, "bad IPv4 address '00o177.0.0.1'"),
    ("http://0X0X7F.1/", urls.MALFORMED, "bad IPv4 address '0x0x7f.1'"),
    ("http://0b1.0x1/", urls.MALFORMED, "bad IPv4 address '0b1.0x1'"),
    ("https://[::1/", urls.MALFORMED, "bad IPv6 address"),
    ("https://[fe80::1%25eth0]/", urls.MALFORMED, "bad IPv6 address"),
    ("https://[::1]x/", urls.MALFORMED, "bad IPv6 address"),
])
def test_refusal(text: str, code: str, detail: str) -> None:
    assert judge(text) == Refusal(code, detail)


@pytest.mark.parametrize("host", ["xn--ü.example", "XN--ü.example", "ｘｎ--ü.example"])
def test_a_label_marked_punycode_must_be_ascii(host: str) -> None:
    """UTS 46 makes it an error (browsers refuse the URL); punycoding it again would send
    the click to xn--xn--...."""
    refusal = judge(f"https://{host}/")
    assert isinstance(refusal, Refusal) and refusal.code == urls.MALFORMED, refusal
    assert str(refusal).endswith("xn--ü is marked as punycode but is not ASCII")


def test_a_host_idna_refuses_is_malformed() -> None:
    refusal = judge("https://a\u0378b.example/")  # unassigned code point
    assert isinstance(refusal, Refusal) and refusal.code == urls.MALFORMED
    assert str(refusal).startswith("host 'a\\u0378b.example' is not a valid name")


def test_length_limit_counts_utf8_bytes() -> None:
    head = "https://shop.example/"
    assert isinstance(judge(head + "a" * (4096 - len(head))), Url)
    assert judge(head + "a" * (4097 - len(head))) == Refusal(
        urls.TOO_LONG, "URL too long to track (over 4096 bytes)")
    assert judge(head + "ü" * 2038).code == urls.TOO_LONG  # type: ignore[union-attr]
    assert judge("mailto:" + "a" * 5000).code == urls.NOT_HTTP  # type: ignore[union-attr]


@pytest.mark.parametrize(("href", "kept"), [
    ("https://admin:hunter2@intranet.example:99999/reset?token=S#otp=S",
     "https://intranet.example:99999/reset"),
    ("HTTPS:\\\\u:p@h.example\\x?q", "HTTPS:\\\\h.example\\x"),
    ("https:u:p@h.example/x?q", "https:h.example/x"),  # no "//": still an authority
    ("ftp://u:p@h.example/p", "ftp://h.example/p"),
    ("//u:p@h.example/p#f", "//h.example/p"),
    ("mailto:help@shop.example?subject=s", "mailto:help@shop.example"),
    ("page.html?t=1", "page.html"),
    ("{{unsubscribe_url}}", "{{unsubscribe_url}}"),
    ("https://shop.example:99999/", "https://shop.example:99999/"),
])
def test_redacted_keeps_scheme_host_port_and_path(href: str, kept: str) -> None:
    assert urls.redacted(href) == kept


# ---------------------------------------------------------------- IPv4, against the spec

def spec_ipv4_number(text: str) -> int | None:
    """The URL standard's IPv4 number parser, step by step (None: failure)."""
    if text == "":
        return None
    radix = 10
    if len(text) >= 2 and text[:2] in ("0x", "0X"):
        text, radix = text[2:], 16
    elif len(text) >= 2 and text[0] == "0":
        text, radix = text[1:], 8
    if text == "":
        return 0
    digits = {10: "0123456789", 8: "01234567", 16: "0123456789abcdefABCDEF"}[radix]
    if any(char not in digits for char in text):
        return None
    return int(text, radix)


def spec_host(domain: str) -> str | None:
    """An ASCII domain through the standard's "ends in a number" checker and IPv4 parser:
    the serialized host, or None for failure."""
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    last = parts[-1]
    ends_in_number = last != "" and (
        all(char in "0123456789" for char in last) or spec_ipv4_number(last) is not None)
    if not ends_in_number:
        return domain.lower()
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if len(parts) > 4:
        return None
    numbers = [spec_ipv4_number(part) for part in parts]
    if None in numbers or any(n > 255 for n in numbers[:-1]):  # type: ignore[operator]
        return None
    if numbers[-1] >= 256 ** (5 - len(numbers)):  # type: ignore[operator]
        return None
    address = numbers[-1]
    for index, number in enumerate(numbers[:-1]):
        address += number * 256 ** (3 - index)  # type: ignore[operator]
    return ".".join(str(address >> shift & 255) for shift in (24, 16, 8, 0))  # type: ignore[operator]


IPV4_PARTS = st.lists(st.sampled_from(["0", "1", "7", "8", "9", "f", "x", "X", "o", "b", "_",
                                       "0x", "0X", "0o", "0b", "00", "255", "256", "a"]),
                      max_size=5).map("".join)


@settings(max_examples=1000, deadline=None)
@given(st.lists(IPV4_PARTS, min_size=1, max_size=5).map(".".join))
@example("0x0x7f000001")
@example("00o177.0.0.1")
@example("1_0")
def test_a_numeric_host_is_the_address_the_spec_reads(domain: str) -> None:
    """The redirect never names another IP than a browser reads in the link."""
    parsed = parse(f"http://{domain}/")
    expected = spec_host(domain)
    if expected is None or expected == "":
        assert isinstance(parsed, Refusal), (domain, parsed)
    else:
        assert isinstance(parsed, Url), (domain, expected, parsed)
        assert parsed.host == expected


# ---------------------------------------------------------------- generated, against ada

LETTERS = "aZ09-_"
WORDS = ["größe", "例え", "москва", "搜索", "ß", "münchen", "ÜNÏ", "ＡＢ", "ｃｏｍ", "日本語",
         "xn--zca", "xn--ü", "a", "shop", "Example", "0x7f", "0", "08", "255", "1", "4294967295",
         ""]
HOSTS = st.one_of(
    st.lists(st.one_of(st.sampled_from(WORDS), st.text(LETTERS, min_size=1, max_size=4)),
             min_size=1, max_size=4).map(".".join),
    st.sampled_from(["[::1]", "[1:0:0:2::3:0]", "[::ffff:1.2.3.4]", "[fe80::1%eth0]",
                     "[1::2::3]", "[::]", "[0:0:0:0:0:0:0:1]", "[v1.x]", "[::1.2.3]",
                     "[::01.2.3.4]", "[1:2:3:4:5:6:7:8]", "%41b", "a%2Eb", "%zz", "a<b",
                     "a^b", "a|b", "a b", "a%00b", "例え。jp", "a\u3002b"]),
)
CHARS = "".join(map(chr, range(0x20, 0x7F))) + "\t\n\x01\x7fäß€鞋𝄞\u00a0"
PIECES = st.lists(st.sampled_from([*CHARS, "%2e", "%2E", "..", "%C3%A4"]), max_size=12).map("".join)


@st.composite
def http_urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https", "HTTPS", "hTtP"]))
    slashes = draw(st.sampled_from(["//", "//", "//", "\\\\", "/\\", "///"]))
    userinfo = draw(st.sampled_from(["", "", "", "u@", "u:p@", ":p@", "a@b@", "ü:ß@"]))
    port = draw(st.sampled_from(["", "", "", ":", ":80", ":443", ":8080", ":0", ":065535",
                                 ":65536", ":x"]))
    path = "".join(draw(st.lists(st.sampled_from(["/", "\\"]) | PIECES, max_size=6)))
    if path and path[0] not in "/\\?#":
        path = "/" + path
    pad = draw(st.sampled_from(["", "", " ", "\t", "\x00 "]))
    return f"{pad}{scheme}:{slashes}{userinfo}{draw(HOSTS)}{port}{path}{pad}"


def ada_href(text: str) -> str | None:
    try:
        return ada_url.URL(text).href
    except ValueError:
        return None


@settings(max_examples=1000, deadline=None)
@given(http_urls())
@example("http://a.b/%2e%2e")
@example("http://h.example/a/..?q")
def test_same_as_ada(text: str) -> None:
    parsed = parse(text)
    expected = ada_href(text)
    if expected is None:
        assert isinstance(parsed, Refusal), (text, parsed)
    else:
        assert isinstance(parsed, Url), (text, expected, parsed)
        assert parsed.href == expected


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["http", "HTTPS", "ftp", "mailto", ""]),
       st.sampled_from(["//", "\\\\", "/\\", "///", "", "/"]), HOSTS,
       st.sampled_from(["", ":80", ":x", ":"]), PIECES)
def test_redacted_drops_userinfo_query_and_fragment(
        scheme: str, slashes: str, host: str, port: str, path: str) -> None:
    """Whatever the link, none of its userinfo, query or fragment (marked with a snowman,
    which no other piece holds) is logged or recorded."""
    if scheme.lower() not in urls.DEFAULT_PORTS:
        slashes = "//"  # elsewhere, only "//" starts an authority
    head = f"{scheme}:" if scheme else ""
    marked = f"{head}{slashes}\u2603u:\u2603p@{host}{port}/{path}?\u2603q#\u2603f"
    assert "\u2603" not in urls.redacted(marked)


@settings(max_examples=400, deadline=None)
@given(st.one_of(http_urls(), st.text(), st.text(CHARS).map(lambda s: "https://" + s)))
def test_href_is_printable_ascii_and_reads_back_as_itself(text: str) -> None:
    """What the redirect sends can carry no second header nor lead anywhere else."""
    parsed = parse(text)
    if isinstance(parsed, Url):
        assert parsed.href.isascii() and parsed.href.isprintable() and " " not in parsed.href
        assert parse(parsed.href) == parsed
        assert parsed.host in parsed.href


@settings(max_examples=400, deadline=None)
@given(st.one_of(http_urls(), st.from_regex(
    r"(?i:https?)://[a-z0-9.-]{1,12}(:[0-9]{1,5})?(/[\w.~%!$&'()*+,;=:@|\[\]-]{0,8}){0,4}"
    r"(\?[\w.~%/?=&|\[\]{}^`\\-]{0,12})?(#[\w.~%/?!'-]{0,8})?", fullmatch=True)))
def test_the_fast_path_agrees_with_the_parser(text: str) -> None:
    assert parse.__wrapped__(text) == urls._parse(text.strip(urls.C0_OR_SPACE))
