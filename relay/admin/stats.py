"""Statistics and events: ``GetTrackList`` as Alibaba answers it (README, "Statistics and
events API"), the native routes (events, statistics by group, clicks per link) and
``relay stats`` / ``relay events``, over the same queries (relay/stats/queries.py): tables by
default, the API's JSON with --json (``relay events`` adds ``machine_events_hidden`` there when
it leaves machine traffic out).

Handlers only parse, query (on the store's reader thread) and answer; a bad parameter raises
``InvalidParameter``, which the API answers with a ``400`` whose JSON error names it
(``error.parameter``) and the CLI prints.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from relay.admin.commands import ConfigOption, open_store, output, print_table
from relay.admin.http import (
    BOOLEAN,
    DAY,
    INTEGER,
    NULLABLE_STRING,
    RATE,
    STRING,
    Operation,
    fetch,
    json_response,
    obj,
    ok,
    param,
    query_params,
)
from relay.stats import queries
from relay.stats.maths import (
    DEFAULT_PAGE_SIZE,
    ESPS,
    MAX_PAGE_SIZE,
    parse_track_list,
    track_list_body,
)
from relay.store import reports


def _today() -> date:
    return datetime.now(UTC).date()


async def get_track_list(request: web.Request) -> web.Response:
    query = parse_track_list(query_params(request), _today())
    rows = await fetch(request, queries.track_list_query(query))
    return json_response(track_list_body(query, queries.counts_by_day(rows)))


async def list_events(request: web.Request) -> web.Response:
    event_filter = queries.parse_events(query_params(request))
    rows = await fetch(request, queries.events_query(event_filter))
    deliveries = await fetch(request, queries.delivery_events_query(event_filter))
    return json_response(queries.events_body(event_filter, rows, deliveries))


async def get_stats(request: web.Request) -> web.Response:
    query = queries.parse_stats(query_params(request), _today())
    rows = await fetch(request, queries.stats_query(query))
    return json_response(queries.stats_body(query, rows))


async def get_link_stats(request: web.Request) -> web.Response:
    query = queries.parse_stats(query_params(request), _today(), grouped=False)
    rows = await fetch(request, queries.links_query(query))
    return json_response(queries.links_body(query, rows))


# ---- command line ----

DEFAULT_EVENTS_HOURS = 24


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    stats = commands.add_parser(
        "stats", help="opens and clicks per day, tag, campaign, sender domain or link",
        description="Counted opens and clicks (people and mailbox proxies, never bots) of the "
                    "mail sent on each day of the window (UTC).")
    stats.add_argument("--since", metavar="DAY", help="first day, yyyy-mm-dd (default: 29 "
                                                      "days before --until)")
    stats.add_argument("--until", metavar="DAY", help="last day, yyyy-mm-dd (default: today)")
    stats.add_argument("--by", default="day", choices=[*queries.GROUPS, "url"],
                       help="group by (default: day)")
    stats.add_argument("--limit", type=int, default=queries.DEFAULT_ROWS, help="at most N rows")
    events = commands.add_parser(
        "events", help="list events: opens, clicks, queue mode's delays and bounces",
        description="Events, oldest first. Machine traffic is left out unless --all.")
    events.add_argument("--since", help="yyyy-mm-dd or ISO 8601 date-time (default: "
                                        f"{DEFAULT_EVENTS_HOURS} hours ago)")
    events.add_argument("--until", help="yyyy-mm-dd (included) or ISO 8601 date-time")
    events.add_argument("--type", choices=queries.EVENT_TYPES)
    for name in ("recipient", "email-id", "tag", "campaign", "topic"):
        events.add_argument(f"--{name}")
    events.add_argument("--all", action="store_true",
                        help="include machine traffic (prefetch, scanner, automation)")
    events.add_argument("--limit", type=int, default=queries.DEFAULT_PAGE, help="at most N")
    events.add_argument("--cursor", help="next_cursor of a previous --json page")
    for command, run in ((stats, _stats), (events, _events)):
        config_option(command)
        command.set_defaults(run=run)


def _stats(args: argparse.Namespace) -> int:
    params = {"since": args.since or "", "until": args.until or "", "limit": str(args.limit),
              "group_by": args.by if args.by != "url" else ""}
    query = queries.parse_stats(params, datetime.now(UTC).date(), grouped=args.by != "url")
    conn = open_store(args)
    if args.by == "url":
        body = queries.links_body(query, reports.rows(conn, queries.links_query(query)))
        return output(args, body, lambda: print_table(
            ["url", "clicks", "unique clicks"],
            [(link["url"], link["clicks"], link["unique_clicks"]) for link in body["links"]]))
    body = queries.stats_body(query, reports.rows(conn, queries.stats_query(query)))
    return output(args, body, lambda: print_table(
        [args.by, "sent", "opens", "unique opens", "clicks", "unique clicks", "open %",
         "click %", "click-to-open %"],
        [(row["key"] or "-", row["sent"], row["opens"], row["unique_opens"], row["clicks"],
          row["unique_clicks"], _percent(row["unique_open_rate"]),
          _percent(row["unique_click_rate"]), _percent(row["click_to_open_rate"]))
         for row in body["rows"]]))


def _events(args: argparse.Namespace) -> int:
    since = args.since or datetime.fromtimestamp(time.time() - DEFAULT_EVENTS_HOURS * 3600,
                                                 UTC).isoformat()
    params = {"since": since, "until": args.until or "", "type": args.type or "",
              "recipient": args.recipient or "", "email_id": args.email_id or "",
              "tag": args.tag or "", "campaign": args.campaign or "", "topic": args.topic or "",
              "include_machine": str(args.all), "limit": str(args.limit),
              "cursor": args.cursor or ""}
    event_filter = queries.parse_events(params)
    conn = open_store(args)
    body = queries.events_body(event_filter,
                               reports.rows(conn, queries.events_query(event_filter)),
                               reports.rows(conn, queries.delivery_events_query(event_filter)))
    if not args.all:
        [(hidden,)] = reports.rows(conn, queries.machine_count_query(event_filter))
        body["machine_events_hidden"] = hidden
    return output(args, body, lambda: _print_events(body, since))


def _print_events(body: Mapping[str, Any], since: str) -> None:
    if body["events"]:
        print_events(body["events"])
    else:
        print(f"no events since {since}")
    if body["next_cursor"]:
        print(f"more: --cursor {body['next_cursor']}")
    hidden = body.get("machine_events_hidden")
    if hidden:
        print(f"{hidden} machine event{'s' if hidden != 1 else ''} hidden (prefetches, link "
              "scanners, automation such as curl or scripts); add --all to list them")


def print_events(events: Sequence[Mapping[str, Any]]) -> None:
    """Events (the API's JSON) as a table; a delivery event's url column holds its reply."""
    print_table(["time", "type", "classification", "recipient", "email id", "url", "device",
                 "client", "location"],
                [(e["occurred_at"], _event_type(e), _classification(e), e["recipient"],
                  e["email_id"], e["url"] or e.get("reply"), e["device"], e["client"],
                  ", ".join(filter(None, (e["geo"] or {}).values()))) for e in events])


def _event_type(e: Mapping[str, Any]) -> str:
    if "smtp_code" in e:  # a delivery event
        return f"{e['type']} ({e['bounce_type']})" if e.get("bounce_type") else e["type"]
    return e["type"] + (" (implied)" if e["implied"] else "")


def _classification(e: Mapping[str, Any]) -> str:
    if "smtp_code" in e:
        then = f", next {e['next_attempt_at']}" if e.get("next_attempt_at") else ""
        return f"attempt {e['attempt']}{then}"
    return e["classification"] + (f" ({e['bot_source']})" if e["bot_source"] else "")


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}"


# ---- OpenAPI description ----

_TRACK_ROW = obj({name: STRING for name in (
    "RcptClickRate", "RcptUniqueOpenCount", "RcptClickCount", "RcptUniqueClickCount",
    "CreateTime", "RcptUniqueOpenRate", "RcptUniqueClickRate", "TotalNumber", "RcptOpenRate",
    "RcptOpenCount")})
TRACK_LIST = obj({
    "OffsetCreateTimeDesc": STRING, "OffsetCreateTime": STRING, "RequestId": STRING,
    "PageNo": INTEGER, "PageSize": INTEGER, "Total": INTEGER, "TotalPages": INTEGER,
    "data": obj({"stat": {"type": "array", "items": _TRACK_ROW}}),
})
DIGITS = {"type": "string", "pattern": "^[0-9]+$"}
_TRACK_PARAMS = [
    param("StartTime", "First day, yyyy-MM-dd, within the last 30 days (UTC)", DAY,
           required=True),
    param("EndTime", "Last day, yyyy-MM-dd, at most 7 days after StartTime", DAY,
           required=True),
    param("PageSize", f"Days per page, 1-{MAX_PAGE_SIZE} (default {DEFAULT_PAGE_SIZE})",
           DIGITS),
    param("PageNumber", "Page, from 1 (default 1)", DIGITS),
    param("AccountName", "Sender address (all senders when omitted)"),
    param("TagName", "Tag name (the X-AliDM-Trace TagName); requires AccountName"),
    param("Esp", f"Recipients' provider: {', '.join(ESPS)}, or an alias such as "
                  "googlemail.com, hotmail.com, live.com, msn.com, me.com, ymail.com"),
    *(param(name, "Deprecated; ignored") for name in
      ("Total", "Offset", "OffsetCreateTime", "OffsetCreateTimeDesc")),
    *(param(name, "Not supported by the relay: must be empty") for name in
      ("DedicatedIpPoolId", "DedicatedIp", "ConfigSetId")),
]

_COUNTS = {"sent": INTEGER, "opens": INTEGER, "unique_opens": INTEGER, "clicks": INTEGER,
           "unique_clicks": INTEGER, "open_rate": RATE, "unique_open_rate": RATE,
           "click_rate": RATE, "unique_click_rate": RATE, "click_to_open_rate": RATE}
STATS = obj({"group_by": {"type": "string", "enum": list(queries.GROUPS)},
             "since": DAY, "until": DAY, "sender_domain": STRING, "campaign": STRING,
             "tag": STRING,
             "rows": {"type": "array", "items": obj({"key": NULLABLE_STRING, **_COUNTS})}},
            ["group_by", "since", "until", "rows"])
LINKS = obj({"since": DAY, "until": DAY, "sender_domain": STRING, "campaign": STRING,
             "tag": STRING, "links": {"type": "array", "items": obj(
                 {"url": STRING, "clicks": INTEGER, "unique_clicks": INTEGER})}},
            ["since", "until", "links"])
_WINDOW_PARAMS = [
    param("since", "First day of the window, UTC (default: 29 days before until)", DAY),
    param("until", "Last day of the window, UTC (default: today)", DAY),
    param("limit", f"At most this many rows (default {queries.DEFAULT_ROWS})",
           {"type": "integer", "minimum": 1, "maximum": queries.MAX_ROWS}),
]
_FILTER_PARAMS = [
    param("sender_domain", "Messages from this sender domain only (by day, campaign or "
                           "sender_domain; clicks per link)"),
    param("campaign", "Messages of this campaign only (by day, campaign or sender_domain; "
                      "clicks per link)"),
    param("tag", "Messages carrying this tag only (by day or tag; clicks per link; with no "
                 "other filter)"),
]

_EVENT_FIELDS = {
    "id": STRING, "type": {"type": "string", "enum": list(queries.EVENT_TYPES)},
    "occurred_at": {"type": "string", "format": "date-time"}, "email_id": STRING,
    "recipient": STRING, "url": NULLABLE_STRING, "ip": NULLABLE_STRING,
    # null for the delivery events (delayed, bounced), which have the five fields after geo
    "user_agent": NULLABLE_STRING, "method": NULLABLE_STRING,
    "classification": NULLABLE_STRING, "bot_source": NULLABLE_STRING,
    "reason": NULLABLE_STRING, "counted": BOOLEAN, "implied": BOOLEAN,
    "first_for_recipient": BOOLEAN, "first_for_link": BOOLEAN,
    # relay/tracking/enrich.py: from the user agent, and the location database when configured
    "device": NULLABLE_STRING, "client": NULLABLE_STRING, "os": NULLABLE_STRING,
    "geo": {**obj({"country": NULLABLE_STRING, "region": NULLABLE_STRING,
                       "city": NULLABLE_STRING}), "nullable": True},
}
EVENT = obj({**_EVENT_FIELDS,
             "smtp_code": INTEGER, "attempt": INTEGER, "reply": STRING,
             "next_attempt_at": {"type": "string", "format": "date-time", "nullable": True},
             "bounce_type": {"type": "string", "enum": ["permanent", "expired"]}},
            list(_EVENT_FIELDS))
EVENTS = obj({"events": {"type": "array", "items": EVENT},
                  "next_cursor": NULLABLE_STRING})
_EVENT_PARAMS = [
    param("since", "From this instant: yyyy-mm-dd or an ISO 8601 date-time (UTC by default)"),
    param("until", "Before this instant; a day (yyyy-mm-dd) is included whole"),
    param("type", "open, click, or (queue mode) delayed or bounced",
          {"type": "string", "enum": list(queries.EVENT_TYPES)}),
    param("recipient", "Recipient address, exactly as sent"),
    param("email_id", "The relay's message id (email_...)"),
    param("tag", "A tag of the message (its TagName or one of its X-Anypost-Tags)"),
    param("campaign", "The message's campaign"),
    param("topic", "The message's topic"),
    param("include_machine", "Also list machine traffic (prefetch, scanner, automation)",
           BOOLEAN),
    param("cursor", "next_cursor of the previous page"),
    param("limit", f"Events per page (default {queries.DEFAULT_PAGE})",
           {"type": "integer", "minimum": 1, "maximum": queries.MAX_PAGE}),
]
OPERATIONS = [
    Operation("GET", "/GetTrackList", get_track_list,
              "Opens and clicks per day, as Alibaba Direct Mail's GetTrackList",
              "GetTrackList", _TRACK_PARAMS, responses=ok(TRACK_LIST), tags=("statistics",)),
    Operation("GET", "/events", list_events, "Open and click events, oldest first, paged",
              "listEvents", _EVENT_PARAMS, responses=ok(EVENTS), tags=("events",)),
    Operation("GET", "/stats", get_stats, "Counts and rates grouped by day, tag, campaign, "
              "sender domain, device, client, OS or country", "getStats",
              [*_WINDOW_PARAMS, *_FILTER_PARAMS, param("group_by", "day (default), tag, campaign, "
                                       "sender_domain, device, client, os, country (these four "
                                       "count opens and clicks: sent is 0)",
                                       {"type": "string", "enum": list(queries.GROUPS)})],
              responses=ok(STATS), tags=("statistics",)),
    Operation("GET", "/stats/links", get_link_stats, "Clicks per link URL", "getLinkStats",
              [*_WINDOW_PARAMS, *_FILTER_PARAMS], responses=ok(LINKS), tags=("statistics",)),
]
