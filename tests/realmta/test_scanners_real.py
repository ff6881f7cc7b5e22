"""The scanner clients against real engines (issue #5): clamd with the local
signature database of ``scripts/services/start-clamd.sh`` (EICAR and the
custom clam.exe signatures, no download), spamd (GTUBE) and rspamd (GTUBE),
and the command scanner running clamdscan and a shell script.

Each engine comes from its start script (``.ci/run`` starts them all and
exports ``MPP_CLAMD_ADDRESS``, ``MPP_SPAMD_ADDRESS`` and ``MPP_RSPAMD_URL``;
when one is set the test only checks that it answers).  Otherwise the
fixture runs the script with its defaults and stops the engine again at the
end if it started it.  An engine that cannot be reached skips its tests, or
fails them with ``MPP_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest
from twisted.internet import defer, reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from .conftest import SCRIPT_TIMEOUT, REPO, service_unavailable, _tail
from mppproxy.results import CheckResult, HardAction
from mppproxy.scan.base import ScanInput, Scanner, ScannerUnavailable
from mppproxy.config.scanners import (ClamdConfig, CommandScannerConfig, RspamdConfig,
                                     ScanHealthConfig, SpamdConfig, parse_address)
from mppproxy.scan.health import HealthMonitor
from mppproxy.scan.scanners.clamd import ClamdScanner
from mppproxy.scan.scanners.command import CommandScanner
from mppproxy.scan.scanners.rspamd import RspamdScanner
from mppproxy.scan.scanners.spamd import SpamdScanner

reactor: Any = _reactor
SERVICES = REPO / "scripts" / "services"
TESTFILES = Path("/usr/share/clamav-testfiles")
CLAMD_DIR = Path(os.environ.get("CLAMD_DIR", "/tmp/clamd"))

# Built from halves so that this file is not itself a test virus.
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD"
         b"-ANTIVIRUS-TEST-FILE!$H+H*")
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD" b"-ANTI-UBE-TEST-EMAIL*C.34X"


def mail(body: bytes, subject: str = "hello", extra: bytes = b"") -> bytes:
    return (b"Received: from client.example (client.example [192.0.2.1])\r\n"
            b"\tby mx.example.com with ESMTP id Q123; Sun, 1 Dec 2024 10:00:00 +0000\r\n"
            b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.com>\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Date: Sun, 1 Dec 2024 10:00:00 +0000\r\n"
            b"Message-ID: <q123@example.org>\r\n" + extra + b"\r\n" + body)


HAM = mail(b"Hi Bob,\r\n\r\nthe meeting is moved to Tuesday at ten.\r\n\r\nAlice\r\n")
GTUBE_MAIL = mail(GTUBE + b"\r\n", subject="test")


def eicar_attachment() -> bytes:
    payload = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
    return mail(b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
                b"--b1\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Transfer-Encoding: base64\r\n"
                b"Content-Disposition: attachment; filename=\"x.com\"\r\n\r\n" + payload +
                b"--b1--\r\n", extra=b"MIME-Version: 1.0\r\n"
                b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n")


def scan_input(data: bytes, **kw: Any) -> ScanInput:
    return ScanInput(chunks=lambda: [data], size=len(data), client_ip="127.0.0.1",
                     helo="client.example", sender="alice@example.org",
                     recipients=("bob@example.com",), queue_id="Q123", **kw)


# -- engines ----------------------------------------------------------------------------

@dataclass
class Engine:
    name: str
    address: str  # "tcp:HOST:PORT" for clamd and spamd, the URL for rspamd

    def answers(self) -> bool:
        """Something accepts connections at the engine's address."""
        if self.address.startswith("http://"):
            url = urlsplit(self.address)
            kind, host, port = "tcp", url.hostname or "", url.port or 80
        else:
            kind, host, port = parse_address(self.address)
        try:
            if kind == "unix":
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(host)
            else:
                socket.create_connection((host, port), timeout=2).close()
        except OSError:
            return False
        return True


def _engine(name: str, script: str, env_key: str, default: str) -> Iterator[Engine]:
    given = os.environ.get(env_key)
    engine = Engine(name, given or default)
    if given:
        if not engine.answers():
            service_unavailable(f"{name} at {given} ({env_key}) does not answer")
        yield engine
        return
    path = SERVICES / script
    if os.geteuid() != 0 or shutil.which("bash") is None or not path.is_file():
        service_unavailable(f"{name}: {script} needs root and bash")
    was_running = engine.answers()
    try:
        r = subprocess.run(["bash", str(path)], capture_output=True, text=True,
                           timeout=SCRIPT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        service_unavailable(f"{script} did not finish in {SCRIPT_TIMEOUT:.0f} s")
    if r.returncode != 0 or not engine.answers():
        service_unavailable(f"{script} exited {r.returncode}:\n{_tail(r.stdout + r.stderr)}")
    yield engine
    if not was_running:
        subprocess.run(["bash", str(path), "stop"], capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="session")
def clamd_engine() -> Iterator[Engine]:
    yield from _engine("clamd", "start-clamd.sh", "MPP_CLAMD_ADDRESS", "tcp:127.0.0.1:3310")


@pytest.fixture(scope="session")
def spamd_engine() -> Iterator[Engine]:
    yield from _engine("spamd", "start-spamd.sh", "MPP_SPAMD_ADDRESS", "tcp:127.0.0.1:783")


@pytest.fixture(scope="session")
def rspamd_engine() -> Iterator[Engine]:
    yield from _engine("rspamd", "start-rspamd.sh", "MPP_RSPAMD_URL", "http://127.0.0.1:11333")


@pytest.fixture(scope="class")
def _clamd(request: Any, clamd_engine: Engine) -> None:
    request.cls.engine = clamd_engine


@pytest.fixture(scope="class")
def _spamd(request: Any, spamd_engine: Engine) -> None:
    request.cls.engine = spamd_engine


@pytest.fixture(scope="class")
def _rspamd(request: Any, rspamd_engine: Engine) -> None:
    request.cls.engine = rspamd_engine


class RealCase(unittest.TestCase):
    timeout = 60
    engine: Engine

    async def timed(self, scanner: Scanner, data: bytes, **kw: Any) -> tuple[CheckResult, float]:
        start = time.perf_counter()
        result = await scanner.scan(scan_input(data, **kw))
        return result, time.perf_counter() - start


# -- clamd -------------------------------------------------------------------------------

@pytest.mark.usefixtures("_clamd")
class ClamdRealTests(RealCase):

    def scanner(self, **kw: Any) -> ClamdScanner:
        return ClamdScanner(ClamdConfig(address=self.engine.address, **kw), reactor)

    async def test_eicar_found(self) -> None:
        """The EICAR file is rejected as a virus named by the local signature."""
        result, _ = await self.timed(self.scanner(), EICAR)
        self.assertEqual(result.action, HardAction.REJECT)
        self.assertTrue(result.reasons[0].startswith("virus Test.EICAR"), result.reasons)
        self.assertTrue(result.reasons[0].endswith(".UNOFFICIAL"), result.reasons)

    async def test_eicar_attached_to_a_mail_found(self) -> None:
        """EICAR as a base64 attachment, sent in small chunks, is found (clamd decodes MIME)."""
        result, _ = await self.timed(self.scanner(chunk_size=512), eicar_attachment())
        self.assertEqual(result.action, HardAction.REJECT)
        self.assertIn("Test.EICAR", result.reasons[0])

    async def test_custom_signature_found(self) -> None:
        """clamav-testfiles' clam.exe, bare and inside its test mail, hits the custom signature."""
        if not (TESTFILES / "clam.exe").is_file():
            service_unavailable("clamav-testfiles is not installed")
        for name in ("clam.exe", "clam.mail", "clam.zip"):
            data = (TESTFILES / name).read_bytes()
            result, _ = await self.timed(self.scanner(), data)
            self.assertEqual(result.action, HardAction.REJECT, name)
            self.assertIn("Test.ClamExe", result.reasons[0], name)

    async def test_clean_mail_and_gtube_pass(self) -> None:
        """Ham and GTUBE mail are no virus."""
        for data in (HAM, GTUBE_MAIL):
            result, _ = await self.timed(self.scanner(), data)
            self.assertEqual(result, CheckResult())

    async def test_large_clean_message(self) -> None:
        """A 2 MB message streams through in chunks and comes back clean."""
        big = mail(b"".join(b"line %07d of a long and boring report\r\n" % i
                            for i in range(50000)))
        result, elapsed = await self.timed(self.scanner(), big)
        self.assertEqual(result, CheckResult())
        self.assertLess(elapsed, 20)

    async def test_stream_over_clamd_limit(self) -> None:
        """A stream past clamd's StreamMaxLength (50M in start-clamd.sh) gets its size-limit
        answer while we are still sending: a clear failure, not retried, not clean."""
        block = b"x" * (1024 * 1024)
        big = ScanInput(chunks=lambda: [block] * 51, size=51 * len(block))
        scanner = self.scanner(max_size=80 * 1024 * 1024, retries=2)
        with self.assertRaises(ScannerUnavailable) as info:
            await scanner.scan(big)
        self.assertIn("INSTREAM size limit exceeded", info.exception.reason)
        self.assertIn("StreamMaxLength", info.exception.reason)

    async def test_version(self) -> None:
        """VERSION is parsed: ClamAV's version (no signature date with only local signatures)."""
        health = await self.scanner().health()
        self.assertTrue(health.up)
        self.assertRegex(health.version, r"^ClamAV \d+\.\d+")

    async def test_concurrent_scans_within_the_bound(self) -> None:
        """Twenty scans at once through three connections all get their answer."""
        scanner = self.scanner(max_connections=3)
        data = [EICAR if i % 2 else HAM for i in range(20)]
        results = await defer.gatherResults(
            [Deferred.fromCoroutine(scanner.scan(scan_input(d))) for d in data])
        self.assertEqual([r.action for r in results],
                         [HardAction.REJECT if i % 2 else None for i in range(20)])


# -- spamd -------------------------------------------------------------------------------

@pytest.mark.usefixtures("_spamd")
class SpamdRealTests(RealCase):

    def scanner(self, **kw: Any) -> SpamdScanner:
        return SpamdScanner(SpamdConfig(address=self.engine.address, **kw), reactor)

    async def test_gtube_is_spam_with_rule_names(self) -> None:
        """GTUBE scores 1000 or more (times the factor) and names the GTUBE rule."""
        result, _ = await self.timed(self.scanner(score_factor=0.01), GTUBE_MAIL)
        self.assertGreaterEqual(result.score, 10.0)
        self.assertIn("GTUBE", result.reasons)
        variables = dict(result.template_vars)
        self.assertTrue(variables["spamd_spam"])
        self.assertGreaterEqual(variables["spamd_score"], 1000)
        self.assertIsNone(result.action)

    async def test_report_gives_gtube_points(self) -> None:
        """REPORT lists GTUBE with its 1000 points."""
        result, _ = await self.timed(self.scanner(command="REPORT"), GTUBE_MAIL)
        self.assertIn(("GTUBE", 1000.0), dict(result.template_vars)["spamd_points"])

    async def test_ham_is_not_spam(self) -> None:
        """A plain, complete mail stays under SpamAssassin's threshold and is not GTUBE."""
        result, _ = await self.timed(self.scanner(), HAM)
        variables = dict(result.template_vars)
        self.assertFalse(variables["spamd_spam"])
        self.assertLess(result.score, 5.0)
        self.assertNotIn("GTUBE", result.reasons)

    async def test_message_without_final_newline(self) -> None:
        """A message whose last line has no CRLF is answered (the request is half-closed)."""
        result, elapsed = await self.timed(self.scanner(timeout=10), GTUBE_MAIL.rstrip(b"\r\n"))
        self.assertIn("GTUBE", result.reasons)
        self.assertLess(elapsed, 5)

    async def test_ping(self) -> None:
        """PING answers: up, with spamd's protocol version."""
        health = await self.scanner().health()
        self.assertTrue(health.up)
        self.assertRegex(health.version, r"^SPAMD/\d+\.\d+$")


# -- rspamd ------------------------------------------------------------------------------

@pytest.mark.usefixtures("_rspamd")
class RspamdRealTests(RealCase):

    def scanner(self, **kw: Any) -> RspamdScanner:
        return RspamdScanner(RspamdConfig(url=self.engine.address, **kw), reactor)

    async def test_gtube(self) -> None:
        """GTUBE: rspamd's pre-result, action reject, symbol GTUBE as the reason."""
        result, _ = await self.timed(self.scanner(score_factor=2.0), GTUBE_MAIL)
        variables = dict(result.template_vars)
        self.assertEqual(variables["rspamd_action"], "reject")
        self.assertIn("GTUBE", result.reasons)
        self.assertEqual(result.score, 2.0 * variables["rspamd_score"])
        self.assertGreater(result.score, 0)

    async def test_ham(self) -> None:
        """A plain mail gets "no action" and a score under the reject score."""
        result, _ = await self.timed(self.scanner(), HAM)
        variables = dict(result.template_vars)
        self.assertEqual(variables["rspamd_action"], "no action")
        self.assertLess(result.score, variables["rspamd_required_score"])
        self.assertNotIn("GTUBE", result.reasons)

    async def test_ping_and_version(self) -> None:
        """/ping answers pong; the version comes from the Server header."""
        health = await self.scanner().health()
        self.assertTrue(health.up)
        self.assertRegex(health.version, r"^rspamd/\d")


# -- the command scanner -------------------------------------------------------------------

@pytest.mark.usefixtures("_clamd")
class CommandRealTests(RealCase):

    def clamdscan(self) -> CommandScanner:
        conf = CLAMD_DIR / "clamd.conf"
        if shutil.which("clamdscan") is None or not conf.is_file():
            service_unavailable(f"clamdscan or {conf} missing")
        return CommandScanner(CommandScannerConfig(
            command=("clamdscan", f"--config-file={conf}", "--stream", "--no-summary", "{file}"),
            name="clamdscan", infected_pattern=r": (?P<name>\S+) FOUND$", timeout=30), reactor)

    async def test_clamdscan_finds_eicar_and_passes_ham(self) -> None:
        """clamdscan as a command scanner: EICAR rejected with its name, ham clean."""
        scanner = self.clamdscan()
        result, _ = await self.timed(scanner, EICAR)
        self.assertEqual(result.action, HardAction.REJECT)
        self.assertIn("Test.EICAR", result.reasons[0])
        result, _ = await self.timed(scanner, HAM)
        self.assertEqual(result, CheckResult())


class ScriptRealTests(RealCase):
    """Real programs that need no engine."""

    async def test_clamdscan_error_is_unavailable(self) -> None:
        """clamdscan that cannot reach its clamd exits 2: a scanner failure, not clean."""
        if shutil.which("clamdscan") is None:
            service_unavailable("clamdscan missing")
        d = Path(tempfile.mkdtemp(prefix="mpp-test-clamdscan-"))
        self.addCleanup(shutil.rmtree, d, True)
        (d / "clamd.conf").write_text("TCPSocket 1\nTCPAddr 127.0.0.1\n")
        scanner = CommandScanner(CommandScannerConfig(
            command=("clamdscan", f"--config-file={d / 'clamd.conf'}", "--stream",
                     "--no-summary", "{file}"), infected_pattern=r": (?P<name>\S+) FOUND$"),
            reactor)
        with self.assertRaises(ScannerUnavailable) as info:
            await scanner.scan(scan_input(HAM))
        self.assertIn("exited 2", info.exception.reason)

    async def test_shell_script_from_a_spool_file(self) -> None:
        """A shell script reads the spooled message by path; its pattern names the find."""
        d = Path(tempfile.mkdtemp(prefix="mpp-test-cmd-"))
        self.addCleanup(shutil.rmtree, d, True)
        script = d / "gtube.sh"
        script.write_text('#!/bin/sh\ngrep -q "GTUBE-STANDARD" "$1" && echo "FOUND GTUBE" '
                          '&& exit 0\nexit 0\n')
        script.chmod(0o755)
        spool = d / "spool.eml"
        spool.write_bytes(GTUBE_MAIL)
        scanner = CommandScanner(CommandScannerConfig(
            command=(str(script), "{file}"), infected_pattern=r"FOUND (\w+)"), reactor)
        result, _ = await self.timed(scanner, GTUBE_MAIL, path=str(spool))
        self.assertEqual(result.reasons, ("virus GTUBE",))
        result, _ = await self.timed(scanner, HAM)
        self.assertEqual(result, CheckResult())


# -- health of all engines at once --------------------------------------------------------

@pytest.mark.usefixtures("_clamd")
class HealthRealTests(RealCase):

    async def test_monitor_sees_every_engine_up(self) -> None:
        """The monitor's first round finds clamd, spamd and rspamd up, with their versions."""
        request = self._pytest_request  # type: ignore[attr-defined]
        spamd = request.getfixturevalue("spamd_engine")
        rspamd = request.getfixturevalue("rspamd_engine")
        scanners = [ClamdScanner(ClamdConfig(address=self.engine.address), reactor),
                    SpamdScanner(SpamdConfig(address=spamd.address), reactor),
                    RspamdScanner(RspamdConfig(url=rspamd.address), reactor)]
        monitor = HealthMonitor(scanners, reactor, ScanHealthConfig(check_interval=0))
        await monitor.start()
        self.assertEqual({n: h.up for n, h in monitor.status.items()},
                         {"clamd": True, "spamd": True, "rspamd": True})
        self.assertTrue(all(h.version for h in monitor.status.values()))


@pytest.fixture(autouse=True)
def _keep_request(request: Any) -> None:
    if request.instance is not None:
        request.instance._pytest_request = request


# -- the whole proxy with real engines -----------------------------------------------------

def test_proxy_refuses_virus_and_spam_and_relays_ham(clamd_engine: Engine, spamd_engine: Engine,
                                                    proxy_process: Any, tmp_path: Any) -> None:
    """``twistd mppproxy`` with clamd and spamd in its default policy: EICAR is
    refused naming the signature, GTUBE is refused by score, ham is delivered."""
    import smtplib

    from helpers import free_port

    port = free_port()
    data_dir = tmp_path / "data"
    config = tmp_path / "scan.toml"
    config.write_text(f"""
listen = ["tcp:{port}:interface=127.0.0.1"]
data_dir = "{data_dir}"
relay_domains = ["example.com"]
trusted_networks = ["10.255.255.0/24"]

[scanners.clamd]
address = "{clamd_engine.address}"

[scanners.spamd]
address = "{spamd_engine.address}"
timeout = 60

[policies.default.scan]
enabled = true

[policies.default.scan.engines.clamd]

[policies.default.scan.engines.spamd]
""")
    proxy = proxy_process(["--config", str(config)], port, name="scanproxy")

    def send(message: bytes) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=90) as s:
            s.ehlo("client.test")
            s.mail("s@client.test")
            s.rcpt("u@example.com")
            return s.data(message)

    try:
        code, text = send(eicar_attachment())
        assert code == 554 and text.startswith(b"5.7.1 Message refused: virus found"), text
        assert b"EICAR" in text.upper()
        code, text = send(GTUBE_MAIL)
        assert code == 550 and text.startswith(b"5.7.1 "), text
        code, text = send(mail(b"Hello Bob,\r\nlunch on Friday at noon?\r\nAlice\r\n",
                               subject="lunch"))
        assert code == 250, text
        delivered = list((data_dir / "maildir" / "example.com" / "u" / "new").iterdir())
        assert len(delivered) == 1
    finally:
        proxy.stop()
