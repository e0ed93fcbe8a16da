"""The click map's drawing (relay/admin/dashboard/clickmap.py): a badge after each link's start
tag with its clicks and share, the HTML otherwise as written, markup in URLs escaped."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from relay.admin.dashboard.clickmap import LinkClicks, draw

URLS = ["https://shop.example/sale", "https://shop.example/a?b=1&c=2", "http://pay.example/",
        'https://x.example/?q="><script>alert(1)</script>', "mailto:help@shop.example"]
BADGE = re.compile(r'<span style="all:initial;[^"]*" title="[^"]*" data-clicks="\d+">[^<]*</span>')


def link(url: str, text: str) -> str:
    quote = "'" if '"' in url else '"'
    return f"<a href={quote}{url.replace('&', '&amp;')}{quote}>{text}</a>"


@given(st.lists(st.tuples(st.sampled_from(URLS), st.text(alphabet="ab <!->", max_size=8)),
                max_size=8),
       st.dictionaries(st.sampled_from(URLS), st.integers(0, 50)))
def test_badges_are_added_and_nothing_else_changes(links, clicks):
    text = "<!doctype html><body>" + "".join(link(u, t) for u, t in links) + "</body>"
    counts = {url: LinkClicks(n, n) for url, n in clicks.items()}
    drawn = draw(text, counts)
    assert BADGE.sub("", drawn) == text
    badges = [int(n) for n in re.findall(r'data-clicks="(\d+)"', drawn)]
    http = [u for u, _ in links if u.startswith("http")]
    assert badges == [counts.get(u, LinkClicks(0, 0)).clicks for u in http]


def test_a_badge_says_the_share_of_all_clicks():
    text = link(URLS[0], "Sale") + link(URLS[1], "More")
    drawn = draw(text, {URLS[0]: LinkClicks(3, 2), URLS[1]: LinkClicks(1, 1)})
    assert "3 clicks · 75%" in drawn and "1 click · 25%" in drawn
    assert "&amp;c=2: 1 clicks, 1 unique, 25% of all clicks" in drawn  # the URL as read
