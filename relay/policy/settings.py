"""The tracking settings model: the account's defaults and each sender domain's say, as the
config file seeds them and the store keeps them, with the one validation both use (the message
level is the control headers, relay/policy/decide.py). Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.errors import InvalidInput
from relay.policy import names

MAX_EXCLUDED_HOSTS = 100  # per domain: they are checked for every link of every message


@dataclass(frozen=True, slots=True)
class Account:
    opens: bool = False
    clicks: bool = False


@dataclass(frozen=True, slots=True)
class Domain:
    """One sender domain's say: None means 'the account's setting'."""

    name: str
    opens: bool | None = None
    clicks: bool | None = None
    exclude_hosts: tuple[str, ...] = ()


def exclude_hosts(hosts: object) -> tuple[str, ...]:
    """Validated, lower-cased, deduplicated link hosts."""
    if not isinstance(hosts, Sequence) or isinstance(hosts, str):
        raise InvalidInput("exclude_hosts must be a list of host names")
    if len(hosts) > MAX_EXCLUDED_HOSTS:
        raise InvalidInput(f"at most {MAX_EXCLUDED_HOSTS} hosts", "exclude_hosts")
    return tuple(dict.fromkeys(_host(f"exclude_hosts[{i}]", h) for i, h in enumerate(hosts)))


def _host(key: str, host: object) -> str:
    if not isinstance(host, str):
        raise InvalidInput(f"expected a host name, got {type(host).__name__}", key)
    try:
        return names.domain_name(host)
    except InvalidInput as exc:
        raise InvalidInput(exc.problem, key) from None


def domain(name: str, opens: bool | None = None, clicks: bool | None = None,
           hosts: object = ()) -> Domain:
    """A sender domain's settings, validated: what the config file, the CLI and the API give."""
    return Domain(names.domain_name(name), opens, clicks, exclude_hosts(hosts))
