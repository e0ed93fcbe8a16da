"""The tag registry: an ``X-AliDM-Trace`` ``TagName`` must name a registered tag, else the
message is refused with a 5xx naming it (relay/policy/decide.py). Tags come from the config's
``[tracking] tags`` (seeded once, see relay/admin/settings.py), ``relay tags add|list|remove``
and ``/api/v1/tags`` (SQL: relay/store/tags.py).
"""

from __future__ import annotations

import argparse
import sqlite3
from typing import Any

from aiohttp import web

from relay.admin.commands import (
    Action,
    ConfigOption,
    add_group,
    fail,
    format_time,
    output,
    print_table,
)
from relay.admin.http import CONTEXT, Operation, json_body, json_response
from relay.admin.settings import open_seeded
from relay.config import Config
from relay.errors import ApiError, InvalidInput
from relay.policy import names
from relay.store import tags as stored
from relay.store.settings import seed_once
from relay.store.transaction import transaction


def add(conn: sqlite3.Connection, name: str) -> bool:
    """Register ``name`` (validated); False when it was registered already."""
    return stored.add(conn, names.tag_name(name))


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
    with transaction(conn):
        added = add(conn, args.name)
    return output(args, {"name": args.name, "added": added}, lambda: print(
        f"added {args.name}" if added else f"{args.name} is registered already"))


def _remove(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    with transaction(conn):
        removed = stored.remove(conn, args.name)
    if not removed:
        return fail(f"no tag named {args.name!r}")
    return output(args, {"name": args.name, "removed": True},
                  lambda: print(f"removed {args.name}"))


def _list(args: argparse.Namespace) -> int:
    _, conn = open_seeded(args, seed)
    rows = stored.listing(conn)
    return output(args, tags_json(rows), lambda: print_table(
        ("TAG", "CREATED"), [(n, format_time(at)) for n, at in rows]))


# --- API -----------------------------------------------------------------------------------

def tags_json(rows: list[tuple[str, float]]) -> dict[str, Any]:
    return {"tags": [{"name": n, "created_at": at} for n, at in rows]}


async def _list_tags(request: web.Request) -> web.Response:
    return json_response(tags_json(await request.app[CONTEXT].store.read(stored.listing)))


async def _add_tag(request: web.Request) -> web.Response:
    name = (await json_body(request)).get("name")
    if not isinstance(name, str):
        raise InvalidInput("name must be a string")
    names.tag_name(name)
    added = await request.app[CONTEXT].store.write(lambda conn: add(conn, name))
    return json_response({"name": name}, 201 if added else 200)


async def _remove_tag(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not await request.app[CONTEXT].store.write(lambda conn: stored.remove(conn, name)):
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
