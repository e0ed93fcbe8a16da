"""``relay stats`` and ``relay events``: the API's statistics and event listing from the command
line, over the same queries (relay/stats/queries.py). Tables by default, the API's JSON with --json
(``relay events`` adds ``machine_events_hidden`` there when it leaves machine traffic out).
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from relay.admin.commands import ConfigOption, open_store, output, print_table
from relay.stats import queries

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
        "events", help="list open and click events",
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


def _run(query: queries.Query, conn: sqlite3.Connection) -> list[Any]:
    return conn.execute(query.sql, query.params).fetchall()


def _stats(args: argparse.Namespace) -> int:
    params = {"since": args.since or "", "until": args.until or "", "limit": str(args.limit),
              "group_by": args.by if args.by != "url" else ""}
    query = queries.parse_stats(params, datetime.now(UTC).date(), grouped=args.by != "url")
    conn = open_store(args)
    if args.by == "url":
        body = queries.links_body(query, _run(queries.links_query(query), conn))
        return output(args, body, lambda: print_table(
            ["url", "clicks", "unique clicks"],
            [(link["url"], link["clicks"], link["unique_clicks"]) for link in body["links"]]))
    body = queries.stats_body(query, _run(queries.stats_query(query), conn))
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
    body = queries.events_body(event_filter, _run(queries.events_query(event_filter), conn))
    if not args.all:
        [(hidden,)] = _run(queries.machine_count_query(event_filter), conn)
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
    """Events (the API's JSON) as a table."""
    print_table(["time", "type", "classification", "recipient", "email id", "url", "device",
                 "client", "location"],
                [(e["occurred_at"], e["type"] + (" (implied)" if e["implied"] else ""),
                  e["classification"] + (f" ({e['bot_source']})" if e["bot_source"] else ""),
                  e["recipient"], e["email_id"], e["url"], e["device"], e["client"],
                  ", ".join(filter(None, (e["geo"] or {}).values()))) for e in events])


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}"
