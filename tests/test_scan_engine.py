"""The scan engine (weights, timeouts, size bounds, failure actions, records)
and the verdict (score thresholds, hard actions, failures, headers).

The scanners here are small scripted ones: the real engines (clamd, spamd,
rspamd, the MIME checks) have their own tests.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mppproxy.results import CheckResult, HardAction, TransactionRecord
from mppproxy.config.policy import ScoringConfig
from mppproxy.scan.base import ScanInput, Scanner, ScannerUnavailable
from mppproxy.scan.engine import ScanEngine, ScanReport, SlotSettings
from mppproxy.verdict import Verdict, decide, result_headers

MESSAGE = ScanInput(chunks=lambda: [b"Subject: x\r\n\r\nbody\r\n"], size=22, queue_id="Q1")


class Scripted(Scanner):
    def __init__(self, name: str, outcome: Any):
        super().__init__(None, None)
        self.name = name  # type: ignore[misc]
        self.outcome = outcome
        self.calls = 0

    async def scan(self, message: ScanInput) -> CheckResult:
        self.calls += 1
        if isinstance(self.outcome, Exception):
            raise self.outcome
        if isinstance(self.outcome, Deferred):
            return await self.outcome
        return self.outcome


def run(engine: ScanEngine, record: TransactionRecord, clock: Clock | None = None, advance: float = 0):
    out: list[Any] = []
    Deferred.fromCoroutine(engine.scan(MESSAGE, record)).addBoth(out.append)
    if clock is not None and advance:
        clock.advance(advance)
    assert out, "the scan did not finish"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_scores_are_weighted_summed_and_recorded():
    """Each scanner's score times its weight is added to the report and to the transaction's
    pre-DATA score, and every scanner's rules and weighted result are recorded in order."""
    spam = Scripted("spamd", CheckResult(score=4.0, reasons=("BAYES_99", "URIBL_BLACK")))
    rsp = Scripted("rspamd", CheckResult(score=2.0, reasons=("R_SPF_FAIL",)))
    engine = ScanEngine([(spam, SlotSettings(weight=1.5)), (rsp, SlotSettings())], Clock())
    record = TransactionRecord(policy="default", score=1.0)
    report = run(engine, record)
    assert report.score == 8.0
    assert record.score == 9.0
    assert report.rules == {"spamd": ("BAYES_99", "URIBL_BLACK"), "rspamd": ("R_SPF_FAIL",)}
    assert [r.check for r in record.recorded] == ["scan:spamd", "scan:rspamd"]
    assert record.recorded[0].result.score == 6.0


def test_failure_tempfails_by_default_and_is_recorded():
    """A scanner that cannot answer is a failure, recorded with its reason, and by default the
    verdict is tempfail."""
    down = Scripted("clamd", ScannerUnavailable("clamd", "connection refused"))
    engine = ScanEngine([(down, SlotSettings())], Clock())
    record = TransactionRecord(policy="default")
    report = run(engine, record)
    assert report.failures == [("clamd", "connection refused")]
    assert record.recorded[0].skipped == "failed: connection refused"
    verdict = decide(record, ScoringConfig(), report)
    assert verdict.action == "tempfail" and verdict.template == "tempfail"


def test_failure_skipped_when_configured():
    """With on_failure = "skip" a failing scanner is left out and the message is relayed."""
    down = Scripted("rspamd", ScannerUnavailable("rspamd", "bad reply"))
    engine = ScanEngine([(down, SlotSettings(on_failure="skip"))], Clock())
    record = TransactionRecord(policy="default")
    report = run(engine, record)
    assert report.failures == []
    assert decide(record, ScoringConfig(), report).action == "relay"


def test_slow_scanner_times_out_as_a_failure():
    """A scanner without an answer within its timeout is a failure saying so."""
    clock = Clock()
    slow = Scripted("spamd", Deferred())
    engine = ScanEngine([(slow, SlotSettings(timeout=5))], clock)
    record = TransactionRecord(policy="default")
    report = run(engine, record, clock, advance=6)
    assert report.failures == [("spamd", "no answer within 5s")]


def test_crashing_scanner_is_a_failure_not_a_crash():
    """A scanner raising an unexpected exception is an "internal error" failure, and the scan
    still completes."""
    broken = Scripted("command", ZeroDivisionError("oops"))
    engine = ScanEngine([(broken, SlotSettings())], Clock())
    record = TransactionRecord(policy="default")
    report = run(engine, record)
    assert report.failures[0][1].startswith("internal error")


def test_size_bound_skips_the_scanner():
    """A message over the slot's max_size is never handed to the scanner, and the skip is
    recorded with the size."""
    big = Scripted("spamd", CheckResult(score=9.0))
    engine = ScanEngine([(big, SlotSettings(max_size=10))], Clock())
    record = TransactionRecord(policy="default")
    run(engine, record)
    assert big.calls == 0
    assert record.recorded[0].skipped.startswith("size 22 >")


def test_virus_is_a_hard_reject_naming_the_signature():
    """A virus found is a hard reject, whatever the score, with the virus template and the
    signature as the reason."""
    clam = Scripted("clamd", CheckResult(reasons=("virus Eicar-Signature",), action=HardAction.REJECT,
                                         template="virus"))
    engine = ScanEngine([(clam, SlotSettings())], Clock())
    record = TransactionRecord(policy="default")
    verdict = decide(record, ScoringConfig(), run(engine, record))
    assert verdict.action == "reject" and verdict.template == "virus"
    assert verdict.reasons == ("virus Eicar-Signature",)


def test_thresholds_tag_quarantine_reject():
    """A score at or over each threshold picks tag, quarantine or reject (below the tag
    threshold: relay), and a tagged verdict carries X-Spam-Flag and X-Spam-Score."""
    scoring = ScoringConfig(tag=5, quarantine=10, reject=15)
    for score, action in ((4.9, "relay"), (5, "tag"), (10, "quarantine"), (15, "reject")):
        record = TransactionRecord(policy="default", score=score)
        assert decide(record, scoring).action == action, score
    tagged = decide(TransactionRecord(policy="default", score=7), scoring)
    assert ("X-Spam-Flag", "YES") in tagged.headers
    assert ("X-Spam-Score", "7") in tagged.headers


def test_whitelisted_transaction_is_not_judged_by_score():
    """A whitelisted transaction is relayed whatever its score."""
    record = TransactionRecord(policy="default", score=50, whitelisted=True)
    assert decide(record, ScoringConfig()).action == "relay"


def test_scanners_run_concurrently():
    """The engine asks all scanners at once rather than one after the other, and sums their
    answers in whatever order they come."""
    clock = Clock()
    first, second = Deferred(), Deferred()
    a, b = Scripted("a", first), Scripted("b", second)
    engine = ScanEngine([(a, SlotSettings()), (b, SlotSettings())], clock)
    out: list[Any] = []
    Deferred.fromCoroutine(engine.scan(MESSAGE, TransactionRecord())).addBoth(out.append)
    assert a.calls == 1 and b.calls == 1, "the second scanner waited for the first"
    second.callback(CheckResult(score=1))
    first.callback(CheckResult(score=2))
    assert out and out[0].score == 3


def test_spooled_message_can_be_read_by_interleaved_readers(tmp_path):
    """Two scanners iterating one spooled (on-disk) message at once each get
    the whole message (no shared file position)."""
    from mppproxy.spool.spool import Spool

    spool = Spool(memory_limit=10, directory=str(tmp_path))
    data = bytes(range(256)) * 1000
    spool.write(data)
    assert spool.on_disk
    a, b = spool.chunks(4096), spool.chunks(4096)
    got_a, got_b = [], []
    for x, y in zip(a, b):
        got_a.append(x)
        got_b.append(y)
    got_a.extend(a)
    got_b.extend(b)
    assert b"".join(got_a) == data and b"".join(got_b) == data
    spool.write(b"more")
    assert spool.getvalue() == data + b"more"


def test_discard_score():
    """At or above discard_score the verdict is discard, unless the reject threshold is reached."""
    scoring = ScoringConfig(tag=5, quarantine=8, reject=15)
    for score, action in ((4, "relay"), (6, "discard"), (9, "discard"), (15, "reject")):
        record = TransactionRecord(policy="default", score=score)
        assert decide(record, scoring, discard_score=6).action == action, score
    assert decide(TransactionRecord(policy="default", score=50), ScoringConfig(reject=0),
                  discard_score=6).action == "discard"
    assert decide(TransactionRecord(policy="default", score=9), scoring).action == "quarantine"


def test_result_headers_name_each_scanners_rules():
    """X-MPP-Scan has score and action, X-MPP-Scan-Rules each scanner's rule names."""
    report = ScanReport(score=7.5, rules={"spamd": ("BAYES_99", "URIBL_BLACK"),
                                          "rspamd": ("R_SPF_FAIL",)})
    verdict = decide(TransactionRecord(policy="default", score=7.5), ScoringConfig(), report)
    assert dict(result_headers(verdict, report)) == {
        "X-MPP-Scan": "score=7.5; action=tag",
        "X-MPP-Scan-Rules": "spamd=BAYES_99,URIBL_BLACK; rspamd=R_SPF_FAIL"}
    assert dict(result_headers(Verdict(), None))["X-MPP-Scan-Rules"] == "none"
