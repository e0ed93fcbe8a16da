import re
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from selectolax.lexbor import LexborHTMLParser

from relay.rewrite import markup
from relay.rewrite.markup import scan, unescape_attr


def hrefs(text: str) -> list[str | None]:
    return [tag.attrs["href"].value for tag in scan(text).links]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('<a href="x">', ["x"]),
        ("<a href='x'>", ["x"]),
        ("<a href=x>", ["x"]),
        ("<A HREF=x>", ["x"]),
        ("<a\nhref\n=\n'x'\n>", ["x"]),
        ("<a/href=x>", ["x"]),
        ("<a href=https://x.example/>", ["https://x.example/"]),
        ('<a href="x"href="y">', ["x"]),  # the first of a duplicate wins
        ('<area shape=rect href="x">', ["x"]),
        ("<a href>", [None]),
        ("<a href=>", [""]),
        ("<abbr href=x><address href=y>", []),
        ('<!-- <a href="x"> -->', []),
        ('<!--[if mso]><a href="x"><![endif]-->', []),
        ('<![if !mso]><a href="x"><![endif]>', ["x"]),
        ('<!--> <a href="x">', ["x"]),
        ('<!---> <a href="x">', ["x"]),
        ('<!-- --!> <a href="x">', ["x"]),
        ("<!-- a - b -- c ---> <a href=x>", ["x"]),  # dashes inside; the end overlaps them
        ("<!-- <a href=x> --!x -- > <a href=y> --> <a href=z>", ["z"]),
        ("<!--- -><a href=x>--><a href=y>", ["y"]),
        ('<!DOCTYPE html><a href="x">', ["x"]),
        ('<script>"<a href=x>"</script><a href="y">', ["y"]),
        ('<SCRIPT>"<a href=x>"</script ><a href="y">', ["y"]),
        ('<style>a{}</style foo="a>b"><a href="y">', ["y"]),
        ("<textarea><a href=x></textarea>", []),
        ("<title><a href=x></title><a href=y>", ["y"]),
        ("<script></scripty><a href=x></script>", []),
        ("<script><!--<script></script><a href=x></script><a href=y>", ["y"]),  # double escape
        ("<script><!--<script>--><a href=x></script><a href=y>", ["y"]),
        ("<script><!--</script><a href=x>", ["x"]),  # an escaped script still ends
        ("<script><!--><a href=x></script><a href=y>", ["y"]),  # "<!-->" ends the escape
        ("<script><!--<scripty></script><a href=x>", ["x"]),
        ('<img alt="<a href=x>"><a href=y>', ["y"]),
        ("<img alt='>' <a href=x>", []),  # one img tag with odd attribute names
        ("<img alt=it's><a href=y>", ["y"]),  # a quote inside an unquoted value is literal
        ('<a href="x', []),  # end of file inside a tag: no tag
        ('<a href="https://x.example/>go</a></body>', []),  # a quote that never closes
        ("<a href='https://x.example/>go</a></body>", []),
        ('<td title="x>y</td><a href=z></body>', []),
        ('<a href=""c>', [""]),  # a name right after a closed quote starts an attribute
        ('<a href = "x" c>', ["x"]),
        ("<plaintext><a href=x>", []),
        ("a < b <a href=x>", ["x"]),
        ("</ a href=x><a href=y>", ["y"]),
        ("<?xml <a href=x>?><a href=y>", ["y"]),
    ],
)
def test_links(text: str, expected: list[str | None]) -> None:
    assert hrefs(text) == expected


def test_value_spans_and_quotes() -> None:
    text = "<p><a class=c href = 'v&amp;w' >t</a>"
    (tag,) = scan(text).links
    href = tag.attrs["href"]
    assert text[href.start : href.end] == "v&amp;w"
    assert href.quote == "'"
    assert (tag.name, text[tag.start : tag.end]) == ("a", "<a class=c href = 'v&amp;w' >")
    assert tag.attrs["class"].quote == ""


def test_body_close_is_the_last_real_one() -> None:
    text = "<body></body><!-- </body> --></BODY ><script></body></script>"
    assert scan(text).body_close == text.index("</BODY >")
    assert scan("<p>no body</p>").body_close is None


@pytest.mark.parametrize(
    "text",
    ["<a href='x", "<!-- open", "<style>a{}", "<b", "<!x", "<?x", '<a href="x>y</a>', "<i t='>",
     "<plaintext>the rest is text</body>"],
)
def test_stuck_at_unterminated(text: str) -> None:
    markup = scan("<p>ok</p>" + text)
    assert markup.stuck_at == len("<p>ok</p>")


def test_not_stuck() -> None:
    assert scan("<p>a < b</p> <").stuck_at is None


def test_metas() -> None:
    text = '<meta charset="iso-8859-1"><!-- <meta charset=x> --><META http-equiv=x content=y>'
    metas = scan(text).metas
    assert [tag.attrs.get("charset", None) and tag.attrs["charset"].value for tag in metas] == [
        "iso-8859-1",
        None,
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a&amp;b", "a&b"),
        ("?a=1&copy=2", "?a=1&copy=2"),  # legacy reference before "=" stays literal
        ("?a=1&copyx", "?a=1&copyx"),
        ("?a=1&copy 2", "?a=1© 2"),
        ("&copy;=", "©="),
        ("&notit;", "&notit;"),
        ("&#x41;&#66;&#67", "ABC"),
        ("&#0;", "\ufffd"),
        ("&#x110000;", "\ufffd"),
        ("&#" + "9" * 5000 + ";", "\ufffd"),
        ("&#128;", "€"),
        ("&;&#;&#x;&", "&;&#;&#x;&"),
        ("&AMP;&lt", "&<"),
    ],
)
def test_unescape_attr(value: str, expected: str) -> None:
    assert unescape_attr(value) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>!-/?'\"= abhrefmtscipyl&;#x\n")), max_size=200))
def test_scan_never_fails_and_spans_are_consistent(text: str) -> None:
    markup = scan(text)
    for tag in (*markup.links, *markup.metas):
        assert text[tag.start] == "<" and text[tag.end - 1] == ">"
        for attr in tag.attrs.values():
            if attr.value is not None:
                assert text[attr.start : attr.end] == attr.value
                assert tag.start < attr.start <= attr.end < tag.end
    if markup.body_close is not None:
        assert text[markup.body_close : markup.body_close + 6].lower() == "</body"


SCRIPT_ATOMS = ["<script>", "</script>", "<SCRIPT/", "</Script ", "<scripty>", "<!--", "-->",
                "<!-->", "-", "x", "<a href=x>", "<a href=y>"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(SCRIPT_ATOMS), max_size=10))
def test_script_escapes_agree_with_lexbor(atoms: list[str]) -> None:
    """Links in and around an escaped script are those a browser's parser finds."""
    text = "<script><!--" + "".join(atoms) + "</script>"
    found = scan(text)
    assume(found.stuck_at is None)  # a script left open: the scanner stops, lexbor goes on
    expected = [node.attributes["href"] for node in LexborHTMLParser(text).css("a")]
    assert [tag.attrs["href"].value for tag in found.links] == expected


@pytest.mark.parametrize("excluded", ["\t\n\f\r />", "\t\n\f\r />=\"'", "\x00", "\x7f<"])
def test_all_but_is_the_negated_class(excluded: str) -> None:
    positive = re.compile(markup._all_but(excluded))
    negated = re.compile(f"[^{re.escape(excluded)}]")
    for code in [*range(0x300), 0xD800, 0xFFFF, 0x10000, sys.maxunicode]:
        char = chr(code)
        assert bool(positive.fullmatch(char)) == bool(negated.fullmatch(char)), hex(code)
