"""The dashboard's operations page: tracking domains (state, the DNS record to publish, a
verify button), webhook endpoints with their failed deliveries (a replay button), the settings
in force (never a secret: relay/config.py ``effective_settings``) and, in queue mode, the queue
(messages by state, the oldest one's age, the deferred and held ones with retry, hold and
release buttons). Each action is what the API and the CLI do (relay/admin/dnscheck.py,
relay/admin/webhooks.py, relay/store/outbox.py, relay/admin/queue.py ``ACTIONS``), a form post
behind the session's CSRF token (relay/admin/dashboard/app.py), answered with a redirect back to
the page saying what happened."""

from __future__ import annotations

import sqlite3
import time
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from relay.admin import dnscheck, webhooks
from relay.admin import queue as admin_queue
from relay.admin.dashboard.base import CLOCK, CONFIG, STORE, render, see_other
from relay.config import effective_settings
from relay.policy import domains
from relay.store import domains as stored_domains
from relay.store import outbox, queue
from relay.webhooks.payloads import FAILED, PENDING

FAILED_SHOWN = 50
QUEUE_SHOWN = 50  # deferred, and held, messages listed (the oldest)


async def operations(request: web.Request) -> web.Response:
    store, config = request.app[STORE], request.app[CONFIG]
    target = domains.cname_target(config.http.public_url)
    now = request.app[CLOCK]()
    listed, endpoints, failed, queued = await store.read(lambda conn: (
        stored_domains.listing(conn), outbox.endpoint_listing(conn),
        outbox.deliveries(conn, state=FAILED, limit=FAILED_SHOWN),
        _queue(conn, now) if config.smtp.mode == "queue" else None))
    tracking = [(d, domains.dns_record(d.host, target)) for d in listed]
    return render(request, "operations.html", tracking=tracking,
                  endpoints=endpoints, failed=failed, queue=queued,
                  settings=effective_settings(config), source=config.source,
                  done=request.query.get("done", ""))


def _queue(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """Queue mode's spool: messages by state, totals, the oldest one's age (seconds), and the
    oldest deferred and held messages (as ``GET /api/v1/queue?state=`` lists them)."""
    oldest = queue.oldest(conn)
    return {"states": queue.state_counts(conn, now),
            "oldest_age": None if oldest is None else max(0.0, now - oldest),
            **{state: admin_queue.list_body(conn, now, state, None, QUEUE_SHOWN)
               for state in ("deferred", "held")}}


def _back(done: str) -> web.Response:
    return see_other("/ui/operations?" + urlencode({"done": done}))


async def verify_domain(request: web.Request) -> web.Response:
    store, config = request.app[STORE], request.app[CONFIG]
    host = request.match_info["host"]
    outcome = await dnscheck.verify(store, config, host, dnscheck.make_resolver(config.dns))
    if outcome is None:
        raise web.HTTPNotFound(reason=f"No tracking domain {host!r}.")
    domain, check = outcome
    return _back(f"{domain.host}: {domain.state} ({check.detail})")


async def replay(request: web.Request) -> web.Response:
    form = await request.post()
    store, config = request.app[STORE], request.app[CONFIG]
    keep_trying = config.webhook_delivery.retry_hours * 3600
    chosen = str(form.get("batch_id", ""))

    def write(conn: sqlite3.Connection) -> int:
        ids = [chosen] if chosen else webhooks.failed_batches(conn, None)
        return outbox.replay(conn, ids, PENDING, time.time(), keep_trying)

    count = await store.write(write)
    return _back(f"{count} deliver{'y' if count == 1 else 'ies'} queued again")


_DONE = {"retry": "due now", "hold": "held", "release": "released"}


async def queue_action(request: web.Request) -> web.Response:
    """Retry, hold or release one queued message (relay/admin/queue.py ``ACTIONS``)."""
    email_id, action = request.match_info["email_id"], request.match_info["action"]
    change = admin_queue.ACTIONS.get(action)
    if change is None:
        raise web.HTTPNotFound(reason=f"No queue action {action!r}.")
    changed = await request.app[STORE].write(lambda conn: change(conn, email_id))
    if not changed:
        return _back(f"{email_id}: not in the queue" + (" or held" if action == "retry" else ""))
    return _back(f"{email_id}: {_DONE[action]}")


async def retry_queue(request: web.Request) -> web.Response:
    """Every queued message not held due now (``relay queue retry --all``)."""
    now = request.app[CLOCK]()
    count = await request.app[STORE].write(lambda conn: queue.retry_now(conn, None, now))
    return _back(f"{count} message{'' if count == 1 else 's'} due now")
