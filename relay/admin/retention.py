"""``relay purge``, ``relay erase`` and ``DELETE /api/v1/recipients/{address}`` (what they
delete: relay/store/retention.py)."""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

from relay.admin.commands import ConfigOption, fail, open_store, output, print_table
from relay.admin.http import CONTEXT, Operation, json_response
from relay.config import StoreSettings
from relay.store import engine as store
from relay.store.retention import DAY, erase_recipient, purge


def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    purger = commands.add_parser(
        "purge", help="delete messages, events and finished webhook deliveries older than DAYS",
        description="Delete messages (with their recipients and deliveries), open and click "
                    "events and finished webhook deliveries older than DAYS days; the daily "
                    "statistics are kept.")
    purger.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    purger.set_defaults(run=_purge)
    eraser = commands.add_parser("erase", help="delete everything about one recipient",
                                 description="Delete every row about RECIPIENT (any case).")
    eraser.add_argument("recipient")
    eraser.set_defaults(run=_erase)
    for command in (purger, eraser):
        config_option(command)


def _purge(args: argparse.Namespace) -> int:
    if args.older_than < 0:
        return fail("--older-than: days, 0 or more")
    return _report(args, purge(open_store(args), time.time() - args.older_than * DAY))


def _erase(args: argparse.Namespace) -> int:
    return _report(args, erase_recipient(open_store(args), args.recipient))


def _report(args: argparse.Namespace, counts: dict[str, int]) -> int:
    return output(args, {"deleted": counts},
                  lambda: print_table(["table", "deleted"], sorted(counts.items())))


def erase_in_store(settings: StoreSettings, address: str) -> dict[str, int]:
    """:func:`erase_recipient` on a connection of its own (run in a worker thread): its many
    short transactions stay out of the group commit. Not migrated: the serving process
    migrated the store when it started."""
    conn = store.connect_store(settings)
    try:
        return erase_recipient(conn, address)
    finally:
        conn.close()


async def _erase_recipient(request: web.Request) -> web.Response:
    address = request.match_info["address"]
    settings = request.app[CONTEXT].config.store
    counts = await asyncio.to_thread(erase_in_store, settings, address)
    return json_response({"recipient": address, "deleted": counts})


OPERATIONS = [
    Operation("DELETE", "/recipients/{address}", _erase_recipient,
              "Erase everything stored about a recipient; rows deleted per table",
              "eraseRecipient", tags=["retention"],
              parameters=[{"name": "address", "in": "path", "required": True,
                           "schema": {"type": "string"}}]),
]
