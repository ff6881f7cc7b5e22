"""The post-DATA scan engine: runs a policy's scanners on one message at
once, applies each one's weight, timeout, size bound and failure action,
and records every result on the transaction, next to the pre-DATA checks'.

The engine decides nothing about the message: it reports the added score,
the first hard action (a virus, a malformed message) and the failures;
``mppproxy/verdict.py`` turns those and the pre-DATA score into one action.

A scanner that fails (down, slow past its timeout, garbage) is logged with
the reason and, by default, makes the verdict a tempfail (docs/design.md promise
4: a failure never lets mail through unscanned); ``on_failure = "skip"``
goes on without it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from twisted.internet import defer

from mppproxy.logsetup import Logger
from mppproxy.policy.base import Action, CheckResult, Recorded, TransactionRecord
from mppproxy.scan.base import ScanInput, Scanner, ScannerUnavailable

log = Logger()

ON_FAILURE = ("tempfail", "skip")


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


@dataclass
class ScanReport:
    """What the scanners said about one message."""

    score: float = 0.0
    # The first hard action in scanner order, with its result.
    hard: Optional[tuple[str, CheckResult]] = None
    # (scanner, reason) of each scanner that could not answer and tempfails.
    failures: list[tuple[str, str]] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    # scanner -> its rule names / reasons (for X-MPP-* and X-Spam-Status).
    rules: dict[str, tuple[str, ...]] = field(default_factory=dict)


class ScanEngine:
    """The scanners of one policy, in order, each with its ``SlotSettings``."""

    def __init__(self, slots: Sequence[tuple[Scanner, SlotSettings]], reactor: Any):
        self.slots = list(slots)
        self.reactor = reactor

    async def scan(self, message: ScanInput, record: TransactionRecord) -> ScanReport:
        report = ScanReport()
        runs = []
        for scanner, settings in self.slots:
            if settings.max_size and message.size > settings.max_size:
                record.recorded.append(Recorded(f"scan:{scanner.name}", CheckResult(),
                                                skipped=f"size {message.size} > {settings.max_size}"))
                continue
            runs.append((scanner, settings, self._run_one(scanner, settings, message)))
        if not runs:
            return report
        outcomes = await defer.gatherResults([d for _, _, d in runs])
        for (scanner, settings, _), (result, failure) in zip(runs, outcomes):
            name = f"scan:{scanner.name}"
            if failure is not None:
                record.recorded.append(Recorded(name, CheckResult(), skipped=f"failed: {failure}"))
                if settings.on_failure == "tempfail":
                    report.failures.append((scanner.name, failure))
                continue
            weighted = result.score * settings.weight
            if weighted != result.score:
                result = CheckResult(weighted, result.reasons, result.action, result.template,
                                     result.template_vars, result.headers, result.blacklisted)
            record.recorded.append(Recorded(name, result))
            record.score += weighted
            report.score += weighted
            report.headers.extend(result.headers)
            if result.reasons:
                report.rules[scanner.name] = result.reasons
            if result.action in (Action.REJECT, Action.TEMPFAIL) and report.hard is None:
                report.hard = (scanner.name, result)
        return report

    def _run_one(self, scanner: Scanner, settings: SlotSettings,
                 message: ScanInput) -> defer.Deferred:
        """Fires (result, None) or (None, why it failed); never fails."""
        started = time.monotonic()
        d = defer.Deferred.fromCoroutine(scanner.scan(message))
        if not d.called:
            # Only a scanner that waits (on an engine) can be late; the
            # MIME, header and attachment rules answer at once, and a timer
            # set and cancelled for them cost more than their scan.
            d.addTimeout(settings.timeout, self.reactor)

        def ok(result: CheckResult) -> tuple[CheckResult, None]:
            return result, None

        def failed(f: Any) -> tuple[None, str]:
            if f.check(defer.TimeoutError):
                why = f"no answer within {settings.timeout:g}s"
            elif f.check(ScannerUnavailable):
                why = f.value.reason
            else:
                log.failure("scanner {scanner} crashed on {queue_id}", f, scanner=scanner.name,
                            queue_id=message.queue_id)
                why = f"internal error: {f.getErrorMessage()}"
            log.warn("scanner {scanner} could not scan {queue_id} ({ms} ms): {why}; {what}",
                     scanner=scanner.name, queue_id=message.queue_id, why=why,
                     ms=round((time.monotonic() - started) * 1000, 1),
                     what="the message is tempfailed" if settings.on_failure == "tempfail"
                     else "going on without it")
            return None, why

        d.addCallbacks(ok, failed)
        return d
