"""The dashboard as an aiohttp sub-application mounted at ``/ui``: server-rendered pages
(Jinja2, autoescaped), the sign-in (relay/admin/dashboard/auth.py) in front of every page but
the sign-in form, security headers on every answer, and the vendored chart library
(``static/``, uPlot with its licence) served from the package: nothing is loaded from the
internet.

Every answer carries a strict Content-Security-Policy (:data:`CSP`: scripts, styles and
images from the dashboard itself only, no inline script or style, no framing by other sites);
the click map's frame has its own, stricter one (relay/admin/dashboard/pages.py).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

import jinja2
from aiohttp import web

from relay.admin.dashboard import operations, pages
from relay.admin.dashboard.auth import (
    COOKIE,
    LOGIN_COOKIE,
    Auth,
    Handler,
    LoginRefused,
    forwarded,
    same_origin,
    set_cookie,
    token_matches,
)
from relay.admin.dashboard.base import (
    AUTH,
    CLOCK,
    CONFIG,
    HEADERS,
    HERE,
    SIGNED,
    STORE,
    TEMPLATES,
    render,
    see_other,
)
from relay.config import Config
from relay.limits import client_key
from relay.store.engine import Store

log = logging.getLogger("relay.dashboard")

PREFIX = "/ui"
PUBLIC = ("/ui/login", "/ui/static/")  # reached without a session
FORM_BYTES = 64 * 1024  # a form post's body at most, the sign-in's included
NUL_REFUSED = "A NUL character (%00) is in no message id, name or search: remove it."


def build_dashboard(config: Config, store: Store, *, clock: Callable[[], float] = time.time,
                    monotonic: Callable[[], float] = time.monotonic) -> web.Application:
    app = web.Application(middlewares=[_request, _headers, _session])
    auth = Auth(store, config, clock, monotonic)
    app[AUTH], app[CONFIG], app[STORE], app[CLOCK] = auth, config, store, clock
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    app[TEMPLATES].filters.update(pages.FILTERS)

    async def close(_: web.Application) -> None:
        auth.close()

    app.on_cleanup.append(close)
    app.router.add_get("/", home)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_static("/static/", HERE / "static", append_version=False)
    for path, handler in pages.ROUTES:
        app.router.add_get(path, handler)
    app.router.add_get("/operations", operations.operations)
    app.router.add_post("/operations/domains/{host}/verify", operations.verify_domain)
    app.router.add_post("/operations/webhooks/replay", operations.replay)
    app.router.add_post("/operations/queue/retry", operations.retry_queue)
    app.router.add_post("/operations/queue/{email_id}/{action}", operations.queue_action)
    return app


async def home(_: web.Request) -> web.Response:
    return see_other("/ui/overview")


@web.middleware
async def _request(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The request as the browser made it (through a trusted proxy: auth.py ``forwarded``),
    with the dashboard's own limit on a form's body: requests are made by the root
    application, whose limit (for the API) a sub-application's ``client_max_size`` does not
    replace. A NUL in the path or the query is refused (PostgreSQL's text holds none)."""
    if "\x00" in request.path or any("\x00" in value for value in request.query.values()):
        raise web.HTTPBadRequest(reason=NUL_REFUSED)
    return await handler(request.clone(client_max_size=FORM_BYTES, **forwarded(
        request, request.app[CONFIG].http.trusted_proxies)))


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers.update(HEADERS)
            raise
        response = render(request, "error.html", exc.status, message=exc.reason)
    except Exception:
        log.exception("dashboard request %s %s failed", request.method, request.path)
        response = render(request, "error.html", 500,
                          message="Internal error; see the relay's log.")
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@web.middleware
async def _session(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Pages need a session (else: to the sign-in form); posts need its CSRF token and must
    come from the dashboard's own pages."""
    if request.path.startswith(PUBLIC):
        return await handler(request)
    signed = await request.app[AUTH].current(request)
    if signed is None:
        if request.method == "GET":
            raise web.HTTPSeeOther("/ui/login")
        raise web.HTTPForbidden(reason="Not signed in.")
    if request.method == "POST":
        form = await request.post()
        if any(isinstance(value, str) and "\x00" in value for value in form.values()):
            raise web.HTTPBadRequest(reason=NUL_REFUSED)
        if not same_origin(request) or not token_matches(signed.csrf,
                                                         str(form.get("csrf", ""))):
            raise web.HTTPForbidden(reason="Cross-site request refused (CSRF token missing or "
                                           "wrong): reload the page and try again.")
    request[SIGNED] = signed
    return await handler(request)


async def login_form(request: web.Request, error: str | None = None, status: int = 200,
                     name: str = "") -> web.Response:
    token = secrets.token_urlsafe(32)
    response = render(request, "login.html", status, csrf=token, error=error, name=name)
    set_cookie(response, request, LOGIN_COOKIE, token)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    name = str(form.get("name", ""))[:200]
    if not same_origin(request) or not token_matches(request.cookies.get(LOGIN_COOKIE, ""),
                                                     str(form.get("csrf", ""))):
        return await login_form(request, "The form expired or came from another site: "
                                         "please sign in again.", 403, name)
    client = client_key(request.remote) or ""
    try:
        token = await request.app[AUTH].sign_in(client, name, str(form.get("password", "")))
    except LoginRefused as exc:
        log.info("dashboard sign-in refused for %r from %s: %s", name, client, exc)
        return await login_form(request, str(exc), exc.status, name)
    log.info("dashboard sign-in: %s from %s", name, client)
    response = see_other("/ui/overview")
    set_cookie(response, request, COOKIE, token)
    response.del_cookie(LOGIN_COOKIE, path="/ui/")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    await request.app[AUTH].sign_out(request)
    response = see_other("/ui/login")
    response.del_cookie(COOKIE, path="/ui/")
    return response
