"""One verdict per transaction: the summed score of the pre-DATA checks and
the post-DATA scanners against the policy's thresholds, or a hard action.

Stage: after the scan engine, before the action (STYLE.md).  The verdict
says what happens to the message and why; the gateway carries it out:

* ``relay``      pass it on (with the result headers);
* ``tag``        add ``X-Spam-Flag``/``X-Spam-Score``/``X-Spam-Status``, relay;
* ``quarantine`` accept and hold a durable copy instead of relaying;
* ``reject``     5xx, text from a template;
* ``tempfail``   4xx, text from a template (a scanner could not answer);
* ``discard``    accept and drop, logged (only a hard action asks for it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mppproxy.policy.base import Action, TransactionRecord
from mppproxy.policy.config import ScoringConfig

ACTIONS = ("relay", "tag", "quarantine", "reject", "tempfail", "discard")


@dataclass(frozen=True)
class Verdict:
    action: str = "relay"
    score: float = 0.0
    reasons: tuple[str, ...] = ()
    # For reject and tempfail: the reply template and what it may show.
    template: str = ""
    template_vars: tuple[tuple[str, Any], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()


def _scored_checks(record: TransactionRecord) -> list[str]:
    return sorted({rec.check for rec in record.recorded if rec.result.score})


def decide(record: TransactionRecord, scoring: ScoringConfig, report: Any = None,
           virus_action: str = "reject", discard_score: float = 0.0) -> Verdict:
    """The verdict for a transaction whose pre-DATA results are in
    ``record`` and whose scan report (``scan/engine.py``) is ``report``
    (None when nothing was scanned).  ``virus_action`` "quarantine" holds a
    message a virus scanner refused instead of refusing it; at or above
    ``discard_score`` (0: never) the message is dropped, unless the reject
    threshold is reached too (a refusal tells the sender; a drop does not)."""
    headers = list(record.headers)
    if report is not None:
        headers.extend(report.headers)
    score = round(record.score, 2)
    reasons = tuple(r for rec in record.recorded if rec.result.score or rec.result.action
                    for r in rec.result.reasons)
    if report is not None and report.hard is not None:
        scanner, result = report.hard
        action = "tempfail" if result.action is Action.TEMPFAIL else "reject"
        if action == "reject" and result.template == "virus" and virus_action == "quarantine":
            # The policy holds viruses instead of refusing them.
            return Verdict("quarantine", score, result.reasons, headers=tuple(headers))
        return Verdict(action, score, result.reasons, result.template or action,
                       result.template_vars, tuple(headers))
    if report is not None and report.failures:
        names = ", ".join(name for name, _ in report.failures)
        return Verdict("tempfail", score, (f"scanner unavailable: {names}",), "tempfail",
                       (), tuple(headers))
    if record.whitelisted:
        return Verdict("relay", score, ("whitelisted",), headers=tuple(headers))
    if scoring.reject > 0 and score >= scoring.reject:
        return Verdict("reject", score, reasons, "score",
                       (("score", score), ("reasons", list(reasons[:5]))), tuple(headers))
    action = "relay"
    if scoring.tag > 0 and score >= scoring.tag:
        action = "tag"
        tests = _scored_checks(record)
        headers += [("X-Spam-Flag", "YES"), ("X-Spam-Score", f"{score:g}"),
                    ("X-Spam-Status", f"Yes, score={score:g} tag={scoring.tag:g} "
                                      f"tests={','.join(tests) or 'none'}")]
    if scoring.quarantine > 0 and score >= scoring.quarantine:
        action = "quarantine"
    if discard_score > 0 and score >= discard_score:
        action = "discard"
    return Verdict(action, score, reasons, headers=tuple(headers))


def result_headers(verdict: Verdict, report: Any) -> tuple[tuple[str, str], ...]:
    """``X-MPP-Scan`` (score, action) and ``X-MPP-Scan-Rules`` (each
    scanner's rule names) for every accepted message, so administrators
    tune rules from the message.  Trustworthy downstream because X-MPP-*
    from outside are stripped at the edge (docs/design.md promise 7)."""
    rules = getattr(report, "rules", None) or {}
    listed = "; ".join(f"{name}={','.join(r.replace(';', ',').replace(' ', '_') for r in names)}"
                       for name, names in rules.items())
    return (("X-MPP-Scan", f"score={verdict.score:g}; action={verdict.action}"),
            ("X-MPP-Scan-Rules", listed or "none"))


def refusal_template(verdict: Verdict) -> Optional[str]:
    return verdict.template if verdict.action in ("reject", "tempfail") else None
