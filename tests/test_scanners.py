"""The scanner engine clients (issue #5) against fake engines on loopback.

Every network scanner is driven through each failure mode with a scripted
fake (tests/fakes_scanners.py): engine down (connection refused), slow past
the timeout, closing mid-reply, answering garbage, an oversize message; the
connection bound is counted on the fake, and retries happen only before a
reply byte.  The command scanner runs small shell scripts.  The health
monitor runs on a ``Clock`` with scripted engines.  Real engines:
tests/realmta/test_scanners_real.py.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest

from fakes_rspamd import Answer, CutShort, Drop, FakeRspamd, Stall, start_rspamd
from fakes_scanners import (CloseOnConnect, Delay, Hold, Reply, ReplyEarly, Silent,
                            clamd_complete, http_complete, http_reply, instream_payload,
                            spamd_complete, spamd_reply, start_engine)
from mppproxy.config.load import _build
from mppproxy.results import CheckResult, HardAction
from mppproxy.scan.base import (DOWN, ERROR, GARBAGE, TIMEOUT, EngineHealth, ScanInput, Scanner,
                                ScannerUnavailable)
from mppproxy.config.scanners import (ClamdConfig, CommandScannerConfig, RspamdConfig,
                                     ScanHealthConfig, SpamdConfig, parse_address, validate)
from mppproxy.scan.health import HealthMonitor
from mppproxy.scan.scanners._client import BadReply
from mppproxy.scan.scanners.clamd import ClamdScanner, parse_version
from mppproxy.scan.scanners.command import CommandScanner
from mppproxy.scan.scanners.rspamd import MAX_REPLY, RspamdScanner
from mppproxy.scan.scanners.spamd import SpamdScanner, parse_report, parse_reply

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parents[1]

MESSAGE = (b"Received: from client.example (client.example [192.0.2.1])\r\n"
           b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n")
FAST = dict(timeout=2.0, connect_timeout=1.0, retry_delay=0.01)


def message(data: bytes = MESSAGE, pieces: int = 1, **kw: Any) -> ScanInput:
    step = max(1, len(data) // pieces)
    chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
    kw.setdefault("client_ip", "192.0.2.1")
    kw.setdefault("helo", "client.example")
    kw.setdefault("sender", "a@example.org")
    kw.setdefault("recipients", ("b@example.com", "c@example.com"))
    kw.setdefault("queue_id", "Q123")
    return ScanInput(chunks=lambda: chunks, size=len(data), **kw)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScannerCase(unittest.TestCase):
    timeout = 30

    async def assertUnavailable(self, d: Any, *fragments: str) -> ScannerUnavailable:
        try:
            await d
        except ScannerUnavailable as e:
            for fragment in fragments:
                self.assertIn(fragment, e.reason)
            return e
        self.fail("no ScannerUnavailable")


# -- clamd ------------------------------------------------------------------------------

class ClamdTests(ScannerCase):

    def scanner(self, engine: Any = None, **kw: Any) -> ClamdScanner:
        address = engine.address if engine is not None else f"tcp:127.0.0.1:{closed_port()}"
        return ClamdScanner(ClamdConfig(address=address, **{**FAST, **kw}), reactor)

    async def test_clean_message_is_streamed_in_chunks(self) -> None:
        """A message clamd calls OK is clean; it went over as zINSTREAM chunks of chunk_size."""
        engine = start_engine(self, clamd_complete, [Reply(b"stream: OK\0")])
        data = MESSAGE * 40
        result = await self.scanner(engine, chunk_size=512).scan(message(data, pieces=3))
        self.assertEqual(result, CheckResult())
        [request] = engine.requests
        self.assertTrue(request.startswith(b"zINSTREAM\0\x00\x00\x02\x00"))
        self.assertEqual(instream_payload(request), data)

    async def test_a_scan_logs_no_factory_start_and_stop(self) -> None:
        """Each connection to an engine has its own client factory; Twisted's
        "Starting factory"/"Stopping factory" lines for it (two info lines per
        scan and engine, seen in benchmarks/scan.sh) are not logged."""
        engine = start_engine(self, clamd_complete, [Reply(b"stream: OK\0")])
        with capturedLogs() as events:
            result = await self.scanner(engine).scan(message())
        self.assertEqual(result, CheckResult())
        noise = [e for e in events if "factory" in str(e.get("log_format", "")).lower()]
        self.assertEqual(noise, [])

    async def test_virus_rejects_naming_the_signature(self) -> None:
        """FOUND is a hard REJECT with reason "virus <signature>" and template "virus"."""
        engine = start_engine(self, clamd_complete,
                              [Reply(b"stream: Eicar-Signature FOUND\0")])
        result = await self.scanner(engine).scan(message())
        self.assertEqual(result.action, HardAction.REJECT)
        self.assertEqual(result.reasons, ("virus Eicar-Signature",))
        self.assertEqual(result.template, "virus")
        self.assertEqual(dict(result.template_vars)["virus"], "Eicar-Signature")

    async def test_extended_detection_info_is_stripped(self) -> None:
        """ExtendedDetectionInfo's "(md5:size)" after the name is not part of the signature."""
        engine = start_engine(self, clamd_complete, [Reply(
            b"stream: Test.EICAR.HDB.UNOFFICIAL(44d88612fea8a8f36de82e1278abb02f:68) FOUND\0")])
        result = await self.scanner(engine).scan(message())
        self.assertEqual(result.reasons, ("virus Test.EICAR.HDB.UNOFFICIAL",))

    async def test_engine_down_is_unavailable_after_retries(self) -> None:
        """Connection refused: tried 1 + retries times, then ScannerUnavailable saying so."""
        scanner = self.scanner(retries=2)
        with capturedLogs() as events:
            e = await self.assertUnavailable(scanner.scan(message()), "connection refused",
                                             "after 3 attempts")
        self.assertEqual(e.scanner, "clamd")
        self.assertEqual(len([ev for ev in events if "trying again" in ev["log_format"]]), 2)

    async def test_unix_socket(self) -> None:
        """clamd on a Unix socket ("unix:/path") is asked the same way."""
        path = tempfile.mktemp(prefix="mpp-clamd-", suffix=".sock", dir="/tmp")
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        engine = start_engine(self, clamd_complete, [Reply(b"stream: X FOUND\0")], unix_path=path)
        self.assertEqual(engine.address, f"unix:{path}")
        result = await self.scanner(engine).scan(message())
        self.assertEqual(result.reasons, ("virus X",))

    async def test_missing_unix_socket_is_unavailable(self) -> None:
        """A Unix socket path that does not exist is an engine that is down."""
        scanner = ClamdScanner(ClamdConfig(address="unix:/nonexistent/clamd.sock",
                                           retries=0, **FAST), reactor)
        await self.assertUnavailable(scanner.scan(message()), "cannot connect")

    async def test_slow_engine_times_out_without_retry(self) -> None:
        """An engine that never answers costs the timeout, then ScannerUnavailable; no retry."""
        engine = start_engine(self, clamd_complete, [Silent()])
        start = time.monotonic()
        await self.assertUnavailable(self.scanner(engine, timeout=0.3).scan(message()),
                                     "timeout after 0.3s")
        self.assertLess(time.monotonic() - start, 2.0)
        self.assertEqual(engine.connections, 1)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(engine.open, [], "the timed-out connection was closed")

    async def test_reply_after_the_timeout_is_too_late(self) -> None:
        """A reply that comes after the timeout is not used."""
        engine = start_engine(self, clamd_complete, [Delay(0.6, b"stream: OK\0")])
        await self.assertUnavailable(self.scanner(engine, timeout=0.2).scan(message()), "timeout")

    async def test_closing_mid_reply_is_unavailable_and_not_retried(self) -> None:
        """A reply cut before its NUL: ScannerUnavailable, and no second connection."""
        engine = start_engine(self, clamd_complete, [Reply(b"stream: Eic"), Reply(b"stream: OK\0")])
        await self.assertUnavailable(self.scanner(engine, retries=3).scan(message()),
                                     "mid-reply after 11 octets")
        self.assertEqual(engine.connections, 1)

    async def test_close_before_any_reply_is_retried(self) -> None:
        """Closed or reset before a reply byte: the next attempt gets the answer."""
        engine = start_engine(self, clamd_complete, [
            CloseOnConnect(), CloseOnConnect(abort=True), Reply(b"stream: OK\0")])
        result = await self.scanner(engine, retries=2).scan(message())
        self.assertEqual(result, CheckResult())
        self.assertEqual(engine.connections, 3)

    async def test_close_after_request_without_reply_is_retried(self) -> None:
        """A connection closed with the request sent and no reply byte counts as no answer."""
        engine = start_engine(self, clamd_complete, [Reply(b""), Reply(b"stream: OK\0")])
        self.assertEqual(await self.scanner(engine, retries=1).scan(message()), CheckResult())
        self.assertEqual(engine.connections, 2)

    async def test_retries_exhausted(self) -> None:
        """With retries = 1 two closed connections are a failure naming both attempts."""
        engine = start_engine(self, clamd_complete, [CloseOnConnect()])
        await self.assertUnavailable(self.scanner(engine, retries=1).scan(message()),
                                     "before any reply", "after 2 attempts")
        self.assertEqual(engine.connections, 2)

    async def test_garbage_is_unavailable(self) -> None:
        """An answer that is not clamd's is a failure, never a clean result."""
        for garbage in (b"HELLO THERE\0", b"stream: maybe\0", b"\xff\xfe\0", b"UNKNOWN COMMAND\0"):
            engine = start_engine(self, clamd_complete, [Reply(garbage)])
            await self.assertUnavailable(self.scanner(engine).scan(message()), "bad reply")

    async def test_error_reply_is_unavailable(self) -> None:
        """clamd's own ERROR answer is a failure carrying its text."""
        engine = start_engine(self, clamd_complete, [Reply(b"stream: Can't allocate memory ERROR\0")])
        await self.assertUnavailable(self.scanner(engine).scan(message()), "clamd error",
                                     "allocate memory")

    async def test_endless_reply_is_cut(self) -> None:
        """A reply that never ends (no NUL) is cut at MAX_REPLY, not buffered forever."""
        engine = start_engine(self, clamd_complete, [Reply(b"x" * 10000, close=False)])
        await self.assertUnavailable(self.scanner(engine).scan(message()), "reply longer than 4096")

    async def test_size_limit_answer_while_sending(self) -> None:
        """clamd's "INSTREAM size limit exceeded" mid-stream is a clear failure, not retried."""
        engine = start_engine(self, clamd_complete, [
            ReplyEarly(1000, b"INSTREAM size limit exceeded. ERROR\0")])
        big = MESSAGE * 20000  # ~2 MB: clamd answers long before it is all sent
        e = await self.assertUnavailable(self.scanner(engine, retries=2).scan(message(big)),
                                         "too large", "StreamMaxLength")
        self.assertIn(str(len(big)), e.reason)
        self.assertEqual(engine.connections, 1)

    async def test_oversize_message_is_not_sent(self) -> None:
        """A message over max_size is not scanned: a reason, no score, no connection."""
        engine = start_engine(self, clamd_complete, [Reply(b"stream: OK\0")])
        result = await self.scanner(engine, max_size=100).scan(message())
        self.assertEqual((result.score, result.action), (0.0, None))
        self.assertIn("not scanned", result.reasons[0])
        self.assertEqual(engine.connections, 0)

    async def test_connection_bound(self) -> None:
        """Ten scans at once open at most max_connections connections; all finish."""
        engine = start_engine(self, clamd_complete, [Hold()])
        scanner = self.scanner(engine, max_connections=3, timeout=10)
        scans = [Deferred.fromCoroutine(scanner.scan(message())) for _ in range(10)]
        done = 0
        for _ in range(200):
            await deferLater(reactor, 0.01, lambda: None)
            self.assertLessEqual(len(engine.open), 3)
            self.assertLessEqual(scanner.client.active, 3)
            done += engine.release(b"stream: OK\0")
            if done == 10:
                break
        results = await defer.gatherResults(scans)
        self.assertEqual(results, [CheckResult()] * 10)
        self.assertEqual((engine.peak, engine.connections), (3, 10))

    async def test_waiting_for_a_slot_counts_in_the_timeout(self) -> None:
        """With every slot busy a scan times out waiting, and the slot is not leaked."""
        engine = start_engine(self, clamd_complete, [Hold()])
        scanner = self.scanner(engine, max_connections=1, timeout=0.3)
        first = Deferred.fromCoroutine(scanner.scan(message()))
        await self.assertUnavailable(scanner.scan(message()), "timeout")
        self.assertEqual(engine.connections, 1)
        await self.assertUnavailable(first, "timeout")
        engine.script = [Reply(b"stream: OK\0")]
        self.assertEqual(await self.scanner(engine, max_connections=1).scan(message()), CheckResult())
        self.assertEqual(await scanner.scan(message()), CheckResult())

    async def test_cancel_closes_the_connection(self) -> None:
        """Cancelling a scan (the scan engine's own timeout) closes its connection."""
        engine = start_engine(self, clamd_complete, [Silent()])
        scanner = self.scanner(engine, timeout=10)
        d = Deferred.fromCoroutine(scanner.scan(message()))
        for _ in range(100):
            if engine.requests:
                break
            await deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((engine.open, scanner.client.active), ([], 0))

    async def test_unreadable_message_is_unavailable(self) -> None:
        """A spool that fails while being read gives ScannerUnavailable, not a clean result."""
        engine = start_engine(self, clamd_complete, [Silent()])

        def broken() -> Any:
            yield b"Subject: x\r\n"
            raise OSError("spool file vanished")

        scan_input = ScanInput(chunks=broken, size=100)
        await self.assertUnavailable(self.scanner(engine, retries=0).scan(scan_input),
                                     "spool file vanished")

    async def test_version_with_signature_date(self) -> None:
        """VERSION gives the engine version, database number and signature time."""
        engine = start_engine(self, clamd_complete,
                              [Reply(b"ClamAV 1.4.6/27480/Mon Dec  9 09:35:33 2024\0")])
        health = await self.scanner(engine).health()
        self.assertEqual((health.up, health.version, health.detail),
                         (True, "ClamAV 1.4.6", "database 27480"))
        self.assertEqual(time.localtime(health.signatures_time)[:6], (2024, 12, 9, 9, 35, 33))
        self.assertEqual(engine.requests, [b"zVERSION\0"])

    async def test_version_garbage_is_unavailable(self) -> None:
        """A VERSION answer that is not one is a health failure."""
        engine = start_engine(self, clamd_complete, [Reply(b"PONG\0")])
        await self.assertUnavailable(self.scanner(engine).health(), "not a VERSION reply")

    def test_parse_version(self) -> None:
        """VERSION replies with and without the official database."""
        self.assertEqual(parse_version("ClamAV 1.4.6"), ("1.4.6", None, None))
        engine, db, when = parse_version("ClamAV 0.103.11/27100/Tue Nov 28 08:37:14 2023")
        self.assertEqual((engine, db), ("0.103.11", 27100))
        self.assertIsNotNone(when)
        for bad in ("ClamAV", "clamav 1.0", "ClamAV 1.0/12/not a date", ""):
            self.assertRaises(ValueError, parse_version, bad)


# -- spamd ------------------------------------------------------------------------------

GTUBE_SYMBOLS = b"GTUBE,MISSING_DATE,MISSING_MID,NO_RECEIVED,NO_RELAYS"
REPORT = (b"Spam detection software, running on the system \"vm\",\n"
          b"has identified this incoming email as possible spam.\n\n"
          b"Content preview:  XJS*C4JDBQADN1 1000 FAKE_RULE in the preview\n\n"
          b"Content analysis details:   (1003.3 points, 5.0 required)\n\n"
          b" pts rule name              description\n"
          b"---- ---------------------- --------------------------------------------------\n"
          b"-0.0 NO_RECEIVED            Informational: message has no Received headers\n"
          b" 0.6 MISSING_MID            Missing Message-Id: header\n"
          b" 2.7 MISSING_DATE           Missing Date: header\n"
          b"1000 GTUBE                  BODY: Generic Test for Unsolicited Bulk Email\n"
          b"                            12 wrapped description words\n"
          b"-1.9 BAYES_00               BODY: Bayes spam probability is 0 to 1%\n\n")


class SpamdTests(ScannerCase):

    def scanner(self, engine: Any = None, **kw: Any) -> SpamdScanner:
        address = engine.address if engine is not None else f"tcp:127.0.0.1:{closed_port()}"
        return SpamdScanner(SpamdConfig(address=address, **{**FAST, **kw}), reactor)

    async def test_symbols_score_times_factor_and_rule_names(self) -> None:
        """SYMBOLS: our score is SpamAssassin's times score_factor; reasons are the rule names."""
        engine = start_engine(self, spamd_complete, [Reply(spamd_reply(GTUBE_SYMBOLS))])
        result = await self.scanner(engine, score_factor=0.5).scan(message())
        self.assertAlmostEqual(result.score, 501.35)
        self.assertEqual(result.reasons, tuple(GTUBE_SYMBOLS.decode().split(",")))
        self.assertIsNone(result.action)
        self.assertEqual(dict(result.template_vars),
                         {"spamd_spam": True, "spamd_score": 1002.7, "spamd_threshold": 5.0})
        [request] = engine.requests
        head, _, body = request.partition(b"\r\n\r\n")
        self.assertEqual(head, b"SYMBOLS SPAMC/1.5\r\nContent-length: %d" % len(MESSAGE))
        self.assertEqual(body, MESSAGE)

    async def test_user_header_and_ham(self) -> None:
        """The User: header is sent when configured; a ham result scores its (low) score."""
        engine = start_engine(self, spamd_complete,
                              [Reply(spamd_reply(b"", spam="False ; -1.5 / 5.0"))])
        result = await self.scanner(engine, user="filter").scan(message())
        self.assertEqual((result.score, result.reasons), (-1.5, ()))
        self.assertIn(b"\r\nUser: filter\r\n", engine.requests[0])

    async def test_report_gives_points_per_rule(self) -> None:
        """REPORT: rule names from the table, with their points; the preview is not read."""
        engine = start_engine(self, spamd_complete,
                              [Reply(spamd_reply(REPORT, spam="True ; 1003.3 / 5.0"))])
        result = await self.scanner(engine, command="REPORT").scan(message())
        self.assertEqual(result.reasons,
                         ("NO_RECEIVED", "MISSING_MID", "MISSING_DATE", "GTUBE", "BAYES_00"))
        self.assertEqual(dict(result.template_vars)["spamd_points"][3], ("GTUBE", 1000.0))
        self.assertTrue(engine.requests[0].startswith(b"REPORT SPAMC/1.5\r\n"))

    async def test_engine_down(self) -> None:
        """Refused connections: ScannerUnavailable after the retries."""
        await self.assertUnavailable(self.scanner(retries=1).scan(message()),
                                     "connection refused", "after 2 attempts")

    async def test_slow(self) -> None:
        """Silent past the timeout: ScannerUnavailable, one connection."""
        engine = start_engine(self, spamd_complete, [Silent()])
        await self.assertUnavailable(self.scanner(engine, timeout=0.3).scan(message()), "timeout")
        self.assertEqual(engine.connections, 1)

    async def test_closing_mid_reply(self) -> None:
        """Headers promising a body that never comes: a failure, not retried."""
        whole = spamd_reply(GTUBE_SYMBOLS)
        engine = start_engine(self, spamd_complete, [Reply(whole[:-10]), Reply(whole)])
        await self.assertUnavailable(self.scanner(engine, retries=2).scan(message()), "cut short")
        self.assertEqual(engine.connections, 1)
        engine2 = start_engine(self, spamd_complete, [Reply(b"SPAMD/1.1 0 EX"), Reply(whole)])
        await self.assertUnavailable(self.scanner(engine2, retries=2).scan(message()),
                                     "no status line")
        self.assertEqual(engine2.connections, 1)

    async def test_garbage(self) -> None:
        """Answers that are not SPAMD replies are failures."""
        for garbage in (b"HTTP/1.0 400 Bad\r\n\r\n",
                        spamd_reply(b"GTUBE", spam="maybe"),
                        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\n\r\nGT BE",
                        b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\n\r\n",
                        b"SPAMD/1.1 0 EX_OK\r\nContent-length: x\r\n\r\n",
                        spamd_reply(b"GTUBE", spam="True ; nan / 5.0")):
            engine = start_engine(self, spamd_complete, [Reply(garbage)])
            await self.assertUnavailable(self.scanner(engine).scan(message()), "bad")

    async def test_spamd_error_code(self) -> None:
        """spamd's own error status (EX_PROTOCOL...) is a failure carrying its text."""
        engine = start_engine(self, spamd_complete,
                              [Reply(b"SPAMD/1.0 76 Bad header line: X\r\n")])
        await self.assertUnavailable(self.scanner(engine).scan(message()), "spamd error 76",
                                     "EX_PROTOCOL", "Bad header line")

    async def test_half_close_lets_spamd_finish_a_last_line(self) -> None:
        """The request is half-closed, so a message without a final newline is answered."""
        engine = start_engine(self, lambda data, eof: eof, [Reply(spamd_reply(b"X"))])
        result = await self.scanner(engine).scan(message(b"Subject: x\r\n\r\nno newline"))
        self.assertEqual(result.reasons, ("X",))

    async def test_oversize_not_sent(self) -> None:
        """Over max_size (like spamc's --max-size): not scanned, no connection."""
        engine = start_engine(self, spamd_complete, [Reply(spamd_reply(b""))])
        result = await self.scanner(engine, max_size=10).scan(message())
        self.assertIn("not scanned", result.reasons[0])
        self.assertEqual(engine.connections, 0)

    async def test_connection_bound(self) -> None:
        """At most max_connections spamd connections at once."""
        engine = start_engine(self, spamd_complete, [Delay(0.05, spamd_reply(b"A"))])
        scanner = self.scanner(engine, max_connections=2, timeout=10)
        results = await defer.gatherResults(
            [Deferred.fromCoroutine(scanner.scan(message())) for _ in range(8)])
        self.assertEqual([r.reasons for r in results], [("A",)] * 8)
        self.assertEqual((engine.peak, engine.connections), (2, 8))

    async def test_ping(self) -> None:
        """PING answers PONG: up, with the protocol version."""
        engine = start_engine(self, spamd_complete, [Reply(b"SPAMD/1.5 0 PONG\r\n")])
        health = await self.scanner(engine).health()
        self.assertEqual((health.up, health.version), (True, "SPAMD/1.5"))
        self.assertEqual(engine.requests, [b"PING SPAMC/1.5\r\n\r\n"])
        engine2 = start_engine(self, spamd_complete, [Reply(b"SPAMD/1.5 0 PANG\r\n")])
        await self.assertUnavailable(self.scanner(engine2).health(), "PING answered")

    def test_parse_reply_incremental(self) -> None:
        """A reply is complete only with its whole body; fed a byte at a time it waits."""
        whole = spamd_reply(GTUBE_SYMBOLS)
        for i in range(len(whole)):
            self.assertIsNone(parse_reply(whole[:i], False))
        self.assertEqual(parse_reply(whole, False).body, GTUBE_SYMBOLS)
        self.assertRaises(BadReply, parse_report, b"no table here")


# -- rspamd -----------------------------------------------------------------------------

RSPAMD_SPAM = {"is_skipped": False, "score": 9.5, "required_score": 15.0, "action": "add header",
               "symbols": {"R_A": {"name": "R_A", "score": 5.0}, "R_B": {"score": 4.6},
                           "R_C": {"score": -0.1}, "R_ZERO": {"score": 0.0}},
               "messages": {}}
RSPAMD_GTUBE = {"is_skipped": True, "score": 15.0, "required_score": 15.0, "action": "reject",
                "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0, "metric_score": 0.0}},
                "messages": {"smtp_message": "Gtube pattern"}}
SPAM_JSON = json.dumps(RSPAMD_SPAM).encode()


def rspamd_reply(data: Any, **kw: Any) -> bytes:
    return http_reply(json.dumps(data).encode(), **kw)


class RspamdTests(ScannerCase):
    """The rspamd client against a twisted.web fake (tests/fakes_rspamd.py)
    and, for replies no real server sends, the byte-scripted engines."""

    def scanner(self, engine: Any = None, **kw: Any) -> RspamdScanner:
        if isinstance(engine, FakeRspamd):
            url = engine.url
        elif engine is not None:
            url = f"http://127.0.0.1:{engine.port.getHost().port}"
        else:
            url = f"http://127.0.0.1:{closed_port()}"
        scanner = RspamdScanner(RspamdConfig(url=url, **{**FAST, **kw}), reactor)
        self.addCleanup(scanner.close)
        return scanner

    async def test_score_symbols_and_envelope_headers(self) -> None:
        """Score x factor; reasons are the weighted symbols; the envelope goes in headers."""
        fake = start_rspamd(self, [Answer(SPAM_JSON)])
        result = await self.scanner(fake, score_factor=2.0, password="pw").scan(message())
        self.assertEqual(result.score, 19.0)
        self.assertEqual(result.reasons, ("R_A", "R_B", "R_C"))
        variables = dict(result.template_vars)
        self.assertEqual((variables["rspamd_action"], variables["rspamd_required_score"]),
                         ("add header", 15.0))
        self.assertIn(("R_ZERO", 0.0), variables["rspamd_symbols"])
        [seen] = fake.seen
        self.assertEqual((seen.method, seen.path), (b"POST", b"/checkv2"))
        for name, values in ((b"ip", [b"192.0.2.1"]), (b"helo", [b"client.example"]),
                             (b"from", [b"a@example.org"]),
                             (b"rcpt", [b"b@example.com", b"c@example.com"]),
                             (b"queue-id", [b"Q123"]), (b"password", [b"pw"]),
                             (b"content-length", [str(len(MESSAGE)).encode()])):
            self.assertEqual(seen.headers.get(name), values, name)
        self.assertEqual(seen.body, MESSAGE)

    async def test_gtube_pre_result_names_its_symbol(self) -> None:
        """A pre-result (GTUBE, is_skipped), answered chunked, names its zero-weight symbol."""
        fake = start_rspamd(self, [Answer(json.dumps(RSPAMD_GTUBE).encode(), chunked=True)])
        result = await self.scanner(fake).scan(message())
        self.assertEqual((result.score, result.reasons), (15.0, ("GTUBE",)))
        self.assertEqual(dict(result.template_vars)["rspamd_action"], "reject")

    async def test_keep_alive_connection_is_used_again(self) -> None:
        """Two scans one after the other go over one connection the server keeps open."""
        fake = start_rspamd(self, [Answer(SPAM_JSON)])
        scanner = self.scanner(fake)
        for _ in range(2):
            self.assertEqual((await scanner.scan(message())).score, 9.5)
        self.assertEqual(fake.connections, 1)
        self.assertEqual([seen.connection for seen in fake.seen], [1, 1])

    async def test_server_closing_after_each_reply(self) -> None:
        """A server that answers Connection: close (rspamd's own worker) gets a new
        connection per scan, and each scan succeeds."""
        fake = start_rspamd(self, [Answer(SPAM_JSON, close=True)])
        scanner = self.scanner(fake, retries=0)
        for _ in range(2):
            self.assertEqual((await scanner.scan(message())).score, 9.5)
        self.assertEqual(fake.connections, 2)

    async def test_stale_pooled_connection_costs_no_attempt(self) -> None:
        """A pooled connection the server drops as the next request arrives is
        replaced at once, even with no retries allowed."""
        fake = start_rspamd(self, [Answer(SPAM_JSON), Drop(), Answer(SPAM_JSON)])
        scanner = self.scanner(fake, retries=0)
        await scanner.scan(message())
        result = await scanner.scan(message())
        self.assertEqual(result.score, 9.5)
        self.assertEqual(fake.connections, 2)
        self.assertEqual([seen.connection for seen in fake.seen], [1, 1, 2])

    async def test_dropped_before_any_reply_is_retried(self) -> None:
        """A connection closed before any reply byte is tried again on a new one;
        with no retries left it is "down"."""
        fake = start_rspamd(self, [Drop(), Answer(SPAM_JSON)])
        result = await self.scanner(fake, retries=1).scan(message())
        self.assertEqual((result.score, fake.connections), (9.5, 2))
        fake = start_rspamd(self, [Drop()])
        e = await self.assertUnavailable(self.scanner(fake, retries=0).scan(message()),
                                         "before any reply")
        self.assertEqual(e.kind, DOWN)

    async def test_closing_mid_body_is_garbage_not_retried(self) -> None:
        """A body shorter than its Content-Length is a bad reply, and no retry follows it."""
        fake = start_rspamd(self, [CutShort(SPAM_JSON[:20], len(SPAM_JSON)), Answer(SPAM_JSON)])
        e = await self.assertUnavailable(self.scanner(fake, retries=2).scan(message()),
                                         "bad reply", "cut short")
        self.assertEqual((e.kind, fake.connections), (GARBAGE, 1))

    async def test_garbage_json(self) -> None:
        """A 200 answer that is not JSON, or JSON that is no scan result, is garbage."""
        for body, fragment in ((b"{not json", "not JSON"), (b"[1, 2]", "not an object")):
            fake = start_rspamd(self, [Answer(body)])
            e = await self.assertUnavailable(self.scanner(fake).scan(message()), fragment)
            self.assertEqual(e.kind, GARBAGE)

    async def test_http_error_status(self) -> None:
        """An HTTP error status is an engine error naming the status."""
        fake = start_rspamd(self, [Answer(b'{"error":"invalid command"}', status=500)])
        e = await self.assertUnavailable(self.scanner(fake).scan(message()), "HTTP 500")
        self.assertEqual(e.kind, ERROR)

    async def test_oversized_reply_is_garbage(self) -> None:
        """A reply over MAX_REPLY octets, announced or chunked, is garbage and not read on."""
        for chunked in (False, True):
            fake = start_rspamd(self, [Answer(b" " * (MAX_REPLY + 1), chunked=chunked)])
            e = await self.assertUnavailable(self.scanner(fake).scan(message()),
                                             f"longer than {MAX_REPLY}")
            self.assertEqual(e.kind, GARBAGE)

    async def test_slow_server_times_out_and_is_dropped(self) -> None:
        """No answer within the timeout: a timeout failure, and the connection is closed."""
        fake = start_rspamd(self, [Stall()])
        e = await self.assertUnavailable(self.scanner(fake, timeout=0.3).scan(message()),
                                         "timeout after 0.3s")
        self.assertEqual(e.kind, TIMEOUT)
        for _ in range(50):
            if not fake.open:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(fake.open, [])

    async def test_cancelled_scan_raises_cancelled(self) -> None:
        """Cancelling a scan (the scan engine's own timeout) ends it with CancelledError,
        which the engine reports as a timeout, and closes the connection."""
        fake = start_rspamd(self, [Stall()])
        d = Deferred.fromCoroutine(self.scanner(fake).scan(message()))
        while not fake.stalled:
            await deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        for _ in range(50):
            if not fake.open:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(fake.open, [])

    async def test_big_message_is_streamed_whole(self) -> None:
        """A 3 MB message in 64 KiB pieces arrives whole, with its Content-Length."""
        data = MESSAGE + b"x" * (3 * 1024 * 1024) + b"\r\n"
        fake = start_rspamd(self, [Answer(SPAM_JSON)])
        await self.scanner(fake).scan(message(data, pieces=len(data) // (64 * 1024)))
        [seen] = fake.seen
        self.assertEqual(seen.headers[b"content-length"], [str(len(data)).encode()])
        self.assertEqual(seen.body, data)

    async def test_unreadable_message_is_an_error(self) -> None:
        """A message whose spool cannot be read fails the scan as our error, not rspamd's."""
        def chunks() -> Any:
            yield MESSAGE
            raise OSError("spool file vanished")

        fake = start_rspamd(self, [Answer(SPAM_JSON)])
        e = await self.assertUnavailable(
            self.scanner(fake, retries=0).scan(ScanInput(chunks=chunks, size=2 * len(MESSAGE))),
            "cannot read the message", "spool file vanished")
        self.assertEqual(e.kind, ERROR)

    async def test_a_scan_logs_no_factory_start_and_stop(self) -> None:
        """The pool's per-connection factories log no "Starting factory" lines."""
        fake = start_rspamd(self, [Answer(SPAM_JSON, close=True)])
        with capturedLogs() as events:
            await self.scanner(fake).scan(message())
        noise = [e for e in events if "factory" in str(e.get("log_format", "")).lower()]
        self.assertEqual(noise, [])

    async def test_client_text_cannot_add_headers(self) -> None:
        """A HELO or sender with CR/LF is left out rather than splitting a header."""
        fake = start_rspamd(self, [Answer(SPAM_JSON)])
        await self.scanner(fake).scan(message(helo="x\r\nPassword: evil", sender="",
                                              recipients=("ok@example.com",)))
        [seen] = fake.seen
        self.assertNotIn(b"evil", b"".join(b"".join(v) for v in seen.headers.values()))
        self.assertNotIn(b"helo", seen.headers)
        self.assertNotIn(b"from", seen.headers)
        self.assertEqual(seen.headers[b"rcpt"], [b"ok@example.com"])

    async def test_base_path_is_kept(self) -> None:
        """A URL with a path (rspamd behind a proxy) puts checkv2 under it."""
        fake = start_rspamd(self, [Answer(SPAM_JSON)])
        scanner = RspamdScanner(RspamdConfig(url=f"{fake.url}/rspamd/", **FAST), reactor)
        self.addCleanup(scanner.close)
        await scanner.scan(message())
        self.assertEqual(fake.seen[0].path, b"/rspamd/checkv2")

    async def test_engine_down(self) -> None:
        """Refused: ScannerUnavailable, kind "down", after the retries."""
        e = await self.assertUnavailable(self.scanner(retries=1).scan(message()),
                                         "connection refused", "after 2 attempts")
        self.assertEqual(e.kind, DOWN)

    async def test_closing_mid_reply(self) -> None:
        """A body shorter than its Content-Length, a head cut short or a chunked body
        cut short: garbage, no retry."""
        whole = rspamd_reply(RSPAMD_SPAM)
        for cut in (whole[:-20], whole[:30], rspamd_reply(RSPAMD_SPAM, chunked=True)[:-7]):
            engine = start_engine(self, http_complete, [Reply(cut), Reply(whole)])
            e = await self.assertUnavailable(self.scanner(engine, retries=2).scan(message()),
                                             "bad reply", "cut short")
            self.assertEqual((e.kind, engine.connections), (GARBAGE, 1))

    async def test_garbage(self) -> None:
        """Not HTTP, not JSON, JSON that is no scan result: garbage; an HTTP error
        status: an engine error."""
        cases = [(b"SPAMD/1.1 0 EX_OK\r\n\r\n", "not HTTP: SPAMD", GARBAGE),
                 (b"SPAMD/1.1 0 EX_OK\r\n", "bad reply", GARBAGE),
                 (b"\x16\x03\x01\x00\xa5\r\n\r\n", "not HTTP", GARBAGE),
                 (http_reply(b"<html>oops</html>"), "not JSON", GARBAGE),
                 (http_reply(b"[1, 2]"), "not an object", GARBAGE),
                 (rspamd_reply({"score": "high", "action": "reject"}), "not a number", GARBAGE),
                 (rspamd_reply({"score": 1.0}), "no action", GARBAGE),
                 (rspamd_reply({"score": 1.0, "action": "x", "symbols": {"A": 3}}),
                  "not an object", GARBAGE),
                 (rspamd_reply({"error": "invalid command"}), "invalid command", GARBAGE),
                 (http_reply(b'{"error":"invalid command"}', status="500 invalid command"),
                  "HTTP 500 invalid command", ERROR)]
        for reply, fragment, kind in cases:
            engine = start_engine(self, http_complete, [Reply(reply)])
            e = await self.assertUnavailable(self.scanner(engine).scan(message()), fragment)
            self.assertEqual(e.kind, kind, reply)

    async def test_unframed_reply_is_read_to_the_end(self) -> None:
        """A reply with neither Content-Length nor chunking is read until the server closes."""
        engine = start_engine(self, http_complete,
                              [Reply(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n" + SPAM_JSON)])
        self.assertEqual((await self.scanner(engine).scan(message())).score, 9.5)

    async def test_oversize_not_sent(self) -> None:
        """Over max_size: not scanned, no connection."""
        engine = start_engine(self, http_complete, [Reply(rspamd_reply(RSPAMD_SPAM))])
        result = await self.scanner(engine, max_size=10).scan(message())
        self.assertIn("not scanned", result.reasons[0])
        self.assertEqual(engine.connections, 0)

    async def test_connection_bound_and_retry(self) -> None:
        """Connections stay within the bound; a reset before the reply is retried."""
        engine = start_engine(self, http_complete,
                              [CloseOnConnect(abort=True), Delay(0.05, rspamd_reply(RSPAMD_SPAM))])
        scanner = self.scanner(engine, max_connections=2, timeout=10)
        results = await defer.gatherResults(
            [Deferred.fromCoroutine(scanner.scan(message())) for _ in range(6)])
        self.assertEqual({r.score for r in results}, {9.5})
        self.assertEqual((engine.peak, engine.connections), (2, 7))

    async def test_ping_and_version(self) -> None:
        """/ping answering pong is up; the version is the Server header."""
        engine = start_engine(self, http_complete, [Reply(http_reply(b"pong\r\n"))])
        health = await self.scanner(engine).health()
        self.assertEqual((health.up, health.version), (True, "rspamd/3.4"))
        self.assertTrue(engine.requests[0].startswith(b"GET /ping HTTP/1.1\r\n"))
        engine2 = start_engine(self, http_complete, [Reply(http_reply(b"nope"))])
        await self.assertUnavailable(self.scanner(engine2).health(), "/ping answered")


# -- the command-line scanner ----------------------------------------------------------------

class CommandTests(ScannerCase):

    def scratch(self) -> Path:
        """A path that does not exist yet, in a directory removed after the test."""
        base = Path(tempfile.mkdtemp(prefix="mpp-test-scanners-"))
        self.addCleanup(shutil.rmtree, base, True)
        return base / "x"

    def script(self, body: str) -> str:
        d = self.scratch()
        d.mkdir(parents=True)
        path = d / "scan.sh"
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return str(path)

    def scanner(self, body: str, **kw: Any) -> CommandScanner:
        kw.setdefault("timeout", 5.0)
        return CommandScanner(CommandScannerConfig(command=(self.script(body), "{file}"), **kw),
                              reactor)

    async def test_clean_by_exit_code_and_temp_file_removed(self) -> None:
        """Exit 0 is clean; the program read the message from a temp file, removed afterwards."""
        temp_dir = self.scratch()
        temp_dir.mkdir()
        copy = self.scratch()
        scanner = self.scanner(f'cat "$1" > {copy}; exit 0\n', temp_dir=str(temp_dir))
        self.assertEqual(await scanner.scan(message(pieces=3)), CheckResult())
        self.assertEqual(copy.read_bytes(), MESSAGE)
        self.assertEqual(list(temp_dir.iterdir()), [])

    async def test_spooled_message_uses_its_file(self) -> None:
        """A message spooled to disk is scanned from its own file, which is left in place."""
        spool = self.scratch()
        spool.write_bytes(MESSAGE)
        scanner = self.scanner('test "$1" = "%s" || exit 3; exit 0\n' % spool)
        self.assertEqual(await scanner.scan(message(path=str(spool))), CheckResult())
        self.assertTrue(spool.exists())

    async def test_infected_by_exit_code(self) -> None:
        """An infected exit code rejects; without a pattern the reason names the exit code."""
        scanner = self.scanner("exit 1\n", name="mytool")
        result = await scanner.scan(message())
        self.assertEqual(result.action, HardAction.REJECT)
        self.assertEqual(result.reasons, ("virus found by mytool (exit 1)",))
        self.assertEqual(scanner.name, "mytool")

    async def test_infected_by_pattern_names_the_signature(self) -> None:
        """The pattern's "name" group names what was found, whatever the exit code."""
        scanner = self.scanner('echo "$1: Win.Test.Thing FOUND"; exit 0\n',
                               infected_pattern=r": (?P<name>\S+) FOUND$", template="malware")
        result = await scanner.scan(message())
        self.assertEqual((result.action, result.reasons, result.template),
                         (HardAction.REJECT, ("virus Win.Test.Thing",), "malware"))

    async def test_unexpected_exit_code_is_unavailable(self) -> None:
        """An exit code neither clean nor infected is a failure with the output's tail."""
        scanner = self.scanner("echo 'cannot open database' >&2; exit 2\n")
        await self.assertUnavailable(scanner.scan(message()), "exited 2", "cannot open database")

    async def test_killed_by_signal_is_unavailable(self) -> None:
        """A program that dies of a signal gives no verdict."""
        scanner = self.scanner("kill -9 $$\n")
        await self.assertUnavailable(scanner.scan(message()), "killed by signal 9")

    async def test_missing_program(self) -> None:
        """A program not on PATH is a failure naming it."""
        scanner = CommandScanner(CommandScannerConfig(command=("no-such-scanner-xyz", "{file}")),
                                 reactor)
        await self.assertUnavailable(scanner.scan(message()), "not found")

    async def test_timeout_kills_the_whole_process_group(self) -> None:
        """Past the timeout the program and its children are killed; the slot comes back."""
        marker = self.scratch()
        temp_dir = self.scratch()
        temp_dir.mkdir()
        scanner = self.scanner(f'sleep 30 & echo $! > {marker}; sleep 30\n', timeout=0.5,
                               max_processes=1, temp_dir=str(temp_dir))
        start = time.monotonic()
        await self.assertUnavailable(scanner.scan(message()), "timeout after 0.5s")
        self.assertLess(time.monotonic() - start, 3)
        child = int(marker.read_text())
        for _ in range(100):
            if scanner.running == 0 and not _alive(child):
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(_alive(child), "the program's own child survived")
        self.assertEqual(scanner.running, 0)
        self.assertEqual(list(temp_dir.iterdir()), [], "the temporary file was removed")

    async def test_bounded_pool(self) -> None:
        """Eight scans with max_processes 2 never run more than two programs at once."""
        log = self.scratch()
        scanner = self.scanner(f'echo "start $(date +%s.%N)" >> {log}; sleep 0.2; '
                               f'echo "end $(date +%s.%N)" >> {log}; exit 0\n',
                               max_processes=2)
        peak = 0

        def sample() -> None:
            nonlocal peak
            peak = max(peak, scanner.running)

        from twisted.internet.task import LoopingCall
        sampler = LoopingCall(sample)
        sampler.start(0.005)
        try:
            results = await defer.gatherResults(
                [Deferred.fromCoroutine(scanner.scan(message())) for _ in range(8)])
        finally:
            sampler.stop()
        self.assertEqual(results, [CheckResult()] * 8)
        self.assertEqual(peak, 2)
        events = sorted((float(t), kind) for kind, t in
                        (line.split() for line in log.read_text().splitlines()))
        running = most = 0
        for _, kind in events:
            running += 1 if kind == "start" else -1
            most = max(most, running)
        self.assertLessEqual(most, 2)

    async def test_oversize_not_scanned(self) -> None:
        """Over max_size: not scanned, nothing run."""
        marker = self.scratch()
        scanner = self.scanner(f"touch {marker}; exit 1\n", max_size=10)
        result = await scanner.scan(message())
        self.assertIn("not scanned", result.reasons[0])
        self.assertFalse(marker.exists())

    async def test_health_is_up_without_version(self) -> None:
        """A command scanner has no engine to ask: up, no version."""
        health = await self.scanner("exit 0\n").health()
        self.assertEqual((health.up, health.version), (True, ""))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# -- the health monitor -----------------------------------------------------------------

class _ScriptedEngine(Scanner):
    """health() answers from a list (EngineHealth, an exception, or None for never)."""

    def __init__(self, name: str, answers: list[Any]):
        super().__init__(None, None)
        self.name = name  # type: ignore[misc]
        self.answers = answers

    async def health(self) -> EngineHealth:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer is None:
            await Deferred()  # never fires; cancelled by the timeout
        if isinstance(answer, Exception):
            raise answer
        return answer


def _events(events: list[dict[str, Any]], word: str) -> list[dict[str, Any]]:
    return [e for e in events if word in e.get("log_format", "")]


class HealthTests(unittest.TestCase):

    def monitor(self, *engines: Scanner, interval: float = 60, max_age: float = 86400,
                now: float = 1_700_000_000.0) -> tuple[HealthMonitor, Clock]:
        clock = Clock()
        clock.advance(now)
        monitor = HealthMonitor(engines, clock, ScanHealthConfig(
            check_interval=interval, max_signature_age=max_age, timeout=5))
        self.addCleanup(monitor.stop)
        return monitor, clock

    def test_start_logs_version_and_signature_date(self) -> None:
        """The first check logs each engine's version and signature date."""
        up = EngineHealth("clamd", True, "ClamAV 1.4.6", signatures_time=1_700_000_000.0 - 3600)
        monitor, _ = self.monitor(_ScriptedEngine("clamd", [up]))
        with capturedLogs() as events:
            self.successResultOf(monitor.start())
        [event] = _events(events, "is up")
        self.assertEqual((event["engine"], event["version"], event["signatures_time"]),
                         ("clamd", "ClamAV 1.4.6", up.signatures_time))
        self.assertEqual(monitor.status["clamd"], up)
        self.assertEqual(_events(events, "old"), [])

    def test_down_and_back_are_logged_once_each(self) -> None:
        """Down is logged once on the transition, back once on recovery, not every check."""
        up = EngineHealth("spamd", True, "SPAMD/1.5")
        engine = _ScriptedEngine("spamd", [up, ScannerUnavailable("spamd", "connection refused"),
                                           ScannerUnavailable("spamd", "connection refused"),
                                           ScannerUnavailable("spamd", "connection refused"), up])
        monitor, clock = self.monitor(engine, interval=60)
        with capturedLogs() as events:
            monitor.start()
            for _ in range(6):
                clock.advance(60)
        [down] = _events(events, "is down")
        self.assertEqual((down["engine"], down["why"], down["log_level"]),
                         ("spamd", "connection refused", LogLevel.warn))
        self.assertEqual(len(_events(events, "is back")), 1)
        self.assertEqual(len(_events(events, "is up")), 1)
        self.assertTrue(monitor.status["spamd"].up)

    def test_down_at_start(self) -> None:
        """An engine down at start is logged as down at once."""
        monitor, _ = self.monitor(_ScriptedEngine("rspamd", [ScannerUnavailable("rspamd", "timeout")]))
        with capturedLogs() as events:
            monitor.start()
        self.assertEqual([e["why"] for e in _events(events, "is down")], ["timeout"])
        self.assertFalse(monitor.status["rspamd"].up)

    def test_health_that_never_answers_times_out(self) -> None:
        """A health question that hangs is cut at the health timeout and counts as down."""
        monitor, clock = self.monitor(_ScriptedEngine("clamd", [None]))
        with capturedLogs() as events:
            d = monitor.start()
            self.assertNoResult(d)
            clock.advance(5)
            self.successResultOf(d)
        [down] = _events(events, "is down")
        self.assertIn("no health answer in 5s", down["why"])

    def test_old_signatures_warn_once_until_they_change(self) -> None:
        """Signatures past max_signature_age warn once; new but still old ones warn again;
        fresh ones are logged as updated."""
        now = 1_700_000_000.0
        old = EngineHealth("clamd", True, "ClamAV 1.4.6", signatures_time=now - 3 * 86400)
        older_new = EngineHealth("clamd", True, "ClamAV 1.4.6", signatures_time=now - 2 * 86400)
        fresh = EngineHealth("clamd", True, "ClamAV 1.4.6", signatures_time=now)
        engine = _ScriptedEngine("clamd", [old, old, old, older_new, fresh, fresh])
        monitor, clock = self.monitor(engine, interval=60, max_age=86400, now=now)
        with capturedLogs() as events:
            monitor.start()
            for _ in range(5):
                clock.advance(60)
        warnings = _events(events, "older than max_signature_age")
        self.assertEqual(len(warnings), 2)
        self.assertEqual(round(warnings[0]["hours"]), 72)
        self.assertEqual(warnings[0]["log_level"], LogLevel.warn)
        self.assertEqual(len(_events(events, "signatures updated")), 1)

    def test_version_change_is_logged(self) -> None:
        """An engine upgraded under us is logged."""
        engine = _ScriptedEngine("clamd", [EngineHealth("clamd", True, "ClamAV 1.4.5"),
                                           EngineHealth("clamd", True, "ClamAV 1.4.6")])
        monitor, clock = self.monitor(engine)
        with capturedLogs() as events:
            monitor.start()
            clock.advance(60)
        [change] = _events(events, "changed version")
        self.assertEqual((change["old"], change["version"]), ("ClamAV 1.4.5", "ClamAV 1.4.6"))

    def test_buggy_scanner_is_down_not_fatal(self) -> None:
        """A health() that raises something unexpected is down, and the loop goes on."""
        engine = _ScriptedEngine("x", [RuntimeError("bug"), EngineHealth("x", True)])
        monitor, clock = self.monitor(engine)
        with capturedLogs() as events:
            monitor.start()
            clock.advance(60)
        self.assertEqual(len(_events(events, "is down")), 1)
        self.assertEqual(len(_events(events, "is back")), 1)
        self.flushLoggedErrors(RuntimeError)

    def test_slow_check_is_not_doubled(self) -> None:
        """A check still running when the interval comes round is not started twice."""
        engine = _ScriptedEngine("clamd", [None])
        asked = []
        original = engine.health

        async def counting() -> EngineHealth:
            asked.append(1)
            return await original()

        engine.health = counting  # type: ignore[method-assign]
        monitor, clock = self.monitor(engine, interval=2)
        monitor.start()
        clock.advance(2)
        clock.advance(2)
        self.assertEqual(len(asked), 1)
        clock.advance(1)  # the 5 s health timeout ends the first check
        clock.advance(2)
        self.assertEqual(len(asked), 2)

    async def test_real_scanners_against_fakes(self) -> None:
        """The monitor asks the real clients: clamd's VERSION and a refused spamd."""
        engine = start_engine(self, clamd_complete,
                              [Reply(b"ClamAV 1.4.6/27480/Mon Dec  9 09:35:33 2024\0")])
        clamd = ClamdScanner(ClamdConfig(address=engine.address, **FAST), reactor)
        spamd = SpamdScanner(SpamdConfig(address=f"tcp:127.0.0.1:{closed_port()}", retries=0,
                                         **FAST), reactor)
        monitor = HealthMonitor([clamd, spamd], reactor,
                                ScanHealthConfig(check_interval=0, max_signature_age=86400),
                                wall=time.time)
        with capturedLogs() as events:
            await monitor.start()
        self.assertEqual([e["engine"] for e in _events(events, "is up")], ["clamd"])
        self.assertEqual([e["engine"] for e in _events(events, "is down")], ["spamd"])
        self.assertEqual(len(_events(events, "older than max_signature_age")), 1)


# -- configuration ------------------------------------------------------------------------

SETTINGS = (ClamdConfig, SpamdConfig, RspamdConfig, CommandScannerConfig, ScanHealthConfig)


class ConfigTests(unittest.TestCase):

    def build(self, cls: type, data: dict[str, Any]) -> tuple[Any, list[str]]:
        errors: list[str] = []
        return _build(cls, data, "scanners.x.", errors, "test.toml"), errors

    def test_defaults_are_valid(self) -> None:
        """Every settings class's defaults pass its own checks (the command needs a command)."""
        for cls in SETTINGS:
            if cls is CommandScannerConfig:
                continue
            self.assertIsNone(validate(cls()), cls.__name__)
        self.assertIn("command", validate(CommandScannerConfig()))

    def test_loader_builds_them_from_toml_data(self) -> None:
        """The project's loader builds each class, lists included, and reports bad values."""
        cfg, errors = self.build(CommandScannerConfig, {
            "command": ["clamdscan", "--no-summary", "{file}"], "infected_exit_codes": [1, 2],
            "infected_pattern": "(?P<name>\\S+) FOUND"})
        self.assertEqual(errors, [])
        self.assertEqual(cfg.infected_exit_codes, (1, 2))
        self.assertEqual(cfg.command, ("clamdscan", "--no-summary", "{file}"))
        cases = [(ClamdConfig, {"address": "tcp:localhost"}, "scanners.x.address"),
                 (ClamdConfig, {"address": "udp:1.2.3.4:5"}, "scanners.x.address"),
                 (ClamdConfig, {"timeout": 0}, "scanners.x.timeout"),
                 (ClamdConfig, {"max_connections": 0}, "scanners.x.max_connections"),
                 (ClamdConfig, {"retries": 11}, "scanners.x.retries"),
                 (ClamdConfig, {"adress": "x"}, "scanners.x.adress: unknown key (did you mean"),
                 (SpamdConfig, {"score_factor": float("nan")}, "scanners.x.score_factor"),
                 (SpamdConfig, {"user": "a b"}, "scanners.x.user"),
                 (SpamdConfig, {"command": "CHECK"}, "scanners.x.command"),
                 (RspamdConfig, {"url": "https://x:1"}, "scanners.x.url"),
                 (RspamdConfig, {"url": "http://x:99999"}, "scanners.x.url"),
                 (RspamdConfig, {"password": "a\r\nb"}, "scanners.x.password"),
                 (CommandScannerConfig, {"command": []}, "scanners.x.command"),
                 (CommandScannerConfig, {"command": ["scan", "{file}", "{other}"]},
                  "scanners.x.command"),
                 (CommandScannerConfig, {"command": ["s", "{file}"], "infected_exit_codes": [256]},
                  "scanners.x.infected_exit_codes"),
                 (CommandScannerConfig, {"command": ["s", "{file}"], "clean_exit_codes": ["0"]},
                  "scanners.x.clean_exit_codes"),
                 (CommandScannerConfig, {"command": ["s", "{file}"], "infected_pattern": "("},
                  "scanners.x.infected_pattern"),
                 (CommandScannerConfig, {"command": ["s", "{file}"], "name": "Bad Name"},
                  "scanners.x.name"),
                 (ScanHealthConfig, {"check_interval": -1}, "scanners.x.check_interval")]
        for cls, data, key in cases:
            _, errors = self.build(cls, data)
            self.assertTrue(any(e.startswith(f"test.toml: {key}") for e in errors), errors)

    def test_parse_address(self) -> None:
        """tcp:HOST:PORT (IPv6 in brackets) and unix:/path."""
        self.assertEqual(parse_address("tcp:127.0.0.1:3310"), ("tcp", "127.0.0.1", 3310))
        self.assertEqual(parse_address("tcp:[::1]:783"), ("tcp", "::1", 783))
        self.assertEqual(parse_address("tcp:clamd.internal:3310"), ("tcp", "clamd.internal", 3310))
        self.assertEqual(parse_address("unix:/run/clamd.ctl"), ("unix", "/run/clamd.ctl", 0))
        for bad in ("127.0.0.1:3310", "tcp:::1:3310", "tcp:[::1]3310", "tcp:host:0",
                    "unix:relative.sock", "tcp::3310", "tcp:[nothex]:1"):
            self.assertRaises(ValueError, parse_address, bad)

