"""The node-wide figures the main process adds to each scrape: build,
configuration generation, certificate expiries, queue depths and oldest
ages, and the state tables' sizes.

Composition floor.  These are known once per node, not per process, so
they are not in the shared metric files; the scrape's collector
(``SnapshotCollector``) yields them from a ``Snapshot`` taken on the
reactor thread, and the text is then made in a pool thread.

The costly ones are cached for ``metrics.state_cache`` seconds: a queue's
``stats`` lists its directories (in the reactor's thread pool), the state
table sizes are a COUNT each in the state database (its own pool).  A
scrape that finds them older starts one refresh and waits for it, at most
``REFRESH_WAIT`` seconds (then it serves the previous figures).
"""
from __future__ import annotations

import datetime
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mppproxy import __version__, tlsnames
from mppproxy.db.base import Database
from mppproxy.db.models import StateTables
from mppproxy.logsetup import Logger
from mppproxy.spool.queue import DurableQueue, QueueStats

log = Logger()

# Seconds a scrape waits for a refresh of the cached figures.
REFRESH_WAIT = 5.0


@dataclass(frozen=True)
class NodeSources:
    """Where the main process finds the node-wide figures now."""

    # (name, queue) of each durable queue of the node.
    queues: Callable[[], list[tuple[str, DurableQueue]]]
    # The STARTTLS context factory served now (None: TLS off) and the
    # label of its default certificate (its file).
    tls: Callable[[], tuple[Any, str]]
    # The state database (greylist, blacklist), None without one.
    database: Callable[[], Optional[Database]]


@dataclass(frozen=True)
class Snapshot:
    """Plain values, safe to read from another thread."""

    generation: int = 0
    certificates: tuple[tuple[str, float], ...] = ()
    queues: tuple[tuple[str, QueueStats], ...] = ()
    state_sizes: tuple[tuple[str, int], ...] = ()


def state_sizes(engine: Engine, tables: StateTables, now: float) -> list[tuple[str, int]]:
    """Entries not yet expired in the greylist, its auto-whitelist and the
    blacklist (blocking; each an index range on ``expires``)."""
    out = []
    with engine.connect() as conn:
        for name, table in (("greylist", tables.greylist),
                            ("greylist_whitelist", tables.greylist_whitelist),
                            ("blacklist", tables.blacklist)):
            query = select(func.count()).select_from(table).where(table.c.expires > now)
            out.append((name, int(conn.execute(query).scalar_one())))
    return out


def certificate_expiries(context: Any, default_label: str) -> list[tuple[str, float]]:
    """notAfter (epoch seconds) of the default certificate and of each
    certificate of ``tls.cert_dir`` (``tlsnames.expiries``)."""
    if context is None:
        return []
    out = []
    default = getattr(context, "default", context)  # an SNIContextFactory's default
    cert = getattr(default, "certificate", None)
    if cert is not None:
        try:
            not_after = cert.to_cryptography().not_valid_after_utc
        except (AttributeError, ValueError):
            not_after = None
        if isinstance(not_after, datetime.datetime):
            out.append((default_label, not_after.timestamp()))
    out.extend(sorted(tlsnames.expiries(context).items()))
    return out


class NodeFigures:
    """The main process's cache of the costly figures, and the snapshot."""

    def __init__(self, reactor: Any, sources: NodeSources, cache_seconds: float,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.reactor = reactor
        self.sources = sources
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.wall = wall
        self.generation = 1
        self._queues: tuple[tuple[str, QueueStats], ...] = ()
        self._sizes: tuple[tuple[str, int], ...] = ()
        self._fetched = float("-inf")
        self._refreshing: Optional[defer.Deferred[None]] = None

    def reloaded(self) -> None:
        """A reload was applied: the configuration generation goes up."""
        self.generation += 1

    async def snapshot(self) -> Snapshot:
        """The figures now, the costly ones refreshed first when older
        than ``cache_seconds`` (on the reactor thread)."""
        if self.clock() - self._fetched >= self.cache_seconds:
            if self._refreshing is None:
                d = self._refreshing = defer.Deferred.fromCoroutine(self._refresh())
                d.addBoth(self._refreshed)
            await self._wait(self._refreshing)
        context, label = self.sources.tls()
        return Snapshot(self.generation, tuple(certificate_expiries(context, label)),
                        self._queues, self._sizes)

    async def _wait(self, d: defer.Deferred[None]) -> None:
        """Wait for the refresh in flight, at most ``REFRESH_WAIT`` s,
        without cancelling it for the next scrape."""
        waiter: defer.Deferred[None] = defer.Deferred()

        def done(result: object = None) -> object:
            if not waiter.called:
                waiter.callback(None)
            return result

        d.addBoth(done)
        timer = self.reactor.callLater(REFRESH_WAIT, done)
        await waiter
        if timer.active():
            timer.cancel()

    def _refreshed(self, result: object) -> None:
        self._refreshing = None

    async def _refresh(self) -> None:
        pool = self.reactor.getThreadPool()
        queues = []
        for name, queue in self.sources.queues():
            try:
                stats = await deferToThreadPool(self.reactor, pool, queue.stats)
            except OSError as e:
                log.warn("metrics: cannot count the {name} queue: {error}", name=name,
                         error=str(e))
                continue
            queues.append((name, stats))
        self._queues = tuple(queues)
        db = self.sources.database()
        if db is not None:
            try:
                sizes = await db.run(state_sizes, db.tables, self.wall())
            except Exception as e:  # a database down: the metrics go on without the sizes
                log.warn("metrics: cannot count the state tables in {database}: {error}",
                         database=db.name, error=str(e))
                self._sizes = ()
            else:
                self._sizes = tuple(sizes)
        self._fetched = self.clock()


class SnapshotCollector(Collector):
    """Yields a ``Snapshot``'s figures (set ``snapshot`` before collecting)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Any]:
        s = self.snapshot
        info = InfoMetricFamily("mppproxy_build", "The running mppproxy")
        info.add_metric([], {"version": __version__,
                             "python": ".".join(map(str, sys.version_info[:3]))})
        yield info
        yield GaugeMetricFamily("mppproxy_config_generation",
                                "Configurations applied since the main process started "
                                "(1 at start, +1 per reload)", value=s.generation)
        certs = GaugeMetricFamily("mppproxy_tls_certificate_expiry_timestamp_seconds",
                                  "notAfter of each served certificate (Unix time)",
                                  labels=["certificate"])
        for label, when in s.certificates:
            certs.add_metric([label], when)
        yield certs
        items = GaugeMetricFamily("mppproxy_queue_items",
                                  "Items in a durable queue: waiting, being sent, set aside",
                                  labels=["queue", "state"])
        oldest = GaugeMetricFamily("mppproxy_queue_oldest_age_seconds",
                                   "Age of the oldest item waiting or being sent (0: empty)",
                                   labels=["queue"])
        for name, stats in s.queues:
            items.add_metric([name, "queued"], stats.queued)
            items.add_metric([name, "claimed"], stats.claimed)
            items.add_metric([name, "bad"], stats.bad)
            oldest.add_metric([name], stats.oldest_age or 0.0)
        yield items
        yield oldest
        sizes = GaugeMetricFamily("mppproxy_state_entries",
                                  "Entries not yet expired in the shared state tables",
                                  labels=["table"])
        for name, n in s.state_sizes:
            sizes.add_metric([name], n)
        yield sizes
