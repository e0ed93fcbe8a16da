"""The composer of the send API (relay/rewrite/compose.py), tested directly: what it writes is
parsed back with the standard library's ``email`` package."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage

from hypothesis import given
from hypothesis import strategies as st

from relay.rewrite.compose import Attachment, Draft, compose

WHEN = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)
SENDER = Address("Shop", "news", "shop.example")
TO = (Address("", "you", "example.org"),)
# Any printable text, non-ASCII included (no surrogates: those cannot be UTF-8)
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=200)
NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                max_size=120).filter(str.strip)


def parsed(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def check_lines(data: bytes) -> None:
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.isascii()  # needs neither 8BITMIME nor SMTPUTF8


def structure(part: EmailMessage) -> object:
    if part.is_multipart():
        return (part.get_content_type(), [structure(p) for p in part.iter_parts()])
    return part.get_content_type()


def test_text_and_html_are_an_alternative():
    data = compose(Draft(SENDER, TO, "Hi", text="plain", html="<p>html</p>"), "id@relay", WHEN)
    message = parsed(data)
    assert structure(message) == ("multipart/alternative", ["text/plain", "text/html"])
    assert message["Message-ID"] == "<id@relay>"
    assert message["Date"].datetime == WHEN
    assert message["MIME-Version"] == "1.0"
    assert message.get_body(("html",)).get_content() == "<p>html</p>\r\n"


def test_html_alone_is_one_part():
    message = parsed(compose(Draft(SENDER, TO, "Hi", html="<p>x</p>"), "i@r", WHEN))
    assert structure(message) == "text/html"


def test_inline_images_are_related_to_the_html_and_attachments_mixed():
    logo = Attachment("logo.png", b"\x89PNG\r\n\x1a\n\x00", "image/png", content_id="logo")
    pdf = Attachment("Rechnung März.pdf", bytes(range(256)) * 10, "application/pdf")
    draft = Draft(SENDER, TO, "Hi", text="t", html='<img src="cid:logo">',
                  attachments=(pdf, logo))
    data = compose(draft, "i@r", WHEN)
    check_lines(data)
    message = parsed(data)
    assert structure(message) == ("multipart/mixed", [
        ("multipart/alternative", ["text/plain", ("multipart/related",
                                                  ["text/html", "image/png"])]),
        "application/pdf"])
    image = next(p for p in message.walk() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<logo>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == logo.content
    attached = list(message.iter_attachments())
    assert [a.get_filename() for a in attached] == ["Rechnung März.pdf"]
    assert attached[0].get_content() == pdf.content
    assert re.search(rb"filename\*=utf-8''Rechnung%20M%C3%A4rz\.pdf", data)  # RFC 2231


def test_extra_headers_and_recipients():
    draft = Draft(SENDER, TO, "Hi", cc=(Address("Zoë", "z", "example.org"),),
                  reply_to=(Address("", "help", "shop.example"),), text="x",
                  headers=(("X-Anypost-Track-Opens", "true"), ("X-Note", "grüß")))
    message = parsed(compose(draft, "i@r", WHEN))
    assert message["Cc"] == "Zoë <z@example.org>"
    assert message["Reply-To"] == "help@shop.example"
    assert message["X-Anypost-Track-Opens"] == "true"
    assert message["X-Note"] == "grüß"
    assert "Bcc" not in message


def test_long_display_name_folds_into_adjacent_encoded_words():
    name = "0000 ¡¡¡¡¡¡¡¡𐀀𐀀𐀀𐀀𐀀𐀀"
    data = compose(Draft(Address(name, "news", "shop.example"), TO, "x", text="x"), "i@r", WHEN)
    folded = data.split(b"\r\nTo:")[0].removeprefix(b"From: ").decode()
    assert "\r\n " in folded
    assert str(make_header(decode_header(folded))) == f"{name} <news@shop.example>"


@given(name=NAMES, subject=TEXT, filename=NAMES, text=TEXT, html=TEXT, header=TEXT)
def test_any_names_subjects_and_filenames_survive(name: str, subject: str, filename: str,
                                                  text: str, html: str, header: str) -> None:
    content = filename.encode() * 3
    draft = Draft(Address(name, "news", "shop.example"), TO, subject, text=text, html=html,
                  headers=(("X-Note", header),),
                  attachments=(Attachment(filename, content, "text/csv", {"charset": "utf-8"}),))
    data = compose(draft, "i@r", WHEN)
    check_lines(data)
    message = parsed(data)
    # the stdlib's address parser puts a space between adjacent encoded words, which RFC 2047
    # 6.2 says to ignore (test_long_display_name_folds_into_adjacent_encoded_words)
    shown = message["From"].addresses[0].display_name
    assert "".join(shown.split()) == "".join(name.split())
    assert message["From"].addresses[0].addr_spec == "news@shop.example"
    assert message["Subject"] == subject.strip()
    assert message["X-Note"] == header.strip()
    body = message.get_body(("plain",))
    assert body.get_content().replace("\r\n", "\n").rstrip("\n") == text.replace(
        "\r\n", "\n").replace("\r", "\n").rstrip("\n")
    (attached,) = message.iter_attachments()
    assert attached.get_filename() == filename.strip()
    assert attached.get_payload(decode=True) == content
