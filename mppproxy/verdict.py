"""One verdict per transaction: the summed score of the pre-DATA checks and
the post-DATA scanners against the policy's thresholds, or a hard action.

Stage: after the scan engine, before the action (STYLE.md).  The verdict
says what happens to the message and why; the gateway carries it out:

* ``relay``      pass it on (with the result headers);
* ``tag``        add ``X-Spam-Flag``/``X-Spam-Score``/``X-Spam-Status``, relay;
* ``quarantine`` accept and hold a durable copy instead of relaying;
* ``reject``     5xx, text from a template;
* ``tempfail``   4xx, text from a template (a scanner could not answer);
* ``discard``    accept and drop, logged (``scan.discard_score``).

The score ladder (``_score_action``): each threshold of ``scoring`` (0:
off) acts at and above itself, tag < quarantine < reject; ``discard_score``
may sit anywhere above tag and quarantine: below reject it drops what would
be quarantined or tagged, above reject it drops the worst silently ("tag 5,
reject 10, discard 20").  ``ladder_problems`` refuses the combinations in
which a threshold could never act, at load and in ``check-config``.
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


def _score(value: float) -> float:
    """Rounded to 2 places, and never -0.0 (a negative weight or engine score
    that rounds to zero would print "-0")."""
    return round(value, 2) + 0.0


def _scored_checks(record: TransactionRecord) -> list[str]:
    return sorted({rec.check for rec in record.recorded if rec.result.score})


def decide(record: TransactionRecord, scoring: ScoringConfig, report: Any = None,
           virus_action: str = "reject", discard_score: float = 0.0) -> Verdict:
    """The verdict for a transaction whose pre-DATA results are in
    ``record`` and whose scan report (``scan/engine.py``) is ``report``
    (None when nothing was scanned).  ``virus_action`` "quarantine" holds a
    message a virus scanner refused instead of refusing it; at or above
    ``discard_score`` (0: never) the message is dropped, on the ladder of
    ``_score_action``.  A hard action's reasons list every hard hit."""
    headers = list(record.headers)
    if report is not None:
        headers.extend(report.headers)
    score = _score(record.score)
    reasons = tuple(r for rec in record.recorded if rec.result.score or rec.result.action
                    for r in rec.result.reasons)
    if report is not None and report.hard is not None:
        scanner, result = report.hard
        # The first hard hit decides the reply; the reasons name them all.
        hard_reasons = tuple(r for _, hit in (getattr(report, "hard_hits", None) or [report.hard])
                             for r in hit.reasons)
        action = "tempfail" if result.action is Action.TEMPFAIL else "reject"
        if action == "reject" and result.template == "virus" and virus_action == "quarantine":
            # The policy holds viruses instead of refusing them.
            return Verdict("quarantine", score, hard_reasons, headers=tuple(headers))
        return Verdict(action, score, hard_reasons, result.template or action,
                       result.template_vars, tuple(headers))
    if report is not None and report.failures:
        names = ", ".join(name for name, _ in report.failures)
        return Verdict("tempfail", score, (f"scanner unavailable: {names}",), "tempfail",
                       (), tuple(headers))
    if record.whitelisted:
        return Verdict("relay", score, ("whitelisted",), headers=tuple(headers))
    action = _score_action(score, scoring, discard_score)
    if action == "reject":
        return Verdict("reject", score, reasons, "score",
                       (("score", score), ("reasons", list(reasons[:5]))), tuple(headers))
    if scoring.tag > 0 and score >= scoring.tag:
        tests = _scored_checks(record)
        headers += [("X-Spam-Flag", "YES"), ("X-Spam-Score", f"{score:g}"),
                    ("X-Spam-Status", f"Yes, score={score:g} tag={scoring.tag:g} "
                                      f"tests={','.join(tests) or 'none'}")]
    return Verdict(action, score, reasons, headers=tuple(headers))


def _score_action(score: float, scoring: ScoringConfig, discard_score: float) -> str:
    """The action of ``score`` on the ladder: reject over discard over
    quarantine over tag, each at and above its threshold (0: off), except
    that a ``discard_score`` above ``scoring.reject`` wins at and above it
    (the administrator drops the worst silently and refuses the rest)."""
    def reached(threshold: float) -> bool:
        return threshold > 0 and score >= threshold

    if reached(discard_score) and not (reached(scoring.reject) and scoring.reject >= discard_score):
        return "discard"
    if reached(scoring.reject):
        return "reject"
    if reached(scoring.quarantine):
        return "quarantine"
    if reached(scoring.tag):
        return "tag"
    return "relay"


def ladder_problems(name: str, scoring: ScoringConfig, discard_score: float,
                    scans: bool) -> list[str]:
    """The threshold combinations of policy ``name`` in which one can never
    act (``_score_action``), each as "key: why" for the config loader.
    ``scans``: the policy's messages are scanned (only they are discarded)."""
    where = f"policies.{name}"
    on = {key: value for key, value in (("tag", scoring.tag), ("quarantine", scoring.quarantine),
                                        ("reject", scoring.reject)) if value > 0}
    problems = []
    # Lower rungs must sit below higher ones: at the higher threshold the
    # higher action wins, so a lower rung at or above it is never reached.
    for low, high in (("tag", "quarantine"), ("tag", "reject"), ("quarantine", "reject")):
        if low in on and high in on and on[low] >= on[high]:
            problems.append(f"{where}.scoring.{low}: {on[low]:g} is not below scoring.{high} "
                            f"({on[high]:g}), so {low} can never act; raise {high} or lower {low}")
    if discard_score <= 0:
        return problems
    key = f"{where}.scan.discard_score"
    if not scans:
        problems.append(f"{key}: {discard_score:g} is set but {where}.scan.enabled is false; "
                        "only scanned messages are discarded, so discard can never act")
    for low in ("tag", "quarantine"):
        if low in on and discard_score <= on[low]:
            problems.append(f"{key}: {discard_score:g} is not above scoring.{low} "
                            f"({on[low]:g}), so {low} can never act")
    if "reject" in on and discard_score == on["reject"]:
        problems.append(f"{key}: {discard_score:g} equals scoring.reject, so discard can never "
                        "act; put it above reject to drop the worst silently, or below to drop "
                        "instead of quarantining")
    return problems


def result_headers(verdict: Verdict, report: Any) -> tuple[tuple[str, str], ...]:
    """``X-MPP-Scan`` (score, action) and ``X-MPP-Scan-Rules`` (each
    scanner's rule names) for every accepted message, so administrators
    tune rules from the message.  Trustworthy downstream because X-MPP-*
    from outside are stripped at the edge (docs/design.md promise 7)."""
    rules = getattr(report, "rules", None) or {}
    listed = "; ".join(f"{name}={','.join(r.replace(';', ',').replace(' ', '_') for r in names)}"
                       for name, names in rules.items())
    return (("X-MPP-Scan", f"score={verdict.score:g}; action={verdict.action}"),
            ("X-MPP-Scan-Rules", listed or "none")) + skipped_headers(report)


def skipped_headers(report: Any) -> tuple[tuple[str, str], ...]:
    """``X-MPP-Scan-Skipped: clamd (down: cannot connect ...)``, one entry
    per scanner that was not consulted, or nothing when all were.  Added to
    every accepted message whatever ``result_headers`` says: a message that
    went on without an engine's opinion must not look scanned clean
    (docs/design.md promises 4 and 5)."""
    skipped = getattr(report, "skipped", None)
    if not skipped:
        return ()
    return (("X-MPP-Scan-Skipped", "; ".join(f"{name} ({why.replace(';', ',')})"
                                             for name, why in skipped)),)


def refusal_template(verdict: Verdict) -> Optional[str]:
    return verdict.template if verdict.action in ("reject", "tempfail") else None


def config_ladder_problems(config: Any) -> list[str]:
    """``ladder_problems`` of every policy of a ``ProxyConfig``.  A named
    policy that inherits the default's thresholds unchanged is not named
    again.  Scanning happens in mode "scan" always (it forces it on), in
    the proxy's modes where the policy engine runs and the policy scans,
    and never in mode "policy"."""
    def inputs(policy: Any) -> tuple[Any, ...]:
        scans = config.mode == "scan" or (config.mode != "policy" and config.policy.enabled
                                          and policy.scan.enabled)
        return policy.scoring, policy.scan.discard_score, scans

    default = inputs(config.policies["default"])
    problems = []
    for name, policy in config.policies.items():
        mine = inputs(policy)
        if name == "default" or mine != default:
            problems.extend(ladder_problems(name, *mine))
    return problems
