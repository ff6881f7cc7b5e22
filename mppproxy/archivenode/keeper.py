"""The store's side of a node: the archive store, the writer that fills it
from a durable queue, and the retention purge (issue 12).

Composition (docs/design.md floor 3).  The archive node runs one beside its
receiver; an edge or all-in-one node without ``archive.node`` runs one on
its own archive queue, so held messages are stored, listed and released on
the same host with no network hop and no database server ("All-in-one
mode keeps the same parts in one process").

``start`` does no blocking I/O: the writer opens the store in the thread
pool and keeps trying while it fails (a database that is down at start
must not stop the node from taking mail: the queue holds the copies).
"""
from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool

from mppproxy._async import as_deferred
from mppproxy.archive.writer import CopyWriter
from mppproxy.config.schema import ProxyConfig
from mppproxy.logsetup import Logger
from mppproxy.spool.queue import DurableQueue
from mppproxy.store.store import ArchiveStore

log = Logger()


class StoreKeeper:
    """Store, writer and purge of one node; ``start``/``stop`` with the
    service, ``wake`` after each enqueue."""

    def __init__(self, reactor: Any, config: ProxyConfig, queue: DurableQueue):
        self.reactor = reactor
        self.config = config
        self.queue = queue
        self.store = ArchiveStore(config.store, config.data_dir)
        node = config.archive_node
        self.writer = CopyWriter(reactor, reactor.getThreadPool(), queue, self.store,
                                 batch=node.writer_batch, retry_delay=node.writer_retry)
        self._purge = task.LoopingCall(self._purge_soon)
        self._purge.clock = reactor

    def wake(self) -> None:
        self.writer.wake()

    def start(self) -> None:
        self.writer.start()
        # The first purge after an interval: the store may still be opening.
        self._purge.start(self.config.store.purge_interval, now=False)

    def stop(self) -> defer.Deferred[None]:
        """The writer ends after the batch in hand, then the store closes."""
        if self._purge.running:
            self._purge.stop()
        return as_deferred(self._stop())

    async def _stop(self) -> None:
        await self.writer.stop()
        if self.writer.store_ready:
            try:
                await deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                        self.store.close)
            except Exception:
                log.failure("closing the archive store")

    def _purge_soon(self) -> defer.Deferred[None]:
        """One retention purge, in the thread pool; a failure is logged and
        the next interval tries again (a LoopingCall stops on an error)."""
        return as_deferred(self._purge_and_forget())

    async def _purge_and_forget(self) -> None:
        await self.purge_once()

    async def purge_once(self) -> int:
        if not self.writer.store_ready:
            return 0
        store = self.config.store
        try:
            purged: int = await deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), self.store.purge, time.time(),
                store.retention_days, dict(store.retention_domains), store.purge_batch)
        except Exception as e:
            log.error("archive retention purge failed: {error}",
                      error=f"{type(e).__name__}: {e}"[:500])
            return 0
        if purged:
            log.info("archive retention purge: {purged} rows removed", purged=purged)
        return purged
