import base64
import string
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import InvalidToken
from relay.ids import PREFIX, new_email_id
from relay.tokens import (
    ClickTarget,
    Keyring,
    OpenTarget,
    RecipientSigner,
    click_url,
    open_url,
    sign_click,
    sign_open,
    verify,
)

KEYS = Keyring({"k1": b"a" * 32}, "k1")
EMAIL = "email_01890a5d-ac96-774b-bcce-b302099a8057"
URL = "https://www.example.com/" + "p" * 76  # 100 characters
ALPHABET = string.ascii_letters + string.digits + "-_"

email_ids = st.uuids().map(lambda u: PREFIX + str(u))
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)


@settings(max_examples=200, deadline=None)
@given(email_ids, texts, texts)
def test_click_round_trip(email_id: str, recipient: str, url: str) -> None:
    token = sign_click(KEYS, email_id, recipient, url)
    assert verify(KEYS, token) == ClickTarget(email_id, recipient, url)


@settings(max_examples=100, deadline=None)
@given(email_ids, texts)
def test_open_round_trip(email_id: str, recipient: str) -> None:
    token = sign_open(KEYS, email_id, recipient)
    assert verify(KEYS, token) == OpenTarget(email_id, recipient)


@pytest.mark.parametrize("url", ["https://x.example/", "http://x.example/", "ftp://x", "", "https"])
def test_scheme_prefixes_round_trip(url: str) -> None:
    assert verify(KEYS, sign_click(KEYS, EMAIL, "r@x", url)).url == url


def test_token_is_url_safe_and_short() -> None:
    token = sign_click(KEYS, EMAIL, "reader@example.org", URL)
    assert set(token) <= set(ALPHABET)
    # 1 head + 3 key id + 16 email id + 19 recipient + 92 url + 16 mac = 147 bytes
    assert len(token) == 196
    assert len(sign_open(KEYS, EMAIL, "reader@example.org")) == 74


def test_recipient_signer_matches_functions() -> None:
    signer = RecipientSigner(KEYS, EMAIL, "r@x")
    assert signer.click(URL) == sign_click(KEYS, EMAIL, "r@x", URL)
    assert signer.open() == sign_open(KEYS, EMAIL, "r@x")


@pytest.mark.parametrize("token", [sign_click(KEYS, EMAIL, "r@x", URL), sign_open(KEYS, EMAIL, "")])
def test_every_single_character_change_fails(token: str) -> None:
    for i, original in enumerate(token):
        for replacement in ALPHABET:
            if replacement != original:
                with pytest.raises(InvalidToken):
                    verify(KEYS, token[:i] + replacement + token[i + 1 :])
        with pytest.raises(InvalidToken):
            verify(KEYS, token[:i] + token[i + 1 :])
        with pytest.raises(InvalidToken):
            verify(KEYS, token[:i] + "A" + token[i:])


def test_every_bit_flip_in_the_payload_fails() -> None:
    token = sign_click(KEYS, EMAIL, "r@x", URL)
    data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for i in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[i] ^= 1 << bit
            spelled = base64.urlsafe_b64encode(bytes(mutated)).rstrip(b"=").decode()
            with pytest.raises(InvalidToken):
                verify(KEYS, spelled)


def test_rotation_keeps_old_tokens_valid() -> None:
    old = Keyring({"k1": b"a" * 32}, "k1")
    rotated = Keyring({"k1": b"a" * 32, "k2": b"b" * 32}, "k2")
    old_token = sign_click(old, EMAIL, "r@x", URL)
    new_token = sign_click(rotated, EMAIL, "r@x", URL)
    assert old_token != new_token
    assert verify(rotated, old_token) == verify(rotated, new_token)
    with pytest.raises(InvalidToken):
        verify(old, new_token)  # k2 unknown there
    retired = Keyring({"k2": b"b" * 32}, "k2")
    with pytest.raises(InvalidToken):
        verify(retired, old_token)


def test_same_key_id_other_secret_fails() -> None:
    token = sign_open(KEYS, EMAIL, "r@x")
    with pytest.raises(InvalidToken):
        verify(Keyring({"k1": b"c" * 32}, "k1"), token)


@pytest.mark.parametrize(
    "token",
    ["", "=", "A", "AA", "AAAA", "a" * 300, "é", "abc=", "abc def", "A" * 9000, "+/+/", "\x00"],
)
def test_malformed_tokens(token: str) -> None:
    with pytest.raises(InvalidToken):
        verify(KEYS, token)


def test_non_string_token() -> None:
    with pytest.raises(InvalidToken):
        verify(KEYS, None)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), st.text(ALPHABET, max_size=400)))
def test_any_string_raises_only_invalid_token(token: str) -> None:
    with pytest.raises(InvalidToken):
        verify(KEYS, token)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=36, max_size=200))
def test_random_payloads_with_valid_header_fail(tail: bytes) -> None:
    data = bytes((0x11, 2)) + b"k1" + tail
    with pytest.raises(InvalidToken):
        verify(KEYS, base64.urlsafe_b64encode(data).rstrip(b"=").decode())


def test_non_canonical_email_id_refused_when_signing() -> None:
    with pytest.raises(ValueError):
        sign_open(KEYS, EMAIL.upper().replace("EMAIL_", "email_"), "r@x")
    with pytest.raises(ValueError):
        sign_open(KEYS, "email_" + uuid.uuid4().hex, "r@x")


@pytest.mark.parametrize(
    "email_id",
    [
        "email_{01890a5d-ac96-774b-bcce-b302099a8057}",
        "email_urn:uuid:01890a5d-ac96-774b-bcce-b302099a8057",
        "email_01890a5d-ac96-774b-bcce-b302099a8057\n",
        "mail_01890a5d-ac96-774b-bcce-b302099a8057",
        "email_01890a5d-ac96-774b-bcce-b302099a805",
    ],
)
def test_other_spellings_of_email_ids_refused(email_id: str) -> None:
    with pytest.raises(ValueError):
        RecipientSigner(KEYS, email_id, "r@x")


@pytest.mark.parametrize(
    ("keys", "current"),
    [({"k1": b"short"}, "k1"), ({"bad id!": b"a" * 32}, "bad id!"), ({"k1": b"a" * 32}, "k2")],
)
def test_keyring_validation(keys: dict[str, bytes], current: str) -> None:
    with pytest.raises(ValueError):
        Keyring(keys, current)


def test_urls() -> None:
    assert open_url("https://t.example", "abc") == "https://t.example/o/abc"
    assert click_url("http://127.0.0.1:8080", "abc") == "http://127.0.0.1:8080/c/abc"


def test_fresh_ids_round_trip() -> None:
    email_id = new_email_id()
    assert verify(KEYS, sign_open(KEYS, email_id, "r@x")).email_id == email_id
