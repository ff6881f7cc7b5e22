"""One verdict per transaction: the summed score of the pre-DATA checks and
the post-DATA scanners against the policy's thresholds, or a hard action.

Stage: after the scan engine, before the action (docs/design.md).  The
verdict says what happens to the message and why, as a ``Disposition``
(``mppproxy/results.py``, the one action vocabulary); the actions carry it
out:

* ``relay``      pass it on (with the result headers);
* ``tag``        add ``X-Spam-Flag``/``X-Spam-Score``/``X-Spam-Status``, relay;
* ``quarantine`` accept and hold a durable copy instead of relaying;
* ``reject``     5xx, text from a template;
* ``tempfail``   4xx, text from a template (a scanner could not answer);
* ``discard``    accept and drop, logged (``scan.discard_score``);
* ``delete``     a virus accepted and dropped, logged loudly, notices sent
  (``scan.virus_action = "delete"``, or a per-engine action).

Per-engine actions (``scan.engine_actions``, issue 14): beside the summed
score, an engine's own verdict may pick the action.  The first rule (in
the order configured) that matches any engine's answer -- its name, its
verdict word (``scan/engine.py`` ``engine_verdict``), its own score before
the policy's weight -- is *the* rule; the precedence, strongest first:

1. a hard refusal (a virus, a malformed message, a refused attachment)
   decides, as ``virus_action`` says for a virus -- unless the rule is
   about the engine whose refusal decides (it then replaces it: "clamd
   virus -> quarantine"; a "tag" rule never does, a virus is never relayed);
2. an engine that could not answer tempfails the message -- unless the
   rule refuses, discards or deletes it (the missing opinion could not
   make that better; it could make a tag or a hold wrong);
3. a whitelisted or allow-listed sender is relayed (as the ladder is
   skipped for it, so are rules on spam verdicts and scores);
4. the rule's action;
5. the score ladder, and the holds DMARC asks for.

The score ladder (``_score_action``): each threshold of ``scoring`` (0:
off) acts at and above itself, tag < quarantine < reject; ``discard_score``
may sit anywhere above tag and quarantine: below reject it drops what would
be quarantined or tagged, above reject it drops the worst silently ("tag 5,
reject 10, discard 20").  ``config/ladder.py`` refuses the combinations in
which a threshold could never act, at load and in ``check-config``; a
change to the ladder changes it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mppproxy.config.policy import ScoringConfig
from mppproxy.config.scan import EngineActionRule
from mppproxy.results import CheckResult, Disposition, HardAction, TransactionRecord
from mppproxy.scan.engine import ScanReport, engine_verdict

RELAY, TAG, QUARANTINE = Disposition.RELAY, Disposition.TAG, Disposition.QUARANTINE
REJECT, TEMPFAIL, DISCARD = Disposition.REJECT, Disposition.TEMPFAIL, Disposition.DISCARD
DELETE = Disposition.DELETE
# A rule's action word -> the disposition.
_RULE_ACTIONS = {"reject": REJECT, "tempfail": TEMPFAIL, "quarantine": QUARANTINE, "tag": TAG,
                 "discard": DISCARD, "delete": DELETE}
# Rule actions that never pass the message on (precedence step 2).
_NEVER_DELIVERED = (REJECT, DISCARD, DELETE)


@dataclass(frozen=True)
class Verdict:
    action: Disposition = Disposition.RELAY
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


def decide(record: TransactionRecord, scoring: ScoringConfig, report: Optional[ScanReport] = None,
           virus_action: str = "reject", discard_score: float = 0.0,
           rules: Sequence[EngineActionRule] = ()) -> Verdict:
    """The verdict for a transaction whose pre-DATA results are in
    ``record`` and whose scan report (``scan/engine.py``) is ``report``
    (None when nothing was scanned).  ``virus_action`` "quarantine" holds a
    message a virus scanner refused instead of refusing it, "delete" drops
    it; at or above ``discard_score`` (0: never) the message is dropped, on
    the ladder of ``_score_action``.  ``rules``: the policy's per-engine
    actions (the module docstring gives the precedence).  A hard action's
    reasons list every hard hit."""
    headers = list(record.headers)
    if report is not None:
        headers.extend(report.headers)
    score = _score(record.score)
    reasons = tuple(r for rec in record.recorded if rec.result.score or rec.result.action
                    for r in rec.result.reasons)
    matched = _first_rule(rules, report) if rules and report is not None else None
    if report is not None and report.hard is not None:
        scanner, result = report.hard
        # The first hard hit decides the reply; the reasons name them all.
        hard_reasons = tuple(r for _, hit in (getattr(report, "hard_hits", None) or [report.hard])
                             for r in hit.reasons)
        if matched is not None and matched[1] == scanner and matched[0].action != "tag":
            # The administrator's word on this very engine's refusal.
            return _by_rule(matched, score, hard_reasons, headers, scoring, record)
        action = TEMPFAIL if result.action is HardAction.TEMPFAIL else REJECT
        if action is REJECT and engine_verdict(result) == "virus" and virus_action != "reject":
            if virus_action == "delete":
                # Accepted, dropped, logged, notices (actions/delete.py).
                return Verdict(DELETE, score, hard_reasons, "", result.template_vars,
                               tuple(headers))
            # The policy holds viruses instead of refusing them.
            return Verdict(QUARANTINE, score, hard_reasons, headers=tuple(headers))
        return Verdict(action, score, hard_reasons, result.template or action.value,
                       result.template_vars, tuple(headers))
    if report is not None and report.failures:
        if matched is not None and _RULE_ACTIONS[matched[0].action] in _NEVER_DELIVERED:
            return _by_rule(matched, score, reasons, headers, scoring, record)
        names = ", ".join(name for name, _ in report.failures)
        return Verdict(TEMPFAIL, score, (f"scanner unavailable: {names}",), "tempfail",
                       (), tuple(headers))
    if record.whitelisted:
        return Verdict(RELAY, score, ("whitelisted",), headers=tuple(headers))
    if record.allowed_for_all:
        # Every recipient's domain allows the sender (db/allowlist.py).
        return Verdict(RELAY, score, ("sender allowed",), headers=tuple(headers))
    if matched is not None:
        return _by_rule(matched, score, reasons, headers, scoring, record)
    action = _score_action(score, scoring, discard_score)
    holds = getattr(report, "holds", None)
    if holds and action in (RELAY, TAG):
        # A scanner asked to hold the message (a DMARC fail under
        # p=quarantine); a score that refuses or discards it says worse.
        held = tuple(r for _, hit in holds for r in hit.reasons)
        return Verdict(QUARANTINE, score, reasons + tuple(r for r in held if r not in reasons),
                       headers=tuple(headers))
    if action is REJECT:
        return Verdict(REJECT, score, reasons, "score",
                       (("score", score), ("reasons", list(reasons[:5]))), tuple(headers))
    if scoring.tag > 0 and score >= scoring.tag:
        headers += _spam_headers(record, score, scoring)
    return Verdict(action, score, reasons, headers=tuple(headers))


def _spam_headers(record: TransactionRecord, score: float,
                  scoring: ScoringConfig) -> list[tuple[str, str]]:
    tests = _scored_checks(record)
    return [("X-Spam-Flag", "YES"), ("X-Spam-Score", f"{score:g}"),
            ("X-Spam-Status", f"Yes, score={score:g} tag={scoring.tag:g} "
                              f"tests={','.join(tests) or 'none'}")]


_Match = tuple[EngineActionRule, str, str, float, CheckResult]


def _first_rule(rules: Sequence[EngineActionRule], report: ScanReport) -> Optional[_Match]:
    """The first rule, in the order configured, that matches an engine's
    answer: (rule, engine, its verdict word, its own score, its result)."""
    answers = getattr(report, "verdicts", None) or ()
    for rule in rules:
        for engine, word, engine_score, result in answers:
            if rule.matches(engine, word, engine_score):
                return rule, engine, word, engine_score, result
    return None


def _by_rule(matched: _Match, score: float, reasons: tuple[str, ...],
             headers: list[tuple[str, str]], scoring: ScoringConfig,
             record: TransactionRecord) -> Verdict:
    """The verdict a per-engine rule picks; its reasons say which rule."""
    rule, engine, word, engine_score, result = matched
    action = _RULE_ACTIONS[rule.action]
    why = f"engine_actions: {engine} said {word} ({engine_score:g}): {rule.action}"
    own = tuple(r for r in result.reasons if r not in reasons)
    reasons = (why,) + reasons + own
    if action is REJECT:
        if word == "virus" and result.template:
            return Verdict(REJECT, score, reasons, result.template, result.template_vars,
                           tuple(headers))
        return Verdict(REJECT, score, reasons, "score",
                       (("score", score), ("reasons", list((result.reasons or (why,))[:5]))),
                       tuple(headers))
    if action is TEMPFAIL:
        return Verdict(TEMPFAIL, score, reasons, "tempfail", (), tuple(headers))
    if action is TAG:
        # Tagged as the ladder tags, whatever the summed score.
        headers = headers + _spam_headers(record, score, scoring)
    if action is DELETE:
        return Verdict(DELETE, score, reasons, "", result.template_vars, tuple(headers))
    return Verdict(action, score, reasons, headers=tuple(headers))


def _score_action(score: float, scoring: ScoringConfig, discard_score: float) -> Disposition:
    """The action of ``score`` on the ladder: reject over discard over
    quarantine over tag, each at and above its threshold (0: off), except
    that a ``discard_score`` above ``scoring.reject`` wins at and above it
    (the administrator drops the worst silently and refuses the rest)."""
    def reached(threshold: float) -> bool:
        return threshold > 0 and score >= threshold

    if reached(discard_score) and not (reached(scoring.reject) and scoring.reject >= discard_score):
        return DISCARD
    if reached(scoring.reject):
        return REJECT
    if reached(scoring.quarantine):
        return QUARANTINE
    if reached(scoring.tag):
        return TAG
    return RELAY


def result_headers(verdict: Verdict, report: Optional[ScanReport]) -> tuple[tuple[str, str], ...]:
    """``X-MPP-Scan`` (score, action) and ``X-MPP-Scan-Rules`` (each
    scanner's rule names) for every accepted message, so administrators
    tune rules from the message.  Trustworthy downstream because X-MPP-*
    from outside are stripped at the edge (docs/design.md promise 7)."""
    rules = getattr(report, "rules", None) or {}
    listed = "; ".join(f"{name}={','.join(r.replace(';', ',').replace(' ', '_') for r in names)}"
                       for name, names in rules.items())
    return (("X-MPP-Scan", f"score={verdict.score:g}; action={verdict.action}"),
            ("X-MPP-Scan-Rules", listed or "none")) + skipped_headers(report)


def skipped_headers(report: Optional[ScanReport]) -> tuple[tuple[str, str], ...]:
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
    return verdict.template if verdict.action is REJECT or verdict.action is TEMPFAIL else None
