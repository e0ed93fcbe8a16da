import base64
import string
import uuid

import pytest
from hypothesis import given, provisional, settings
from hypothesis import strategies as st

from relay.errors import InvalidToken
from relay.ids import PREFIX, new_email_id
from relay.tracking.tokens import (
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
from tests.legacy_tokens import FIXED, sign_v1

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
    # 1 head + 2 key id + 16 siv + 1 kind + 16 email id + 19 recipient + 92 url = 147 bytes
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
@given(st.sampled_from([bytes((0x21,)) + b"k1", bytes((0x11, 2)) + b"k1"]),
       st.binary(min_size=36, max_size=200))
def test_random_payloads_with_valid_header_fail(head: bytes, tail: bytes) -> None:
    data = head + tail
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


# Opacity: nothing of the recipient, the URL or the email id can be read from a token.

recipients = st.one_of(st.emails(), texts.filter(lambda t: len(t.encode()) >= 6))
urls = st.one_of(
    provisional.urls(),
    st.builds("{}://{}/{}".format, st.sampled_from(["https", "http"]), provisional.domains(),
              texts),
)
WINDOW = 8  # bytes: long enough that a token never holds one by chance (64**8 spellings)


def readings(token: str) -> list[bytes]:
    """Every plausible way to read a token's text: as it is, and base64-decoded from each of
    the four alignments in both alphabets (a standard decoder drops the ``-`` and ``_``)."""
    out = [token.encode()]
    for start in range(4):
        chunk = token[start:]
        chunk = chunk[: len(chunk) - len(chunk) % 4]
        out.append(base64.urlsafe_b64decode(chunk))
        standard = chunk.replace("-", "").replace("_", "")
        out.append(base64.b64decode(standard[: len(standard) - len(standard) % 4]))
    return out


def secrets_of(email_id: str, recipient: str, url: str) -> list[bytes]:
    """What a token must not show, in every spelling it could be written in."""
    parts = [recipient, *recipient.split("@"), url, url.split("://", 1)[-1], email_id,
             email_id.removeprefix(PREFIX).replace("-", "")]
    if "://" in url:
        host, _, path = url.split("://", 1)[1].partition("/")
        parts += [host, path]
    found = [p.encode("utf-8") for p in parts] + [uuid.UUID(email_id.removeprefix(PREFIX)).bytes]
    return [s for s in found if len(s) >= 6]


@settings(max_examples=200, deadline=None)
@given(email_ids, recipients, urls)
def test_a_token_reveals_no_address_url_or_email_id(email_id: str, recipient: str, url: str
                                                    ) -> None:
    for token in (sign_click(KEYS, email_id, recipient, url), sign_open(KEYS, email_id, recipient)):
        read = readings(token)
        for secret in secrets_of(email_id, recipient, url):
            for i in range(max(1, len(secret) - WINDOW + 1)):
                window = secret[i : i + WINDOW]
                assert not any(window in r for r in read), (token, window)


def test_a_token_starts_with_its_version_and_key_id() -> None:
    """The only clear part: version 2 and the key id's length in one byte, then the key id."""
    token = sign_click(KEYS, EMAIL, "reader@example.org", URL)
    data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert data[:3] == bytes((0x21,)) + b"k1"
    long_kid = Keyring({"k" * 16: b"a" * 32}, "k" * 16)
    data = base64.urlsafe_b64decode(sign_open(long_kid, EMAIL, "r@x") + "==")
    assert data[:17] == bytes((0x2F,)) + b"k" * 16


def test_same_link_same_token_other_recipient_other_token() -> None:
    """AES-SIV is deterministic: equal payloads, equal tokens; anything else differs entirely."""
    one = sign_click(KEYS, EMAIL, "a@x.example", URL)
    other = sign_click(KEYS, EMAIL, "b@x.example", URL)
    assert one == sign_click(KEYS, EMAIL, "a@x.example", URL)
    assert one[:4] == other[:4]  # version and key id
    assert sum(a == b for a, b in zip(one[4:], other[4:], strict=True)) < len(one) // 8


@settings(max_examples=200, deadline=None)
@given(email_ids, texts, st.one_of(st.none(), urls, texts))
def test_as_long_as_a_version_1_token(email_id: str, recipient: str, url: str | None) -> None:
    new = sign_open(KEYS, email_id, recipient) if url is None else sign_click(
        KEYS, email_id, recipient, url)
    assert len(new) == len(sign_v1(KEYS, email_id, recipient, url))


def test_a_version_2_fixed_token_keeps_opening() -> None:
    """Made by the first version 2 code: the format and the key derivation must not drift."""
    keys = Keyring({"k1": b"a" * 32, "g1": bytes(range(32))}, "k1")
    assert verify(keys, "IWsxI8fXXmWtZaKMHhURsxSYWgIO1BeQqfxBWbpSvkFpE8-J80seReRWFsLlVsOQCkonzaNOaw"
                  ) == OpenTarget(EMAIL, "reader@example.org")
    assert verify(keys, "IWcxf5UY5JA6VOpt1SqYRhG7QVyOB_eMRlL4TaJsArcSldBV7whn1B2dMcPelity0Dq0giWWCY"
                  "tNHGnwDSTq_X6_FLT3WuHIrhls-V5bToL_iIk9PeZToZRU6hgLrLk") == ClickTarget(
        EMAIL, "Jörg.Müller@bücher.example", "https://shop.example/größe-42?q=鞋")


# Version 1 tokens, already sent, keep verifying; none is made any more.

V1_KEYS = Keyring({"k1": b"a" * 32, "g1": bytes(range(32))}, "k1")


@pytest.mark.parametrize(("kid", "recipient", "url", "token"), FIXED)
def test_version_1_tokens_made_by_the_old_code_still_verify(
        kid: str, recipient: str, url: str | None, token: str) -> None:
    keys = Keyring(V1_KEYS.keys, kid)
    assert sign_v1(keys, EMAIL, recipient, url) == token  # the helper is the old code
    want = OpenTarget(EMAIL, recipient) if url is None else ClickTarget(EMAIL, recipient, url)
    assert verify(keys, token) == want
    assert verify(Keyring(V1_KEYS.keys, "k1" if kid == "g1" else "g1"), token) == want
    assert sign_click(keys, EMAIL, recipient, url or "") != token  # new ones are version 2


@settings(max_examples=200, deadline=None)
@given(email_ids, texts, st.one_of(st.none(), texts))
def test_version_1_round_trip(email_id: str, recipient: str, url: str | None) -> None:
    want = OpenTarget(email_id, recipient) if url is None else ClickTarget(email_id, recipient, url)
    assert verify(KEYS, sign_v1(KEYS, email_id, recipient, url)) == want


@pytest.mark.parametrize("token", [sign_v1(KEYS, EMAIL, "r@x", URL), sign_v1(KEYS, EMAIL, "")])
def test_every_change_to_a_version_1_token_fails(token: str) -> None:
    test_every_single_character_change_fails(token)


def test_rotation_keeps_version_1_tokens_valid() -> None:
    rotated = Keyring({"k1": b"a" * 32, "k2": b"b" * 32}, "k2")
    old_token = sign_v1(KEYS, EMAIL, "r@x", URL)
    assert verify(rotated, old_token) == ClickTarget(EMAIL, "r@x", URL)
    with pytest.raises(InvalidToken):
        verify(Keyring({"k2": b"b" * 32}, "k2"), old_token)
