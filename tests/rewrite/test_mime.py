import binascii
import quopri

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import DecodeError
from relay.rewrite import mime

NESTED = (
    b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n'
    b"preamble\r\n"
    b"--a\r\n"
    b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
    b"--b \r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html</p>\r\n"
    b"--b--\r\n"
    b"--a\r\n"
    b"Content-Type: text/html; name=x.html\r\n\r\n<p>file</p>\r\n"
    b"--a\r\n"
    b"Content-Type: text/html\r\nContent-Disposition: attachment\r\n\r\n<p>att</p>\r\n"
    b"--a\r\n"
    b"\r\nno headers\r\n"
    b"--a--\r\n"
    b"epilogue\r\n"
)


def bodies(raw: bytes) -> list[tuple[str, str, bytes, bool]]:
    return [
        (p.path, p.content_type, raw[p.body_start : p.end], p.attachment)
        for p in mime.leaves(mime.split(raw))
    ]


def test_nested_split() -> None:
    assert bodies(NESTED) == [
        ("1.1", "text/plain", b"plain", False),
        ("1.2", "text/html", b"<p>html</p>", False),
        ("2", "text/html", b"<p>file</p>", True),
        ("3", "text/html", b"<p>att</p>", True),
        ("4", "text/plain", b"no headers", False),
    ]


def test_bare_lf_and_missing_close_delimiter() -> None:
    raw = b"Content-Type: multipart/alternative; boundary=z\n\n--z\nContent-Type: text/html\n\nx\n"
    assert bodies(raw) == [("1", "text/html", b"x\n", False)]


def test_delimiter_must_start_a_line_and_match_exactly() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n\r\nsee --z here\r\n--zz\r\n"
        b"--z--\r\n"
    )
    assert bodies(raw) == [("1", "text/plain", b"see --z here\r\n--zz", False)]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"Content-Type: multipart/mixed\r\n\r\nx", "multipart without a usable boundary"),
        (b"Content-Type: multipart/mixed; boundary=q\r\n\r\nx", "multipart without parts"),
        (
            b"Content-Type: multipart/mixed; boundary=q0\r\n\r\n"
            + b"".join(
                b"--q%d\r\nContent-Type: multipart/mixed; boundary=q%d\r\n\r\n" % (i, i + 1)
                for i in range(40)
            ),
            "multipart nested too deeply",
        ),
    ],
)
def test_structure_problems(raw: bytes, problem: str) -> None:
    problems = {p.problem for p in mime.leaves(mime.split(raw))}
    assert problem in problems


def test_defaults() -> None:
    (part,) = mime.leaves(mime.split(b"Subject: x\r\n\r\nbody"))
    assert (part.content_type, part.path) == ("text/plain", "")
    (part,) = mime.leaves(mime.split(b"Content-Type: junk\r\n\r\nbody"))
    assert part.content_type == "text/plain"


@pytest.mark.parametrize(
    ("cte", "body", "expected"),
    [
        ("7bit", b"abc", b"abc"),
        ("8BIT", b"\xc3\xa9", b"\xc3\xa9"),
        ("quoted-printable", b"a=3Db=\r\nc", b"a=bc"),
        ("base64", b"aGVs\r\nbG8=", b"hello"),
    ],
)
def test_transfer_decode(cte: str, body: bytes, expected: bytes) -> None:
    raw = f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode() + body
    assert mime.transfer_decode(raw, mime.split(raw)) == expected


@pytest.mark.parametrize(("cte", "body"), [("base64", b"a"), ("x-uuencode", b"")])
def test_transfer_decode_refuses(cte: str, body: bytes) -> None:
    raw = f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode() + body
    with pytest.raises(DecodeError):
        mime.transfer_decode(raw, mime.split(raw))


@pytest.mark.parametrize(
    ("data", "charset", "expected"),
    [
        (b"caf\xe9 \x80 \x93", "iso-8859-1", "café € “"),
        (b"\x81", "ISO-8859-1", "\x81"),
        ("日本".encode("iso2022_jp"), "iso-2022-jp", "日本"),
        ("ｶﾀｶﾅ".encode("iso2022_jp_ext"), "iso-2022-jp", "ｶﾀｶﾅ"),
        (b"\xc3\xa9", None, "é"),
        (b"\xe9", None, "é"),
        (b"\xe9", "us-ascii", "é"),
        (b'<meta charset="koi8-r">\xc1', None, '<meta charset="koi8-r">а'),
        ("中文".encode("gbk"), "gb2312", "中文"),
        # a byte-order mark decides, whatever the label says (a UTF-8 one is kept)
        (b"\xef\xbb\xbfcaf\xc3\xa9", "iso-8859-1", "\ufeffcafé"),
        ("\ufeffcafé".encode("utf-16-le"), None, "café"),
        ("\ufeffcafé".encode("utf-16-be"), "us-ascii", "café"),
        # the prescan skips comments, and content= counts only with http-equiv
        (b'<!-- <meta charset="koi8-r"> --><meta charset="utf-8">\xc3\xa9', None,
         '<!-- <meta charset="koi8-r"> --><meta charset="utf-8">é'),
        (b'<meta content="text/html; charset=koi8-r">\xc3\xa9', None,
         '<meta content="text/html; charset=koi8-r">é'),
        (b'<meta http-equiv="Content-Type" content="text/html; charset=koi8-r">\xc1', None,
         '<meta http-equiv="Content-Type" content="text/html; charset=koi8-r">а'),
    ],
)
def test_decode_text(data: bytes, charset: str | None, expected: str) -> None:
    assert mime.decode_text(data, charset) == expected


@pytest.mark.parametrize(
    ("data", "charset"),
    [(b"\xff", "utf-8"), (b"x", "no-such"), (b"x", "unicode_escape"), (b"x", "a\x00b"),
     (b"\xff\xfe\x00\xd8", None)],  # a lone surrogate after a UTF-16 byte-order mark
)
def test_decode_text_refuses(data: bytes, charset: str) -> None:
    with pytest.raises(DecodeError):
        mime.decode_text(data, charset)


def _apply(raw: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    for start, end, new in sorted(edits, reverse=True):
        raw = raw[:start] + new + raw[end:]
    return raw


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            b'Content-Type: text/html; charset="iso-8859-1"\r\n'
            b"Content-Transfer-Encoding: 8bit\r\n",
            b"Content-Type: text/html; charset=UTF-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n",
        ),
        (
            b"Content-type: text/html\r\nX: y\r\n",
            b"Content-type: text/html; charset=UTF-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\nX: y\r\n",
        ),
        (
            b"Content-Type: text/html;\r\n\tcharset=us-ascii; format=x\r\n"
            b"content-transfer-encoding: base64\r\n",
            b"Content-Type: text/html;\r\n\tcharset=UTF-8; format=x\r\n"
            b"content-transfer-encoding: quoted-printable\r\n",
        ),
    ],
)
def test_header_edits(headers: bytes, expected: bytes) -> None:
    raw = headers + b"\r\nbody"
    assert _apply(raw, mime.header_edits(raw, mime.split(raw))) == expected + b"\r\nbody"


def check_qp(encoded: bytes) -> None:
    for line in encoded.split(b"\r\n"):
        assert len(line) <= 76
        assert not line.endswith((b" ", b"\t"))
    assert b"\n" not in encoded.replace(b"\r\n", b"")


ascii_texts = st.text(st.characters(max_codepoint=0x7F, exclude_characters="\r"), max_size=400)
any_texts = st.text(
    st.characters(exclude_characters="\r", exclude_categories=("Cs",)), max_size=400
)
tokens = st.text("abcXYZ019-_", min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(st.one_of(ascii_texts, any_texts))
def test_qp_encode_round_trip(text: str) -> None:
    (encoded,) = mime.qp_encode_parts([text], b"\r\n")
    check_qp(encoded)
    assert binascii.a2b_qp(encoded).decode("utf-8") == text.replace("\n", "\r\n")


@settings(max_examples=300, deadline=None)
@given(  # all-ASCII parts take the fast path, others binascii's
    st.sampled_from([ascii_texts, any_texts]).flatmap(
        lambda texts: st.tuples(st.lists(st.tuples(texts, tokens), max_size=5), texts)
    )
)
def test_pieces_with_wrapped_tokens(case: tuple[list[tuple[str, str]], str]) -> None:
    pieces, last = case
    encoded = mime.qp_encode_parts([text for text, _ in pieces] + [last], b"\r\n")
    out = b""
    for static, (_, token) in zip(encoded, pieces, strict=False):
        assert static == b"" or static.endswith(b"\r\n")  # the token starts a line
        out += static + mime.qp_wrap_safe(token, "\r\n")
    out += encoded[-1]
    check_qp(out)
    expected = "".join(text + token for text, token in pieces) + last
    assert binascii.a2b_qp(out).decode("utf-8") == expected.replace("\n", "\r\n")


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (["a=b é\r\n"], [b"a=3Db =C3=A9\r\n"]),
        (["x" * 80], [b"x" * 75 + b"=\r\n" + b"x" * 5]),
        (["x" * 74 + "=y"], [b"x" * 74 + b"=\r\n=3Dy"]),  # "=3D" is never cut apart
        (["a  \r\nb\t"], [b"a  =\r\n\r\nb\t=\r\n"]),  # end-of-line white space kept
        (["a\x00\x0cb"], [b"a=00=0Cb"]),
        (['<a href="', '">', ""], [b'<a href=3D"=\r\n', b'">=\r\n', b""]),
        (["line\r\n", "x"], [b"line\r\n", b"x"]),  # a cut at a line start needs no break
        (["x" * 75 + " "], [b"x" * 75 + b"=\r\n =\r\n"]),
        (["\xff\x00", "é"], [b"=C3=BF=00=\r\n", b"=C3=A9"]),  # the cut is not a 0xFF of text
    ],
)
def test_qp_encode_parts_examples(parts: list[str], expected: list[bytes]) -> None:
    assert mime.qp_encode_parts(parts, b"\r\n") == expected


def test_qp_lf_messages_keep_lf() -> None:
    (encoded,) = mime.qp_encode_parts(["a\r\nb " * 40], b"\n")
    assert b"\r" not in encoded


def test_line_ending() -> None:
    assert mime.line_ending(b"a: b\r\n") == b"\r\n"
    assert mime.line_ending(b"a: b\n") == b"\n"
    assert mime.line_ending(b"") == b"\r\n"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 90), st.text(alphabet="aé =\t", max_size=30))
def test_non_ascii_qp_lines_fit_even_where_binascii_overflows(width, tail):
    """binascii.b2a_qp writes a space ending a long line as "=20" past the 76th column."""
    text = "é" + "a" * width + " \r\nnext" + tail + "\r\n"
    [encoded] = mime.qp_encode_parts([text], b"\r\n")
    assert all(len(line) <= 76 for line in encoded.split(b"\r\n"))
    assert quopri.decodestring(encoded).decode("utf-8") == text
