"""The header block follows a message through the mail path's edits (relay/rewrite/headers.py):
read once, then moved by what is cut out or put in, never read again; it must be what reading
the edited message would give."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.rewrite.headers import insert_field, parse_header_block, remove_headers

lines = st.sampled_from([b"Received: from a", b"Subject: x", b"X-Anypost-Tags: a", b"To :  b",
                         b" folded", b"\tfolded", b"not a header", b"", b"body", b"From: c"])
messages = st.tuples(st.lists(lines, max_size=10), st.sampled_from([b"\r\n", b"\n"]),
                     st.booleans()).map(lambda m: m[1].join(m[0]) + (m[1] if m[2] else b""))


@given(messages, st.data())
def test_a_block_with_headers_cut_out_is_the_block_of_what_is_left(raw: bytes,
                                                                   data: st.DataObject) -> None:
    block = parse_header_block(raw)
    doomed = data.draw(st.lists(st.sampled_from(block.headers), unique=True)
                       if block.headers else st.just([]))
    assert block.without(doomed) == parse_header_block(remove_headers(raw, doomed))


@given(messages, st.data(), st.sampled_from([b"Message-ID: <a@b>\r\n",
                                             b"Message-ID: <a@b>\n"]))
def test_a_block_with_a_field_put_in_is_the_block_of_the_result(raw: bytes, data: st.DataObject,
                                                               field: bytes) -> None:
    block = parse_header_block(raw)
    at = data.draw(st.sampled_from([h.start for h in block.headers]
                                   + [block.headers[-1].end if block.headers else 0]))
    out, moved = insert_field(raw, block, field, at)
    assert out == raw[:at] + field + raw[at:]
    assert moved == parse_header_block(out)
