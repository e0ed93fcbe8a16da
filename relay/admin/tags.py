"""The tag registry (seed 000, 002): an ``X-AliDM-Trace`` ``TagName`` must name a registered
tag, else the message is refused with a 5xx naming it (relay/policy/decide.py). Tags come from the
config's ``[tracking] tags`` (seeded once, see relay/admin/settings.py), ``relay tags
add|list|remove`` and ``/api/v1/tags``.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from typing import Any

from aiohttp import web

from relay.admin.api import CONTEXT, ApiError, Operation, json_response
from relay.admin.commands import (
    Action,
    ConfigOption,
    add_group,
    fail,
    format_time,
    output,
    print_table,
)
from relay.admin.settings import bump, json_body, open_seeded, seed_once
from relay.config import Config
from relay.policy import names
from relay.store.transaction import transaction


def registered(conn: sqlite3.Connection) -> frozenset[str]:
    return frozenset(row[0] for row in conn.execute("SELECT name FROM tags").fetchall())


def listing(conn: sqlite3.Connection) -> list[tuple[str, float]]:
    return conn.execute("SELECT name, created_at FROM tags ORDER BY name").fetchall()


def add(conn: sqlite3.Connection, name: str) -> bool:
    """Register ``name`` (validated); False when it was registered already."""
    added = conn.execute("INSERT OR IGNORE INTO tags VALUES (?, ?)",
                         (names.tag_name(name), time.time())).rowcount == 1
    if added:
        bump(conn)
    return added


def remove(conn: sqlite3.Connection, name: str) -> bool:
    removed = conn.execute("DELETE FROM tags WHERE name = ?", (name,)).rowcount == 1
    if removed:
        bump(conn)
    return removed


def seed(conn: sqlite3.Connection, config: Config) -> None:
    for name in config.tracking.tags:
        if seed_once(conn, "tag", name):
            add(conn, name)


# --- CLI -----------------------------------------------------------------------------------

def add_commands(commands: argparse._SubParsersAction, config_option: ConfigOption) -> None:
    add_group(commands, "tags", "register, list and remove tags (TagName)", config_option, [
        Action("add", "register a tag", _add, "name"),
        Action("remove", "remove a tag: mail naming it is refused", _remove, "name"),
        Action("list", "list registered tags", _list),
    ])


def _add(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    try:
        with transaction(conn):
            added = add(conn, args.name)
    except ValueError as exc:
        return fail(str(exc))
    return output(args, {"name": args.name, "added": added}, lambda: print(
        f"added {args.name}" if added else f"{args.name} is registered already"))


def _remove(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    with transaction(conn):
        removed = remove(conn, args.name)
    if not removed:
        return fail(f"no tag named {args.name!r}")
    return output(args, {"name": args.name, "removed": True},
                  lambda: print(f"removed {args.name}"))


def _list(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    rows = listing(conn)
    return output(args, tags_json(rows), lambda: print_table(
        ("TAG", "CREATED"), [(n, format_time(at)) for n, at in rows]))


# --- API -----------------------------------------------------------------------------------

def tags_json(rows: list[tuple[str, float]]) -> dict[str, Any]:
    return {"tags": [{"name": n, "created_at": at} for n, at in rows]}


async def _list_tags(request: web.Request) -> web.Response:
    return json_response(tags_json(listing(request.app[CONTEXT].store.writer)))


async def _add_tag(request: web.Request) -> web.Response:
    name = (await json_body(request)).get("name")
    if not isinstance(name, str):
        raise ApiError(400, "name must be a string")
    try:
        names.tag_name(name)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    added = await request.app[CONTEXT].store.write(lambda conn: add(conn, name))
    return json_response({"name": name}, 201 if added else 200)


async def _remove_tag(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not await request.app[CONTEXT].store.write(lambda conn: remove(conn, name)):
        raise ApiError(404, f"no tag named {name!r}")
    return web.Response(status=204)


_NAME_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}}

OPERATIONS = [
    Operation("GET", "/tags", _list_tags, "Registered tags", "listTags", tags=["tags"]),
    Operation("POST", "/tags", _add_tag, "Register a tag (201; 200 if it was already)", "addTag",
              request_body=_NAME_BODY, tags=["tags"],
              responses={"201": {"description": "Registered"},
                         "200": {"description": "Registered already"}}),
    Operation("DELETE", "/tags/{name}", _remove_tag,
              "Remove a tag: mail naming it is refused from then on", "removeTag",
              parameters=[{"name": "name", "in": "path", "required": True,
                           "schema": {"type": "string"}}],
              responses={"204": {"description": "Removed"}}, tags=["tags"]),
]
