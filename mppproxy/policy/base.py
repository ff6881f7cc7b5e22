"""The contract every pre-DATA check keeps (STYLE.md, "a pipeline of small
stages").

A check is a small object with a ``name`` and one ``async`` method that
takes the ``Facts`` of one recipient and returns a frozen ``CheckResult``.
It never answers the client and never sums scores: the engine
(``policy/engine.py``) runs the checks of a policy in order, records every
result, adds up the scores and turns them into one reply.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Optional


class Action(enum.Enum):
    """A hard action a check may ask for instead of (or besides) a score."""

    # The client, HELO or sender is whitelisted: the later checks of the
    # policy are skipped for the whole transaction, and that is logged.
    WHITELIST = "whitelist"
    # Only this recipient is whitelisted: its later checks are skipped.
    WHITELIST_RECIPIENT = "whitelist_recipient"
    # Refuse the recipient for good (5xx).
    REJECT = "reject"
    # Refuse the recipient for now (4xx): greylisting, a DNS or database
    # failure that a policy turns into a tempfail (docs/design.md promise 4).
    TEMPFAIL = "tempfail"


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


@dataclass(frozen=True)
class CheckResult:
    """What one check found.

    ``score`` is added to the transaction's score (negative scores are
    allowed: a DNSWL or a known-good sender).  ``reasons`` are short texts
    for the log line and the X-MPP headers.  ``action``: a hard action, or
    None to leave the decision to the score.  ``template`` names the reply
    template for a refusal (``templates/replies/<template>.txt``) and
    ``template_vars`` what it may show the client.  ``headers`` are added to
    the message when it is relayed (``Authentication-Results:``, say).
    """

    score: float = 0.0
    reasons: tuple[str, ...] = ()
    action: Optional[Action] = None
    template: str = ""
    template_vars: tuple[tuple[str, Any], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    # The check put the client on the auto-blacklist: the engine refuses
    # the client's message even for recipients accepted before.
    blacklisted: bool = False

    @property
    def hit(self) -> bool:
        return self.action is not None or self.score != 0.0


MISS = CheckResult()


class Recorded(NamedTuple):
    """One check's result as the engine recorded it on the transaction:
    hits and misses alike (docs/design.md promise 5).  A named tuple: the engine
    makes several per recipient, and a frozen dataclass costs three times
    as much to build."""

    check: str
    result: CheckResult
    recipient: str = ""
    # Why the check did not run: "exempt client", "timeout", "error".
    skipped: str = ""

    def as_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {"check": self.check, "score": self.result.score}
        if self.recipient:
            out["recipient"] = self.recipient
        if self.result.reasons:
            out["reasons"] = list(self.result.reasons)
        if self.result.action is not None:
            out["action"] = self.result.action.value
        if self.skipped:
            out["skipped"] = self.skipped
        return out

    @property
    def is_miss(self) -> bool:
        return not self.skipped and not self.result.hit and not self.result.reasons


def checks_for_log(recorded: list[Recorded]) -> dict[str, Any]:
    """The transaction log's view of the results: every hit (and skip) in
    full, the misses by name only (score 0, nothing found)."""
    hits = []
    passed = set()
    # One pass, is_miss inline: this runs for every logged decision.
    for r in recorded:
        result = r.result
        if r.skipped or result.reasons or result.action is not None or result.score != 0.0:
            hits.append(r.as_log())
        else:
            passed.add(r.check)
    return {"checks": hits, "checks_passed": sorted(passed)}


class Check:
    """Base class for the checks in ``policy/checks/``.

    ``settings`` is the check's own section of one policy (a frozen
    dataclass from ``policy/config.py``); ``services`` holds what checks
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


@dataclass
class TransactionRecord:
    """The engine's memory for one transaction (kept in ``txn.facts``)."""

    policy: Optional[str] = None
    whitelisted: bool = False
    # The recipient being decided was whitelisted (its later checks skipped).
    rcpt_whitelisted: bool = False
    score: float = 0.0
    # A check blacklisted the client during this transaction.
    blacklisted_during: bool = False
    # Results of TRANSACTION-scoped checks, reused for later recipients.
    once: dict[str, CheckResult] = field(default_factory=dict)
    recorded: list[Recorded] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    # What decided the engine's last refusal: a check's name, "score" (the
    # reject threshold) or "policy_group"; the transaction log names it.
    refused_by: str = ""
