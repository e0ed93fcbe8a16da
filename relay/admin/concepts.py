"""The one list of what the relay lets people administer. Each concept's module holds its API
routes (:class:`~relay.admin.http.Operation` values) and its ``relay`` subcommands; this list
feeds both the API (relay/admin/api.py) and the command line (relay/cli.py), in this order."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.admin import (
    apikeys,
    domains,
    messages,
    queue,
    retention,
    settings,
    stats,
    store_admin,
    tags,
    users,
    webhooks,
)
from relay.admin.commands import ConfigOption
from relay.admin.http import Operation

AddCommands = Callable[[argparse._SubParsersAction, ConfigOption], None]


@dataclass(frozen=True)
class Concept:
    name: str
    operations: Sequence[Operation]
    add_commands: AddCommands


CONCEPTS: tuple[Concept, ...] = (
    Concept("api keys", (), apikeys.add_commands),
    Concept("settings", settings.OPERATIONS, settings.add_commands),
    Concept("tracking domains", domains.OPERATIONS, domains.add_commands),
    Concept("tags", tags.OPERATIONS, tags.add_commands),
    Concept("statistics", stats.OPERATIONS, stats.add_commands),
    Concept("messages", messages.OPERATIONS, messages.add_commands),
    Concept("webhooks", webhooks.OPERATIONS, webhooks.add_commands),
    Concept("retention", retention.OPERATIONS, retention.add_commands),
    Concept("dashboard users", (), users.add_commands),
    Concept("the store", (), store_admin.add_commands),
    Concept("queue", queue.OPERATIONS, queue.add_commands),
)


def operations() -> list[Operation]:
    """Every API route, in the order of :data:`CONCEPTS`."""
    return [op for concept in CONCEPTS for op in concept.operations]
