"""What a send request may say (relay/policy/sending.py), tested directly."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import InvalidRequest
from relay.policy.sending import merge, read_batch, read_email


def body(**fields: Any) -> dict[str, Any]:
    return {"from": "Shop <news@shop.example>", "to": ["you@example.org"], "subject": "Hi",
            "html": "<p>x</p>", **fields}


def problems(request: object) -> dict[str, list[str]]:
    with pytest.raises(InvalidRequest) as caught:
        read_email(request)
    return caught.value.errors


def test_a_plain_request():
    s = read_email(body(cc=["Zoë <z@example.org>"], bcc=["b@example.org", "you@example.org"],
                        reply_to="help@shop.example"))
    assert s.sender == "news@shop.example" and s.sender_domain == "shop.example"
    assert s.recipients == ("you@example.org", "z@example.org", "b@example.org")
    assert s.draft.sender.display_name == "Shop"
    assert [a.addr_spec for a in s.draft.reply_to] == ["help@shop.example"]
    assert s.draft.headers == ()


def test_tracking_tags_campaign_topic_become_the_control_headers():
    s = read_email(body(tracking={"opens": False, "clicks": True}, tags=["a", "b-2"],
                        campaign="spring_sale", topic="news.weekly"))
    assert s.draft.headers == (("X-Anypost-Track-Opens", "false"),
                               ("X-Anypost-Track-Clicks", "true"), ("X-Anypost-Tags", "a,b-2"),
                               ("X-Anypost-Campaign", "spring_sale"),
                               ("X-Anypost-Topic", "news.weekly"))
    # a toggle the request does not set is not said: the domain's setting, else the account's
    assert read_email(body(tracking={"opens": True})).draft.headers == (
        ("X-Anypost-Track-Opens", "true"),)


@pytest.mark.parametrize("field,value,path", [
    ("template_id", "template_1", "template_id"),
    ("variables", {"a": 1}, "variables"),
    ("ip_pool", "pool", "ip_pool"),
    ("unsubscribe", {"mode": "none"}, "unsubscribe"),
    ("colour", "red", "colour"),
    ("tags", ["a b"], "tags"),
    ("tags", [f"t{i}" for i in range(11)], "tags"),
    ("tags", ["a", "a"], "tags"),
    ("campaign", "spring sale", "campaign"),
    ("topic", "News", "topic"),
    ("tracking", {"opens": "yes"}, "tracking.opens"),
    ("tracking", {"pixel": True}, "tracking.pixel"),
    ("headers", {"X-Anypost-Track-Opens": "true"}, "headers.X-Anypost-Track-Opens"),
    ("headers", {"Subject": "x"}, "headers.Subject"),
    ("headers", {"Content-Type": "text/plain"}, "headers.Content-Type"),
    ("headers", {"X-A": "a\r\nBcc: x@y.example"}, "headers.X-A"),
    ("headers", {"Bad Name": "x"}, "headers.Bad Name"),
    ("headers", {f"X-{i}": "v" for i in range(26)}, "headers"),
    ("from", "not an address", "from"),
    ("from", "ünïcode@shop.example", "from"),
    ("to", [], "to"),
    ("to", ["a@b.example", "nope"], "to[1]"),
    ("to", [f"r{i}@example.org" for i in range(51)], "to"),
    ("reply_to", [f"r{i}@example.org" for i in range(11)], "reply_to"),
    ("subject", None, "subject"),
    ("attachments", [{"filename": "a.txt", "content": "%%%"}], "attachments[0].content"),
    ("attachments", [{"filename": "a/b", "content": ""}], "attachments[0].filename"),
    ("attachments", [{"filename": "a", "content": "", "content_type": "multipart/mixed"}],
     "attachments[0].content_type"),
    ("attachments", [{"filename": "a", "content": "", "content_id": "<x>"}],
     "attachments[0].content_id"),
    ("attachments", [{"filename": "a", "content": ""}] * 21, "attachments"),
])
def test_each_problem_names_its_field(field: str, value: object, path: str) -> None:
    assert path in problems(body(**{field: value}))


def test_recipients_are_counted_together():
    many = [f"r{i}@example.org" for i in range(30)]
    assert "to" in problems(body(to=many[:20], cc=many[20:], bcc=[f"b{i}@x.example"
                                                                   for i in range(21)]))


def test_text_or_html_is_needed_and_inline_images_need_html():
    assert "text" in problems(body(html=None))
    image = {"filename": "l.png", "content": "", "content_id": "logo"}
    assert "attachments" in problems(body(html=None, text="x", attachments=[image]))


def test_attachment_content_type_parameters():
    s = read_email(body(attachments=[{"filename": "a.csv", "content": base64.b64encode(
        b"a,b").decode(), "content_type": "text/csv; charset=utf-8"}]))
    (a,) = s.draft.attachments
    assert (a.content, a.content_type, dict(a.params)) == (b"a,b", "text/csv",
                                                           {"charset": "utf-8"})
    assert s.attachment_bytes == 3


def test_international_domain_is_punycoded():
    s = read_email(body(to=["Jörg <j@bücher.example>"]))
    assert s.recipients == ("j@xn--bcher-kva.example",)


def test_batch_defaults_merge_as_the_sdk_documents():
    defaults = {"from": "news@shop.example", "subject": "Default", "tags": ["all"],
                "cc": ["c@example.org"], "headers": {"X-A": "1", "X-B": "1"},
                "tracking": {"opens": True, "clicks": True}}
    entry = {"to": ["you@example.org"], "subject": "Mine", "tags": ["mine"],
             "headers": {"X-B": "2"}, "tracking": {"clicks": False}}
    assert merge(defaults, entry) == {
        "from": "news@shop.example", "to": ["you@example.org"], "subject": "Mine",
        "tags": ["all", "mine"], "cc": ["c@example.org"], "headers": {"X-A": "1", "X-B": "2"},
        "tracking": {"opens": True, "clicks": False}}
    (merged,) = read_batch({"emails": [entry], "defaults": defaults})
    assert merged == merge(defaults, entry)


@pytest.mark.parametrize("batch", [
    {"emails": []}, {"emails": [{}] * 101}, {"emails": [{}], "defaults": {"to": ["a@b.c"]}},
    {"emails": [{}], "other": 1}, [], {"emails": [{}], "defaults": []}])
def test_bad_batches(batch: object) -> None:
    with pytest.raises(InvalidRequest):
        read_batch(batch)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(sorted(
                        ["from", "to", "cc", "subject", "html", "text", "headers", "tags",
                         "tracking", "attachments", "campaign", "filename", "content"])),
                        inner, max_size=6), max_leaves=20))
def test_any_json_is_a_submission_or_invalid_request(value: object) -> None:
    try:
        read_email(value)
    except InvalidRequest as exc:
        assert exc.errors and all(isinstance(v, list) and v for v in exc.errors.values())
