"""Scanning as a service (issue #5): the SMTP handler and the HTTP resource
of ``ScanService`` on loopback in the test's reactor, with blocking clients
in threads and the real scan engine over the MIME, attachment and header
scanners; ``mppproxy scan FILE`` as a subprocess; ``twistd -n mppproxy
--mode scan`` as a user runs it."""
from __future__ import annotations

import http.client
import json
import os
import smtplib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from helpers import free_port, stop_process, wait_for
from mppproxy.config.load import from_mapping, merge
from mppproxy.scanservice.core import ScanRequest, ScanRuntime
from mppproxy.scanservice.service import ScanService

ROOT = Path(__file__).resolve().parent.parent
LISTEN = "tcp:0:interface=127.0.0.1"
TIMEOUT = 10.0

CLEAN = (b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: hello\r\n"
         b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
         b"\r\nJust a note.\r\n")
# multipart without a boundary: the MIME checks refuse it as malformed.
MALFORMED = (b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: parts\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n"
             b"--x\r\nContent-Type: text/plain\r\n\r\nhidden\r\n--x--\r\n")
EXE = (b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: invoice\r\n"
       b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
       b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
       b"--b\r\nContent-Type: application/octet-stream\r\n"
       b"Content-Disposition: attachment; filename=\"invoice.pdf.exe\"\r\n"
       b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n")

BASE: dict[str, Any] = {
    "mode": "scan",
    "smtp": {"hostname": "scan.test"},
    "tls": {"enabled": False},
    "scanservice": {"smtp_listen": [LISTEN], "http_listen": [LISTEN]},
    "policies": {
        "strict": {"domains": ["strict.example"],
                   "scan": {"headers": {"rules": [
                       {"header": "Subject", "pattern": "invoice", "action": "score:3",
                        "name": "invoice-subject"}]}}},
    },
}


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    return free_port()


class ScanServiceTests(unittest.TestCase):
    def start(self, data: Optional[dict[str, Any]] = None) -> ScanService:
        config = from_mapping(merge(BASE, {"data_dir": self.mktemp(), **(data or {})}))
        service = ScanService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def port(self, service: ScanService, kind: str) -> int:
        (port,) = [p for (k, _), p in service.ports.items() if k == kind]
        return port.getHost().port

    # -- SMTP

    def smtp_scan(self, port: int, message: bytes, rcpts: tuple[str, ...] = ("bob@example.com",),
                  ) -> tuple[int, str]:
        def run() -> tuple[int, str]:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
                s.ehlo("client.test")
                code, _ = s.mail("alice@example.org")
                assert code == 250
                for r in rcpts:
                    code, _ = s.rcpt(r)
                    assert code == 250, r
                code, text = s.data(message)
                return code, text.decode()

        return run()

    async def test_smtp_clean_message_relay(self) -> None:
        """A clean message gets 250 2.0.0 with action=relay and one line per scanner."""
        service = self.start()
        code, text = await deferToThread(self.smtp_scan, self.port(service, "smtp"), CLEAN)
        self.assertEqual(code, 250)
        self.assertIn("action=relay", text)
        self.assertIn("policy=default", text)
        self.assertIn("scanner mime: score=0.0", text)
        self.assertIn("scanner attachments: score=0.0", text)

    async def test_smtp_malformed_message_verdict_in_250(self) -> None:
        """A malformed message still gets 250: the malformed verdict is in the reply text."""
        service = self.start()
        code, text = await deferToThread(self.smtp_scan, self.port(service, "smtp"), MALFORMED)
        self.assertEqual(code, 250)
        self.assertIn("action=reject", text)
        self.assertIn("refusal=malformed", text)
        self.assertIn("mime:boundary_missing", text)

    async def test_smtp_any_recipient_nothing_stored(self) -> None:
        """Recipients of any domain are taken (no relay control) and nothing is delivered or kept."""
        service = self.start()
        code, text = await deferToThread(self.smtp_scan, self.port(service, "smtp"), EXE,
                                         ("someone@elsewhere.invalid", "x@[192.0.2.1]"))
        self.assertEqual(code, 250)
        self.assertIn("action=reject", text)
        self.assertIn("refusal=attachment", text)
        data = Path(service.config.data_dir)
        self.assertFalse((data / "maildir").exists())
        self.assertFalse((data / "quarantine").exists())
        self.assertEqual(list((data / "spool").iterdir()), [])

    async def test_smtp_policy_by_first_recipient(self) -> None:
        """The first recipient's domain picks the policy, whose own scanners and rules apply."""
        service = self.start()
        code, text = await deferToThread(self.smtp_scan, self.port(service, "smtp"),
                                         CLEAN.replace(b"hello", b"your invoice"),
                                         ("bob@strict.example", "carol@example.com"))
        self.assertEqual(code, 250)
        self.assertIn("policy=strict", text)
        self.assertIn("score=3.0", text)
        self.assertIn("invoice-subject", text)

    async def test_smtp_untrusted_client_refused_at_mail(self) -> None:
        """A client outside trusted_networks gets 554 5.7.1 at MAIL."""
        service = self.start({"trusted_networks": ["10.255.255.0/24"]})
        port = self.port(service, "smtp")

        def run() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
                s.ehlo("client.test")
                return s.mail("alice@example.org")

        code, text = await deferToThread(run)
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith(b"5.7.1"), text)

    async def test_smtp_scanner_down_tempfails(self) -> None:
        """An engine that cannot be reached makes the reply 451 4.3.0, with the verdict text."""
        service = self.start({
            "scanners": {"clamd": {"address": f"tcp:127.0.0.1:{closed_port()}",
                                   "retries": 0, "connect_timeout": 1.0}},
            "policies": {"default": {"scan": {"engines": {"clamd": {}}}}}})
        port = self.port(service, "smtp")

        def run() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
                s.ehlo("client.test")
                s.mail("alice@example.org")
                s.rcpt("bob@example.com")
                s.putcmd("data")
                assert s.getreply()[0] == 354
                s.send(CLEAN + b".\r\n")
                return s.getreply()

        code, text = await deferToThread(run)
        self.assertEqual(code, 451)
        self.assertTrue(text.startswith(b"4.3.0 action=tempfail"), text)
        self.assertIn(b"scanner unavailable: clamd", text)

    # -- HTTP

    async def test_http_scanner_down_503(self) -> None:
        """Over HTTP a tempfail verdict is answered 503 with the same JSON verdict."""
        service = self.start({
            "scanners": {"clamd": {"address": f"tcp:127.0.0.1:{closed_port()}",
                                   "retries": 0, "connect_timeout": 1.0}},
            "policies": {"default": {"scan": {"engines": {"clamd": {}}}}}})
        status, body = await self.http(self.port(service, "http"), "POST", "/scan", CLEAN)
        self.assertEqual((status, body["action"], body["refusal"]), (503, "tempfail", "tempfail"))
        # Why it was not consulted, by kind (scan/base.py): the engine is down.
        self.assertIn("down: cannot connect", body["scanners"]["clamd"]["skipped"])

    def http(self, port: int, method: str, path: str, body: Optional[bytes] = None,
             headers: Optional[dict[str, str]] = None) -> tuple[int, Any]:
        def run() -> tuple[int, Any]:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            try:
                c.request(method, path, body, headers or {})
                r = c.getresponse()
                raw = r.read()
                self.assertEqual(r.getheader("content-type"), "application/json; charset=utf-8")
                return r.status, json.loads(raw)
            finally:
                c.close()

        return deferToThread(run)  # type: ignore[return-value]

    async def test_http_scan_json_shape(self) -> None:
        """POST /scan answers the verdict as JSON: action, score, reasons, scanners, queue_id."""
        service = self.start()
        port = self.port(service, "http")
        status, body = await self.http(port, "POST", "/scan?rcpt=bob@example.com&sender=a@b.example",
                                       MALFORMED)
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"action", "score", "reasons", "refusal", "policy",
                                     "queue_id", "scanners"})
        self.assertEqual(body["action"], "reject")
        self.assertEqual(body["refusal"], "malformed")
        self.assertIn("mime:boundary_missing", body["reasons"])
        self.assertEqual(body["scanners"]["mime"]["skipped"], "")
        self.assertIn("mime:boundary_missing", body["scanners"]["mime"]["rules"])
        self.assertTrue(body["queue_id"])
        status, body = await self.http(port, "POST", "/scan", CLEAN,
                                       {"X-Recipient": "bob@strict.example, c@example.com",
                                        "X-Client-IP": "192.0.2.7"})
        self.assertEqual((status, body["action"], body["policy"]), (200, "relay", "strict"))
        status, body = await self.http(port, "POST", "/scan?policy=strict", CLEAN)
        self.assertEqual(body["policy"], "strict")

    async def test_http_errors(self) -> None:
        """Wrong method 405, bad input 400, unknown path 404, each with a JSON error."""
        service = self.start()
        port = self.port(service, "http")
        for method, path, body, want in [
                ("GET", "/scan", None, 405), ("PUT", "/scan", b"x", 405),
                ("POST", "/scan", b"", 400), ("POST", "/scan?client_ip=nonsense", CLEAN, 400),
                ("POST", "/scan?policy=nope", CLEAN, 400), ("POST", "/scan?smtputf8=maybe", CLEAN, 400),
                ("GET", "/other", None, 404), ("POST", "/scan/x", CLEAN, 404),
                ("POST", "/health", b"x", 405)]:
            status, answer = await self.http(port, method, path, body)
            self.assertEqual(status, want, (method, path, answer))
            self.assertIsInstance(answer["error"], str)

    async def test_http_body_too_large(self) -> None:
        """A body over limits.max_message_size gets 413, with Content-Length or chunked."""
        service = self.start({"limits": {"max_message_size": 2048}})
        port = self.port(service, "http")
        big = CLEAN + b"x" * 4096 + b"\r\n"
        status, answer = await self.http(port, "POST", "/scan", big)
        self.assertEqual(status, 413)
        self.assertIn("max_message_size", answer["error"])

        def chunked() -> int:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            try:
                c.request("POST", "/scan", iter([big[:1000], big[1000:]]),
                          encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
                return c.getresponse().status
            finally:
                c.close()

        self.assertEqual(await deferToThread(chunked), 413)
        status, answer = await self.http(port, "POST", "/scan", CLEAN)
        self.assertEqual(status, 200)

    async def test_http_health_and_untrusted(self) -> None:
        """GET /health lists the engines; clients outside trusted_networks get 403."""
        service = self.start({"scanners": {"clamd": {"address": f"tcp:127.0.0.1:{closed_port()}"}}})
        port = self.port(service, "http")
        status, body = await self.http(port, "GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"status", "engines", "policies"})
        self.assertIn("clamd", body["engines"])
        self.assertEqual(body["policies"], ["default", "strict"])
        service.apply(from_mapping(merge(BASE, {"data_dir": service.config.data_dir,
                                                "trusted_networks": ["10.255.255.0/24"],
                                                "scanservice": {
                                                    "smtp_listen": list(service.config.scanservice.smtp_listen),
                                                    "http_listen": list(service.config.scanservice.http_listen)}})))
        status, body = await self.http(port, "POST", "/scan", CLEAN)
        self.assertEqual(status, 403)


class RuntimeTests(unittest.TestCase):
    async def test_scan_forces_scanning_on(self) -> None:
        """A policy with scan.enabled = false is still scanned in scan mode."""
        config = from_mapping({"policies": {"default": {"scan": {"enabled": False}}}})
        runtime = ScanRuntime(config, reactor)
        outcome = await runtime.scan(ScanRequest.of_bytes(MALFORMED))
        self.assertEqual(outcome.action, "reject")
        self.assertIn("mime", outcome.scanners)

    async def test_loop_is_refused_as_at_the_edge(self) -> None:
        """A message with more Received: fields than limits.max_hop_count is judged reject (mail loop) without any scanner, as the edge refuses it with 554 5.4.6."""
        runtime = ScanRuntime(from_mapping({}), reactor)
        looped = b"".join(b"Received: from hop%d.example by hop%d.example; "
                          b"Mon, 7 Dec 2026 05:00:00 +0000\r\n" % (i, i) for i in range(60))
        outcome = await runtime.scan(ScanRequest.of_bytes(looped + b"Subject: x\r\n\r\nbody\r\n"))
        self.assertEqual(outcome.action, "reject")
        self.assertEqual(outcome.scanners, {})
        self.assertIn("mail loop: 60 Received: header fields", "; ".join(outcome.verdict.reasons))

    async def test_forged_trust_headers_are_removed_before_scanning(self) -> None:
        """Scan mode judges the message without the client's X-Spam-* fields, as the edge passes it on."""
        runtime = ScanRuntime(from_mapping({}), reactor)
        seen: list[bytes] = []
        scanning = runtime.scanning["default"]
        parse = scanning.mime.parse

        async def spy(message: Any) -> Any:
            seen.append(b"".join(message.chunks()))
            return await parse(message)

        scanning.mime.parse = spy  # type: ignore[method-assign]
        await runtime.scan(ScanRequest.of_bytes(
            b"X-Spam-Flag: NO\r\nSubject: x\r\n\r\nbody\r\n", helo="c.example",
            client_ip="192.0.2.7"))
        self.assertTrue(seen)
        for octets in seen:
            self.assertTrue(octets.startswith(b"Received: from c.example ([192.0.2.7])"), octets)
            self.assertNotIn(b"X-Spam-Flag", octets)

    async def test_reply_text_is_clean(self) -> None:
        """Control characters in a reason (a file name) never reach the reply or the JSON."""
        runtime = ScanRuntime(from_mapping({}), reactor)
        message = EXE.replace(b"invoice.pdf.exe", b"a\x1bb.exe")
        outcome = await runtime.scan(ScanRequest.of_bytes(message))
        reply = runtime.reply(outcome)
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        self.assertNotIn("\x1b", reply.text)
        self.assertNotIn("\x1b", json.dumps(outcome.as_json(), ensure_ascii=False))

    async def test_site_template_renders_verdict(self) -> None:
        """A site's scan_result.txt (policy.templates_dir) replaces the built-in text."""
        site = Path(self.mktemp())
        (site / "replies").mkdir(parents=True)
        (site / "replies" / "scan_result.txt").write_text(
            "verdict {{ action }} ({{ scanners | length }} scanners)\n")
        runtime = ScanRuntime(from_mapping({"policy": {"templates_dir": str(site.resolve())}}),
                              reactor)
        reply = runtime.reply(await runtime.scan(ScanRequest.of_bytes(CLEAN)))
        self.assertEqual(reply.to_bytes(), b"250 2.0.0 verdict relay (2 scanners)\r\n")


# -- the command line

def run_cli(*args: str, stdin: Optional[bytes] = None, cwd: Optional[Path] = None
            ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mppproxy", "scan", *args], input=stdin,
                          capture_output=True, env=env, cwd=cwd, timeout=60)


def test_cli_scan_exit_codes(tmp_path):
    """`mppproxy scan` prints the verdict; exit 0 for relay, 1 for reject, JSON with --json, - reads stdin."""
    clean = tmp_path / "clean.eml"
    clean.write_bytes(CLEAN)
    bad = tmp_path / "bad.eml"
    bad.write_bytes(MALFORMED)
    proc = run_cli(str(clean))
    assert proc.returncode == 0, proc.stderr
    assert b"action: relay" in proc.stdout
    proc = run_cli("--json", str(bad))
    assert proc.returncode == 1, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict["action"] == "reject" and verdict["refusal"] == "malformed"
    proc = run_cli("-", stdin=MALFORMED)
    assert proc.returncode == 1 and b"refusal: malformed" in proc.stdout
    conf = tmp_path / "c.toml"
    conf.write_text('[policies.strict]\ndomains = ["strict.example"]\n'
                    '[[policies.strict.scan.headers.rules]]\nheader = "Subject"\n'
                    'pattern = "hello"\naction = "reject"\n')
    proc = run_cli("-c", str(conf), "--rcpt", "bob@strict.example", str(clean))
    assert proc.returncode == 1 and b"policy: strict" in proc.stdout, proc.stdout
    proc = run_cli("-c", str(conf), "--policy", "default", str(clean))
    assert proc.returncode == 0


def test_cli_scan_tempfail_exit_2(tmp_path):
    """A scanner that cannot answer makes the verdict tempfail and the exit status 2."""
    conf = tmp_path / "c.toml"
    conf.write_text(f'[scanners.clamd]\naddress = "tcp:127.0.0.1:{closed_port()}"\nretries = 0\n'
                    '[policies.default.scan.engines.clamd]\n')
    msg = tmp_path / "m.eml"
    msg.write_bytes(CLEAN)
    proc = run_cli("-c", str(conf), str(msg))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert b"action: tempfail" in proc.stdout


def test_cli_scan_problems(tmp_path):
    """An unreadable file, an empty one, a bad config or an unknown policy: exit 2, a message, no traceback."""
    msg = tmp_path / "m.eml"
    msg.write_bytes(CLEAN)
    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"")
    bad = tmp_path / "bad.toml"
    bad.write_text('mode = "scan"\n[limits]\nmax_message_size = "big"\n')
    small = tmp_path / "small.toml"
    small.write_text("[limits]\nmax_message_size = 1024\n")
    big = tmp_path / "big.eml"
    big.write_bytes(CLEAN + b"x" * 2048)
    for args, words in [((str(tmp_path / "missing.eml"),), b"cannot read"),
                        ((str(tmp_path),), b"cannot read"),
                        ((str(empty),), b"is empty"),
                        (("-c", str(bad), str(msg)), b"limits.max_message_size"),
                        (("-c", str(tmp_path / "none.toml"), str(msg)), b"none.toml"),
                        (("--policy", "nope", str(msg)), b"no policy 'nope'"),
                        (("-c", str(small), str(big)), b"larger than limits.max_message_size")]:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert words in proc.stderr, (args, proc.stderr)
        assert b"Traceback" not in proc.stderr


# -- twistd

def test_twistd_scan_mode(tmp_path):
    """`twistd -n mppproxy --mode scan` answers SMTP with the verdict and HTTP with JSON, relaying nothing."""
    smtp_port, http_port = free_port(), free_port()
    conf = tmp_path / "scan.toml"
    conf.write_text(f'data_dir = "{tmp_path / "data"}"\n[tls]\nenabled = false\n'
                    f'[scanservice]\nhttp_listen = ["tcp:{http_port}:interface=127.0.0.1"]\n')
    log = tmp_path / "twistd.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "mppproxy", "--mode", "scan", "-c", str(conf),
         "--listen", f"tcp:{smtp_port}:interface=127.0.0.1"],
        cwd=tmp_path, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                for port in (smtp_port, http_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(up, 20, what="scan service ports")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=TIMEOUT) as s:
            s.ehlo("client.test")
            s.mail("a@example.org")
            s.rcpt("b@example.com")
            code, text = s.data(MALFORMED)
        assert code == 250 and b"refusal=malformed" in text, text
        c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=TIMEOUT)
        c.request("POST", "/scan", CLEAN)
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["action"] == "relay"
        c.request("GET", "/health")
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        c.close()
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert not (tmp_path / "data" / "maildir").exists()
