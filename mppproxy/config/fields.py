"""Field checks shared by every configuration dataclass.

Each check takes a converted value and returns None, or what is wrong with
it; ``opt`` puts one into a field's metadata, where ``config/load.py``
finds it.  A leaf module (no project imports), so every schema module may
use it without import cycles (docs/design.md, "Floors").
"""
from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, Callable, Optional

from twisted.internet.endpoints import serverFromString

Check = Callable[[Any], Optional[str]]


def opt(check: Check, doc: str = "") -> dict[str, Any]:
    return {"check": check, "doc": doc}


def choice(*allowed: str) -> Check:
    def check(value: Any) -> Optional[str]:
        if value not in allowed:
            return f"must be one of {', '.join(repr(a) for a in allowed)}, not {value!r}"
        return None

    return check


def at_least(minimum: float) -> Check:
    def check(value: Any) -> Optional[str]:
        if value < minimum:
            return f"must be at least {minimum}, not {value!r}"
        return None

    return check


def finite(value: Any) -> Optional[str]:
    if not math.isfinite(value):
        return f"must be a finite number, not {value!r}"
    return None


def tempfail_or_skip(value: str) -> Optional[str]:
    """What a failure does: "tempfail" (4xx, docs/design.md promise 4) or
    "skip" (logged, and the rest goes on)."""
    return None if value in ("tempfail", "skip") else f"must be 'tempfail' or 'skip', not {value!r}"


def regex(value: str) -> Optional[str]:
    """A Python regular expression; empty means none."""
    if not value:
        return None
    try:
        re.compile(value)
    except re.error as e:
        return f"{value!r} is not a regular expression: {e}"
    return None


def regexes(values: tuple[str, ...]) -> Optional[str]:
    return next((problem for problem in map(regex, values) if problem), None)


def endpoints(values: tuple[str, ...]) -> Optional[str]:
    """Twisted server endpoint descriptions, at least one."""
    # Parsing a description does no I/O; the reactor is only stored, so a
    # placeholder serves to check the syntax up front.
    if not values:
        return "needs at least one endpoint, such as 'tcp:25:interface=0.0.0.0'"
    for v in values:
        try:
            serverFromString(object(), v)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        except (ValueError, TypeError, KeyError) as e:
            return f"{v!r} is not a Twisted endpoint description ({e})"
    return None


def networks(values: tuple[str, ...]) -> Optional[str]:
    """IP networks in CIDR form (trusted_networks, archive_node.edges)."""
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            return f"{v!r} is not an IP network (CIDR such as 192.0.2.0/24 or 2001:db8::/32)"
    return None
