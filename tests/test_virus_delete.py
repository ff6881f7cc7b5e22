"""The virus action ``delete`` and per-engine actions through the proxy on
loopback (issue 14): client -> proxy -> fake backend, a real SMTP sink that
records every message it gets.

The virus comes from the EICAR test string, found by the real clamd client
talking to the content-aware fake clamd of test_scan_equivalence (or a real
clamd when MPP_CLAMD_ADDRESS names one, as there).  The spam engine is a real
persistent command engine (a Python program the test writes).
"""
from __future__ import annotations

import email
import email.policy
import shutil
import sys
import tempfile
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from twisted.internet import reactor as _reactor
from twisted.logger import capturedLogs, formatEvent

from fakes_backend import FakeBackend
from fakes_scanners import clamd_complete
from loopback import proxy_config, start_proxy
from mppproxy.config.load import from_mapping
from test_policy_loopback import PolicyCase
from test_scan_equivalence import CLAMD, EICAR, _attached, _clamd_answer, _plain
from test_scan_fixes import ContentEngine

reactor: Any = _reactor

ADMIN = "virus-admin@example.com"
SPAM_ENGINE = '''
import json, sys
inp = sys.stdin.buffer
while True:
    line = inp.readline()
    if not line:
        break
    data = inp.read(json.loads(line)["size"])
    score = 95 if b"spam-token" in data else 0
    print(json.dumps({"verdict": "spam" if score else "clean", "score": score,
                      "name": "CM_TEST"}), flush=True)
'''


class DeleteCase(PolicyCase):

    def clamd(self) -> str:
        if CLAMD:
            return CLAMD
        engine = ContentEngine(clamd_complete, _clamd_answer)
        engine.port = reactor.listenTCP(0, engine, interface="127.0.0.1")
        self.addCleanup(engine.port.stopListening)
        return engine.address

    def spam_engine(self) -> str:
        base = Path(tempfile.mkdtemp(prefix="mpp-test-delete-"))
        self.addCleanup(shutil.rmtree, base, True)
        path = base / "cm.py"
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(SPAM_ENGINE))
        path.chmod(0o755)
        return str(path)

    def start_with(self, scan: dict[str, Any], spam: bool = False,
                   fake: Optional[FakeBackend] = None) -> tuple[FakeBackend, Any]:
        fake = fake or FakeBackend()
        port = fake.start_for(self)
        scanners: dict[str, Any] = {"clamd": {"address": self.clamd(), "retries": 0,
                                              "timeout": 10.0}}
        engines: dict[str, Any] = {"clamd": {}}
        if spam:
            scanners["command"] = [{"name": "cm", "command": [self.spam_engine()],
                                    "persistent": True, "output": "json", "timeout": 10.0}]
            engines["cm"] = {"weight": 0}
        data = {"scanners": scanners, "policies": {"default": {
            "scan": {"enabled": True, "engines": engines, **scan},
            "scoring": {"tag": 5, "reject": 15}}}}
        loaded = from_mapping(data, "test")
        config = proxy_config(self.mktemp(), port, policy=data,
                              relay_domains=("example.com",))
        return fake, start_proxy(self, replace(config, scanners=loaded.scanners))


class VirusDeleteTests(DeleteCase):

    async def test_eicar_is_deleted_with_250_and_notices_are_delivered(self) -> None:
        """EICAR under virus_action delete: the client hears 250, nothing of it is relayed, the recipient and the administrator each get a notice (MAIL FROM:<>) naming the virus and the reference, and the log says DELETED and why."""
        fake, proxy = self.start_with({"virus_action": "delete", "delete_notice": {
            "recipients": True, "admins": [ADMIN], "sender": "filter@example.com"}})
        infected = _attached("invoice due", "eicar.txt", EICAR, "text/plain")
        with capturedLogs() as events:
            out = await self.run_session(proxy.port, ("a@example.com",), message=infected)
        code, text = out["data"]
        self.assertEqual(code, 250, text)
        self.assertEqual(len(fake.messages), 2, [m.recipients for m in fake.messages])
        for sent in fake.messages:
            self.assertEqual(sent.sender, b"")
            # The notice names the virus (a real clamd's name has "EICAR" in
            # it), never the infected content.
            self.assertNotIn(b"X5O!P%@AP", sent.data)
            self.assertNotIn(b"invoice due\r\n\r\n", sent.data)
        by_rcpt = {m.recipients[0]: m for m in fake.messages}
        self.assertEqual(set(by_rcpt), {b"a@example.com", ADMIN.encode()})
        notice = email.message_from_bytes(by_rcpt[b"a@example.com"].data,
                                          policy=email.policy.default)
        body = notice.get_content()
        [tx] = [e for e in events if e.get("mpp_event") == "transaction"]
        self.assertEqual(tx["action"], "delete")
        self.assertIn("DELETED", formatEvent(tx))
        self.assertIn("virus", tx["reason"])
        self.assertEqual(tx["reply_code"], 250)
        self.assertIn(tx["queue_id"], body)
        self.assertIn("Subject:         invoice due", body)
        self.assertIn("Message deleted: virus found", str(notice["Subject"]))
        self.assertEqual(str(notice["From"]), "filter@example.com")
        self.assertEqual(str(notice["Auto-Submitted"]), "auto-generated")
        self.assertIn("A message addressed to you", body)
        admin_body = email.message_from_bytes(by_rcpt[ADMIN.encode()].data,
                                              policy=email.policy.default).get_content()
        self.assertIn("deleted a message for a@example.com", admin_body)
        if not CLAMD:
            self.assertIn("Eicar-Signature", body)
        warnings = [formatEvent(e) for e in events if "DELETED (virus)" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)
        self.assertIn("sent to <a@example.com>", warnings[0])

    async def test_clean_message_is_relayed_not_deleted(self) -> None:
        """Under virus_action delete a clean message is relayed as ever and no notice goes out."""
        fake, proxy = self.start_with({"virus_action": "delete", "delete_notice": {
            "recipients": True, "admins": [ADMIN]}})
        out = await self.run_session(proxy.port, ("a@example.com",), message=_plain("hello"))
        self.assertEqual(out["data"][0], 250)
        [relayed] = fake.messages
        self.assertEqual(relayed.recipients, [b"a@example.com"])
        self.assertIn(b"Subject: hello", relayed.data)

    async def test_delete_without_notices_and_with_a_refusing_backend(self) -> None:
        """Without notices the deleted message reaches nobody; a backend refusing the notice changes nothing for the client (250) and the warning says why."""
        fake, proxy = self.start_with({"virus_action": "delete"})
        infected = _plain("hi", EICAR)
        out = await self.run_session(proxy.port, ("a@example.com",), message=infected)
        self.assertEqual(out["data"][0], 250)
        self.assertEqual(fake.messages, [])
        refusing = FakeBackend(replies={"RCPT": lambda conn, line: (
            "550 5.1.1 no such user" if ADMIN.encode() in line else None)})
        fake2, proxy2 = self.start_with({"virus_action": "delete", "delete_notice": {
            "admins": [ADMIN]}}, fake=refusing)
        with capturedLogs() as events:
            out = await self.run_session(proxy2.port, ("a@example.com",), message=infected)
        self.assertEqual(out["data"][0], 250)
        self.assertEqual([m for m in fake2.messages if m.accepted], [])
        [warning] = [formatEvent(e) for e in events if "DELETED (virus)" in formatEvent(e)]
        self.assertIn(f"not sent to <{ADMIN}>: RCPT refused: 550", warning)


class EngineActionLoopbackTests(DeleteCase):

    async def test_spam_engine_rule_refuses_and_weight_zero_keeps_it_out_of_the_sum(self) -> None:
        """A persistent spam engine with weight 0 counts only through its rule: spam >= 90 is refused (550, the score template); a clean answer is relayed without its score."""
        fake, proxy = self.start_with({"engine_actions": [
            {"engine": "cm", "verdict": "spam", "min_score": 90, "action": "reject"}]},
            spam=True)
        with capturedLogs() as events:
            out = await self.run_session(proxy.port, ("a@example.com",),
                                         message=_plain("spam-token offer"))
        code, text = out["data"]
        self.assertEqual(code, 550, text)
        self.assertIn(b"likely spam", text)
        self.assertEqual(fake.messages, [])
        [tx] = [e for e in events if e.get("mpp_event") == "transaction"]
        self.assertIn("engine_actions: cm said spam (95): reject", tx["reason"] or formatEvent(tx))
        out = await self.run_session(proxy.port, ("a@example.com",), message=_plain("hello"))
        self.assertEqual(out["data"][0], 250)
        self.assertEqual(len(fake.messages), 1)

    async def test_clamd_rule_deletes_while_virus_action_rejects(self) -> None:
        """virus_action reject, but a rule for clamd's virus says delete: the rule wins for that engine (250, nothing relayed)."""
        fake, proxy = self.start_with({"virus_action": "reject", "engine_actions": [
            {"engine": "clamd", "verdict": "virus", "action": "delete"}]})
        out = await self.run_session(proxy.port, ("a@example.com",), message=_plain("x", EICAR))
        self.assertEqual(out["data"][0], 250)
        self.assertEqual(fake.messages, [])

