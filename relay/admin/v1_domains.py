"""``/v1/domains``: the ``anypost`` SDK's sending domains, mapped onto the relay's own: a
domain's settings (relay/admin/settings.py, ``[[domains]]``) and its tracking domain
(relay/admin/domains.py). One system, managed through either API or the CLI.

- A domain is one the relay knows: it has settings, or a tracking domain. Its id is
  ``domain_<name>`` (the name alone is taken as well). The relay relays mail, it needs no
  mail-flow records: ``status`` is ``verified`` and ``dns_records`` empty.
- ``tracking``: ``opens_enabled``/``clicks_enabled`` are the domain's settings as they apply (the
  account's where the domain says nothing); ``subdomain`` the prefix of its tracking domain
  (``track`` for ``track.shop.example``), with the CNAME to publish; ``status`` ``disabled``
  when neither is on, ``verified`` when the links go to a verified tracking domain or, without
  one, to the relay's own host, else ``pending`` (with the last failure).
- ``PATCH`` sets the toggles (they become the domain's own settings) and the subdomain (a new
  tracking domain, ``pending``; ``null`` removes it); ``verify`` looks the CNAME up now.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aiohttp import web

from relay.admin import dnscheck, domains
from relay.admin.http import Operation, json_response
from relay.admin.v1_http import CONTEXT, AnypostError, read_json
from relay.errors import InvalidInput
from relay.policy import names
from relay.policy.domains import FAILED, VERIFIED, cname_target
from relay.policy.rules import Rules
from relay.policy.settings import Domain
from relay.stats.queries import iso_time
from relay.store import domains as stored_domains
from relay.store import settings as stored_settings

ID_PREFIX = "domain_"
DEFAULT_LIMIT, MAX_LIMIT = 20, 100


def domain_json(rules: Rules, name: str, public_url: str) -> dict[str, Any]:
    own = rules.domains.get(name)
    tracking = rules.tracking.get(name)
    opens = own.opens if own is not None and own.opens is not None else rules.account.opens
    clicks = own.clicks if own is not None and own.clicks is not None else rules.account.clicks
    status, failure, records = "verified", None, []
    if tracking is not None:
        records = [{"type": "CNAME", "name": _relative(tracking.host, name),
                    "value": cname_target(public_url), "purpose": "tracking"}]
        if tracking.state != VERIFIED:
            status = "pending"
            if tracking.state == FAILED:
                failure = {"code": "cname_mismatch", "message": tracking.reason or ""}
    if not (opens or clicks):
        status = "disabled"
    created = tracking.created_at if tracking is not None else 0.0
    return {
        "id": ID_PREFIX + name, "name": name, "status": "verified", "dns_records": [],
        "verification_failure": None,
        "tracking": {
            "opens_enabled": opens, "clicks_enabled": clicks,
            "subdomain": tracking.host.partition(".")[0] if tracking is not None else None,
            "dns_records": records, "status": status, "verification_failure": failure,
            "verified_at": (iso_time(tracking.checked_at) if tracking is not None
                            and tracking.state == VERIFIED and tracking.checked_at
                            else None)},
        "created_at": iso_time(created), "verified_at": iso_time(created),
    }


def _relative(host: str, name: str) -> str:
    """The record's name relative to the sending domain, as provider forms take it."""
    return host.removesuffix("." + name) if host.endswith("." + name) else host


async def _rules(request: web.Request) -> Rules:
    return await request.app[CONTEXT].pipeline.rules.current()


def _known(rules: Rules) -> list[str]:
    return sorted(set(rules.domains) | set(rules.tracking))


def _name(request: web.Request, rules: Rules) -> str:
    name = request.match_info["id"].removeprefix(ID_PREFIX).lower()
    if name not in rules.domains and name not in rules.tracking:
        raise AnypostError(404, f"no domain {request.match_info['id']!r}")
    return name


async def _answer(request: web.Request, name: str, status: int = 200) -> web.Response:
    context = request.app[CONTEXT]
    return json_response(domain_json(await _rules(request), name,
                                     context.config.http.public_url), status)


async def list_domains(request: web.Request) -> web.Response:
    rules = await _rules(request)
    try:
        limit = int(request.query.get("limit") or DEFAULT_LIMIT)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise AnypostError(400, f"limit must be 1-{MAX_LIMIT}", errors={"limit": [
            f"a whole number from 1 to {MAX_LIMIT}"]})
    after = request.query.get("after", "").removeprefix(ID_PREFIX)
    names_left = [n for n in _known(rules) if n > after]
    page = names_left[:limit]
    public_url = request.app[CONTEXT].config.http.public_url
    more = len(names_left) > limit
    return json_response({"data": [domain_json(rules, n, public_url) for n in page],
                          "has_more": more, "next_cursor": ID_PREFIX + page[-1] if more
                          else None})


async def create_domain(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = body.get("name") if isinstance(body, dict) else None
    try:
        name = names.domain_name(name if isinstance(name, str) else "")
    except InvalidInput as exc:
        raise AnypostError(422, str(exc), errors={"name": [str(exc)]}) from None
    if name in _known(await _rules(request)):
        raise AnypostError(409, f"the domain {name} exists already")
    await request.app[CONTEXT].store.write(
        lambda conn: stored_settings.put_domain(conn, Domain(name)))
    return await _answer(request, name, 201)


async def get_domain(request: web.Request) -> web.Response:
    return await _answer(request, _name(request, await _rules(request)))


async def update_domain(request: web.Request) -> web.Response:
    rules = await _rules(request)
    name = _name(request, rules)
    body = await read_json(request)
    tracking = body.get("tracking") if isinstance(body, dict) else None
    if not isinstance(tracking, dict):
        raise AnypostError(422, "tracking is required", errors={"tracking": ["an object"]})
    problems: dict[str, list[str]] = {}
    for key in sorted(set(tracking) - {"opens_enabled", "clicks_enabled", "subdomain"}):
        problems[f"tracking.{key}"] = ["unknown field"]
    for key in ("opens_enabled", "clicks_enabled"):
        if key in tracking and not isinstance(tracking[key], bool):
            problems[f"tracking.{key}"] = ["true or false"]
    subdomain = tracking.get("subdomain", _unchanged := object())
    host = None
    if isinstance(subdomain, str):
        try:
            host = names.tracking_host(f"{subdomain}.{name}", name)
        except InvalidInput as exc:
            problems["tracking.subdomain"] = [str(exc)]
    elif subdomain is not None and subdomain is not _unchanged:
        problems["tracking.subdomain"] = ["a prefix such as track, or null"]
    if problems:
        raise AnypostError(422, next(iter(problems.values()))[0], errors=problems)
    own = rules.domains.get(name) or Domain(name)
    own = replace(own, opens=tracking.get("opens_enabled", own.opens),
                  clicks=tracking.get("clicks_enabled", own.clicks))
    current = rules.tracking.get(name)

    def write(conn: Any) -> None:
        stored_settings.put_domain(conn, own)
        if subdomain is _unchanged or (current is not None and current.host == host):
            return
        if current is not None:
            stored_domains.remove(conn, current.host)
        if host is not None:
            domains.add(conn, host, name)

    try:
        await request.app[CONTEXT].store.write(write)
    except InvalidInput as exc:  # the host is another domain's
        raise AnypostError(422, str(exc), errors={"tracking.subdomain": [str(exc)]}) from None
    return await _answer(request, name)


async def delete_domain(request: web.Request) -> web.Response:
    rules = await _rules(request)
    name = _name(request, rules)
    current = rules.tracking.get(name)

    def write(conn: Any) -> None:
        stored_settings.delete_domain(conn, name)
        if current is not None:
            stored_domains.remove(conn, current.host)

    await request.app[CONTEXT].store.write(write)
    return web.Response(status=204)


async def verify_domain(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    name = _name(request, await _rules(request))
    current = (await _rules(request)).tracking.get(name)
    if current is not None:
        await dnscheck.verify(context.store, context.config, current.host,
                              dnscheck.make_resolver(context.config.dns))
    return await _answer(request, name)


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "domain_<name>, or the name"}]
_TAGS = ("domains",)

OPERATIONS = [
    Operation("GET", "/domains", list_domains, "Sending domains the relay knows", "listDomains",
              [{"name": "limit", "in": "query", "schema": {"type": "integer"}},
               {"name": "after", "in": "query", "schema": {"type": "string"}}], tags=_TAGS),
    Operation("POST", "/domains", create_domain, "Add a sending domain", "createDomain",
              tags=_TAGS, responses={"201": {"description": "Added"}}),
    Operation("GET", "/domains/{id}", get_domain, "One domain", "getDomain", _ID, tags=_TAGS),
    Operation("PATCH", "/domains/{id}", update_domain, "Set the domain's tracking",
              "updateDomain", _ID, tags=_TAGS),
    Operation("DELETE", "/domains/{id}", delete_domain, "Forget a domain", "deleteDomain", _ID,
              tags=_TAGS, responses={"204": {"description": "Deleted"}}),
    Operation("POST", "/domains/{id}/verify", verify_domain, "Look the tracking CNAME up now",
              "verifyDomain", _ID, tags=_TAGS),
]
