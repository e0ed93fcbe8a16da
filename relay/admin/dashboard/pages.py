"""The dashboard's pages. Each reads what the API reads, through the same queries
(relay/stats/queries.py: the daily counters, never a scan of events; relay/store/machine.py
for machine traffic), so a page's numbers are the API's for the same window and filters.
Handlers parse, query on the store's reader thread, and render a template."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from relay.admin import queue as admin_queue
from relay.admin.dashboard import clickmap
from relay.admin.dashboard.base import CLOCK, HEADERS, STORE, render, see_other
from relay.admin.messages import message_view
from relay.stats import queries
from relay.stats.maths import Counts, InvalidParameter, days_between
from relay.store import html_bodies, machine

OVERVIEW_DAYS = 30
TOP_LINKS = 50
# The click map's frame: the message's HTML as written, no script, nothing fetched (remote
# images stay blank), no form, no navigation out of the frame.
FRAME_CSP = ("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
             "font-src data:; frame-ancestors 'self'")


def _today() -> date:
    return datetime.now(UTC).date()


def _params(request: web.Request) -> dict[str, str]:
    return {name: request.query.getone(name) for name in request.query}


async def _rows(request: web.Request, query: queries.Query) -> list[Any]:
    return await request.app[STORE].fetchall(query.sql, query.params)


def _window(params: Mapping[str, str]) -> dict[str, str]:
    """The since/until a form shows: what was asked, else the last OVERVIEW_DAYS days."""
    until = params.get("until") or _today().isoformat()
    since = params.get("since") or ""
    if not since:
        try:
            since = (date.fromisoformat(until) - timedelta(days=OVERVIEW_DAYS - 1)).isoformat()
        except ValueError:
            since = ""
    return {"since": since, "until": until}


async def overview(request: web.Request) -> web.Response:
    params = _params(request)
    form = {**params, **_window(params)}
    try:
        query = queries.parse_stats({**form, "group_by": "day",
                                     "limit": str(queries.MAX_ROWS)}, _today())
    except InvalidParameter as exc:
        return render(request, "overview.html", 400, form=form, error=str(exc), totals=None,
                      days=[], machine=[], chart=None)
    rows = await _rows(request, queries.stats_query(query))
    by_day = queries.counts_by_day(rows)
    days = [(day.isoformat(), by_day.get(day.isoformat(), Counts()))
            for day in days_between(query.since, query.until)]
    chart = {"days": [d for d, _ in days], **{
        name: [getattr(c, name) for _, c in days] for name in queries.COUNTERS}}
    bots = await request.app[STORE].fetchall(machine.WINDOW, tuple(query.window().values()))
    return render(request, "overview.html", form=form, error=None,
                  totals=queries.total(rows), days=days, chart=chart,
                  machine=[tuple(row) for row in bots])


async def links(request: web.Request) -> web.Response:
    params = _params(request)
    form = {**params, **_window(params)}
    try:
        query = queries.parse_stats({**form, "limit": str(TOP_LINKS)}, _today(),
                                    grouped=False)
    except InvalidParameter as exc:
        return render(request, "links.html", 400, form=form, error=str(exc), links=[])
    rows = await _rows(request, queries.links_query(query))
    return render(request, "links.html", form=form, error=None, links=rows)


AUDIENCE = ("device", "client", "os", "country")
AUDIENCE_ROWS = 20


async def audience(request: web.Request) -> web.Response:
    """Opens and clicks by device, client, OS and country (the API's ``group_by`` of each)."""
    params = _params(request)
    form = {**params, **_window(params)}
    tables = []
    try:
        for group in AUDIENCE:
            query = queries.parse_stats({**form, "group_by": group,
                                         "limit": str(AUDIENCE_ROWS)}, _today())
            tables.append((group, queries.stats_body(query, await _rows(
                request, queries.stats_query(query)))["rows"]))
    except InvalidParameter as exc:
        return render(request, "audience.html", 400, form=form, error=str(exc), tables=[])
    return render(request, "audience.html", form=form, error=None, tables=tables)


async def messages(request: web.Request) -> web.Response:
    params = {k: v.strip() for k, v in _params(request).items() if v.strip()}
    email_id = params.pop("email_id", "")
    if email_id:  # one path segment, whatever was typed (a NUL, a line break, "../")
        return see_other("/ui/messages/" + quote(email_id, safe=""))
    try:
        found = queries.parse_messages({**params, "limit": params.get("limit", "50")})
    except InvalidParameter as exc:
        return render(request, "messages.html", 400, form=params, error=str(exc), found=None)
    rows = await _rows(request, queries.messages_query(found))
    page = rows[:found.limit]
    recipients = await _rows(request, queries.recipients_query([row[0] for row in page]))
    body = queries.messages_body(found, rows, recipients)
    return render(request, "messages.html", form=params, error=None, found=body,
                  statuses=queries.RECIPIENT_STATUSES)


async def message(request: web.Request) -> web.Response:
    """The API's view of the message (relay/admin/messages.py), with its queue record while
    queue mode still holds it (relay/admin/queue.py ``show_body``: each recipient's attempts)."""
    email_id = request.match_info["email_id"]
    store = request.app[STORE]
    body = await message_view(store, email_id)
    if body is None:
        raise web.HTTPNotFound(reason=f"No message {email_id!r}.")
    now = request.app[CLOCK]()
    kept, queued = await store.read(lambda conn: (
        html_bodies.kept(conn, email_id), admin_queue.show_body(conn, email_id, now)))
    return render(request, "message.html", m=body, kept=kept, queued=queued,
                  statuses=queries.RECIPIENT_STATUSES)


def _link_clicks(rows: list[Any]) -> dict[str, clickmap.LinkClicks]:
    return {url: clickmap.LinkClicks(clicks, unique) for url, clicks, unique in rows}


def _ranked(counts: Mapping[str, clickmap.LinkClicks]) -> list[tuple[str, clickmap.LinkClicks]]:
    return sorted(counts.items(), key=lambda item: (-item[1].clicks, item[0]))


async def _clicks(request: web.Request, email_id: str) -> dict[str, clickmap.LinkClicks]:
    return _link_clicks(await request.app[STORE].fetchall(html_bodies.LINK_CLICKS, (email_id,)))


async def click_map(request: web.Request) -> web.Response:
    email_id = request.match_info["email_id"]
    if not await request.app[STORE].read(lambda conn: html_bodies.kept(conn, email_id)):
        raise web.HTTPNotFound(reason=f"No HTML kept for {email_id!r} (dashboard.keep_html off, "
                                      "no HTML part, or sent before it was kept).")
    counts = await _clicks(request, email_id)
    return render(request, "clickmap.html", email_id=email_id, links=_ranked(counts),
                  total=sum(c.clicks for c in counts.values()), group=None,
                  frame=f"/ui/messages/{email_id}/frame")


class _Group:
    """A campaign's or a tag's click map: the HTML of its first message (the oldest whose
    HTML is kept), and the counted clicks of every message of the group that had that same
    HTML (by its digest: a newsletter sent as one message per recipient is counted whole;
    messages of the group with other HTML, personalised or another version, are not)."""

    def __init__(self, request: web.Request) -> None:
        campaign = request.query.get("campaign", "").strip()
        tag = request.query.get("tag", "").strip()
        if not (campaign or tag):
            raise web.HTTPBadRequest(reason="Name a campaign or a tag.")
        self.kind, self.name = ("campaign", campaign) if campaign else ("tag", tag)
        self.store = request.app[STORE]
        self.params = html_bodies.group_params(self.kind, self.name)

    async def first(self) -> str:
        rows = await self.store.fetchall(html_bodies.FIRST[self.kind], self.params)
        if not rows:
            raise web.HTTPNotFound(reason=f"No message of {self.kind} {self.name!r} has its "
                                          "HTML kept.")
        return str(rows[0][0])

    async def clicks(self, first: str) -> dict[str, clickmap.LinkClicks]:
        return _link_clicks(await self.store.fetchall(html_bodies.SHARED_CLICKS[self.kind],
                                                      (first, *self.params)))

    async def sharing(self, first: str) -> int:
        rows = await self.store.fetchall(html_bodies.SHARING[self.kind], (first, *self.params))
        return int(rows[0][0])


async def group_click_map(request: web.Request) -> web.Response:
    """A campaign's or a tag's click map (:class:`_Group` says what is counted)."""
    group = _Group(request)
    first = await group.first()
    counts = await group.clicks(first)
    return render(request, "clickmap.html", email_id=first, links=_ranked(counts),
                  total=sum(c.clicks for c in counts.values()), group=group,
                  sharing=await group.sharing(first),
                  frame="/ui/clickmap/frame?" + urlencode({group.kind: group.name}))


def _frame(text: str, counts: Mapping[str, clickmap.LinkClicks]) -> web.Response:
    headers = {**HEADERS, "Content-Security-Policy": FRAME_CSP,
               "X-Frame-Options": "SAMEORIGIN"}
    return web.Response(text=clickmap.draw(text, counts), content_type="text/html",
                        charset="utf-8", headers=headers)


async def _html(request: web.Request, email_id: str) -> str:
    text = await request.app[STORE].read(lambda conn: html_bodies.html_of(conn, email_id))
    if text is None:
        raise web.HTTPNotFound(reason=f"No HTML kept for {email_id!r}.")
    return text


async def click_map_frame(request: web.Request) -> web.Response:
    email_id = request.match_info["email_id"]
    return _frame(await _html(request, email_id), await _clicks(request, email_id))


async def group_click_map_frame(request: web.Request) -> web.Response:
    group = _Group(request)
    first = await group.first()
    return _frame(await _html(request, first), await group.clicks(first))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.2f}%"


def _when(value: str) -> str:
    return value.replace("T", " ").replace("Z", " UTC")


def _duration(seconds: float) -> str:
    """A wait or an age for people: ``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, hours, days = whole // 60 % 60, whole // 3600 % 24, whole // 86400
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


FILTERS = {"percent": _percent, "when": _when, "duration": _duration}
ROUTES = (
    ("/overview", overview),
    ("/links", links),
    ("/audience", audience),
    ("/messages", messages),
    ("/messages/{email_id}", message),
    ("/messages/{email_id}/clickmap", click_map),
    ("/clickmap", group_click_map),
    ("/clickmap/frame", group_click_map_frame),
    ("/messages/{email_id}/frame", click_map_frame),
)
