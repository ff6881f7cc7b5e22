"""Engine health: each scanner engine's version and signature age, at start
and then periodically.

Stage: post-DATA scanning, beside the scan path (it never blocks a scan).
``HealthMonitor`` asks every scanner's ``health()`` every
``check_interval`` seconds (a ``LoopingCall``) and logs:

* at the first check, one line per engine: its version and signature date
  (``engine_health_start``), or that it is down;
* ``engine X is down: why`` once, when an engine stops answering, and
  ``engine X is back`` once, when it answers again (never a line per check);
* a warning when an engine's signatures are older than
  ``max_signature_age``, again whenever the signatures change while still
  too old, and a line when they are fresh again;
* a line when an engine's version changes (an upgrade under us).

``status`` holds the last ``EngineHealth`` of each engine, for a status
page or a scan engine that wants to know.  Log events carry the fields
``engine``, ``up``, ``version``, ``signatures_time``, ``age`` and ``why``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from mppproxy._async import as_deferred
from mppproxy.logsetup import Logger
from mppproxy.scan.base import EngineHealth, Scanner, ScannerUnavailable
from mppproxy.config.scanners import ScanHealthConfig

log = Logger()


def _when(t: Optional[float]) -> str:
    if t is None:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t))


class HealthMonitor:
    """Watches ``scanners`` on ``reactor`` with ``settings``
    (``ScanHealthConfig``).  ``wall`` gives the current Unix time to judge
    signature ages (the reactor's ``seconds`` by default, so tests can use
    a ``Clock``).  Construction does no I/O; ``start`` runs the first check
    at once and returns a Deferred that fires when it is done; ``stop``
    ends the loop."""

    def __init__(self, scanners: Sequence[Scanner], reactor: Any,
                 settings: ScanHealthConfig = ScanHealthConfig(),
                 wall: Optional[Callable[[], float]] = None):
        self.scanners = tuple(scanners)
        self.settings = settings
        self.status: dict[str, EngineHealth] = {}
        self._reactor = reactor
        self._wall = wall or reactor.seconds
        self._stale: dict[str, Optional[float]] = {}
        self._loop: Optional[LoopingCall] = None
        self._checking: Optional[Deferred[None]] = None

    def start(self) -> Deferred[None]:
        first = self.check_all()
        if self.settings.check_interval > 0:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self._reactor
            # now=False: the first check has just been started above.
            self._loop.start(self.settings.check_interval, now=False)
        return first

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._checking is not None:
            self._checking.cancel()

    def _tick(self) -> None:
        # A check still running (engines slower than the interval) is not
        # doubled up; the LoopingCall must not wait on it either.
        if self._checking is None:
            self.check_all()

    def check_all(self) -> Deferred[None]:
        """Ask every engine once; fires when all have answered or timed out."""
        work = [as_deferred(self._check(s)) for s in self.scanners]
        d: Deferred[Any] = defer.gatherResults(work, consumeErrors=True)
        # Set before the callbacks: answers that are already there fire
        # them at once, and _checked must find this one to clear.
        self._checking = d
        d.addErrback(self._failed)
        d.addBoth(self._checked)
        return d

    def _failed(self, failure: Any) -> None:
        # stop() cancels a running check; anything else is a bug in here.
        if not failure.check(defer.FirstError) or \
                not failure.value.subFailure.check(defer.CancelledError):
            log.failure("engine health check failed", failure)

    def _checked(self, _: Any) -> None:
        self._checking = None

    async def _check(self, scanner: Scanner) -> None:
        name = scanner.name
        asking = as_deferred(scanner.health())
        asking.addTimeout(self.settings.timeout, self._reactor)
        try:
            health: EngineHealth = await asking
        except defer.TimeoutError:
            health = EngineHealth(name, False, detail=f"no health answer in {self.settings.timeout:g}s")
        except ScannerUnavailable as e:
            health = EngineHealth(name, False, detail=e.reason)
        except defer.CancelledError:
            raise
        except Exception as e:  # a bug in a scanner must not stop the loop
            log.failure("health check of {engine} raised", engine=name)
            health = EngineHealth(name, False, detail=f"{type(e).__name__}: {e}")
        self._record(health)

    def _record(self, health: EngineHealth) -> None:
        name = health.name
        before = self.status.get(name)
        self.status[name] = health
        if not health.up:
            if before is None or before.up:
                log.warn("engine {engine} is down: {why}", engine=name, up=False,
                         why=health.detail or "no answer")
            return
        if before is None:
            log.info("engine {engine} is up: {version}, signatures {signatures}",
                     engine=name, up=True, version=health.version or "unknown version",
                     signatures=_when(health.signatures_time),
                     signatures_time=health.signatures_time, detail=health.detail)
        elif not before.up:
            log.info("engine {engine} is back: {version}", engine=name, up=True,
                     version=health.version or "unknown version")
        elif before.version and health.version and before.version != health.version:
            log.info("engine {engine} changed version: {old} -> {version}",
                     engine=name, old=before.version, version=health.version)
        self._judge_age(health)

    def _judge_age(self, health: EngineHealth) -> None:
        limit = self.settings.max_signature_age
        name = health.name
        if health.signatures_time is None or limit <= 0:
            return
        age = self._wall() - health.signatures_time
        if age > limit:
            if self._stale.get(name, -1.0) != health.signatures_time:
                log.warn("engine {engine}: signatures are {hours:.0f} hours old "
                         "(from {signatures}), older than max_signature_age",
                         engine=name, hours=age / 3600, age=age,
                         signatures=_when(health.signatures_time),
                         signatures_time=health.signatures_time)
            self._stale[name] = health.signatures_time
        elif name in self._stale:
            del self._stale[name]
            log.info("engine {engine}: signatures updated ({signatures})",
                     engine=name, signatures=_when(health.signatures_time),
                     signatures_time=health.signatures_time)
