"""relay.tracking.keys on a real store of the run's engine: a generated key stays, so links
made under it keep working after restarts and after configured keys take over."""

from __future__ import annotations

from typing import Any

import pytest

from relay.config import TrackingSettings
from relay.errors import InvalidToken
from relay.ids import new_email_id
from relay.tracking.keys import GENERATED_KID, load_keyring
from relay.tracking.tokens import ClickTarget, OpenTarget, sign_click, sign_open, verify
from tests.legacy_tokens import sign_v1

URL = "https://shop.example/sale?id=7"


def test_tokens_under_the_generated_key_work_after_rotation(store_conn: Any) -> None:
    conn = store_conn
    first = load_keyring(TrackingSettings(), conn)
    assert first.current == GENERATED_KID
    email_id = new_email_id()
    old = [sign_click(first, email_id, "ann@example.net", URL),
           sign_v1(first, email_id, "ann@example.net", URL),
           sign_open(first, email_id, "ann@example.net")]
    assert load_keyring(TrackingSettings(), conn).keys == first.keys  # a restart: the same key

    rotated = load_keyring(TrackingSettings(keys=(("k2", "n" * 32),), current_key="k2"), conn)
    assert rotated.current == "k2"
    click, open_ = ClickTarget(email_id, "ann@example.net", URL), OpenTarget(email_id,
                                                                              "ann@example.net")
    assert [verify(rotated, token) for token in old] == [click, click, open_]
    new = sign_click(rotated, email_id, "ann@example.net", URL)
    assert verify(rotated, new) == click
    with pytest.raises(InvalidToken):
        verify(first, new)  # k2 is unknown there
