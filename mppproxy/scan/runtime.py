"""The scan stage of one configuration: the engines of ``[scanners]``, each
policy's scanning, and the health monitor that watches the engines.

Stage: post-DATA scanning (docs/design.md, "The stages of one session").
It is built beside the policy engine, never by it: the proxy and scan
mode compose it, so turning the pre-DATA engine off (``policy.enabled =
false``) leaves scanning as ``[policies.NAME.scan]`` says.  Scan mode
builds it with ``always = True``: there every policy scans, since scanning
is the whole point of asking.

Construction does no I/O (docs/design.md); ``start`` begins watching the
engines, ``stop`` ends it and closes the scanners' idle connections.  A
reload builds a new one and stops the old.
"""
from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any, Optional

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.python.failure import Failure

from mppproxy.config.schema import ProxyConfig
from mppproxy.dns.nameservers import nameservers
from mppproxy.dns.resolver import Resolver
from mppproxy.logsetup import Logger
from mppproxy.scan import factory
from mppproxy.scan.base import Scanner
from mppproxy.scan.factory import PolicyScanning
from mppproxy.scan.health import HealthMonitor

log = Logger()


class ScanStage:
    """``scanning[policy]``: the policy's ``PolicyScanning``, or None where
    its ``scan.enabled`` is false (never None with ``always``)."""

    def __init__(self, config: ProxyConfig, reactor: Any, always: bool = False):
        self.config = config
        self.reactor = reactor
        # One scanner per engine, shared by every policy so each engine's
        # connection bound holds across policies.
        self.engines: dict[str, Scanner] = factory.build_engines(config, reactor)
        scans = {name: replace(p.scan, enabled=True) if always else p.scan
                 for name, p in config.policies.items()}
        # DKIM and DMARC ask DNS: the stage's own resolver (its cache lives
        # as long as the stage), made only when a policy authenticates.
        self.resolver: Optional[Resolver] = None
        auth = None
        if any(factory.wants_authentication(s) for s in scans.values()):
            self.resolver = Resolver(reactor, nameservers(config.dns), timeout=config.dns.timeout)
            auth = factory.AuthServices(self.resolver,
                                        config.smtp.hostname or socket.getfqdn())
        self.scanning: dict[str, Optional[PolicyScanning]] = {
            name: factory.build(scan, reactor, self.engines, auth)
            for name, scan in scans.items()}
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

    def stop(self) -> Deferred[None]:
        """Stop watching the engines and close what the scanners keep open
        while idle (rspamd's pooled HTTP connections, a GeoIP database), so a
        reload or a stop leaves no idle connection behind.  Scans still in
        flight on this stage finish: clamd and spamd use one connection per
        request, a command its own process, and a closed resource is opened
        again on use.  The Deferred fires when the idle connections are
        closed; it never fails (a failure to close is logged)."""
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        if self.health is not None:
            self.health.stop()
            self.health = None
        closing = []
        for scanner in self._scanners():
            close = getattr(scanner, "close", None)
            if close is None:
                continue
            d = maybeDeferred(close)
            d.addErrback(_log_close_failure, scanner.name)
            closing.append(d)
        if self.resolver is not None:
            closing.append(self.resolver.close())
            self.resolver = None
        done: Deferred[None] = gatherResults(closing).addCallback(lambda _: None)
        return done

    def _scanners(self) -> list[Scanner]:
        """Every scanner of the stage once: the engines (shared by the
        policies), then each policy's own (MIME check, attachments, header
        rules)."""
        seen: dict[int, Scanner] = {id(s): s for s in self.engines.values()}
        for built in self.scanning.values():
            if built is not None:
                for scanner, _ in built.engine.slots:
                    seen.setdefault(id(scanner), scanner)
        return list(seen.values())


def _log_close_failure(failure: Failure, name: str) -> None:
    log.failure("closing scanner {scanner} failed", failure, scanner=name)
