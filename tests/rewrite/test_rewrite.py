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
import gc
import re
import subprocess
import types
from pathlib import Path

import ada_url
import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from selectolax.lexbor import LexborHTMLParser

from relay.errors import InvalidToken
from relay.rewrite import mime
from relay.rewrite.dkim import DkimSigner
from relay.rewrite.splice import (
    OPT_OUT_ATTRIBUTES,
    LinkResult,
    Links,
    Report,
    RewriteOptions,
    prepare,
)
from relay.tracking.tokens import ClickTarget, Keyring, OpenTarget, verify

# ../shared beside the project's root, as the developers and CI have it
SHARED = Path(__file__).resolve().parents[3] / "shared"
CORPUS = sorted((SHARED / "corpus" / "html").glob("*.html"))
assert CORPUS, f"no HTML templates in {SHARED / 'corpus' / 'html'}"
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
    """The URLs a browser would follow for links the spec says to track, in document order:
    lexbor finds the links, ada (a WHATWG URL parser) reads them."""
    urls = []
    for node in LexborHTMLParser(tree_html).css("a[href], area[href]"):
        attrs = {name.lower(): value for name, value in node.attributes.items()}
        if any(name in attrs for name in OPT_OUT_ATTRIBUTES):
            continue
        if (attrs.get("clicktracking") or "").strip().lower() == "off":
            continue
        url = (attrs.get("href") or "").strip("".join(map(chr, range(0x21))))
        compact = re.sub("[\t\n\r]", "", url)
        if not re.match(r"(?i)https?:[/\\]{2}", compact) or re.search(r"\{\{|\}\}|\*\||\|\*", url):
            continue
        try:
            host = ada_url.URL(url).hostname.removesuffix(".")
        except ValueError:
            continue
        if len(url.encode("utf-8", "surrogatepass")) > 4096:
            continue
        if host == ada_url.URL(options.base_url).hostname or any(
            host == h or host.endswith("." + h) for h in options.excluded_hosts
        ):
            continue
        urls.append(url)
    return urls


def normalize_charset(html: str) -> str:
    return re.sub(r"(?i)(charset\s*=\s*[\"']?)[A-Za-z0-9_-]+", r"\1X", html)


def check(
    raw: bytes, html: str, options: RewriteOptions = OPTIONS, compare_with_lexbor: bool = True
) -> bytes:
    """Run the rewrite on ``raw`` (whose HTML part decodes to ``html``) and check everything."""
    prepared = prepare(raw, options)
    assert "internal error" not in prepared.reason
    out = prepared.render(EMAIL_ID, RCPT, KEYS)
    if not prepared.will_change:
        assert out == raw
        return out
    check_output(raw, out, prepared.report, html, options, compare_with_lexbor)
    return out


def check_output(
    raw: bytes,
    out: bytes,
    report: Report,
    html: str,
    options: RewriteOptions,
    compare_with_lexbor: bool = True,
) -> None:
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
    hrefs = iter([link.href for p in report.parts for link in p.links if link.rewritten])
    clicked = []

    def restore(match: re.Match[str]) -> str:
        try:
            target = verify(KEYS, match.group(2))
        except InvalidToken:  # a tracking-looking URL that was in the input
            return match.group()
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
    inserted = any(p.pixel for p in report.parts)
    assert inserted <= options.opens
    assert len(pixels) == inserted
    if inserted:
        at = restored.index(pixels[0])
        restored = restored.replace(pixels[0], "")
        body_end = restored.lower().rfind("</body>")
        # "<" + "text " (or "</" + "text ") puts "</body>" in a tag; "</" (or "<!", "<?")
        # before it, in a bogus comment: "</</body>" is one. The pixel then goes at the end.
        in_tag = body_end >= 0 and (
            re.search(r"</?[A-Za-z][^<>]*\Z", restored[:body_end])
            or re.search(r"<(?:/[^A-Za-z>]|[!?])[^>]*\Z", restored[: body_end + 1])
        )
        if compare_with_lexbor and not in_tag:
            assert at == (body_end if body_end >= 0 else len(restored))
    if html.count("\n") == html.count("\r\n") and "\r" not in html.replace("\r\n", ""):
        assert normalize_charset(restored) == normalize_charset(html)
    else:  # bare LF or CR inside base64: quoted-printable line breaks are CRLF
        expected = html.replace("\r\n", "\n").replace("\r", "\n")
        assert normalize_charset(restored).replace("\r\n", "\n") == normalize_charset(expected)
    if options.clicks and compare_with_lexbor:
        expected = eligible(html, options)
        if clicked != expected:  # lexbor clones a misnested <a> when it reopens formatting
            assert _runs(clicked) == _runs(expected)  # elements; a clone follows its original


def _runs(urls: list[str]) -> list[str]:
    """``urls`` with each run of one URL counted once."""
    return [url for i, url in enumerate(urls) if i == 0 or urls[i - 1] != url]


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
    assert prepared.reason.endswith("pixel inserted")
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
    assert [link.url for link in part.links] == [
        "https://shop.example/ja/セール", "https://shop.example/ja/sale?x=1&y=2"]


def test_newsletter() -> None:
    raw = (SHARED / "bench" / "newsletter.eml").read_bytes()
    prepared = prepare(raw, OPTIONS)
    assert prepared.reason == "rewrote 10 of 10 links, pixel inserted"
    html = html_part(raw).get_payload(decode=True).decode("utf-8")
    check(raw, html)


@pytest.mark.parametrize("cte", ["quoted-printable", "base64", "8bit"])
def test_the_html_kept_for_the_click_map_is_the_first_html_part_as_decoded(cte: str) -> None:
    """``Prepared.html`` (the dashboard's click map): the first HTML part as the client sent
    it, read in the pass that plans the rewrite; a lone CR, made a line break in the copies,
    stays."""
    html = '<p>Hello\r there</p><a href="https://shop.example/sale">Sale</a>'
    raw = build(html, "utf-8", cte)
    prepared = prepare(raw, OPTIONS)
    assert prepared.will_change
    assert prepared.html == html_part(raw).get_payload(decode=True).decode("utf-8") == html


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


# ---------------------------------------------------------------- generated HTML and MIME

HREFS = [
    "https://example.com/",
    "http://Example.COM:8080/p?q=1&amp;r=2#frag",
    "https://x.example/a?b=1&copy=2",
    "https://x.example/a?b=1&copy;",
    "https://x.example/&#x41;&#66",
    "https://x.example/%41%7e",
    "  https://padded.example/path  ",
    "https://[::1]/v6",
    "https://user:pw@host.example/",
    "mailto:someone@example.com",
    "tel:+123",
    "#top",
    "/relative/path",
    "relative",
    "{{unsubscribe_url}}",
    "https://x.example/*|UNSUB|*",
    "https://track.shop.example/c/abc",
    "https://news.excluded.example/x",
    "javascript:alert(1)",
    "",
    "https://[zz]/",
    "https://x.example/%zz",
    "https://ünïcode.example/",
    'https://x.example/a"b',
    "HTTPS://UPPER.EXAMPLE/",
    "ftp://files.example/",
    "https://shop.example/größe-42?utm_campaign=frühling",
    "https://shop.example/搜索?q=鞋",
    "https://例え.jp/a",
    "https://x.example/?a=1|2&x=[1]",
    "https://x.example/a b?c d",
    "https://x.example/a&#10;b",
    "https:\\\\x.example\\back",
    "https://0x7f.1/",
    "https://1.2.3.999/",
    "https://x.example:99999/",
    "https://x.example:/empty-port",
    "https://:80/",
    "https:x.example",
    "https://☃.net/",
    "https://news.EXCLUDED.example./x",
]
OPT_OUTS = [
    "",
    " data-smtpd-no-track",
    " clicktracking=off",
    " CLICKTRACKING='Off'",
    ' data-pm-no-track="1"',
    " ses:no-track",
    " Data-Alidm-Traceoff",
    ' class="x"',
]
ATOMS = [
    "text ",
    "\r\n",
    " ",
    "<b>",
    "</b>",
    "<i class=x>",
    "</i>",
    "<br/>",
    '<span style="a:b">',
    "</span>",
    "</a>",
    "&amp;",
    "&copy;",
    "&lt;a href=x&gt;",
    "<",
    ">",
    '"',
    "'",
    "=",
    "/",
    "<!DOCTYPE html>",
    "<html>",
    "<head>",
    "</head>",
    "<body>",
    "</body>",
    "</BODY>",
    "</html>",
    '<meta charset="iso-8859-1">',
    '<meta http-equiv="Content-Type" content="text/html; charset=x">',
    '<!-- <a href="https://comment.example/">c</a> -->',
    "<!---->",
    "<!-->",
    '<!--[if mso]><a href="https://mso.example/">o</a><![endif]-->',
    "<![if !mso]>",
    "<![endif]>",
    "<script>var s = '<a href=\"https://script.example/\">';</script>",
    "<style>a[href='https://style.example/']{color:red}</style>",
    '<textarea><a href="https://textarea.example/"></textarea>',
    "<title><a href=https://title.example/></title>",
    '<img alt="a > b" src="x.png">',
    "<img alt='<a href=https://attr.example/>'>",
    "<?php echo 1 ?>",
    "</ weird>",
    "<a>",
    "<area>",
]


def _link(tag: str, quote: str, href: str, extra: str, first: bool) -> str:
    if not quote and (not href or re.search(r"[\s\"'>`=<]", href)):
        quote = '"'
    value = href.replace(quote, "&quot;" if quote == '"' else "&#39;") if quote else href
    attr = f"href={quote}{value}{quote}"
    return f"<{tag} {attr}{extra}>" if first else f"<{tag}{extra} {attr}>"


links = st.builds(
    _link,
    st.sampled_from(["a", "A", "area"]),
    st.sampled_from(['"', "'", ""]),
    st.sampled_from(HREFS),
    st.sampled_from(OPT_OUTS),
    st.booleans(),
)
documents = st.lists(st.one_of(links, st.sampled_from(ATOMS)), max_size=40).map("".join)
GENERATED = RewriteOptions(True, True, BASE, excluded_hosts=frozenset({"excluded.example"}))


@settings(max_examples=300, deadline=None)
@given(documents, st.sampled_from(["quoted-printable", "base64", "8bit"]))
def test_generated_html(html: str, cte: str) -> None:
    check(build(html, "utf-8", cte), html, GENERATED)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(links, st.sampled_from(ATOMS), st.text(max_size=8)), max_size=30).map(
        "".join
    ),
    st.sampled_from(["quoted-printable", "base64", "8bit"]),
)
def test_nonsense_html(html: str, cte: str) -> None:
    """Random text mixed in: lexbor's tree may differ from the token stream (it can clone
    misnested links), so only the rewrite's own invariants are checked."""
    html = html.replace("\r", "")
    check(build(html, "utf-8", cte), html, GENERATED, compare_with_lexbor=False)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_mime_never_crashes(data: st.DataObject) -> None:
    raw = bytearray(build("<a href='https://example.com/'>x</a></body>", "utf-8", "8bit"))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["delete", "insert", "truncate"]))
        if action == "delete":
            del raw[at : at + data.draw(st.integers(1, 40))]
        elif action == "insert":
            raw[at:at] = data.draw(
                st.one_of(
                    st.binary(max_size=20),
                    st.sampled_from(
                        [
                            b"--outer",
                            b"--inner--",
                            b"\r\n\r\n",
                            b"Content-Type: ",
                            b"multipart/mixed; boundary=x",
                            b"\r\n--inner\r\n",
                        ]
                    ),
                )
            )
        else:
            del raw[at:]
    prepared = prepare(bytes(raw), OPTIONS)
    assert "internal error" not in prepared.reason
    out = prepared.render(EMAIL_ID, RCPT, KEYS)
    assert prepared.will_change or out == bytes(raw)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash(raw: bytes) -> None:
    prepared = prepare(b"Content-Type: text/html\r\n\r\n" + raw, OPTIONS)
    assert "internal error" not in prepared.reason
    prepared.render(EMAIL_ID, RCPT, KEYS)


@pytest.mark.parametrize(
    "html",
    [
        "<a " * 40000,
        '<a href="' * 40000,
        "<!--" * 40000,
        "<div a=" * 40000,
        "<script>" + "<!--<script>" * 20000,
        "<a href=https://x.example/>" * 20000,
        "&" * 100000,
        "<a href='" + "&amp;" * 40000 + "'>",
    ],
    ids=range(8),
)
def test_pathological_input_is_linear(html: str) -> None:
    raw = build(html, "utf-8", "8bit")
    prepared = prepare(raw, OPTIONS)
    assert "internal error" not in prepared.reason
    prepared.render(EMAIL_ID, RCPT, KEYS)


# ---------------------------------------------------------------- DKIM


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(private key PEM, DNS TXT record) for a throwaway 1024-bit RSA key."""
    folder = tmp_path_factory.mktemp("dkim")
    private = folder / "key.pem"
    subprocess.run(
        ["openssl", "genrsa", "-traditional", "-out", str(private), "1024"],
        check=True,
        capture_output=True,
    )
    public = subprocess.run(
        ["openssl", "rsa", "-in", str(private), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return private.read_bytes(), b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def signed(raw: bytes, key: bytes, domain: bytes = b"shop.example") -> bytes:
    signature = dkim.sign(
        raw,
        b"sel",
        domain,
        key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"],
    )
    return signature + raw


def test_dkim_resigned_with_key(dkim_key: tuple[bytes, bytes]) -> None:
    key, record = dkim_key
    html = "<html><body><a href='https://example.com/'>x</a></body></html>"
    raw = signed(build(html, "utf-8", "8bit"), key)
    options = RewriteOptions(True, True, BASE, dkim=DkimSigner("shop.example", "sel", key))
    prepared = prepare(raw, options)
    assert prepared.will_change
    assert "re-signed for shop.example" in prepared.reason
    out = prepared.render(EMAIL_ID, RCPT, KEYS)
    assert out.count(b"DKIM-Signature:") == 1
    assert dkim.verify(out, dnsfunc=lambda name, timeout=5: record)
    assert b"h=from:to:subject" in re.sub(rb"\s", b"", out[: out.index(b"From: Shop")])
    unsigned = build(html, "utf-8", "8bit")
    assert raw.endswith(unsigned)
    check_output(unsigned, out[out.index(b"From: Shop") :], prepared.report, html, options)


def test_dkim_without_key_leaves_message(dkim_key: tuple[bytes, bytes]) -> None:
    key, _ = dkim_key
    raw = signed(build("<a href='https://example.com/'>x</a>", "utf-8", "8bit"), key)
    for signer in (None, DkimSigner("other.example", "sel", key)):
        prepared = prepare(raw, RewriteOptions(True, True, BASE, dkim=signer))
        assert not prepared.will_change
        assert prepared.reason == "DKIM-Signature present and no key for shop.example"
        assert prepared.render(EMAIL_ID, RCPT, KEYS) is raw


def test_dkim_unusable_key(dkim_key: tuple[bytes, bytes]) -> None:
    key, _ = dkim_key
    raw = signed(build("<a href='https://example.com/'>x</a>", "utf-8", "8bit"), key)
    junk = DkimSigner("shop.example", "sel", b"junk")
    prepared = prepare(raw, RewriteOptions(True, True, BASE, dkim=junk))
    assert not prepared.will_change
    assert prepared.reason.startswith("DKIM key for shop.example unusable")


def test_no_dkim_signature_no_signing(dkim_key: tuple[bytes, bytes]) -> None:
    key, _ = dkim_key
    raw = build("<a href='https://example.com/'>x</a>", "utf-8", "8bit")
    options = RewriteOptions(True, True, BASE, dkim=DkimSigner("shop.example", "sel", key))
    out = prepare(raw, options).render(EMAIL_ID, RCPT, KEYS)
    assert b"DKIM-Signature" not in out


def test_quote_that_never_closes_leaves_the_part_alone() -> None:
    """A browser reads everything after an unclosed quote as one attribute value, so neither
    the link nor a pixel appended before </body> would ever load: the part stays as it is."""
    html = '<html><body><a href="https://shop.example/sale>Sale</a></body></html>'
    raw = build(html, "utf-8", "8bit")
    prepared = prepare(raw, OPTIONS)
    assert not prepared.will_change
    assert prepared.render(EMAIL_ID, RCPT, KEYS) == raw
    assert "ends inside a tag" in prepared.reason


# ---------------------------------------------------------------- S/MIME


def smime_signed(folder: Path, html: str) -> bytes:
    """A message whose body openssl signed (multipart/signed, S/MIME), with CRLF line ends."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=shop.example", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    inner = (
        'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n--alt\r\n'
        "Content-Type: text/plain; charset=utf-8\r\n\r\nSale: https://shop.example/sale\r\n"
        f"--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--alt--\r\n"
    )
    body = subprocess.run(["openssl", "smime", "-sign", "-signer", str(cert), "-inkey", str(key)],
                          input=inner.encode(), check=True, capture_output=True).stdout
    head = b"From: Shop <news@shop.example>\r\nTo: reader@example.org\r\nSubject: signed\r\n"
    return re.sub(rb"(?<!\r)\n", b"\r\n", head + body)


def smime_verifies(message: bytes) -> bool:
    check = subprocess.run(["openssl", "smime", "-verify", "-noverify", "-out", "/dev/null"],
                           input=message, capture_output=True)
    return check.returncode == 0


def test_smime_signed_html_is_left_alone(tmp_path: Path) -> None:
    raw = smime_signed(tmp_path, '<body><a href="https://shop.example/sale">Sale</a></body>')
    assert smime_verifies(raw)
    prepared = prepare(raw, OPTIONS)
    out = prepared.render(EMAIL_ID, RCPT, KEYS)
    assert out == raw
    assert smime_verifies(out)
    assert "multipart/signed" in prepared.reason
    html = [part for part in prepared.report.parts if part.content_type == "text/html"]
    assert [part.rewritten for part in html] == [False]


def test_unsigned_html_beside_a_signed_part_is_rewritten(tmp_path: Path) -> None:
    signed_entity = smime_signed(tmp_path, "<p>signed</p>").split(b"\r\n", 3)[3]
    raw = (
        b"From: Shop <news@shop.example>\r\nTo: reader@example.org\r\nSubject: mixed\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="mix"\r\n\r\n'
        b'--mix\r\nContent-Type: text/html; charset=utf-8\r\n\r\n'
        b'<a href="https://shop.example/x">x</a></body>\r\n'
        b"--mix\r\n" + signed_entity + b"\r\n--mix--\r\n"
    )
    out = prepare(raw, OPTIONS).render(EMAIL_ID, RCPT, KEYS)
    assert f"{BASE}/c/".encode() in out
    assert signed_entity in out


def test_a_url_too_long_for_a_click_link_is_left_alone() -> None:
    """Its token would be longer than the tracker verifies: a link that could never work."""
    url = "https://shop.example/p?d=".ljust(4096, "a")  # the longest tracked
    raw = build(f'<body><a href="{url}">x</a><a href="{url}a">y</a></body>', "utf-8", "8bit")
    prepared = prepare(raw, OPTIONS)
    [part] = [p for p in prepared.report.parts if p.content_type == "text/html"]
    assert [(link.url, link.reason) for link in part.links] == [
        (url, ""), (None, "URL too long to track (over 4096 bytes)")]
    out = html_part(prepared.render(EMAIL_ID, RCPT, KEYS)).get_payload(decode=True).decode()
    [token] = re.findall(re.escape(BASE) + r"/c/([A-Za-z0-9_-]+)", out)
    assert verify(KEYS, token).url == url


def test_plaintext_gets_no_pixel() -> None:
    """After <plaintext> everything is text: a pixel there would show as markup."""
    options = RewriteOptions(opens=True, clicks=False, base_url=BASE)
    raw = build("<body><p>Log:</p><plaintext>a < b</body>", "utf-8", "8bit")
    prepared = prepare(raw, options)
    assert not prepared.will_change
    assert "ends inside a tag, comment or raw text" in prepared.reason


def test_links_to_an_ipv6_tracking_host_are_not_tracked_again() -> None:
    options = RewriteOptions(opens=False, clicks=True, base_url="http://[::1]:8080")
    raw = build('<body><a href="http://[::1]:8080/c/abc">x</a></body>', "utf-8", "8bit")
    [part] = [p for p in prepare(raw, options).report.parts if p.content_type == "text/html"]
    assert [link.reason for link in part.links] == ["already a tracking link"]


def test_a_utf16_part_with_a_byte_order_mark_is_rewritten_as_utf8() -> None:
    html = '<html><body>café <a href="https://shop.example/">x</a></body></html>'
    raw = build("\ufeff" + html, "utf-16-le", "base64", label="")
    raw = raw.replace(b'Content-Type: text/html; charset=""', b"Content-Type: text/html")
    out = prepare(raw, OPTIONS).render(EMAIL_ID, RCPT, KEYS)
    part = html_part(out)
    assert part.get_content_charset() == "utf-8"
    text = part.get_payload(decode=True).decode("utf-8")
    assert text.startswith("<html><body>café <a href=\"" + BASE + "/c/")


def test_links_as_browsers_read_them() -> None:
    """Every href a browser follows is tracked, each one left alone says why; the tokens
    carry the URL as written (entity references decoded)."""
    hrefs = {
        "https://shop.example/größe-42": "",
        "https://shop.example/搜索?q=鞋&amp;utm_campaign=frühling": "",
        "https://x.example/?a=1|2&amp;x=[1]": "",
        "https://x.example/a b": "",
        "https://例え.jp/a": "",
        "https://news.EXCLUDED.example./x": "excluded_host",
        "https://track.shop.example/c/abc": "tracking_host",
        "mailto:a@shop.example": "not_http",
        "https://x.example:99999/": "malformed",
        "https:x.example": "malformed",
        "{{unsubscribe}}": "placeholder",
        "/relative": "relative",
        "#top": "fragment",
        "": "empty",
    }
    html = "<body>" + "".join(f'<a href="{href}">x</a>' for href in hrefs) + "</body>"
    html += '<a href="https://x.example/" data-smtpd-no-track>x</a>'
    raw = build(html, "utf-8", "8bit")
    prepared = prepare(raw, GENERATED)
    [part] = [p for p in prepared.report.parts if p.content_type == "text/html"]
    assert [link.code for link in part.links] == [*hrefs.values(), "opt_out"]
    assert [link.url for link in part.links if link.rewritten] == [
        "https://shop.example/größe-42", "https://shop.example/搜索?q=鞋&utm_campaign=frühling",
        "https://x.example/?a=1|2&x=[1]", "https://x.example/a b", "https://例え.jp/a"]
    assert prepared.reason == "rewrote 5 of 15 links, pixel inserted"
    assert prepared.report.links_text(limit=2) == (
        "5/15 tracked, untracked: https://news.EXCLUDED.example./x (excluded host "
        "excluded.example); https://track.shop.example/c/abc (already a tracking link); 8 more")
    check(raw, html, GENERATED)


def walked(root: object) -> int:
    """How many objects the cyclic garbage collector visits to walk ``root``: the referents of
    each container it tracks, met from ``root`` (not following types and functions, which
    lead to every module)."""
    seen, stack, visits = {id(root)}, [root], 0
    while stack:
        for referent in gc.get_referents(stack.pop()):
            visits += 1
            if gc.is_tracked(referent) and id(referent) not in seen and not isinstance(
                    referent, type | types.FunctionType | types.ModuleType):
                seen.add(id(referent))
                stack.append(referent)
    return visits


def test_a_message_with_many_links_is_walked_in_few_steps_by_the_garbage_collector() -> None:
    """While its copies go out, a prepared newsletter stays in memory: as one object per link
    and per piece (100,000 links in bench/fanout_bench.py), every collection that looked at
    it visited them all, a cache miss each, and stalled the event loop 80-400 ms. What it
    holds for a copy (its rendering) is walked in as few steps."""
    html = "<body>" + "".join(f'<a href="https://shop.example/{n:x}">{n}</a>\n'
                              for n in range(20_000)) + '<a href="mailto:a@b">m</a></body>'
    prepared = prepare(build(html, "utf-8", "quoted-printable"), OPTIONS)
    assert prepared.links is not None and prepared.links.tracked == 20_000
    rendering = prepared.rendering(EMAIL_ID, RCPT, KEYS)
    rendering.sign(prepared.tokens)
    assert walked(prepared) < 500
    assert walked(rendering) < 500
    assert rendering.message() == prepared.render(EMAIL_ID, RCPT, KEYS)


link_results = st.builds(
    LinkResult, st.text(max_size=5), st.one_of(st.none(), st.text(max_size=5)),
    st.text(max_size=3), st.sampled_from(["", "not_http", "opt_out"]),
).map(lambda link: link if link.url is None else LinkResult(link.href, link.url))


@given(st.lists(st.lists(link_results, max_size=6), min_size=1, max_size=4),
       st.integers(0, 8))
def test_links_read_back_as_they_were_given(groups: list[list[LinkResult]], limit: int) -> None:
    everything = [link for group in groups for link in group]
    links = Links.joined([Links(group) for group in groups])
    assert list(links) == everything
    assert [links[-n] for n in range(1, len(links) + 1)] == everything[::-1]
    assert list(links[1::2]) == everything[1::2]
    assert links.tracked == sum(link.rewritten for link in everything)
    left = [link for link in everything if not link.rewritten]
    assert links.untracked() == left and links.untracked(limit) == left[:limit]
