"""The dashboard's operations page: tracking domains (state, the DNS record to publish, a
verify button) and webhook endpoints with their failed deliveries (a replay button). Each
action is what the API and the CLI do (relay/admin/dnscheck.py, relay/admin/webhooks.py,
relay/store/outbox.py), a form post behind the session's CSRF token
(relay/admin/dashboard/app.py), answered with a redirect back to the page saying what
happened."""

from __future__ import annotations

import sqlite3
import time
from urllib.parse import urlencode

from aiohttp import web

from relay.admin import dnscheck, webhooks
from relay.admin.dashboard.base import CONFIG, STORE, render, see_other
from relay.policy import domains
from relay.store import domains as stored_domains
from relay.store import outbox
from relay.webhooks.payloads import FAILED, PENDING

FAILED_SHOWN = 50


async def operations(request: web.Request) -> web.Response:
    store, config = request.app[STORE], request.app[CONFIG]
    target = domains.cname_target(config.http.public_url)
    listed, endpoints, failed = await store.read(lambda conn: (
        stored_domains.listing(conn), outbox.endpoint_listing(conn),
        outbox.deliveries(conn, state=FAILED, limit=FAILED_SHOWN)))
    tracking = [(d, domains.dns_record(d.host, target)) for d in listed]
    return render(request, "operations.html", tracking=tracking,
                  endpoints=endpoints, failed=failed,
                  done=request.query.get("done", ""))


def _back(done: str) -> web.Response:
    return see_other("/ui/operations?" + urlencode({"done": done}))


async def verify_domain(request: web.Request) -> web.Response:
    store, config = request.app[STORE], request.app[CONFIG]
    host = request.match_info["host"]
    outcome = await dnscheck.verify(store, config, host, dnscheck.make_resolver(config.dns))
    if outcome is None:
        raise web.HTTPNotFound(reason=f"No tracking domain {host}.")
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
