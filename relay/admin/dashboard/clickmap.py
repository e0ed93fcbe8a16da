"""The click map: a message's HTML with each tracked link's clicks drawn on it.

Pure: the HTML kept at sending (relay/store/html_bodies.py, the body as the sender wrote it,
before the rewrite) and the counted clicks per URL in, the HTML with a badge spliced in after
each ``<a>``/``<area>`` start tag out. Links are found by the rewrite's own scanner
(relay/rewrite/markup.py) and their URL read as the rewrite reads it (entity references
decoded, relay/rewrite/splice.py), which is the URL each click recorded, so a badge sits on
the link its clicks came through. Everything else is left as written; the page shows it in a
sandboxed frame with no scripts and nothing loaded from elsewhere (relay/admin/dashboard/pages.py).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass

from relay.rewrite import markup, urls

_BADGE = ('<span style="all:initial;display:inline-block;background:#111;color:#ffe066;'
          'font:bold 12px/1.4 sans-serif;padding:1px 5px;margin:0 3px;border-radius:3px;'
          'outline:2px solid #ffe066" title="{title}" data-clicks="{clicks}">{text}</span>')


@dataclass(frozen=True, slots=True)
class LinkClicks:
    clicks: int
    unique: int


def link_url(tag: markup.Tag) -> str:
    """The URL a click on this link records (as relay/rewrite/splice.py ``_classify``)."""
    return markup.unescape_attr(tag.attrs["href"].value or "").strip(urls.C0_OR_SPACE)


def draw(text: str, counts: Mapping[str, LinkClicks]) -> str:
    """``text`` with a badge after each link's start tag: its clicks and their share of all the
    message's clicks (links nobody clicked show 0)."""
    total = sum(c.clicks for c in counts.values())
    pieces: list[str] = []
    pos = 0
    for tag in markup.scan(text).links:
        url = link_url(tag)
        if not url.lower().startswith(("http://", "https://")):
            continue
        found = counts.get(url, LinkClicks(0, 0))
        share = f"{found.clicks / total:.0%}" if total else "0%"
        label = f"{found.clicks} click{'s' if found.clicks != 1 else ''} · {share}"
        title = f"{url}: {found.clicks} clicks, {found.unique} unique, {share} of all clicks"
        pieces.append(text[pos:tag.end])
        pieces.append(_BADGE.format(title=html.escape(title), clicks=found.clicks,
                                    text=html.escape(label)))
        pos = tag.end
    pieces.append(text[pos:])
    return "".join(pieces)
