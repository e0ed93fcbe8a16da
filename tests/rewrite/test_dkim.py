"""DKIM re-signing (relay/rewrite/dkim.py) gives dkimpy's signature byte for byte, with the
body hash computed a piece at a time so the interpreter lock is let go while a large copy is
signed."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import threading
import time

import dkim
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given
from hypothesis import strategies as st

from relay.rewrite.dkim import DkimSigner, relaxed_body_hash


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(private key PEM, DNS TXT record) of a throwaway 1024-bit RSA key."""
    private = tmp_path_factory.mktemp("dkim") / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(private), "1024"], check=True,
                   capture_output=True)
    public = subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout", "-outform",
                             "DER"], check=True, capture_output=True).stdout
    return private.read_bytes(), b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


# Bodies and headers made of what canonicalization looks at: whitespace, CR and LF alone and
# together, empty lines (at the end too), and other bytes.
texts = st.lists(st.sampled_from([b"a", b"b c", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n",
                                  b"  \t ", b".", b"\xff"]), max_size=40).map(b"".join)
headers = st.lists(st.tuples(st.sampled_from([b"Subject", b"To", b"X-A", b"Date"]),
                             st.lists(st.sampled_from([b"v", b" ", b"\t", b" w "]),
                                      max_size=5).map(b"".join),
                             st.sampled_from([b"", b"\r\n\t folded"])), max_size=4)


def dkimpy_body_hash(body: bytes) -> bytes:
    """The bh= dkimpy gives ``body`` (its parser joins the body's lines with CRLF)."""
    _, parsed = dkim.rfc822_parse(b"From: a@b\r\n\r\n" + body)
    return base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(parsed)).digest())


@given(texts, st.integers(1, 12))
def test_the_body_hash_is_dkimpys_whatever_the_pieces(body: bytes, piece: int) -> None:
    assert relaxed_body_hash(b"xx" + body, 2, piece) == dkimpy_body_hash(body)


@given(headers, texts, st.sampled_from([b"\r\n", b"\n"]),
       st.sampled_from([None, (b"from", b"subject"), (b"from", b"to", b"x-a", b"from")]))
def test_the_signature_is_dkimpys_byte_for_byte_and_verifies(
        key: tuple[bytes, bytes], fields: list[tuple[bytes, bytes, bytes]], body: bytes,
        eol: bytes, names: tuple[bytes, ...] | None) -> None:
    private, record = key
    lines = [b"From: Shop <news@shop.example>"]
    lines += [name + b":" + value + fold.replace(b"\r\n", eol) for name, value, fold in fields]
    message = eol.join(lines) + eol + eol + body
    now = int(time.time())
    ours = DkimSigner("shop.example", "sel", private).sign(message, names)
    theirs = dkim.sign(message, b"sel", b"shop.example", private,
                       canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=list(names) if names else None, linesep=eol)
    if int(time.time()) == now:  # t= is the second it was signed in
        assert ours == theirs + message
    assert dkim.verify(ours, dnsfunc=lambda name, timeout=5: record)


def test_a_large_body_is_signed_with_the_lock_let_go(key: tuple[bytes, bytes]) -> None:
    """A thread ticking beside the signer of a 15 MB copy is never held up for as long as
    dkimpy's own signing held it (its canonicalization holds the interpreter lock for the
    whole body): the gap is bound by one piece, not by the body."""
    private, record = key
    line = b"<p>" + b"x  \t y " * 9 + b"</p>   \r\n"
    message = b"From: a@shop.example\r\nSubject: big\r\n\r\n" + line * (15 * 2**20 // len(line))
    signer = DkimSigner("shop.example", "sel", private)

    def longest_gap(sign: object) -> float:
        done, gaps = threading.Event(), [0.0]

        def tick() -> None:
            last = time.perf_counter()
            while not done.is_set():
                time.sleep(0.001)
                now = time.perf_counter()
                gaps[0], last = max(gaps[0], now - last), now

        ticker = threading.Thread(target=tick)
        ticker.start()
        try:
            sign()  # type: ignore[operator]
        finally:
            done.set()
            ticker.join()
        return gaps[0]

    theirs = longest_gap(lambda: dkim.sign(message, b"sel", b"shop.example", private,
                                           canonicalize=(b"relaxed", b"relaxed")))
    ours = longest_gap(lambda: signer.sign(message))
    assert ours < theirs / 4, (ours, theirs)
    assert dkim.verify(signer.sign(message), dnsfunc=lambda name, timeout=5: record)
