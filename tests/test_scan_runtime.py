"""The scan stage's life (``mppproxy/scan/runtime.py``): a stop (a reload
stops the old stage, a shutdown the current one) closes what the scanners
keep open while idle, so no pooled rspamd connection outlives its stage."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from fakes_rspamd import Answer, FakeRspamd, start_rspamd
from mppproxy.config.load import from_mapping
from mppproxy.scan.base import ScanInput
from mppproxy.scan.runtime import ScanStage
from mppproxy.scanservice.core import ScanRequest, ScanRuntime

reactor: Any = _reactor

MESSAGE = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
HAM = json.dumps({"is_skipped": False, "score": 1.0, "required_score": 15.0,
                  "action": "no action", "symbols": {"R_A": {"score": 1.0}}}).encode()


def config(fake: FakeRspamd, data_dir: str) -> Any:
    return from_mapping({
        "data_dir": data_dir,
        "scanners": {"rspamd": {"url": fake.url, "timeout": 2.0, "connect_timeout": 1.0}},
        "policies": {"default": {"scan": {"enabled": True, "engines": {"rspamd": {}}}}}})


async def settle(fake: FakeRspamd) -> None:
    """Until the fake has seen every connection closed (a few reactor turns), at most 1 s."""
    for _ in range(100):
        if not fake.open:
            return
        await deferLater(reactor, 0.01, lambda: None)


class StopClosesIdleConnectionsTests(unittest.TestCase):

    async def test_stage_stop_closes_pooled_rspamd_connections(self) -> None:
        """A connection rspamd keeps open after a scan stays open while the stage lives and is closed by its stop."""
        fake = start_rspamd(self, [Answer(HAM)])
        stage = ScanStage(config(fake, self.mktemp()), reactor)
        stage.start()
        rspamd = stage.engines["rspamd"]
        result = await rspamd.scan(ScanInput(chunks=lambda: [MESSAGE], size=len(MESSAGE)))
        self.assertEqual(result.score, 1.0)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(fake.open)  # kept alive in the pool (scan and health probe), idle
        await stage.stop()
        await settle(fake)
        self.assertEqual(fake.open, [])
        self.assertIsNone(stage.health)

    async def test_scan_mode_stop_closes_them_too(self) -> None:
        """Scan mode's runtime (stopped by a reload or a shutdown) closes its rspamd pool when it stops."""
        fake = start_rspamd(self, [Answer(HAM)])
        runtime = ScanRuntime(config(fake, self.mktemp()), reactor)
        outcome = await runtime.scan(ScanRequest.of_bytes(MESSAGE))
        self.assertEqual(outcome.scanners["rspamd"].score, 1.0)
        self.assertEqual(len(fake.open), 1)
        runtime.stop()
        await settle(fake)
        self.assertEqual(fake.open, [])
