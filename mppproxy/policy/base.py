"""The contract every pre-DATA check keeps (STYLE.md, "a pipeline of small
stages").

A check is a small object with a ``name`` and one ``async`` method that
takes the ``Facts`` of one recipient and returns a frozen ``CheckResult``.
It never answers the client and never sums scores: the engine
(``policy/engine.py``) runs the checks of a policy in order, records every
result, adds up the scores and turns them into one reply.  The result types
it shares with the scanners live on the ground floor (``mppproxy/results.py``;
docs/design.md, "Floors").
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from mppproxy.results import CheckResult


class Scope(enum.Enum):
    """How often a check runs within one transaction."""

    # Once per transaction: its facts (client, HELO, sender) do not change
    # with the recipient, so the first recipient's result is reused.
    TRANSACTION = "transaction"
    # For every recipient.
    RECIPIENT = "recipient"


@dataclass(frozen=True)
class Facts:
    """What a check may look at: one recipient of one transaction.

    Addresses are as the client sent them; ``*_domain`` are lower-cased and
    without a trailing dot ("" for the null sender or a bare postmaster).
    """

    client_ip: str
    helo: str = ""
    sender: str = ""
    sender_domain: str = ""
    recipient: str = ""
    recipient_domain: str = ""
    client_name: str = ""
    policy: str = "default"
    session_id: str = ""
    queue_id: str = ""
    tls: bool = False
    # The Postfix policy protocol asks at other stages than RCPT.
    stage: str = "rcpt"


class Check:
    """Base class for the checks in ``policy/checks/``.

    ``settings`` is the check's own section of one policy (a frozen
    dataclass from ``config/policy.py``); ``services`` holds what checks
    share: the DNS resolver, the stores, the clock (``policy/services.py``).
    Construction does no I/O.
    """

    name: ClassVar[str] = ""
    scope: ClassVar[Scope] = Scope.RECIPIENT
    # The engine applies the section's whitelist_* keys as exemptions from
    # this check; the access check reads them as its own lists instead.
    exemptible: ClassVar[bool] = True

    def __init__(self, settings: Any, services: Any):
        self.settings = settings
        self.services = services

    async def check(self, facts: Facts) -> CheckResult:
        raise NotImplementedError
