"""Spam engines on the command line (issue 14): a command scanner that answers
a verdict and a score by exit code, pattern or JSON line, and persistent engines
fed message after message on stdin (``scan/scanners/command_pool.py``).

Every engine here is a small real Python program the test writes; nothing is
mocked.  The failure cases (a hung engine, one that dies mid-message, one that
answers garbage, a full queue) go through the real scan engine too, so the
message takes the engine's failure path, and the log is checked for a clear
line and no traceback.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial import unittest

from mppproxy.config.load import from_mapping
from mppproxy.config.errors import ConfigError
from mppproxy.config.scanners import CommandScannerConfig
from mppproxy.results import CheckResult, HardAction, TransactionRecord
from mppproxy.scan.base import DOWN, ERROR, GARBAGE, ScanInput, ScannerUnavailable
from mppproxy.scan.engine import ScanEngine, SlotSettings, engine_verdict
from mppproxy.scan.scanners.command import CommandScanner

reactor: Any = _reactor

MESSAGE = (b"From: a@example.org\r\nTo: b@example.com\r\nSubject: cheap pills\r\n\r\n"
           b"Buy now.\r\n")

# A persistent engine: reads {"size": N, ...}\n + N octets, answers one JSON
# line.  BEHAVIOUR (set per test) decides what it does with each message.
PERSISTENT = '''
import json, os, sys, time
inp = sys.stdin.buffer
out = sys.stdout
count = 0
while True:
    line = inp.readline()
    if not line:
        break
    head = json.loads(line)
    data = inp.read(head["size"])
    count += 1
    behave(head, data, count)
    out.flush()
'''


def message(data: bytes = MESSAGE, **kw: Any) -> ScanInput:
    kw.setdefault("queue_id", "Q1")
    kw.setdefault("sender", "a@example.org")
    kw.setdefault("recipients", ("b@example.com",))
    return ScanInput(chunks=lambda: [data], size=len(data), **kw)


class EngineCase(unittest.TestCase):
    timeout = 60

    def program(self, body: str) -> str:
        """A Python program (this interpreter) in a directory removed after the test."""
        base = Path(tempfile.mkdtemp(prefix="mpp-test-engines-"))
        self.addCleanup(shutil.rmtree, base, True)
        path = base / "engine.py"
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        path.chmod(0o755)
        return str(path)

    def one_shot(self, body: str, **kw: Any) -> CommandScanner:
        kw.setdefault("timeout", 10.0)
        kw.setdefault("name", "spamtool")
        return CommandScanner(CommandScannerConfig(command=(self.program(body), "{file}"), **kw),
                              reactor)

    def persistent(self, behave: str, **kw: Any) -> CommandScanner:
        kw.setdefault("timeout", 5.0)
        kw.setdefault("name", "cloud")
        scanner = CommandScanner(CommandScannerConfig(
            command=(self.program(textwrap.dedent(behave) + PERSISTENT),), persistent=True,
            output="json", **kw), reactor)
        self.addCleanup(self.stop, scanner)
        return scanner

    async def stop(self, scanner: CommandScanner) -> None:
        """Retire the processes and wait (bounded) until none is left."""
        closing = scanner.close()
        if closing is not None:
            await closing
        for _ in range(300):
            if scanner.running == 0:
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail(f"{scanner.running} engine processes still running")

    async def unavailable(self, d: Any) -> ScannerUnavailable:
        try:
            await d
        except ScannerUnavailable as e:
            return e
        self.fail("no ScannerUnavailable")


class OneShotTests(EngineCase):

    async def test_exit_code_map_gives_spam_with_score(self) -> None:
        """exit_verdicts maps an exit code to spam and a score (times score_factor), asked before the clean codes."""
        scanner = self.one_shot("import sys; sys.exit(2)\n",
                                exit_verdicts={"2": "spam:6.5", "0": "clean"}, score_factor=2.0)
        result = await scanner.scan(message())
        self.assertEqual((result.score, result.action, engine_verdict(result)), (13.0, None, "spam"))
        self.assertEqual(result.reasons, ("spam score=6.5",))
        clean = self.one_shot("import sys; sys.exit(0)\n", exit_verdicts={"2": "spam:6.5"})
        self.assertEqual(await clean.scan(message()), CheckResult())

    async def test_exit_code_map_virus_refuses_and_unknown_code_fails(self) -> None:
        """A mapped virus code is a hard refusal; a code mapped nowhere is a failure naming it."""
        virus = self.one_shot("import sys; sys.exit(3)\n", exit_verdicts={"3": "virus"})
        result = await virus.scan(message())
        self.assertEqual((result.action, engine_verdict(result)), (HardAction.REJECT, "virus"))
        other = self.one_shot("import sys; print('license expired'); sys.exit(7)\n",
                              exit_verdicts={"3": "virus"})
        e = await self.unavailable(other.scan(message()))
        self.assertIn("exited 7", e.reason)
        self.assertIn("license expired", e.reason)

    async def test_pattern_reads_verdict_score_and_name(self) -> None:
        """output "pattern": the named groups give the verdict, the score and the name."""
        scanner = self.one_shot(
            "print('header line'); print('result: SPAM score=8.25 rule=CM_BULK')\n",
            output="pattern",
            output_pattern=r"result: (?P<verdict>\w+) score=(?P<score>[-0-9.]+) rule=(?P<name>\S+)")
        result = await scanner.scan(message())
        self.assertEqual((result.score, engine_verdict(result), result.reasons),
                         (8.25, "spam", ("spam CM_BULK",)))

    async def test_pattern_score_only_uses_spam_score(self) -> None:
        """A score without a verdict is spam at and above spam_score, clean below (the score counts either way)."""
        high = self.one_shot("print('score=5')\n", output="pattern",
                             output_pattern=r"score=(?P<score>\S+)", spam_score=5.0)
        low = self.one_shot("print('score=1.5')\n", output="pattern",
                            output_pattern=r"score=(?P<score>\S+)", spam_score=5.0)
        self.assertEqual(engine_verdict(await high.scan(message())), "spam")
        result = await low.scan(message())
        self.assertEqual((result.score, engine_verdict(result)), (1.5, "clean"))

    async def test_pattern_without_match_is_garbage_not_clean(self) -> None:
        """Output the pattern does not match is a failure of kind garbage, never a clean result."""
        scanner = self.one_shot("print('something else')\n", output="pattern",
                                output_pattern=r"score=(?P<score>\S+)")
        e = await self.unavailable(scanner.scan(message()))
        self.assertEqual(e.kind, GARBAGE)
        self.assertIn("does not match", e.reason)

    async def test_json_line_is_read_from_the_output(self) -> None:
        """output "json": the last JSON object line of the output gives verdict, score and name."""
        scanner = self.one_shot(
            "import json, sys\n"
            "data = open(sys.argv[1], 'rb').read()\n"
            "print('starting')\n"
            "print(json.dumps({'verdict': 'spam' if b'pills' in data else 'clean',"
            " 'score': 7.5, 'name': 'MS_PHARMA'}))\n", output="json")
        result = await scanner.scan(message())
        self.assertEqual((result.score, engine_verdict(result), result.reasons),
                         (7.5, "spam", ("spam MS_PHARMA",)))

    async def test_json_garbage_and_unknown_verdict_are_failures(self) -> None:
        """No JSON line, a bad verdict word or a score that is no number: garbage failures."""
        for body, fragment in (("print('not json')\n", "no JSON line"),
                               ("print('{\"verdict\": \"maybe\"}')\n", "'maybe' is not one of"),
                               ("print('{\"score\": \"lots\"}')\n", "not a number"),
                               ("print('{\"score\": 1e999}')\n", "finite")):
            e = await self.unavailable(self.one_shot(body, output="json").scan(message()))
            self.assertEqual(e.kind, GARBAGE, body)
            self.assertIn(fragment, e.reason, body)


class PersistentTests(EngineCase):

    async def test_one_process_answers_many_messages(self) -> None:
        """A persistent engine gets each message framed on stdin and answers 40 of them from one process; envelope facts arrive in the header line."""
        scanner = self.persistent('''
            def behave(head, data, count):
                assert len(data) == head["size"]
                spam = b"pills" in data
                print(json.dumps({"verdict": "spam" if spam else "clean",
                                  "score": 6.0 if spam else -1.0,
                                  "name": head["sender"] + "#" + str(os.getpid())}))
            ''', max_processes=1)
        results = []
        for i in range(40):
            data = MESSAGE if i % 2 else MESSAGE.replace(b"pills", b"news")
            results.append(await scanner.scan(message(data, queue_id=f"Q{i}")))
        self.assertEqual([r.score for r in results], [-1.0, 6.0] * 20)
        self.assertEqual({engine_verdict(r) for r in results[1::2]}, {"spam"})
        pids = {r.reasons[0].split("#")[1] for r in results}
        self.assertEqual(len(pids), 1, "one process served them all")
        self.assertTrue(results[1].reasons[0].startswith("spam a@example.org#"))
        self.assertEqual(scanner.pool.started, 1)

    async def test_pool_is_bounded_and_runs_in_parallel(self) -> None:
        """Twelve scans at once with max_processes 3: never more than three processes, all answered."""
        scanner = self.persistent('''
            def behave(head, data, count):
                time.sleep(0.05)
                print(json.dumps({"score": 1}))
            ''', max_processes=3)
        peak = 0

        def sample() -> None:
            nonlocal peak
            peak = max(peak, scanner.running)

        from twisted.internet.task import LoopingCall
        sampler = LoopingCall(sample)
        sampler.start(0.005)
        try:
            results = await defer.gatherResults(
                [Deferred.fromCoroutine(scanner.scan(message(queue_id=f"Q{i}")))
                 for i in range(12)])
        finally:
            sampler.stop()
        self.assertEqual([r.score for r in results], [1.0] * 12)
        self.assertLessEqual(peak, 3)
        self.assertEqual(scanner.pool.started, 3)

    async def test_processes_are_recycled_after_max_messages(self) -> None:
        """After max_messages a process is replaced (EOF on stdin) and the next message goes to a new one."""
        scanner = self.persistent('''
            def behave(head, data, count):
                print(json.dumps({"score": count, "name": str(os.getpid())}))
            ''', max_processes=1, max_messages=3)
        results = [await scanner.scan(message()) for _ in range(7)]
        self.assertEqual([r.score for r in results], [1, 2, 3, 1, 2, 3, 1])
        self.assertEqual(len({r.reasons[0] for r in results}), 3)
        self.assertEqual(scanner.pool.started, 3)

    async def test_hung_engine_times_out_is_killed_and_restarted(self) -> None:
        """An engine that hangs on one message: the scan fails after the timeout (the message takes the engine's on_failure path, tempfail), the process is killed, and the next message gets a fresh process."""
        scanner = self.persistent('''
            def behave(head, data, count):
                if head["queue_id"] == "HANG":
                    time.sleep(60)
                print(json.dumps({"verdict": "clean", "score": 0}))
            ''', max_processes=1, timeout=1.0)
        engine = ScanEngine([(scanner, SlotSettings(on_failure="tempfail", timeout=10.0))],
                            reactor)
        record = TransactionRecord()
        start = time.monotonic()
        with capturedLogs() as events:
            report = await engine.scan(message(queue_id="HANG"), record)
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual([name for name, _ in report.failures], ["cloud"])
        self.assertIn("timeout", report.skipped[0][1])
        self.assertTrue(any("gave no answer in time" in _text(e) for e in events))
        self.assertFalse(any(e.get("log_failure") for e in events), "no traceback")
        for _ in range(250):
            if scanner.running == 0:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(scanner.running, 0, "the hung process was killed")
        result = await scanner.scan(message(queue_id="NEXT"))
        self.assertEqual(result, CheckResult())
        self.assertEqual(scanner.pool.started, 2)

    async def test_engine_dying_mid_message_fails_that_message_only(self) -> None:
        """An engine that exits while reading a message: that scan fails (down, with its stderr), the next gets a new process."""
        scanner = self.persistent('''
            def behave(head, data, count):
                if head["queue_id"] == "DIE":
                    sys.stderr.write("segfault in rules engine\\n")
                    sys.stderr.flush()
                    os._exit(3)
                print(json.dumps({"score": 2}))
            ''', max_processes=1)
        self.assertEqual((await scanner.scan(message(queue_id="A"))).score, 2.0)
        with capturedLogs() as events:
            e = await self.unavailable(scanner.scan(message(queue_id="DIE")))
        self.assertEqual(e.kind, DOWN)
        self.assertIn("exited 3 before it answered", e.reason)
        self.assertIn("segfault in rules engine", e.reason)
        self.assertFalse(any(ev.get("log_failure") for ev in events), "no traceback")
        self.assertEqual((await scanner.scan(message(queue_id="B"))).score, 2.0)
        self.assertEqual(scanner.pool.started, 2)

    async def test_garbage_answer_kills_the_process_with_a_clear_log_line(self) -> None:
        """An answer that is no JSON: the scan fails as garbage, a warning names the engine and what it said, no traceback; the process is replaced."""
        scanner = self.persistent('''
            def behave(head, data, count):
                if head["queue_id"] == "BAD":
                    print("OK maybe spam??")
                else:
                    print(json.dumps({"score": 3}))
            ''', max_processes=1)
        engine = ScanEngine([(scanner, SlotSettings(on_failure="skip"))], reactor)
        with capturedLogs() as events:
            report = await engine.scan(message(queue_id="BAD"), TransactionRecord())
        self.assertEqual(report.failures, [])  # skip: judged without it
        [(name, why)] = report.skipped
        self.assertEqual(name, "cloud")
        self.assertIn("garbage: bad answer: not a JSON line: OK maybe spam??", why)
        texts = [_text(e) for e in events]
        self.assertTrue(any("cloud: engine process" in t and "garbage answer" in t
                            for t in texts), texts)
        self.assertFalse(any(e.get("log_failure") for e in events), "no traceback")
        self.assertEqual((await scanner.scan(message())).score, 3.0)
        self.assertEqual(scanner.pool.started, 2)

    async def test_two_answer_lines_for_one_message_are_garbage(self) -> None:
        """An engine that answers twice for one message is out of step: the scan fails, the process goes."""
        scanner = self.persistent('''
            def behave(head, data, count):
                print(json.dumps({"score": 1}) + "\\n" + json.dumps({"score": 2}))
            ''', max_processes=1)
        e = await self.unavailable(scanner.scan(message()))
        self.assertEqual(e.kind, GARBAGE)

    async def test_full_queue_fails_at_once(self) -> None:
        """With one busy process and max_queue 1, a third scan fails at once (queue full) while the first two are answered."""
        scanner = self.persistent('''
            def behave(head, data, count):
                time.sleep(0.3)
                print(json.dumps({"score": 1}))
            ''', max_processes=1, max_queue=1)
        first = Deferred.fromCoroutine(scanner.scan(message(queue_id="1")))
        second = Deferred.fromCoroutine(scanner.scan(message(queue_id="2")))
        e = await self.unavailable(scanner.scan(message(queue_id="3")))
        self.assertEqual(e.kind, ERROR)
        self.assertIn("queue full", e.reason)
        self.assertEqual([(await first).score, (await second).score], [1.0, 1.0])

    async def test_engine_that_cannot_start(self) -> None:
        """A program that is not there is a failure naming it (down), not a crash."""
        scanner = CommandScanner(CommandScannerConfig(command=("/nonexistent/engine",),
                                                      persistent=True, name="gone"), reactor)
        e = await self.unavailable(scanner.scan(message()))
        self.assertEqual(e.kind, DOWN)


class ConfigTests(unittest.SynchronousTestCase):

    def errors(self, command: dict[str, Any]) -> list[str]:
        try:
            from_mapping({"scanners": {"command": [command]}}, "t.toml")
        except ConfigError as e:
            return e.errors
        return []

    def test_keys_are_checked_with_their_names(self) -> None:
        """check-config names the key of each bad command-engine setting."""
        cases = [
            ({"command": ["x"]}, "t.toml: scanners.command[0].command: one argument must hold"),
            ({"command": ["x", "{file}"], "persistent": True},
             "t.toml: scanners.command[0].command: a persistent engine reads"),
            ({"command": ["x", "{file}"], "output": "xml"}, "t.toml: scanners.command[0].output:"),
            ({"command": ["x", "{file}"], "output": "pattern"},
             "t.toml: scanners.command[0].output_pattern: output = \"pattern\" needs"),
            ({"command": ["x", "{file}"], "output": "pattern", "output_pattern": "(\\d+)"},
             "t.toml: scanners.command[0].output_pattern: '(\\\\d+)': needs a named group"),
            ({"command": ["x", "{file}"], "exit_verdicts": {"2": "ham"}},
             "t.toml: scanners.command[0].exit_verdicts: '2': 'ham': the verdict must be"),
            ({"command": ["x", "{file}"], "exit_verdicts": {"300": "spam"}},
             "t.toml: scanners.command[0].exit_verdicts: '300': keys are exit codes"),
            ({"command": ["x", "{file}"], "exit_verdicts": {"2": "spam:x"}},
             "t.toml: scanners.command[0].exit_verdicts: '2': 'spam:x': 'x' is not a number"),
            ({"command": ["x"], "persistent": True, "max_messages": 0},
             "t.toml: scanners.command[0].max_messages:"),
            ({"command": ["x"], "persistent": True, "output": "pattern", "output_pattern":
              "(?P<score>.*)"}, "t.toml: scanners.command[0].output: a persistent engine"),
        ]
        for data, expected in cases:
            errors = self.errors(data)
            self.assertTrue(any(e.startswith(expected) for e in errors), (expected, errors))

    def test_good_settings_load(self) -> None:
        """A persistent JSON engine and a one-shot exit-code spam engine load without errors."""
        self.assertEqual(self.errors({"command": ["cm"], "persistent": True, "output": "json",
                                      "name": "cm", "max_queue": 10}), [])
        self.assertEqual(self.errors({"command": ["ms", "{file}"], "name": "ms",
                                      "exit_verdicts": {"0": "clean", "1": "spam:5"},
                                      "score_factor": 0.5}), [])


def _text(event: dict[str, Any]) -> str:
    from twisted.logger import formatEvent
    return formatEvent(event)
