"""What the dashboard's modules share: the application's keys, the security headers of every
answer, and rendering a template."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from relay.admin.dashboard.auth import Auth, Signed
from relay.config import Config
from relay.store.engine import Store

HERE = Path(__file__).parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a form post says "Origin: null"
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
AUTH = web.AppKey("dashboard_auth", Auth)
CONFIG = web.AppKey("dashboard_config", Config)
STORE = web.AppKey("dashboard_store", Store)
# The relay's clock (relay/clock.py: tests drive it): sessions' expiry, the queue's ages
CLOCK = web.AppKey("dashboard_clock", Callable[[], float])
TEMPLATES = web.AppKey("dashboard_templates", jinja2.Environment)
SIGNED = web.RequestKey("dashboard_signed", Signed)  # who signed the request in


def render(request: web.Request, template: str, status: int = 200, **values: Any
           ) -> web.Response:
    signed: Signed | None = request.get(SIGNED)
    body = request.app[TEMPLATES].get_template(template).render(
        signed=signed, path=request.path, **values)
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **HEADERS})


