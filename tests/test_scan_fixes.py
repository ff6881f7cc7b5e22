"""Issue #15, "Scanning": skipped engines leave a mark, the MIME guard runs
before the engines, discard above reject, scan mode's verdict is the edge's,
no "-0" score and every hard hit reported.

The engines here are small content-aware fakes on loopback (clamd's
INSTREAM and spamd's SYMBOLS protocols) that count the messages they were
sent, driven by the real scanner clients, the real factory and the real
proxy or scan runtime; the unit tests use scripted scanners.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from fakes_backend import FakeBackend
from fakes_scanners import clamd_complete, instream_payload, spamd_complete, spamd_reply
from helpers import free_port
from loopback import proxy_config, start_proxy, wait_reactor_quiet
from mppproxy import cli
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping, merge
from mppproxy.results import CheckResult, HardAction, TransactionRecord
from mppproxy.config.policy import ScoringConfig
from mppproxy.config.scan import ScanConfig
from mppproxy.scan import factory
from mppproxy.scan.base import DOWN, GARBAGE, ScanInput, Scanner, ScannerUnavailable
from mppproxy.scan.engine import ScanEngine, ScanReport, SlotSettings
from mppproxy.scan.postdata import scan_and_decide
from mppproxy.scanservice.core import ScanRequest, ScanRuntime
from mppproxy.verdict import decide
from test_policy_loopback import session

# -- messages -------------------------------------------------------------------------

CLEAN = (b"From: <s@client.test>\r\nTo: <a@example.com>\r\nSubject: hello\r\n"
         b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@client.test>\r\n"
         b"\r\nJust a note.\r\n")
# The fake spamd scores a message with "spam-seven" 7 and one with
# "spam-twentyfive" 25; the fake clamd finds a virus in one with "virus-token".
SPAMMY = CLEAN.replace(b"hello", b"spam-seven")
VERY_SPAMMY = CLEAN.replace(b"hello", b"spam-twentyfive")
INFECTED = CLEAN.replace(b"Just a note.", b"virus-token")
# multipart without a boundary: the MIME check refuses it (boundary_missing);
# it carries both tokens, so an engine that saw it would say so.
MALFORMED = (b"From: <s@client.test>\r\nTo: <a@example.com>\r\nSubject: spam-twentyfive\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n"
             b"--x\r\nContent-Type: text/plain\r\n\r\nvirus-token\r\n--x--\r\n")
# Two From fields (header_duplicate: refused as malformed) and a program
# attached (the attachment rule "executable" refuses it too).
MALFORMED_WITH_PROGRAM = (
    b"From: alice@example.org\r\nFrom: mallory@example.org\r\nTo: bob@example.com\r\n"
    b"Subject: invoice\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
    b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
    b"--b\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Disposition: attachment; filename=\"invoice.pdf.exe\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n")


# -- content-aware fake engines ----------------------------------------------------------

@implementer(IHalfCloseableProtocol)
class _Answerer(Protocol):
    """Reads one request until ``complete`` says it is whole, answers, closes."""

    def __init__(self, engine: "ContentEngine"):
        self.engine = engine
        self.buffer = b""
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._maybe_answer(False)

    def readConnectionLost(self) -> None:
        self._maybe_answer(True)

    def writeConnectionLost(self) -> None:
        pass

    def _maybe_answer(self, eof: bool) -> None:
        if self.answered or not self.engine.complete(self.buffer, eof):
            return
        self.answered = True
        self.transport.write(self.engine.answer(self.buffer))
        self.transport.loseConnection()


class ContentEngine(Factory):
    """An engine whose answer depends on the message; ``scanned`` holds
    every message it was sent to scan (health probes are not counted)."""

    noisy = False

    def __init__(self, complete: Callable[[bytes, bool], bool],
                 answer: Callable[["ContentEngine", bytes], bytes]):
        self.complete = complete
        self._answer = answer
        self.scanned: list[bytes] = []
        self.port: Any = None

    def answer(self, request: bytes) -> bytes:
        return self._answer(self, request)

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Answerer(self)

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port.getHost().port}"


def _clamd_answer(engine: ContentEngine, request: bytes) -> bytes:
    if request == b"zVERSION\0":
        return b"ClamAV 1.0.0/27000/Mon Jan  1 00:00:00 2024\0"
    if request == b"zPING\0":
        return b"PONG\0"
    payload = instream_payload(request)
    engine.scanned.append(payload)
    return b"stream: Fake.Test.Virus FOUND\0" if b"virus-token" in payload else b"stream: OK\0"


def _spamd_answer(engine: ContentEngine, request: bytes) -> bytes:
    if request.startswith(b"PING "):
        return b"SPAMD/1.5 0 PONG\r\n\r\n"
    body = request.split(b"\r\n\r\n", 1)[1]
    engine.scanned.append(body)
    score = 25.0 if b"spam-twentyfive" in body else 7.0 if b"spam-seven" in body else 0.0
    if not score:
        return spamd_reply(b"", spam="False ; 0.0 / 5.0")
    return spamd_reply(b"FAKE_SPAM", spam=f"True ; {score:.1f} / 5.0")


def start_engines(case: unittest.TestCase) -> tuple[ContentEngine, ContentEngine]:
    engines = (ContentEngine(clamd_complete, _clamd_answer),
               ContentEngine(spamd_complete, _spamd_answer))
    for engine in engines:
        engine.port = reactor.listenTCP(0, engine, interface="127.0.0.1")
        case.addCleanup(engine.port.stopListening)
    return engines


def natural_ladder(clamd: str, spamd: str, **scan: Any) -> dict[str, Any]:
    """One configuration for edge and scan mode: the administrator's
    "tag 5, reject 10, discard 20", clamd and spamd asked."""
    return {
        "scanners": {"clamd": {"address": clamd, "retries": 0},
                     "spamd": {"address": spamd, "retries": 0}},
        "policies": {"default": {
            "scoring": {"tag": 5, "reject": 10},
            "scan": {"enabled": True, "result_headers": True, "discard_score": 20,
                     "engines": {"clamd": {}, "spamd": {}}, **scan}}},
    }


def edge_config(case: unittest.TestCase, backend_port: int, data: dict[str, Any]) -> Any:
    """The in-process proxy's configuration with ``data``'s policies and
    scanners (``proxy_config`` takes only the policies)."""
    config = proxy_config(case.mktemp(), backend_port, policy=data)
    return dataclasses.replace(config, scanners=from_mapping(data).scanners)


def transaction_event(events: list[dict[str, Any]]) -> dict[str, Any]:
    [event] = [e for e in events if e.get("mpp_event") == "transaction"]
    return event


def header_values(data: bytes, name: str) -> list[str]:
    import email
    import email.policy

    msg = email.message_from_bytes(data, policy=email.policy.default)
    # Unfolded (RFC 5322 2.2.3), the folding white space as one space.
    return [" ".join(str(v).split()) for v in msg.get_all(name, [])]


# -- scripted scanners for the unit tests -------------------------------------------------

MESSAGE = ScanInput(chunks=lambda: [b"Subject: x\r\n\r\nbody\r\n"], size=22, queue_id="Q1")


class Scripted(Scanner):
    """Answers ``outcome`` (a result, an exception, or a Deferred), counting calls."""

    def __init__(self, name: str, outcome: Any, external: bool = True, settings: Any = None):
        super().__init__(settings, None)
        self.name = name  # type: ignore[misc]
        self.external = external  # type: ignore[misc]
        self.outcome = outcome
        self.calls = 0

    async def scan(self, message: ScanInput) -> CheckResult:
        self.calls += 1
        if isinstance(self.outcome, Exception):
            raise self.outcome
        if isinstance(self.outcome, Deferred):
            return await self.outcome
        return self.outcome


def run(coroutine: Any, clock: Optional[Clock] = None, advance: float = 0) -> Any:
    out: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(out.append)
    if clock is not None and advance:
        clock.advance(advance)
    assert out, "did not finish"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


# -- 1. a skipped engine leaves a mark ----------------------------------------------------

def test_each_skip_is_reported_with_its_kind():
    """Down, garbage, timeout and over-max_size engines are each listed as skipped, with why."""
    clock = Clock()

    @dataclasses.dataclass(frozen=True)
    class Limits:
        max_size: int

    down = Scripted("clamd", ScannerUnavailable("clamd", "connection refused", DOWN))
    garbage = Scripted("rspamd", ScannerUnavailable("rspamd", "bad reply: x", GARBAGE))
    slow = Scripted("spamd", Deferred())
    big = Scripted("tool", CheckResult(score=9), settings=Limits(max_size=10))
    skip = SlotSettings(on_failure="skip", timeout=5)
    engine = ScanEngine([(down, skip), (garbage, skip), (slow, skip), (big, skip)], clock)
    record = TransactionRecord(policy="default")
    report = run(engine.scan(MESSAGE, record), clock, advance=6)
    assert dict(report.skipped) == {
        "clamd": "down: connection refused", "rspamd": "garbage: bad reply: x",
        "spamd": "timeout: no answer within 5s", "tool": "over max_size: size 22 > 10"}
    # The engine's own max_size keeps the message from it (not scanned, not "clean").
    assert big.calls == 0
    assert report.failures == [] and decide(record, ScoringConfig(), report).action == "relay"


def test_skipped_engine_marks_the_accepted_message_even_without_result_headers():
    """A message that went on without an engine carries X-MPP-Scan-Skipped, result_headers or not."""
    down = Scripted("clamd", ScannerUnavailable("clamd", "cannot connect: connection refused", DOWN))
    for result_headers in (False, True):
        scanning = factory.build(ScanConfig(enabled=True, result_headers=result_headers),
                                 Clock(), {})
        assert scanning is not None
        scanning.engine.slots.append((down, SlotSettings(on_failure="skip")))
        record = TransactionRecord(policy="default")
        data = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
        message = ScanInput(chunks=lambda: [data], size=len(data))
        scanned = run(scan_and_decide(scanning, message, record, ScoringConfig()))
        headers = dict(scanned.verdict.headers)
        assert scanned.verdict.action == "relay"
        assert headers["X-MPP-Scan-Skipped"] == "clamd (down: cannot connect: connection refused)"
        assert ("X-MPP-Scan" in headers) is result_headers
        assert scanned.skipped == {"clamd": "down: cannot connect: connection refused"}


class SkippedEngineLoopbackTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    async def test_edge_relays_with_the_mark_and_logs_it(self) -> None:
        """Edge, clamd down with on_failure skip: 250, X-MPP-Scan-Skipped names clamd, the log lists it."""
        fake = FakeBackend()
        closed = free_port()
        data = {"scanners": {"clamd": {"address": f"tcp:127.0.0.1:{closed}", "retries": 0}},
                "policies": {"default": {"scan": {
                    "enabled": True, "result_headers": True,
                    "engines": {"clamd": {"on_failure": "skip"}}}}}}
        proxy = start_proxy(self, edge_config(self, fake.start_for(self), data))
        with capturedLogs() as events:
            out = await _session(proxy.port, CLEAN)
        self.assertEqual(out["data"][0], 250)
        [relayed] = fake.messages
        why = f"down: cannot connect to tcp:127.0.0.1:{closed}: connection refused"
        self.assertEqual(header_values(relayed.data, "X-MPP-Scan-Skipped"), [f"clamd ({why})"])
        self.assertEqual(header_values(relayed.data, "X-MPP-Scan"), ["score=0; action=relay"])
        event = transaction_event(events)
        self.assertEqual(event["scan_skipped"], {"clamd": why})
        self.assertEqual(event["action"], "relay")

    async def test_scan_mode_reports_the_skip_in_json_and_reply_text(self) -> None:
        """Scan mode names the engine that was not consulted in JSON and in the reply text."""
        closed = free_port()
        data = merge({"mode": "scan", "data_dir": self.mktemp()}, {
            "scanners": {"clamd": {"address": f"tcp:127.0.0.1:{closed}", "retries": 0}},
            "policies": {"default": {"scan": {"engines": {"clamd": {"on_failure": "skip"}}}}}})
        runtime = ScanRuntime(from_mapping(data), reactor)
        outcome = await Deferred.fromCoroutine(runtime.scan(ScanRequest.of_bytes(CLEAN)))
        why = f"down: cannot connect to tcp:127.0.0.1:{closed}: connection refused"
        self.assertEqual(outcome.action, "relay")
        self.assertEqual(outcome.as_json()["scanners"]["clamd"]["skipped"], why)
        reply = runtime.reply(outcome)
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        self.assertIn(f"not consulted: clamd ({why})", reply.text)
        self.assertIn(f"scanner clamd: score 0, skipped ({why})", outcome.as_text())


async def _session(port: int, message: bytes) -> dict[str, Any]:
    from twisted.internet.threads import deferToThread

    return await deferToThread(session, port, ("a@example.com",), message=message)


# -- 2. the MIME guard runs before the engines --------------------------------------------

def _guarded_scanning(counting: Scanner) -> Any:
    scanning = factory.build(ScanConfig(enabled=True, engines={}), Clock(), {})
    assert scanning is not None
    # After the guard, before the message rules: where the factory puts engines.
    scanning.engine.slots.insert(1, (counting, SlotSettings()))
    return scanning


def test_malformed_message_never_reaches_an_engine():
    """A message the MIME guard refuses is not sent to an engine; a clean one is."""
    counting = Scripted("rspamd", CheckResult(score=3.0, reasons=("R_SEEN",)))
    scanning = _guarded_scanning(counting)
    for data, calls, action in ((MALFORMED, 0, "reject"), (CLEAN, 1, "relay")):
        record = TransactionRecord(policy="default")
        message = ScanInput(chunks=lambda data=data: [data], size=len(data))
        scanned = run(scan_and_decide(scanning, message, record, ScoringConfig()))
        assert counting.calls == calls, data
        assert scanned.verdict.action == action
    # The refused message lists the engine as not sent, and why.
    counting.calls = 0
    record = TransactionRecord(policy="default")
    message = ScanInput(chunks=lambda: [MALFORMED], size=len(MALFORMED))
    scanned = run(scan_and_decide(scanning, message, record, ScoringConfig()))
    assert scanned.skipped == {"rspamd": "not sent: refused by mime"}
    assert scanned.verdict.template == "malformed"


def test_message_rules_still_run_after_a_guard_refusal():
    """The attachment rules (not an engine) still judge a malformed message, so both hits are reported."""
    scanning = factory.build(ScanConfig(enabled=True), Clock(), {})
    assert scanning is not None
    record = TransactionRecord(policy="default")
    message = ScanInput(chunks=lambda: [MALFORMED_WITH_PROGRAM], size=len(MALFORMED_WITH_PROGRAM))
    scanned = run(scan_and_decide(scanning, message, record, ScoringConfig()))
    verdict = scanned.verdict
    assert (verdict.action, verdict.template) == ("reject", "malformed")
    assert "mime:header_duplicate" in verdict.reasons
    attachment = scanned.report.rules["attachments"]
    assert attachment and set(attachment) <= set(verdict.reasons)


# -- 3. discard above reject; combinations that can never act -----------------------------

def test_discard_above_reject_drops_the_worst():
    """With tag 5, reject 10, discard 20: relay, tag, reject, then discard at and above 20."""
    scoring = ScoringConfig(tag=5, reject=10)
    for score, action in ((4, "relay"), (5, "tag"), (9.9, "tag"), (10, "reject"),
                          (19.9, "reject"), (20, "discard"), (100, "discard")):
        record = TransactionRecord(policy="default", score=score)
        assert decide(record, scoring, discard_score=20).action == action, score


@pytest.mark.parametrize("scoring, scan, key, text", [
    ({"quarantine": 12, "reject": 10}, {}, "policies.default.scoring.quarantine",
     "12 is not below scoring.reject (10)"),
    ({"tag": 10, "reject": 10}, {}, "policies.default.scoring.tag",
     "10 is not below scoring.reject (10)"),
    ({"tag": 6, "quarantine": 6}, {}, "policies.default.scoring.tag",
     "6 is not below scoring.quarantine (6)"),
    ({"tag": 5, "reject": 10}, {"enabled": True, "discard_score": 3},
     "policies.default.scan.discard_score", "3 is not above scoring.tag (5)"),
    ({"tag": 5, "quarantine": 8, "reject": 15}, {"enabled": True, "discard_score": 8},
     "policies.default.scan.discard_score", "8 is not above scoring.quarantine (8)"),
    ({"tag": 5, "reject": 10}, {"enabled": True, "discard_score": 10},
     "policies.default.scan.discard_score", "10 equals scoring.reject"),
    ({"tag": 5, "reject": 10}, {"discard_score": 20},
     "policies.default.scan.discard_score", "20 is set but policies.default.scan.enabled is false"),
])
def test_check_config_refuses_a_threshold_that_can_never_act(tmp_path: Path, capsys: Any,
                                                             scoring: dict[str, Any],
                                                             scan: dict[str, Any], key: str,
                                                             text: str) -> None:
    """check-config refuses a threshold combination in which one can never act, naming file and key."""
    path = tmp_path / "mppproxy.toml"
    lines = [f'data_dir = "{tmp_path / "data"}"', "[policies.default.scoring]"]
    lines += [f"{k} = {v}" for k, v in scoring.items()]
    lines.append("[policies.default.scan]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in scan.items()]
    path.write_text("\n".join(lines) + "\n")
    assert cli.main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: {key}: {text}" in err, err


def test_natural_ladder_and_scan_mode_discard_are_accepted(tmp_path: Path) -> None:
    """tag 5, reject 10, discard 20 loads; so does a discard_score in mode scan (it always scans)."""
    data = {"data_dir": str(tmp_path), "policies": {"default": {
        "scoring": {"tag": 5, "reject": 10}, "scan": {"enabled": True, "discard_score": 20}}}}
    assert from_mapping(data).policies["default"].scan.discard_score == 20
    scan_mode = merge(data, {"mode": "scan", "policies": {"default": {"scan": {"enabled": False}}}})
    from_mapping(scan_mode)
    with pytest.raises(ConfigError):
        from_mapping(merge(data, {"policies": {"default": {"scan": {"enabled": False}}}}))


def test_named_policy_inheriting_a_bad_ladder_is_named_once() -> None:
    """A bad default ladder is reported for the default only, not again for each policy inheriting it."""
    data = {"policies": {"default": {"scoring": {"quarantine": 20, "reject": 10}},
                         "school": {"domains": ["school.example"]}}}
    with pytest.raises(ConfigError) as raised:
        from_mapping(data, "test.toml")
    assert [e for e in raised.value.errors if "scoring.quarantine" in e] == [
        "test.toml: policies.default.scoring.quarantine: 20 is not below scoring.reject (10), "
        "so quarantine can never act; raise reject or lower quarantine"]


# -- 4. scan mode's verdict is the edge's ---------------------------------------------------

class SameVerdictTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    async def test_scan_service_verdict_equals_the_edges(self) -> None:
        """For clean, spammy, very spammy, infected and malformed mail and one config, scan mode decides as the edge."""
        clamd, spamd = start_engines(self)
        data = natural_ladder(clamd.address, spamd.address)
        fake = FakeBackend()
        config = edge_config(self, fake.start_for(self), data)
        proxy = start_proxy(self, config)
        runtime = ScanRuntime(config, reactor)
        expected = {"clean": ("relay", 0.0), "spammy": ("tag", 7.0),
                    "very spammy": ("discard", 25.0), "infected": ("reject", 0.0),
                    "malformed": ("reject", 0.0)}
        messages = {"clean": CLEAN, "spammy": SPAMMY, "very spammy": VERY_SPAMMY,
                    "infected": INFECTED, "malformed": MALFORMED}
        for name, data_bytes in messages.items():
            with capturedLogs() as events:
                await _session(proxy.port, data_bytes)
            event = transaction_event(events)
            outcome = await Deferred.fromCoroutine(runtime.scan(
                ScanRequest.of_bytes(data_bytes, sender="s@client.test",
                                     recipients=("a@example.com",))))
            edge = (event["action"], event["score"])
            self.assertEqual(edge, expected[name], name)
            self.assertEqual((outcome.action, outcome.verdict.score), edge, name)
            if event["reason"] is not None:
                self.assertEqual("; ".join(outcome.verdict.reasons), event["reason"], name)
        self.assertEqual(outcome.refusal, "malformed")
        # Neither mode sent the malformed message to an engine: 4 messages each, twice.
        self.assertEqual(len(clamd.scanned), 8)
        self.assertEqual(len(spamd.scanned), 8)
        self.assertFalse(any(b"multipart/mixed" in m for m in clamd.scanned + spamd.scanned))


# -- 5. "-0" and every hard hit ---------------------------------------------------------------

class ScanOutputTests(unittest.TestCase):

    def runtime(self, scan: dict[str, Any]) -> ScanRuntime:
        data = {"mode": "scan", "data_dir": self.mktemp(), "policies": {"default": {"scan": scan}}}
        return ScanRuntime(from_mapping(data), reactor)

    async def test_negative_zero_prints_as_zero(self) -> None:
        """A score that rounds to -0 is shown as 0 in text, JSON and the reply."""
        runtime = self.runtime({"headers": {"rules": [
            {"header": "Subject", "pattern": "hello", "action": "score:-0.004", "name": "tiny"}]}})
        outcome = await Deferred.fromCoroutine(runtime.scan(ScanRequest.of_bytes(CLEAN)))
        text = outcome.as_text()
        self.assertIn("score: 0\n", text)
        self.assertIn("scanner headers: score 0, rules tiny", text)
        self.assertNotIn("-0", json.dumps(outcome.as_json()))
        self.assertNotIn("-0", runtime.reply(outcome).text)

    async def test_malformed_and_refused_attachment_both_reported(self) -> None:
        """A message both malformed and carrying a program lists both hard hits in its reasons."""
        runtime = self.runtime({})
        outcome = await Deferred.fromCoroutine(runtime.scan(
            ScanRequest.of_bytes(MALFORMED_WITH_PROGRAM)))
        self.assertEqual(outcome.refusal, "malformed")
        reasons = outcome.as_json()["reasons"]
        self.assertIn("mime:header_duplicate", reasons)
        for rule in outcome.scanners["attachments"].rules:
            self.assertIn(rule, reasons)


def test_every_hard_hit_is_in_the_reasons():
    """A virus found beside a malformed-message defect is named in the verdict's reasons too."""
    mime = CheckResult(reasons=("mime:header_8bit",), action=HardAction.REJECT, template="malformed")
    virus = CheckResult(reasons=("virus Eicar-Signature",), action=HardAction.REJECT,
                        template="virus")
    report = ScanReport(hard=("mime", mime), hard_hits=[("mime", mime), ("clamd", virus)])
    verdict = decide(TransactionRecord(policy="default"), ScoringConfig(), report)
    assert verdict.template == "malformed"
    assert verdict.reasons == ("mime:header_8bit", "virus Eicar-Signature")
