"""The rewrite, checked mechanically against its promises (PRODUCT.md sections 2 and 3).

Each rendered message is taken apart with the standard library's parser (not ours), then:
the HTML with every tracking href put back and the pixel removed equals the input HTML; every
eligible link (found by lexbor, classified here independently) has a token that verifies to
its exact unescaped URL; the quoted-printable is valid; every byte outside the HTML part is
the input's own.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from selectolax.lexbor import LexborHTMLParser

from relay import mime
from relay.rewrite import OPT_OUT_ATTRIBUTES, RewriteOptions, prepare
from relay.tokens import ClickTarget, Keyring, OpenTarget, verify

CORPUS = sorted(Path("/work/shared/corpus/html").glob("*.html"))
BASE = "https://track.shop.example"
KEYS = Keyring({"k1": b"k" * 32}, "k1")
EMAIL_ID = "email_01890a5d-ac96-774b-bcce-b302099a8057"
RCPT = "reader@example.org"
OPTIONS = RewriteOptions(opens=True, clicks=True, base_url=BASE)
JAPANESE = (
    '<html><head><meta http-equiv="Content-Type" content="text/html; charset=ISO-2022-JP">'
    "</head>\n<body>\n<p>こんにちは、世界。セール開催中！</p>\n"
    '<a href="https://shop.example/ja/セール">日本語のURL</a>\n'
    '<a href="https://shop.example/ja/sale?x=1&amp;y=2">今すぐ購入</a>\n'
    "</body></html>\n"
)
CP1252_EXTRA = "\n<p>€9 – “quoted” ’tis naïve café</p>\n"


# ---------------------------------------------------------------- building test messages


def encode_body(data: bytes, cte: str) -> bytes:
    if cte == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    if cte == "quoted-printable":
        return binascii.b2a_qp(data.replace(b"\r\n", b"\n"), istext=True).replace(b"\n", b"\r\n")
    return data


def build(html: str, charset: str | None, cte: str, label: str | None = None) -> bytes:
    """multipart/mixed { multipart/alternative { text/plain, text/html }, PDF attachment }."""
    data = html.encode(charset or "utf-8")
    declared = f'; charset="{label or charset}"' if charset else ""
    attachment = base64.encodebytes(b"%PDF-1.4 not really\x00\xff" * 20).replace(b"\n", b"\r\n")
    return b"\r\n".join(
        [
            b"From: Shop <news@shop.example>",
            b"To: reader@example.org",
            b"Subject: =?utf-8?q?Hello_=E2=98=83?=",
            b"MIME-Version: 1.0",
            b'Content-Type: multipart/mixed; boundary="outer"',
            b"",
            b"This is the preamble.",
            b"--outer",
            b"Content-Type: multipart/alternative;",
            b'\tboundary="inner"',
            b"",
            b"--inner",
            b"Content-Type: text/plain; charset=utf-8",
            b"",
            b'From the shop: <a href="https://x.example/">not html</a>',
            b"--inner",
            f"Content-Type: text/html{declared}".encode(),
            f"Content-Transfer-Encoding: {cte}".encode(),
            b"X-Part-Header: kept",
            b"",
            encode_body(data, cte),
            b"--inner--",
            b"",
            b"--outer",
            b'Content-Type: application/pdf; name="a.pdf"',
            b"Content-Disposition: attachment; filename=a.pdf",
            b"Content-Transfer-Encoding: base64",
            b"",
            attachment.rstrip(b"\r\n"),
            b"--outer--",
            b"epilogue",
            b"",
        ]
    )


# ---------------------------------------------------------------- independent checks


def html_part(raw: bytes) -> email.message.Message:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    parts = [p for p in message.walk() if p.get_content_type() == "text/html"]
    assert len(parts) == 1
    return parts[0]


def check_qp(body: bytes) -> None:
    assert b"\n" not in body.replace(b"\r\n", b"")
    assert b"\r" not in body.replace(b"\r\n", b"")
    for line in body.split(b"\r\n"):
        assert len(line) <= 76, line
        assert not line.endswith((b" ", b"\t")), line
        assert re.fullmatch(rb"(?:[\t !-<>-~]|=[0-9A-F]{2})*=?", line), line


def eligible(tree_html: str, options: RewriteOptions = OPTIONS) -> list[str]:
    """The URLs a browser would follow for links the spec says to track, in document order."""
    urls = []
    for node in LexborHTMLParser(tree_html).css("a[href], area[href]"):
        attrs = {name.lower(): value for name, value in node.attributes.items()}
        if any(name in attrs for name in OPT_OUT_ATTRIBUTES):
            continue
        if (attrs.get("clicktracking") or "").strip().lower() == "off":
            continue
        url = (attrs.get("href") or "").strip("\t\n\f\r ")
        if not re.match(r"(?i)https?://[^/?#]", url) or re.search(r"\{\{|\}\}|\*\||\|\*", url):
            continue
        unescaped = re.sub("%[0-9A-Fa-f]{2}", "", url)
        if not re.fullmatch(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]*", unescaped):
            continue
        host = (urlsplit(url).hostname or "").lower()
        if host == urlsplit(options.base_url).hostname or any(
            host == h or host.endswith("." + h) for h in options.excluded_hosts
        ):
            continue
        urls.append(url)
    return urls


def normalize_charset(html: str) -> str:
    return re.sub(r"(?i)(charset\s*=\s*[\"']?)[A-Za-z0-9_-]+", r"\1X", html)


def check(raw: bytes, html: str, options: RewriteOptions = OPTIONS) -> bytes:
    """Run the rewrite on ``raw`` (whose HTML part decodes to ``html``) and check everything."""
    prepared = prepare(raw, options)
    assert "internal error" not in prepared.reason
    out = prepared.render(EMAIL_ID, RCPT, KEYS)
    if not prepared.will_change:
        assert out == raw
        return out
    part = html_part(out)
    assert part.get_content_charset() == "utf-8"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    new_html = part.get_payload(decode=True).decode("utf-8")

    # Bytes outside the part's body and its two headers are the input's own.
    old_leaf = _html_leaf(raw)
    new_leaf = _html_leaf(out)
    assert out[: old_leaf.start] == raw[: old_leaf.start]
    assert out[new_leaf.end :] == raw[old_leaf.end :]
    check_qp(out[new_leaf.body_start : new_leaf.end])
    assert _other_headers(raw, old_leaf) == _other_headers(out, new_leaf)

    # Tokens verify; put back every href and remove the pixel: the input again.
    hrefs = iter([link.href for p in prepared.report.parts for link in p.links if link.rewritten])
    clicked = []

    def restore(match: re.Match[str]) -> str:
        target = verify(KEYS, match.group(2))
        if match.group(1) == "o":
            assert target == OpenTarget(EMAIL_ID, RCPT)
            return match.group()
        assert isinstance(target, ClickTarget) and (target.email_id, target.recipient) == (
            EMAIL_ID,
            RCPT,
        )
        clicked.append(target.url)
        return next(hrefs)

    base = re.escape(options.base_url)
    restored = re.sub(base + r"/([co])/([A-Za-z0-9_-]+)", restore, new_html)
    assert next(hrefs, None) is None
    pixels = re.findall(r'<img src="' + base + r'/o/[A-Za-z0-9_-]+"[^>]*/>', restored)
    if options.opens:
        assert len(pixels) == 1
        body_end = restored.lower().rfind("</body>")
        at = restored.index(pixels[0])
        assert at + len(pixels[0]) == (body_end if body_end >= 0 else len(restored))
        restored = restored.replace(pixels[0], "")
    else:
        assert not pixels
    if html.count("\n") == html.count("\r\n") and "\r" not in html.replace("\r\n", ""):
        assert normalize_charset(restored) == normalize_charset(html)
    else:  # bare LF or CR inside base64: quoted-printable line breaks are CRLF
        expected = html.replace("\r\n", "\n").replace("\r", "\n")
        assert normalize_charset(restored).replace("\r\n", "\n") == normalize_charset(expected)
    if options.clicks:
        assert clicked == eligible(html, options)
    return out


def _html_leaf(raw: bytes) -> mime.Part:
    (leaf,) = [p for p in mime.leaves(mime.split(raw)) if p.content_type == "text/html"]
    return leaf


def _other_headers(raw: bytes, leaf: mime.Part) -> list[bytes]:
    names = ("content-type", "content-transfer-encoding")
    return [raw[h.start : h.end] for h in leaf.headers.headers if h.key not in names]


# ---------------------------------------------------------------- the corpus matrix


def corpus_cases() -> list[tuple[str, str | None, str, str | None, str]]:
    cases = []
    for path in CORPUS:
        html = path.read_text("utf-8")
        crlf = html.replace("\n", "\r\n")
        for cte in ("8bit", "quoted-printable", "base64"):
            cases.append((path.name, "utf-8", cte, None, crlf))
        if crlf.isascii():
            cases.append((path.name, "us-ascii", "7bit", None, crlf))
        cases.append((path.name, "cp1252", "quoted-printable", "iso-8859-1", crlf + CP1252_EXTRA))
        cases.append((path.name, "cp1252", "8bit", "ISO-8859-1", crlf + CP1252_EXTRA))
        cases.append((path.name, "utf-8", "base64", None, html))  # bare LF inside base64
    return cases


@pytest.mark.parametrize(("name", "charset", "cte", "label", "html"), corpus_cases())
def test_corpus(name: str, charset: str, cte: str, label: str | None, html: str) -> None:
    raw = build(html, charset, cte, label)
    prepared = prepare(raw, OPTIONS)
    assert prepared.will_change, prepared.reason
    check(raw, html)


@pytest.mark.parametrize("cte", ["quoted-printable", "base64", "7bit"])
def test_iso_2022_jp(cte: str) -> None:
    html = JAPANESE.replace("\n", "\r\n")
    raw = build(html, "iso2022_jp", cte, "ISO-2022-JP")
    out = check(raw, html)
    new_html = html_part(out).get_payload(decode=True).decode("utf-8")
    assert "こんにちは、世界。" in new_html
    assert 'content="text/html; charset=utf-8"' in new_html
    report = prepare(raw, OPTIONS).report
    (part,) = [p for p in report.parts if p.content_type == "text/html"]
    assert [link.reason for link in part.links] == ["not a well-formed URL", ""]
    assert part.links[1].url == "https://shop.example/ja/sale?x=1&y=2"


def test_newsletter() -> None:
    raw = Path("/work/shared/bench/newsletter.eml").read_bytes()
    prepared = prepare(raw, OPTIONS)
    assert prepared.reason == "rewrote 10 links, pixel inserted"
    html = html_part(raw).get_payload(decode=True).decode("utf-8")
    check(raw, html)


@pytest.mark.parametrize(
    "options",
    [
        RewriteOptions(opens=True, clicks=False, base_url=BASE),
        RewriteOptions(opens=False, clicks=True, base_url=BASE),
        RewriteOptions(True, True, BASE, excluded_hosts=frozenset({"example.com", "github.com"})),
        RewriteOptions(True, True, "http://127.0.0.1:8080"),
    ],
)
@pytest.mark.parametrize("path", CORPUS[::4], ids=lambda p: p.name)
def test_options(options: RewriteOptions, path: Path) -> None:
    html = path.read_text("utf-8").replace("\n", "\r\n")
    check(build(html, "utf-8", "quoted-printable"), html, options)
