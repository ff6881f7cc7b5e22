"""``[digest]``: user digests (issue 13), a daily email to each recipient
with held mail in the listed domains, with one-shot release links.

A leaf of ``config/`` (docs/design.md floor 1): ``schema.py`` puts
``DigestConfig`` into ``ProxyConfig``; ``load.py`` calls
``digest_problems`` (rules across keys).  The digests themselves are made
and sent by the node that serves the console (``mppproxy/web/digest*.py``)
and by ``mppproxy digest send``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import jinja2

from mppproxy.config.fields import at_least as _at_least, opt as _opt

# HH:MM on a 24-hour clock.
_TIME = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
# A plain address for From: and MAIL FROM (no display name, no brackets).
_ADDRESS = re.compile(r"^[^\s<>()\[\],;:\"@\\]{1,64}@[^\s<>()\[\],;:\"@\\]{1,253}$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")
# A token's lifetime: a link older than a year is not worth honouring.
MAX_TOKEN_DAYS = 365


def _domains(values: tuple[str, ...]) -> Optional[str]:
    for v in values:
        d = v.strip().rstrip(".")
        if not d or any(c.isspace() for c in d) or "@" in d or "*" in d:
            return f"{v!r} is not a domain name (no wildcards)"
    return None


def _send_at(value: str) -> Optional[str]:
    return None if _TIME.match(value) else f"must be HH:MM (UTC, 24-hour clock), not {value!r}"


def _sender(value: str) -> Optional[str]:
    if value and not _ADDRESS.match(value):
        return f"{value!r} is not an e-mail address (local@domain, no display name)"
    return None


def _subject(value: str) -> Optional[str]:
    if not value.strip():
        return "must not be empty"
    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as e:
        return f"is not a Jinja2 template: {e.message} (line {e.lineno})"
    return None


def _base_url(value: str) -> Optional[str]:
    if value and not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", value):
        return f"{value!r} is not an http:// or https:// URL (the console's public address)"
    return None


def _relay(value: str) -> Optional[str]:
    if value and not _HOST_PORT.match(value):
        return f"{value!r} is not host:port"
    if value and not 1 <= int(value.rpartition(":")[2]) <= 65535:
        return f"{value!r}: the port must be 1 to 65535"
    return None


def _token_days(value: int) -> Optional[str]:
    if not 1 <= value <= MAX_TOKEN_DAYS:
        return f"must be 1 to {MAX_TOKEN_DAYS} days, not {value!r}"
    return None


@dataclass(frozen=True)
class DigestConfig:
    """``[digest]``: which domains' recipients get a daily digest, when,
    from whom, and how its release links behave."""

    # The domains whose recipients get digests; empty: no digests at all.
    domains: tuple[str, ...] = field(default=(), metadata=_opt(_domains))
    # When the day's digests go out, HH:MM in UTC (every node agrees on UTC;
    # local time would move with each node's time zone and summer time).
    send_at: str = field(default="07:00", metadata=_opt(_send_at))
    # From: and the envelope sender of digests; required when domains is set.
    sender: str = field(default="", metadata=_opt(_sender))
    # The Subject (a Jinja2 template; variables: count, shown, recipient, domain).
    subject: str = field(default="Quarantine digest: {{ count }} held message(s) for "
                                 "{{ recipient }}", metadata=_opt(_subject))
    # The console's public URL: release links are <base_url>/digest/<token>.
    # Required when domains is set.
    base_url: str = field(default="", metadata=_opt(_base_url))
    # Days a release link works.
    token_days: int = field(default=7, metadata=_opt(_token_days))
    # Messages listed in one digest (newest first); the rest are counted.
    max_items: int = field(default=50, metadata=_opt(_at_least(1)))
    # Held messages received in the last N days are listed (0: every held
    # message).  1 with a daily digest lists each message once.
    days: int = field(default=1, metadata=_opt(_at_least(0)))
    # host:port digests are sent to; empty: the release route of the
    # recipient's domain ([release] routes, default_route, [backend]).
    relay: str = field(default="", metadata=_opt(_relay))


def digest_enabled(digest: DigestConfig) -> bool:
    return bool(digest.domains)


def digest_problems(digest: DigestConfig) -> list[str]:
    """Rules across ``[digest]``'s keys (each named by its key)."""
    if not digest_enabled(digest):
        return []
    problems = []
    if not digest.sender:
        problems.append("digest.sender: is required when digest.domains is set "
                        "(the digests' From: address)")
    if not digest.base_url:
        problems.append("digest.base_url: is required when digest.domains is set "
                        "(the console's public URL, for the release links)")
    return problems
