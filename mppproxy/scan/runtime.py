"""The scan stage of one configuration: the engines of ``[scanners]``, each
policy's scanning, and the health monitor that watches the engines.

Stage: post-DATA scanning (docs/design.md, "The stages of one session").
It is built beside the policy engine, never by it: the proxy and scan
mode compose it, so turning the pre-DATA engine off (``policy.enabled =
false``) leaves scanning as ``[policies.NAME.scan]`` says.  Scan mode
builds it with ``always = True``: there every policy scans, since scanning
is the whole point of asking.

Construction does no I/O (docs/design.md); ``start`` begins watching the
engines, ``stop`` ends it.  A reload builds a new one and stops the old.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from twisted.internet.base import DelayedCall

from mppproxy.config.schema import ProxyConfig
from mppproxy.scan import factory
from mppproxy.scan.base import Scanner
from mppproxy.scan.factory import PolicyScanning
from mppproxy.scan.health import HealthMonitor


class ScanStage:
    """``scanning[policy]``: the policy's ``PolicyScanning``, or None where
    its ``scan.enabled`` is false (never None with ``always``)."""

    def __init__(self, config: ProxyConfig, reactor: Any, always: bool = False):
        self.config = config
        self.reactor = reactor
        # One scanner per engine, shared by every policy so each engine's
        # connection bound holds across policies.
        self.engines: dict[str, Scanner] = factory.build_engines(config, reactor)
        self.scanning: dict[str, Optional[PolicyScanning]] = {
            name: factory.build(replace(p.scan, enabled=True) if always else p.scan,
                                reactor, self.engines)
            for name, p in config.policies.items()}
        self.health: Optional[HealthMonitor] = None
        self._starting: Optional[DelayedCall] = None

    def start_soon(self) -> None:
        """``start`` on the next reactor turn: a service that builds the
        stage while starting or reloading does no I/O in doing so."""
        self._starting = self.reactor.callLater(0, self._start_now)

    def _start_now(self) -> None:
        self._starting = None
        self.start()

    def start(self) -> None:
        """Watch the engines of ``[scanners]``: version and signature age at
        start, then down/back lines (``scan/health.py``)."""
        if self.engines and self.health is None:
            self.health = HealthMonitor(list(self.engines.values()), self.reactor,
                                        self.config.scanners.health)
            self.health.start()

    def stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        if self.health is not None:
            self.health.stop()
            self.health = None
