"""The durable queue's group committer (mppproxy/spool/committer.py).

A real reactor and a real queue in a temporary directory (a tiny tmpfs for
the full disk): the items of many callers are written by one thread in
batches, each caller hears only once its own item is durable, and a failure
reaches only the items it concerns.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from helpers import mount_tmpfs
from mppproxy.spool.committer import GroupCommitter
from mppproxy.spool.queue import DurableQueue


class CommitterTests(TestCase):

    def make(self, directory: str = "", **kwargs: Any) -> GroupCommitter:
        if not directory:
            parent = tempfile.mkdtemp(prefix="mpp-commit-")
            self.addCleanup(shutil.rmtree, parent, True)
            directory = os.path.join(parent, "queue")
        queue = DurableQueue(directory)
        queue.open()
        self.addCleanup(queue.close)
        committer = GroupCommitter(reactor, queue, **kwargs)
        self.addCleanup(committer.stop)
        return committer

    async def test_items_of_many_callers_are_written_in_batches(self) -> None:
        """100 items submitted at once are all stored, each id once, in fewer batches than items."""
        committer = self.make()
        ds = [committer.submit(b"message %d" % i, {"i": i}) for i in range(100)]
        ids = await defer.gatherResults(ds)
        self.assertEqual(len(set(ids)), 100)
        self.assertLess(committer.batches, 100)
        stored = {}
        for _ in range(100):
            item = committer.queue.claim()
            assert item is not None
            stored[item.metadata["i"]] = item.message()
        self.assertEqual(stored, {i: b"message %d" % i for i in range(100)})

    async def test_caller_hears_only_once_the_item_is_in_new(self) -> None:
        """When a caller's Deferred fires, its item is already visible in new/ (written, renamed, synced)."""
        committer = self.make()
        seen = []

        def check(item_id: str) -> str:
            names = os.listdir(os.path.join(committer.queue.directory, "new"))
            seen.append(any(item_id in name for name in names))
            return item_id

        await defer.gatherResults([committer.submit(b"m", {}).addCallback(check)
                                   for _ in range(10)])
        self.assertEqual(seen, [True] * 10)

    async def test_full_disk_fails_only_the_items_that_do_not_fit(self) -> None:
        """On a full tmpfs the big item fails with ENOSPC naming its file; the small ones of the same batch are stored."""
        path = mount_tmpfs(self, "256k")
        committer = self.make(os.path.join(path, "queue"))
        big = committer.submit((b"x" * 65536 for _ in range(16)), {})
        small = [committer.submit(b"small %d" % i, {}) for i in range(3)]
        failure = await self.assertFailure(big, OSError)
        self.assertEqual(failure.errno, errno.ENOSPC)
        self.assertIsNotNone(failure.filename)
        ids = await defer.gatherResults(small)
        self.assertEqual(len(ids), 3)
        self.assertEqual(os.listdir(os.path.join(committer.queue.directory, "tmp")), [])

    async def test_a_queue_that_cannot_open_fails_every_item(self) -> None:
        """When ``prepare`` (opening the queue) fails, each waiting caller gets that error."""
        def refuse() -> None:
            raise PermissionError(errno.EACCES, "no access", "/queue")

        committer = self.make(prepare=refuse)
        ds = [committer.submit(b"m", {}) for _ in range(3)]
        for d in ds:
            await self.assertFailure(d, PermissionError)

    async def test_stop_ends_the_thread_and_refuses_later_items(self) -> None:
        """stop() returns once the thread has ended; a later submit fails at once and writes nothing."""
        committer = self.make()
        await committer.submit(b"before", {})
        committer.stop()
        self.assertFalse(any(t.name.startswith("queue-commit") and t.is_alive()
                             and committer.queue.directory in t.name
                             for t in threading.enumerate()))
        await self.assertFailure(committer.submit(b"after", {}), RuntimeError)
        self.assertEqual(len(os.listdir(os.path.join(committer.queue.directory, "new"))), 1)
