"""Name rules for sender domains, tracking hosts and tags. Pure: each check returns the
normalized name or raises InvalidInput saying what is wrong.

Tracking host prefixes follow Tencent SES's rule (README, "Settings, tracking domains and
tags"): 3-63 characters, letters, digits and hyphens, not starting or ending with a hyphen,
not all digits. The rest of the host (its
parent) must be the sender domain or a parent of it, with at least two labels, so that a
host can never hang directly under a top-level domain. (Without the public suffix list,
``co.uk`` still counts as two labels.)
"""

from __future__ import annotations

import ipaddress
import re

from relay.errors import InvalidInput

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_PREFIX = re.compile(r"(?!-)[A-Za-z0-9-]{3,63}(?<!-)")
# A registered tag, the TagName of X-AliDM-Trace (Alibaba's grammar). The free-form tags and
# campaign of X-Anypost-Tags / X-Anypost-Campaign have a grammar of their own, narrower (1-64,
# no '.' or '@'; relay/policy/decide.py): they copy another interface, are not registered, and
# are stored apart (messages.tags beside messages.tag_name). One grammar for both would either
# refuse mail accepted today (a TagName over 64 characters or holding '.' or '@') or widen what
# the Anypost headers take beyond the interface they copy.
TAG_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,128}")


def normal(text: str) -> str:
    """A host or domain name as it is stored and looked up: lower case, no trailing dot."""
    return text.strip().lower().removesuffix(".")


def domain_name(text: str) -> str:
    """A DNS host name of at least two labels, lower-cased, without a trailing dot."""
    name = normal(text)
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(x) for x in labels):
        raise InvalidInput(f"{text!r} is not a domain name (labels of letters, digits and "
                         "hyphens, at least two of them)")
    return name


def host_name(text: str) -> str:
    """A DNS host name of one label or more (``localhost`` too), lower-cased, without a
    trailing dot. Not an IP address, bracketed (an address literal) or not: the relay's name
    is the domain of its ``postmaster@`` and of the Message-IDs it adds, and is what its
    EHLO and ``Received:`` lines say it is; a top label of digits only (RFC 3696 2) is none."""
    name = normal(text)
    literal = name.removeprefix("[").removesuffix("]").removeprefix("ipv6:")
    if is_address(literal) or name.rpartition(".")[2].isdigit():
        raise InvalidInput(f"{text!r} is an IP address, not a host name (give the relay's DNS "
                         "name, such as relay.example.com)")
    if len(name) > 253 or not all(_LABEL.fullmatch(x) for x in name.split(".")):
        raise InvalidInput(f"{text!r} is not a host name (labels of letters, digits and "
                         "hyphens, separated by dots)")
    return name


def is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def tracking_prefix(prefix: str) -> str:
    if not _PREFIX.fullmatch(prefix):
        raise InvalidInput(f"prefix {prefix!r} must be 3-63 letters, digits or hyphens, "
                         "not starting or ending with a hyphen")
    if prefix.isdigit():
        raise InvalidInput(f"prefix {prefix!r} must not be all digits")
    return prefix.lower()


def tracking_host(host: str, sender_domain: str) -> str:
    """``prefix.parent`` where parent is ``sender_domain`` or one of its parents."""
    sender = domain_name(sender_domain)
    prefix, _, parent = host.strip().removesuffix(".").partition(".")
    prefix = tracking_prefix(prefix)
    parent = domain_name(parent) if parent else ""
    if not parent or not (sender == parent or sender.endswith("." + parent)):
        raise InvalidInput(f"{host!r} must be a prefix under {sender} or a parent domain of it")
    return f"{prefix}.{parent}"


def tag_name(name: str) -> str:
    if not TAG_NAME.fullmatch(name):
        raise InvalidInput(f"tag {name!r} must be 1-128 letters, digits, '_', '.', '@' or '-'")
    return name


def dkim_selector(text: str) -> str:
    """A DKIM selector (RFC 6376 3.1): DNS labels joined by dots, kept as written."""
    selector = text.strip()
    if len(selector) > 253 or not all(_LABEL.fullmatch(x) for x in selector.lower().split(".")):
        raise InvalidInput(f"{text!r} is not a selector (labels of letters, digits and hyphens)")
    return selector
