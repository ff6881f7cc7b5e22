"""When user digests go out (issue 13): a ``LoopingCall`` in the node that
serves the console (all-in-one's main process, or the archive node),
started and stopped with it (``web/service.py``).

Floor 3 (``mppproxy/web/``).  Every TICK seconds: when digests are on
(``digest.domains``), it is past ``digest.send_at`` (UTC) and today's run
is not done, run ``digestmail.send_digests``.  What a restart must not
repeat is in the store, not in memory (``store/digests.py``): each
recipient's digest is claimed before it is sent, and the day's run is
marked done when every digest went out, so a restart (or a second archive
node on the same database) sends nobody a second digest that day.  A node
that was down at ``send_at`` sends when it comes up, the same day.  When
some digests could not be sent (the relay down), the run is tried again
after RETRY seconds, for those only.

Each tick reads the configuration anew, so a reload that turns digests on
or moves ``send_at`` applies without a restart.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool

from mppproxy._async import as_deferred
from mppproxy.config.digest import digest_enabled
from mppproxy.config.schema import ProxyConfig
from mppproxy.logsetup import Logger
from mppproxy.store.digests import SENT_KEEP_DAYS, DigestLedger
from mppproxy.store.store import ArchiveStore
from mppproxy.web.digestmail import DAY, RunReport, day_of, send_digests
from mppproxy.web.digesttoken import TokenSigner

log = Logger()

# Seconds between looks at the clock: a digest goes out within a minute
# of send_at.
TICK = 60.0
# Seconds before digests that could not be sent are tried again.
RETRY = 900.0


def due(now: float, send_at: str) -> bool:
    """Whether ``now`` (epoch seconds) is at or past today's ``send_at``
    (HH:MM, UTC)."""
    moment = datetime.fromtimestamp(now, timezone.utc)
    hour, minute = (int(part) for part in send_at.split(":"))
    return (moment.hour, moment.minute) >= (hour, minute)


class DigestScheduler:
    """Runs the day's digests once (module docstring).  ``clock``: what
    tells the time and drives the loop (the reactor; a ``task.Clock`` in
    tests); the reactor runs the store calls and the SMTP connections."""

    def __init__(self, config: Callable[[], ProxyConfig], reactor: Any, store: ArchiveStore,
                 secret: bytes, ready: Callable[[], Awaitable[bool]],
                 clock: Optional[Any] = None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.store = store
        self.signer = TokenSigner(secret)
        self.ready = ready
        self.ledger = DigestLedger(store)
        self._loop: Optional[LoopingCall] = None
        self._running: Optional[defer.Deferred[Optional[RunReport]]] = None
        self._done_day = ""
        self._retry_at = 0.0

    def start(self) -> None:
        loop = LoopingCall(self._tick)
        loop.clock = self.clock
        self._loop = loop
        loop.start(TICK, now=False)

    def stop(self) -> defer.Deferred[Any]:
        """Stop looking at the clock; a run in progress finishes the digest
        it is sending (the store closes after)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        running = self._running
        if running is None:
            return defer.succeed(None)
        waiter: defer.Deferred[Any] = defer.Deferred()
        running.addBoth(lambda result: waiter.callback(None))
        return waiter

    def _tick(self) -> defer.Deferred[Optional[RunReport]]:
        d = as_deferred(self.tick())
        self._running = d

        def done(result: Any) -> Any:
            self._running = None
            return result

        return d.addBoth(done)

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    async def tick(self) -> Optional[RunReport]:
        """One look at the clock: the day's run when it is due, else
        nothing.  Never raises (the loop would stop): a failure is logged
        and tried again after RETRY seconds."""
        config = self.config()
        digest = config.digest
        now = float(self.clock.seconds())
        day = day_of(now)
        if (not digest_enabled(digest) or day == self._done_day or now < self._retry_at
                or not due(now, digest.send_at)):
            return None
        try:
            if not await self.ready():
                self._retry_at = now + TICK
                return None
            if await self._in_thread(self.ledger.run_done, day):
                self._done_day = day
                return None
            report = await send_digests(config, self.store, self.reactor, self.signer, now)
            if report.failed:
                self._retry_at = now + RETRY
                log.warn("digests for {day}: {failed} could not be sent; trying those again "
                         "in {retry:.0f} s", day=day, failed=report.failed, retry=RETRY)
            else:
                await self._in_thread(self.ledger.mark_run_done, day)
                self._done_day = day
            await self._in_thread(self.ledger.purge, now, day_of(now - SENT_KEEP_DAYS * DAY))
            return report
        except Exception:
            log.failure("digests for {day} failed; trying again in {retry:.0f} s", day=day,
                        retry=RETRY)
            self._retry_at = now + RETRY
            return None
