"""The post-DATA scan engine: runs a policy's scanners on one message at
once, applies each one's weight, timeout, size bound and failure action,
and records every result on the transaction, next to the pre-DATA checks'.

The engine decides nothing about the message: it reports the added score,
the first hard action (a virus, a malformed message) and the failures;
``mppproxy/verdict.py`` turns those and the pre-DATA score into one action.

A scanner that fails (down, slow past its timeout, garbage) is logged with
the reason and, by default, makes the verdict a tempfail (docs/design.md promise
4: a failure never lets mail through unscanned); ``on_failure = "skip"``
goes on without it.  Every scanner that was not consulted, for whatever
reason, is listed in ``ScanReport.skipped`` (kind and reason), so a message
that went on without an engine says so (X-MPP-Scan-Skipped, the log line).

Guards run first (the MIME check, ``SlotSettings.guard``): when one refuses
the message or cannot check it, no external engine (``Scanner.external``)
is asked; a malformed message never reaches clamd, spamd or rspamd.  The
message checks that read only the parsed tree (attachment and header rules)
still run, so every hard hit is reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from twisted.internet import defer

from mppproxy import probes
from mppproxy._async import as_deferred
from mppproxy.logsetup import Logger
from mppproxy.results import CheckResult, HardAction, Recorded, TransactionRecord
from mppproxy.scan.base import (ERROR, NOT_SENT, TIMEOUT, TOO_LARGE, ScanInput, Scanner,
                                ScannerUnavailable)

log = Logger()

ON_FAILURE = ("tempfail", "skip")

# What ``ScanEngine._run_one`` fires: the scanner's result, or what kept
# it from answering (kind, why).
_Outcome = tuple[CheckResult, None] | tuple[None, tuple[str, str]]


@dataclass(frozen=True)
class SlotSettings:
    """How the engine treats one scanner (``[policies.NAME.scan.<scanner>]``)."""

    # The scanner's score is multiplied by this before it is added.
    weight: float = 1.0
    # "tempfail": the message gets 451 when this scanner cannot answer;
    # "skip": logged, and the message goes on without its opinion.
    on_failure: str = "tempfail"
    # Messages larger than this (octets) skip the scanner; 0: no bound.
    max_size: int = 0
    # Seconds the engine waits for its answer (the scanner has its own
    # connection timeouts too).
    timeout: float = 120.0
    # Runs before the other scanners; a hard action or a tempfailing
    # failure here keeps the message from every external engine (the MIME
    # check: malformed mail never reaches a scanner).
    guard: bool = False


@dataclass
class ScanReport:
    """What the scanners said about one message."""

    score: float = 0.0
    # The first hard action in scanner order, with its result.
    hard: Optional[tuple[str, CheckResult]] = None
    # Every hard action (the first one included), in scanner order: a
    # message both malformed and carrying a refused attachment names both.
    hard_hits: list[tuple[str, CheckResult]] = field(default_factory=list)
    # (scanner, reason) of each scanner that could not answer and tempfails.
    failures: list[tuple[str, str]] = field(default_factory=list)
    # (scanner, "kind: reason") of each scanner that was not consulted:
    # failed (whatever its failure action), over a size bound, or not sent
    # because a guard refused the message.  Kinds: scan/base.py.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    # (scanner, result) of each scanner that asked to hold the message
    # (HardAction.QUARANTINE: a DMARC fail under p=quarantine); the verdict
    # holds it unless a refusal or the score says worse.
    holds: list[tuple[str, CheckResult]] = field(default_factory=list)
    # scanner -> its rule names / reasons (for X-MPP-* and X-Spam-Status).
    rules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # (scanner, its verdict word, its own score before the policy's weight,
    # its result) of every scanner that answered, in scanner order: what
    # the per-engine actions match (verdict.py, ``engine_verdict``).
    verdicts: list[tuple[str, str, float, CheckResult]] = field(default_factory=list)


def engine_verdict(result: CheckResult) -> str:
    """One scanner's word on the message: its ``verdict`` fact (command
    engines, spamd, rspamd: clean, spam, virus; "unscanned" over its size),
    else "virus" for a refusal with the virus template (clamd), else the
    hard action it asked for ("reject", "tempfail", "quarantine"), else
    "clean"."""
    for name, value in result.facts:
        if name == "verdict":
            return value
    action = result.action
    if action is None:
        return "clean"
    if action is HardAction.REJECT and result.template == "virus":
        return "virus"
    return action.value


class ScanEngine:
    """The scanners of one policy, in order, each with its ``SlotSettings``."""

    def __init__(self, slots: Sequence[tuple[Scanner, SlotSettings]], reactor: Any):
        self.slots = list(slots)
        self.reactor = reactor

    async def scan(self, message: ScanInput, record: TransactionRecord) -> ScanReport:
        report = ScanReport()
        guards = [slot for slot in self.slots if slot[1].guard]
        others = [slot for slot in self.slots if not slot[1].guard]
        await self._run(guards, message, record, report)
        refused = self._guard_refusal(report)
        if refused is not None:
            for scanner, _ in others:
                if scanner.external:
                    _skip(record, report, scanner.name, NOT_SENT, refused)
            others = [slot for slot in others if not slot[0].external]
        await self._run(others, message, record, report)
        return report

    @staticmethod
    def _guard_refusal(report: ScanReport) -> Optional[str]:
        """Why the guards (the only scanners run so far) keep the message
        from the engines, or None."""
        if report.hard is not None:
            return f"refused by {report.hard[0]}"
        if report.failures:
            return f"{report.failures[0][0]} could not check it"
        return None

    async def _run(self, slots: Sequence[tuple[Scanner, SlotSettings]], message: ScanInput,
                   record: TransactionRecord, report: ScanReport) -> None:
        """Run ``slots`` at once and add what they said to ``report``."""
        runs = []
        for scanner, settings in slots:
            limit = _size_limit(scanner, settings)
            if limit and message.size > limit:
                _skip(record, report, scanner.name, TOO_LARGE, f"size {message.size} > {limit}")
                continue
            runs.append((scanner, settings, self._run_one(scanner, settings, message)))
        if not runs:
            return
        outcomes = await defer.gatherResults([d for _, _, d in runs])
        for (scanner, settings, _), outcome in zip(runs, outcomes):
            # Indexed, not unpacked: mypy narrows the outcome on its item.
            if outcome[1] is not None:
                kind, why = outcome[1]
                _skip(record, report, scanner.name, kind, why, recorded=f"failed: {why}")
                if settings.on_failure == "tempfail":
                    report.failures.append((scanner.name, why))
                continue
            _add(record, report, scanner.name, outcome[0], settings.weight)

    def _run_one(self, scanner: Scanner, settings: SlotSettings,
                 message: ScanInput) -> defer.Deferred[_Outcome]:
        """Fires (result, None) or (None, (kind, why it failed)); never fails."""
        started = time.monotonic()
        d = as_deferred(scanner.scan(message))
        if not d.called:
            # Only a scanner that waits (on an engine) can be late; the
            # MIME, header and attachment rules answer at once, and a timer
            # set and cancelled for them cost more than their scan.
            d.addTimeout(settings.timeout, self.reactor)

        def ok(result: CheckResult) -> _Outcome:
            if probes.engine_timers:  # the metrics (probes.py); an empty list when off
                probes.engine_done(scanner.name, time.monotonic() - started, "ok")
            return result, None

        def failed(f: Any) -> _Outcome:
            if f.check(defer.TimeoutError):
                kind, why = TIMEOUT, f"no answer within {settings.timeout:g}s"
            elif f.check(ScannerUnavailable):
                kind, why = f.value.kind, f.value.reason
            else:
                log.failure("scanner {scanner} crashed on {queue_id}", f, scanner=scanner.name,
                            queue_id=message.queue_id)
                kind, why = ERROR, f"internal error: {f.getErrorMessage()}"
            if probes.engine_timers:
                probes.engine_done(scanner.name, time.monotonic() - started, kind)
            log.warn("scanner {scanner} could not scan {queue_id} ({ms} ms): {why}; {what}",
                     scanner=scanner.name, queue_id=message.queue_id, why=why,
                     ms=round((time.monotonic() - started) * 1000, 1),
                     what="the message is tempfailed" if settings.on_failure == "tempfail"
                     else "going on without it")
            return None, (kind, why)

        return d.addCallbacks(ok, failed)


def _size_limit(scanner: Scanner, settings: SlotSettings) -> int:
    """The smaller of the policy's and the engine's own ``max_size`` (0:
    none): an external engine's own bound is applied here too, so the
    message it would not take is recorded as skipped, not as scanned clean."""
    limits = [settings.max_size]
    if scanner.external:
        limits.append(int(getattr(scanner.settings, "max_size", 0) or 0))
    limits = [n for n in limits if n > 0]
    return min(limits) if limits else 0


def _skip(record: TransactionRecord, report: ScanReport, name: str, kind: str, why: str,
          recorded: str = "") -> None:
    """Record scanner ``name`` as not consulted: on the transaction (the
    log's ``checks``) and in the report (headers, ``scan_skipped``)."""
    record.recorded.append(Recorded(f"scan:{name}", CheckResult(), skipped=recorded or why))
    report.skipped.append((name, f"{kind}: {why}"))


def _add(record: TransactionRecord, report: ScanReport, name: str, result: CheckResult,
         weight: float) -> None:
    """Add one scanner's answer, times its weight, to the record and report."""
    report.verdicts.append((name, engine_verdict(result), result.score, result))
    weighted = result.score * weight
    if weighted != result.score:
        result = CheckResult(weighted, result.reasons, result.action, result.template,
                             result.template_vars, result.headers, result.blacklisted,
                             facts=result.facts)
    record.recorded.append(Recorded(f"scan:{name}", result))
    record.score += weighted
    report.score += weighted
    report.headers.extend(result.headers)
    if result.reasons:
        report.rules[name] = result.reasons
    if result.action is HardAction.QUARANTINE:
        report.holds.append((name, result))
    elif result.action in (HardAction.REJECT, HardAction.TEMPFAIL):
        report.hard_hits.append((name, result))
        if report.hard is None:
            report.hard = (name, result)
