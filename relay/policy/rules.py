"""The decision's input: settings, tracking domains and tags as one immutable snapshot, numbered
by the rules generation it was read at (read and cached by relay/store/rules.py). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from relay.policy.domains import TrackingDomain
from relay.policy.settings import Account, Domain


@dataclass(frozen=True)
class Rules:
    generation: int = -1
    account: Account = Account()
    domains: Mapping[str, Domain] = field(default_factory=dict)
    tracking: Mapping[str, TrackingDomain] = field(default_factory=dict)  # by sender domain
    tags: frozenset[str] = frozenset()
    secure_hosts: frozenset[str] = frozenset()  # with a certificate (relay/certs/)
