"""The DATA reader's pure checks, against the obvious slow versions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp_in import has_long_line


def naive_long_line(body: bytes, limit: int) -> bool:
    return any(len(line.removesuffix(b"\r")) > limit for line in body.split(b"\n"))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 60), max_size=40), st.integers(1, 40))
def test_has_long_line_matches_the_naive_check(lengths, limit):
    body = b"\r\n".join(b"x" * n for n in lengths)
    assert has_long_line(body, limit) == naive_long_line(body, limit)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_has_long_line_on_any_bytes(body, limit):
    assert has_long_line(body, limit) == naive_long_line(body, limit)


def test_limit_is_exact_at_998():
    assert not has_long_line(b"a" * 998 + b"\r\nb\r\n", 998)
    assert has_long_line(b"b\r\n" + b"a" * 999 + b"\r\n", 998)
