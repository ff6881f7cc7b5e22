"""Post-DATA scanning at the edge as a stage of its own (``mppproxy/edge/handler.py``
with ``mppproxy/scan/runtime.py``): the pre-DATA engine switch
(``policy.enabled``) does not turn scanning off; the default policy's
scanning applies when the engine is off.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.config.policy import PolicyConfig, PolicyEngineConfig
from mppproxy.config.scan import ScanConfig
from mppproxy.config.schema import ProxyConfig
from mppproxy.edge.handler import EdgeSession
from mppproxy.results import CheckResult, Disposition, HardAction
from mppproxy.scan.base import ScanInput, Scanner
from mppproxy.scan.engine import SlotSettings
from mppproxy.smtp.replies import Reply
from test_edge_handler import make_config, make_gateway, make_session, make_txn, temp_dir

MESSAGE = b"From: <sender@client.example>\r\nSubject: hello\r\n\r\nbody\r\n"


class CountingScanner(Scanner):
    """A fake engine: counts the messages it is given and answers ``result``."""

    name: ClassVar[str] = "counting"

    def __init__(self, result: CheckResult = CheckResult()):
        super().__init__(None, None)
        self.result = result
        self.seen: list[str] = []

    async def scan(self, message: ScanInput) -> CheckResult:
        self.seen.append(message.queue_id)
        return self.result


def engine_off_config(data_dir: str, **engine: Any) -> ProxyConfig:
    """The policy engine off, the default policy scanning."""
    return make_config(
        data_dir=data_dir, policy=replace(PolicyEngineConfig(), enabled=False, **engine),
        policies={"default": replace(PolicyConfig(), scan=replace(ScanConfig(), enabled=True))})


class ScanningWithoutPolicyEngineTests(SynchronousTestCase):

    def gateway(self, config: ProxyConfig, result: CheckResult = CheckResult()
                ) -> tuple[EdgeSession, CountingScanner]:
        gateway, ctx = make_gateway(config)
        self.assertIsNone(ctx.policy)
        scanning = ctx.scan.scanning["default"]
        assert scanning is not None
        fake = CountingScanner(result)
        scanning.engine.slots.append((fake, SlotSettings()))
        return gateway, fake

    def data_end(self, gateway: EdgeSession, trusted: bool = False) -> tuple[Reply, Any, dict[str, Any]]:
        txn = make_txn(MESSAGE)
        with capturedLogs() as events:
            reply = self.successResultOf(Deferred.fromCoroutine(
                gateway.on_data_end(make_session(trusted=trusted), txn)))
        [event] = [e for e in events if e.get("mpp_event") == "transaction"]
        return reply, txn, event

    def test_engine_off_still_scans(self) -> None:
        """With policy.enabled false the default policy's scanning runs: the fake engine sees the message once and the log line names the policy."""
        gateway, fake = self.gateway(engine_off_config(temp_dir(self)))
        reply, txn, event = self.data_end(gateway)
        self.assertEqual(reply.code, 250)
        self.assertEqual(fake.seen, [txn.id])
        self.assertEqual((event["action"], event["policy"]), (Disposition.DELIVER, "default"))
        self.assertIn("scan:counting", event["checks_passed"])

    def test_engine_off_scan_refusal_uses_the_templates(self) -> None:
        """With policy.enabled false a scanner's hard reject is refused with the reply template and logged as reject."""
        hit = CheckResult(reasons=("virus Eicar-Test",), action=HardAction.REJECT, template="virus",
                          template_vars=(("virus", "Eicar-Test"),))
        gateway, fake = self.gateway(engine_off_config(temp_dir(self)), hit)
        reply, txn, event = self.data_end(gateway)
        self.assertEqual(reply.code, 554)
        self.assertIn(txn.id, reply.text)
        self.assertEqual(event["action"], "reject")
        self.assertEqual(len(fake.seen), 1)

    def test_engine_off_trusted_client_skipped_like_the_engine_skips_it(self) -> None:
        """With policy.enabled false and policy.skip_trusted on, a trusted client's message is not scanned, as with the engine on."""
        gateway, fake = self.gateway(engine_off_config(temp_dir(self), skip_trusted=True))
        reply, _, event = self.data_end(gateway, trusted=True)
        self.assertEqual(reply.code, 250)
        self.assertEqual(fake.seen, [])
        self.assertIsNone(event["policy"])
