"""The HTML of sent messages, for the dashboard's click map: each distinct body once
(``html_bodies``, by the SHA-256 of its UTF-8 text), and which body each message had
(``message_html``). A newsletter sent to 100,000 recipients is one body and one row per
message (not per recipient). ``message_html`` rows go with their message (a foreign key with
``ON DELETE CASCADE``: retention and erasure delete messages); bodies no message names any
more are deleted by retention's purge (relay/store/retention.py).
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.smtp.pipeline import MessageRecord, Outcome

# A larger body is not kept (characters): the click map is for mail people read.
MAX_HTML = 2_000_000
# The purge's step: bodies no message names.
ORPHANS = "NOT EXISTS (SELECT 1 FROM message_html x WHERE x.digest = html_bodies.digest)"


def on_message(conn: sqlite3.Connection, record: MessageRecord, outcome: Outcome) -> None:
    """The SMTP path's message listener (relay/smtp/pipeline.py), when ``dashboard.keep_html``
    is on: keeps the HTML of a tracked message some copy of which was sent."""
    if record.html is not None and len(record.html) <= MAX_HTML and outcome.sent:
        keep(conn, record.email_id, record.html, record.created_at)


def keep(conn: sqlite3.Connection, email_id: str, html: str, now: float) -> None:
    """Record that ``email_id`` had ``html``, storing the body only if it is new."""
    digest = hashlib.sha256(html.encode("utf-8", "surrogatepass")).hexdigest()
    conn.execute("INSERT INTO html_bodies (digest, html, created_at) VALUES (?, ?, ?) "
                 "ON CONFLICT (digest) DO NOTHING", (digest, html, now))
    conn.execute("INSERT INTO message_html (email_id, digest) VALUES (?, ?) "
                 "ON CONFLICT (email_id) DO NOTHING", (email_id, digest))


_HTML_OF = ("SELECT b.html FROM message_html m JOIN html_bodies b ON b.digest = m.digest "
           "WHERE m.email_id = ?")


def html_of(conn: sqlite3.Connection, email_id: str) -> str | None:
    rows = conn.execute(_HTML_OF, (email_id,)).fetchall()
    return None if not rows else str(rows[0][0])


def kept(conn: sqlite3.Connection, email_id: str) -> bool:
    return bool(conn.execute("SELECT 1 FROM message_html WHERE email_id = ?",
                             (email_id,)).fetchall())


# The click map's counts: counted clicks and distinct clickers per URL of one message (its
# events, by the events_email index). Run by the caller on the store's reader thread.
LINK_CLICKS = ("SELECT url, count(*), count(DISTINCT recipient) FROM events "
               "WHERE email_id = ? AND type = 'click' AND counted = 1 GROUP BY url")


# A campaign's or a tag's messages (a tag: the X-AliDM-Trace TagName or one of the message's
# tags, as the events API's tag filter): the condition on ``messages m`` and how many times it
# takes the name as a parameter.
GROUPS = {"campaign": ("m.campaign = ?", 1),
          "tag": ("(m.tag_name = ? OR EXISTS (SELECT 1 FROM json_each(m.tags) "
                  "WHERE value = ?))", 2)}
# The first message (the oldest email id) of the group whose HTML is kept: the walk goes up the
# kept messages' own primary key and stops at the first match (LIMIT 1).
FIRST = {group: "SELECT h.email_id FROM message_html h JOIN messages m ON m.email_id = h.email_id "
                f"WHERE {match} ORDER BY h.email_id LIMIT 1"
         for group, (match, _) in GROUPS.items()}
# The group's messages that had the same HTML as a given one (the message_html_digest index):
# how many, and their counted clicks and distinct clickers (message and recipient) per URL.
_SHARING = ("FROM message_html h JOIN messages m ON m.email_id = h.email_id {join}"
            "WHERE h.digest = (SELECT digest FROM message_html WHERE email_id = ?) AND {match}")
SHARING = {group: "SELECT count(*) " + _SHARING.format(join="", match=match)
           for group, (match, _) in GROUPS.items()}
SHARED_CLICKS = {
    group: "SELECT e.url, count(*), count(DISTINCT e.email_id || ' ' || e.recipient) "
           + _SHARING.format(join="JOIN events e ON e.email_id = h.email_id ", match=match)
           + " AND e.type = 'click' AND e.counted = 1 GROUP BY e.url"
    for group, (match, _) in GROUPS.items()}


def group_params(group: str, name: str) -> tuple[str, ...]:
    """The parameters naming ``name`` in the queries of ``group`` (a key of :data:`GROUPS`)."""
    return (name,) * GROUPS[group][1]
