"""The shared result contract: what checks and scanners report, what the
engines record, and what happens to a message (docs/design.md, "The stages
of one session" and promise 5).

Ground floor: the policy stage, the scan stage, the verdict, the actions
and the transaction log all speak this vocabulary, and it imports nothing of
theirs, so neither stage depends on the other.

Two enums, on purpose:

* ``Disposition`` is the one action vocabulary: what becomes of a message
  (or, for the log-only members, of a transaction that ends without one).
  The verdict picks one, the actions carry it out, the transaction log and
  the ``X-MPP-Scan`` header print its value.  It is a ``StrEnum``, so its
  members print (and serialise to JSON) as the same lowercase words the
  log and the headers always carried.
* ``HardAction`` is what a single check or scanner may *ask* the engine
  for instead of a score.  Two of its requests (``WHITELIST``,
  ``WHITELIST_RECIPIENT``) steer the engine -- skip the later checks -- and
  are no fate of a message: putting them in ``Disposition`` would let a
  verdict say "whitelist".  Two ask for a refusal and map onto the
  disposition of the same name (``HardAction.disposition``); ``QUARANTINE``
  (scanners only) asks to hold the message, and the verdict weighs it
  against the score.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional


class Disposition(enum.StrEnum):
    """What becomes of a message: the verdict's choice and the transaction
    log's ``action`` field."""

    # Passed on to the backend (with the result headers).
    RELAY = "relay"
    # X-Spam-* headers (and the policy's Subject prefix) added, then relayed.
    TAG = "tag"
    # Accepted and held as a durable copy instead of being relayed.
    QUARANTINE = "quarantine"
    # Refused for good (5xx), text from a template.
    REJECT = "reject"
    # Refused for now (4xx): a scanner could not answer, a disk or the
    # backend failed (docs/design.md promise 4).
    TEMPFAIL = "tempfail"
    # Accepted and dropped on purpose, logged (``scan.discard_score``).
    DISCARD = "discard"
    # A virus accepted and dropped (``scan.virus_action = "delete"`` or a
    # per-engine action), logged loudly, a notice sent where configured.
    DELETE = "delete"
    # Without a backend: written to the local Maildir (all-in-one mode).
    DELIVER = "deliver"
    # Log only: no recipient was accepted and some were refused before DATA
    # (by policy or relay control).
    REFUSED = "refused"
    # Log only: the transaction ended (RSET, QUIT, hang-up) without a message.
    ABORTED = "aborted"

    @property
    def refuses(self) -> bool:
        """The client hears a refusal (4xx or 5xx) for the message."""
        return self is Disposition.REJECT or self is Disposition.TEMPFAIL


# What the verdict may choose (the score ladder and the hard hits); the
# other members only describe how a transaction ended.
VERDICTS = (Disposition.RELAY, Disposition.TAG, Disposition.QUARANTINE, Disposition.REJECT,
            Disposition.TEMPFAIL, Disposition.DISCARD, Disposition.DELETE)


class HardAction(enum.Enum):
    """A hard action a check or scanner may ask for instead of (or besides)
    a score."""

    # The client, HELO or sender is whitelisted: the later checks of the
    # policy are skipped for the whole transaction, and that is logged.
    WHITELIST = "whitelist"
    # Only this recipient is whitelisted: its later checks are skipped.
    WHITELIST_RECIPIENT = "whitelist_recipient"
    # Refuse the recipient or message for good (5xx).
    REJECT = "reject"
    # Refuse it for now (4xx): greylisting, a DNS or database failure that
    # a policy turns into a tempfail (docs/design.md promise 4).
    TEMPFAIL = "tempfail"
    # After DATA only: accept the message and hold it instead of relaying
    # (a DMARC fail under p=quarantine, scan/scanners/authentication.py).
    # A refusal or a higher score wins over it (verdict.py).
    QUARANTINE = "quarantine"

    @property
    def disposition(self) -> Optional[Disposition]:
        """The disposition a refusal asks for; None for the whitelists."""
        return _REFUSALS.get(self)


_REFUSALS = {HardAction.REJECT: Disposition.REJECT, HardAction.TEMPFAIL: Disposition.TEMPFAIL}


@dataclass(frozen=True)
class CheckResult:
    """What one check or scanner found.

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
    action: Optional[HardAction] = None
    template: str = ""
    template_vars: tuple[tuple[str, Any], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    # The check put the client on the auto-blacklist: the engine refuses
    # the client's message even for recipients accepted before.
    blacklisted: bool = False
    # With WHITELIST_RECIPIENT: the database allow list of the recipient's
    # domain has the sender (db/allowlist.py).  When every recipient the
    # engine passed is allowed so, the message counts as whitelisted
    # (``TransactionRecord.allowed_for_all``).
    sender_allowed: bool = False
    # What the check found, for later stages to read, as (name, value)
    # pairs: the SPF check's result and the domain it checked, which DMARC
    # needs after DATA (scan/postdata.py).
    facts: tuple[tuple[str, str], ...] = ()

    @property
    def hit(self) -> bool:
        return self.action is not None or self.score != 0.0


MISS = CheckResult()


class Recorded(NamedTuple):
    """One check's or scanner's result as the engine recorded it on the
    transaction: hits and misses alike (docs/design.md promise 5).  A named
    tuple: the engine makes several per recipient, and a frozen dataclass
    costs three times as much to build."""

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


@dataclass
class TransactionRecord:
    """The engines' memory for one transaction: the pre-DATA checks' and the
    scanners' results, the policy that judges it and its score (kept on
    ``Transaction.record``; scan mode makes one per message)."""

    policy: Optional[str] = None
    whitelisted: bool = False
    # The recipient being decided was whitelisted (its later checks skipped).
    rcpt_whitelisted: bool = False
    score: float = 0.0
    # A check blacklisted the client during this transaction.
    blacklisted_during: bool = False
    # Recipients the policy engine let through, and those of them whose
    # domain's allow list has the sender (a check answered WHITELIST_RECIPIENT
    # with ``sender_allowed``).  The backend may still refuse a passed one:
    # it then counts against ``allowed_for_all``, the safe side.
    passed_recipients: set[str] = field(default_factory=set)
    allowed_recipients: set[str] = field(default_factory=set)
    # Results of TRANSACTION-scoped checks, reused for later recipients.
    once: dict[str, CheckResult] = field(default_factory=dict)
    recorded: list[Recorded] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    # What decided the engine's last refusal: a check's name, "score" (the
    # reject threshold) or "policy_group"; the transaction log names it.
    refused_by: str = ""

    @property
    def allowed_for_all(self) -> bool:
        """Every recipient the engine passed (at least one) was allowed
        this sender by its domain's allow list (db/allowlist.py): the
        verdict treats the message as whitelisted.  Not ``whitelisted``
        itself, which also makes the engine skip the checks of later
        recipients, whose domains may not allow the sender."""
        return bool(self.passed_recipients) and self.passed_recipients <= self.allowed_recipients
