"""``[policyd]``: the Postfix policy-delegation server (``--mode policy``;
docs/design.md, "Configuration").

A leaf of ``config/``, read by ``policyd/``; ``config/schema.py`` puts it
into ``ProxyConfig``.  The limits bound what one policy client can make us
hold (docs/design.md promise 6); the defaults follow Postfix's own policy
client settings (postconf(5), ``smtpd_policy_service_*``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from mppproxy.config.fields import at_least as _at_least, endpoints as _endpoints, opt as _opt

# access(5) actions a site may choose as the answer to a request we cannot
# evaluate.  OK is not among them: it would let a malformed request skip
# the restrictions after check_policy_service (docs/design.md promise 4).
_DEFAULT_ACTIONS = ("DUNNO", "DEFER_IF_PERMIT", "DEFER", "DEFER_IF_REJECT", "REJECT")
_NUMERIC_ACTION = re.compile(r"^[45]\d\d(?: .*)?$")


def check_action(value: str) -> Optional[str]:
    """A policy answer a site may configure: one access(5) action on one
    line, never OK."""
    if any(c in value for c in "\r\n\0"):
        return "must be one line"
    word = value.split(" ", 1)[0]
    if word in _DEFAULT_ACTIONS or _NUMERIC_ACTION.match(value):
        return None
    return (f"must be one of {', '.join(_DEFAULT_ACTIONS)} (with optional text) or "
            f"'4NN text' / '5NN text', not {value!r}")


@dataclass(frozen=True)
class PolicydConfig:
    """The policy server's listeners and bounds."""

    # Twisted endpoint descriptions; Postfix: check_policy_service
    # inet:127.0.0.1:10040.
    listen: tuple[str, ...] = field(default=("tcp:10040:interface=127.0.0.1",),
                                    metadata=_opt(_endpoints))
    # The answer to a request we cannot evaluate (malformed, or the engine
    # failed): DUNNO leaves the decision to the restrictions after ours.
    default_action: str = field(default="DUNNO", metadata=_opt(check_action))
    # Each smtpd process keeps one connection (default_process_limit 100).
    max_connections: int = field(default=1000, metadata=_opt(_at_least(1)))
    # Postfix closes idle policy connections after 300 s
    # (smtpd_policy_service_max_idle); a little more here so that Postfix,
    # not we, normally closes them and never writes into a closed socket.
    idle_timeout: float = field(default=330.0, metadata=_opt(_at_least(1)))
    # One "name=value" line, LF included.  Postfix's longest values are
    # addresses (RFC 5321 4.5.3.1.3: 256 octets) and certificate names.
    max_line: int = field(default=4096, metadata=_opt(_at_least(512)))
    # Attributes in one request; Postfix 3.8 sends about 35.
    max_attributes: int = field(default=100, metadata=_opt(_at_least(10)))
    # Requests read ahead on one connection before we stop reading it
    # (a pipelining client cannot make us queue without bound).
    max_pending: int = field(default=64, metadata=_opt(_at_least(1)))
    # Transactions (Postfix "instance") whose engine record is kept, so the
    # recipients of one message share it; least recently used go first.
    max_transactions: int = field(default=10000, metadata=_opt(_at_least(100)))
    # Every refusal and PREPEND is logged with each check's result; a DUNNO
    # only when this is true.  Postfix logs what it accepts itself, and a
    # log write per request is the largest cost of a DUNNO answer.
    log_dunno: bool = False
