"""What a process knows now, written into its gauges every
``metrics.refresh`` seconds (and by the main process before each scrape).

Composition floor.  Open sessions, backend connections and health, engine
health and signature age, DNS-list health and suspension live in the
memory of each process (``smtp/server.py``'s connection counter,
``relay/pool.py``, ``scan/health.py``, ``policy/dnshealth.py``,
``policy/dnsguard.py``); nothing on the hot path writes them.  Sessions
accepted and backend connections opened are counters kept by those
objects: their growth since the last refresh is added here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet.task import LoopingCall

from mppproxy.logsetup import Logger
from mppproxy.metrics.registry import Metrics
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.relay.pool import BackendPool
from mppproxy.scan.runtime import ScanStage

log = Logger()


@dataclass(frozen=True)
class Sources:
    """Where a process's state is found now (a reload replaces the pool,
    the scan stage and sometimes the policy runtime)."""

    # (open now, accepted since the start)
    sessions: Callable[[], tuple[int, int]]
    pool: Callable[[], Optional[BackendPool]]
    scan: Callable[[], Optional[ScanStage]]
    policy: Callable[[], Optional[PolicyRuntime]]


class ProcessState:
    """Writes one process's gauges (``refresh``), every ``interval``
    seconds once ``start``ed."""

    def __init__(self, reactor: Any, metrics: Metrics, sources: Sources, interval: float,
                 wall: Callable[[], float] = time.time):
        self.reactor = reactor
        self.metrics = metrics
        self.sources = sources
        self.interval = interval
        self.wall = wall
        self._sessions_seen = 0
        self._pool: Optional[BackendPool] = None
        self._pool_opened = 0
        self._pool_failures = 0
        self._loop: Optional[LoopingCall] = None

    def start(self) -> None:
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        d = self._loop.start(self.interval, now=True)
        d.addErrback(lambda f: log.failure("metrics: the state refresh stopped", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def refresh(self) -> None:
        """Write what this process knows now (on the reactor thread: it
        reads objects the reactor changes)."""
        m = self.metrics
        open_now, accepted = self.sources.sessions()
        m.sessions_open.set(open_now)
        if accepted > self._sessions_seen:
            m.sessions.inc(accepted - self._sessions_seen)
        self._sessions_seen = accepted
        self._backend(self.sources.pool())
        self._engines(self.sources.scan())
        self._dns_lists(self.sources.policy())

    def _backend(self, pool: Optional[BackendPool]) -> None:
        m = self.metrics
        if pool is None:
            return
        if pool is not self._pool:
            # A reload made a new pool: its counts start at 0.
            self._pool, self._pool_opened, self._pool_failures = pool, 0, 0
        idle = pool.idle
        m.backend_connections.labels("idle").set(idle)
        m.backend_connections.labels("busy").set(max(0, pool.open - idle))
        if pool.opened > self._pool_opened:
            m.backend_connects.inc(pool.opened - self._pool_opened)
            self._pool_opened = pool.opened
        if pool.connect_failures > self._pool_failures:
            m.backend_connect_failures.inc(pool.connect_failures - self._pool_failures)
            self._pool_failures = pool.connect_failures
        if pool.backend_up is not None:
            m.backend_up.labels(f"{pool.config.host}:{pool.config.port}").set(
                1 if pool.backend_up else 0)

    def _engines(self, scan: Optional[ScanStage]) -> None:
        monitor = scan.health if scan is not None else None
        if monitor is None:
            return
        now = self.wall()
        m = self.metrics
        for name, health in monitor.status.items():
            m.engine_up.labels(name).set(1 if health.up else 0)
            if health.signatures_time is not None:
                m.engine_signature_age.labels(name).set(max(0.0, now - health.signatures_time))

    def _dns_lists(self, policy: Optional[PolicyRuntime]) -> None:
        if policy is None:
            return
        m = self.metrics
        services = policy.services
        for report in services.dns_health.reports():
            m.dns_list_up.labels(report.name).set(1 if report.up else 0)
        guard = services.dns_guard
        if guard is not None:
            for state in guard.states():
                m.dns_list_suspended.labels(state.dnsbl.name).set(
                    0 if state.suspended is None else 1)
