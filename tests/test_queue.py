"""The durable queue (mppproxy/spool/queue.py, issue 12 "Edge side").

In-process tests drive the queue with an injected clock; the crash and
concurrency tests run real processes (``python -c``) that are SIGKILLed or
race for items, each bounded in loops and time; the full-disk test mounts a
tiny tmpfs (root only: it skips otherwise, or fails with
``MPP_REQUIRE_SERVICES=1``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from helpers import mount_tmpfs
from mppproxy.smtp import replies
from mppproxy.spool import queue as queue_module
from mppproxy.spool.queue import DurableQueue, ItemState, QueueItem

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A settable time source for the queue."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def files(directory: str, sub: str) -> list[str]:
    return sorted(os.listdir(os.path.join(directory, sub)))


class QueueTestCase(SynchronousTestCase):

    def mktemp(self) -> str:
        """A fresh directory path under the system's temporary directory,
        removed after the test (the crash test writes hundreds of items)."""
        parent = tempfile.mkdtemp(prefix="mpp-queue-")
        self.addCleanup(shutil.rmtree, parent, True)
        return os.path.join(parent, "queue")

    def make_queue(self, directory: Optional[str] = None, **kwargs: Any) -> DurableQueue:
        q = DurableQueue(directory or self.mktemp(), **kwargs)
        q.open()
        self.addCleanup(q.close)
        return q

    def claim(self, q: DurableQueue) -> QueueItem:
        item = q.claim()
        assert item is not None
        return item


class EnqueueClaimTests(QueueTestCase):

    def test_enqueue_claim_finish(self) -> None:
        """An enqueued item comes back whole from claim, with its metadata, and finish removes it."""
        q = self.make_queue()
        item_id = q.enqueue([b"Subject: a\r\n", b"\r\n", b"body\r\n"], {"rcpt": ["a@example.org"]})
        self.assertEqual(files(q.directory, "tmp"), [])
        self.assertEqual(len(files(q.directory, "new")), 1)
        item = self.claim(q)
        self.assertEqual((item.id, item.metadata, item.attempts), (item_id, {"rcpt": ["a@example.org"]}, 0))
        self.assertEqual(item.message(), b"Subject: a\r\n\r\nbody\r\n")
        self.assertEqual(item.size, len(item.message()))
        self.assertEqual(files(q.directory, "new"), [])
        self.assertIsNone(q.claim())
        q.finish(item)
        self.assertEqual(files(q.directory, "claimed"), [])
        self.assertEqual(q.depth(), 0)

    def test_message_is_read_in_bounded_chunks(self) -> None:
        """A large item is streamed back in chunks no bigger than asked for."""
        q = self.make_queue()
        body = os.urandom(300_000)
        q.enqueue((body[i:i + 7000] for i in range(0, len(body), 7000)), {})
        item = self.claim(q)
        chunks = list(item.chunks(65536))
        self.assertTrue(all(len(c) <= 65536 for c in chunks))
        self.assertEqual(b"".join(chunks), body)

    def test_small_item_is_read_whole_at_claim(self) -> None:
        """An item file up to WHOLE_ITEM octets is read once, when claimed:
        its message is in memory (removing the file afterwards changes
        nothing), in bounded chunks too; a larger one is read from its file
        when asked for."""
        clock = Clock()
        q = self.make_queue(clock=clock)
        small = os.urandom(4000)
        large = os.urandom(queue_module.WHOLE_ITEM + 1)
        q.enqueue([small], {"n": 1})
        clock.now += 1
        q.enqueue([large], {"n": 2})
        first, second = q.claim_many(2)
        self.assertEqual((first.metadata, first.size), ({"n": 1}, len(small)))
        os.unlink(first.path)
        self.assertEqual(first.message(), small)
        self.assertEqual(b"".join(first.chunks(1000)), small)
        self.assertTrue(all(len(c) <= 1000 for c in first.chunks(1000)))
        self.assertIsNone(second.data)
        self.assertEqual((second.metadata, second.size), ({"n": 2}, len(large)))
        self.assertEqual(second.message(), large)

    def test_claims_oldest_due_first(self) -> None:
        """Items are claimed in the order they fell due, and not before."""
        clock = Clock()
        q = self.make_queue(clock=clock)
        first = q.enqueue(b"1", {})
        clock.now += 1
        later = q.enqueue(b"3", {}, due=clock.now + 100)
        clock.now += 1
        second = q.enqueue(b"2", {})
        self.assertEqual([self.claim(q).id, self.claim(q).id], [first, second])
        self.assertIsNone(q.claim())
        clock.now += 100
        self.assertEqual(self.claim(q).id, later)

    def test_claim_many_takes_due_items_in_order_up_to_the_limit_and_size(self) -> None:
        """claim_many claims up to its limit of due items, earliest first, stops once the messages reach max_size (always taking one), and leaves the rest for later."""
        clock = Clock()
        q = self.make_queue(clock=clock)
        ids = []
        for n in range(5):
            ids.append(q.enqueue(b"x" * 100, {"n": n}))
            clock.now += 1
        q.enqueue(b"later", {}, due=clock.now + 100)
        self.assertEqual([i.id for i in q.claim_many(2)], ids[:2])
        self.assertEqual([i.id for i in q.claim_many(10, max_size=150)], ids[2:4])
        self.assertEqual([i.id for i in q.claim_many(10, max_size=1)], ids[4:])
        self.assertEqual(q.claim_many(10), [])
        self.assertEqual(len(files(q.directory, "claimed")), 5)

    def test_ids_are_unique(self) -> None:
        """Items enqueued within the same microsecond still get different ids."""
        q = self.make_queue(clock=Clock())
        ids = {q.enqueue(b"x", {}) for _ in range(50)}
        self.assertEqual(len(ids), 50)

    def test_unopened_queue_refuses(self) -> None:
        """A queue that was not opened refuses to enqueue or claim."""
        q = DurableQueue(self.mktemp())
        self.assertRaises(RuntimeError, q.enqueue, b"x", {})
        self.assertRaises(RuntimeError, q.claim)


class RetryTests(QueueTestCase):

    def test_retry_backs_off_exponentially_up_to_the_cap(self) -> None:
        """Each retry makes the item due after base * 2**attempts seconds, capped at max_delay."""
        clock = Clock()
        q = self.make_queue(clock=clock, base_delay=10, max_delay=100, max_age=10_000)
        q.enqueue(b"m", {"k": 1})
        item = self.claim(q)
        for attempts, delay in enumerate([10, 20, 40, 80, 100, 100]):
            self.assertEqual(item.attempts, attempts)
            self.assertEqual(q.retry(item, "451 try later"), ItemState.QUEUED)
            clock.now += delay - 0.01
            self.assertIsNone(q.claim())
            clock.now += 0.01
            item = self.claim(q)
            self.assertEqual(item.metadata, {"k": 1})
        self.assertEqual(item.attempts, 6)

    def test_retry_is_logged_with_fields(self) -> None:
        """A retry logs the item, its attempts, its delay and the error as fields."""
        q = self.make_queue(clock=Clock(), base_delay=5)
        q.enqueue(b"m", {})
        item = self.claim(q)
        with capturedLogs() as events:
            q.retry(item, "connection refused")
        [event] = [e for e in events if e.get("item_id") == item.id]
        self.assertEqual((event["attempts"], event["delay"], event["error"]),
                         (1, 5.0, "connection refused"))


class BadTests(QueueTestCase):

    def assert_bad_event(self, events: list[Any], item_id: str, age: float, attempts: int,
                         reason_part: str) -> None:
        bad = [e for e in events if e.get("item_id") == item_id and "reason" in e]
        self.assertEqual(len(bad), 1, events)
        event = bad[0]
        self.assertEqual(event["log_level"].name, "error")
        self.assertAlmostEqual(event["age"], age, places=3)
        self.assertEqual(event["attempts"], attempts)
        self.assertIn(reason_part, event["reason"])

    def test_bad_after_max_age(self) -> None:
        """A retry of an item older than max_age moves it to bad/ with an error event naming it, its age, attempts and reason."""
        clock = Clock()
        q = self.make_queue(clock=clock, base_delay=10, max_age=3600)
        item_id = q.enqueue(b"m", {})
        item = self.claim(q)
        clock.now += 3600
        with capturedLogs() as events:
            self.assertEqual(q.retry(item, "451 4.4.1 unreachable"), ItemState.BAD)
        self.assert_bad_event(events, item_id, 3600, 1, "451 4.4.1 unreachable")
        self.assertEqual(files(q.directory, "bad"), [f"{item_id}.reason.json", f"{item_id}_1_0"])
        record = json.loads(Path(q.directory, "bad", f"{item_id}.reason.json").read_text())
        self.assertEqual((record["id"], record["attempts"]), (item_id, 1))
        self.assertIn("unreachable", record["reason"])
        self.assertEqual(Path(q.directory, "bad", f"{item_id}_1_0").read_bytes().split(b"\n", 2)[2], b"m")
        self.assertIsNone(q.claim())
        stats = q.stats()
        self.assertEqual((stats.depth, stats.bad), (0, 1))

    def test_bad_on_permanent_refusal(self) -> None:
        """bad() moves an item refused for good to bad/ and logs it with its reason."""
        clock = Clock()
        q = self.make_queue(clock=clock)
        item_id = q.enqueue(b"m", {})
        clock.now += 7
        item = self.claim(q)
        with capturedLogs() as events:
            q.bad(item, "554 5.7.1 signature does not verify")
        self.assert_bad_event(events, item_id, 7, 0, "554 5.7.1")
        self.assertIn(f"{item_id}_0_0", files(q.directory, "bad"))
        self.assertEqual(files(q.directory, "claimed"), [])

    def test_unreadable_item_goes_to_bad(self) -> None:
        """A damaged file in new/ is moved to bad/ and logged at claim, not returned and not lost."""
        q = self.make_queue()
        name = "0000000000000001_0000000000000001-1-1-ab_0_0"
        Path(q.directory, "new", name).write_bytes(b"garbage")
        with capturedLogs() as events:
            self.assertIsNone(q.claim())
        self.assertIn("0000000000000001-1-1-ab_0_0", files(q.directory, "bad"))
        self.assertTrue(any("unreadable" in str(e.get("reason")) for e in events))


class StatsTests(QueueTestCase):

    def test_depth_and_oldest_age_are_logged(self) -> None:
        """log_stats emits the depth (waiting and claimed) and the oldest item's age as fields."""
        clock = Clock()
        q = self.make_queue(clock=clock)
        self.assertEqual((q.depth(), q.oldest_age()), (0, None))
        q.enqueue(b"a", {})
        clock.now += 30
        q.enqueue(b"b", {})
        clock.now += 70
        self.claim(q)
        with capturedLogs() as events:
            stats = q.log_stats()
        [event] = [e for e in events if "depth" in e]
        self.assertEqual((event["depth"], event["queued"], event["claimed"], event["oldest_age"]),
                         (2, 1, 1, 100.0))
        self.assertEqual((stats.depth, q.oldest_age()), (2, 100.0))


class RecoverTests(QueueTestCase):

    def test_claims_of_a_closed_queue_come_back_until_max_recoveries(self) -> None:
        """An item whose claimer went away returns to new/ at recover, and goes to bad/ after max_recoveries."""
        directory = self.mktemp()
        q = self.make_queue(directory, max_recoveries=3)
        item_id = q.enqueue(b"m", {})
        for recoveries in (1, 2):
            other = self.make_queue(directory)
            self.assertEqual(self.claim(other).id, item_id)
            self.assertEqual(q.recover(), 0)  # its owner is alive: left alone
            other.close()
            self.assertEqual(q.recover(), 1)
            self.assertTrue(files(directory, "new")[0].endswith(f"_{item_id}_0_{recoveries}"))
        other = self.make_queue(directory)
        self.claim(other)
        other.close()
        with capturedLogs() as events:
            self.assertEqual(q.recover(), 0)
        self.assertIn(f"{item_id}_0_3", files(directory, "bad"))
        self.assertTrue(any(e.get("item_id") == item_id and "reason" in e for e in events))
        self.assertEqual(files(directory, "owners"), [q.owner])

    def test_claim_of_a_killed_process_comes_back(self) -> None:
        """An item claimed by a live process stays claimed; once that process is SIGKILLed, recover puts it back."""
        directory = self.mktemp()
        q = self.make_queue(directory)
        item_id = q.enqueue(b"hello", {"n": 1})
        proc = start_script(HOLDER, directory)
        self.assertEqual(read_line(proc, 20), f"claimed {item_id}")
        self.assertEqual(q.recover(), 0)
        self.assertEqual(len(files(directory, "claimed")), 1)
        kill(proc)
        self.assertEqual(q.recover(), 1)
        item = self.claim(q)
        self.assertEqual((item.id, item.recoveries, item.message()), (item_id, 1, b"hello"))


class ProcessTests(QueueTestCase):

    def test_open_survives_another_recover_taking_its_staging_file(self) -> None:
        """Another process's recover meets our owner file in the instant
        before we lock it: it holds its probe's lock (ours fails), or it
        removes the file as a dead owner's (our rename fails).  open tries
        again under a new name and registers once, leaving no dot file (CI
        met the second case with two processes opening one queue)."""
        directory = self.mktemp()
        self.make_queue(directory).close()  # the layout exists
        real_flock = queue_module.fcntl.flock
        calls = [0]

        def racing_flock(fd: int, operation: int) -> None:
            calls[0] += 1
            staging = os.path.join(directory, "owners", f".{q.owner}.{calls[0] - 1}.new")
            if calls[0] == 1:
                # The other recover's probe holds the lock.
                probe = os.open(staging, os.O_RDONLY)
                self.addCleanup(os.close, probe)
                real_flock(probe, queue_module.fcntl.LOCK_EX | queue_module.fcntl.LOCK_NB)
            elif calls[0] == 2:
                # The other recover took the file for a dead owner's.
                os.unlink(staging)
            real_flock(fd, operation)

        q = DurableQueue(directory)
        self.patch(queue_module.fcntl, "flock", racing_flock)
        q.open()
        self.addCleanup(q.close)
        self.assertEqual(calls[0], 3)
        self.assertEqual(files(directory, "owners"), [q.owner])
        self.assertFalse(q._owner_alive("no-such-owner"))

    def test_two_processes_never_claim_the_same_item(self) -> None:
        """Two processes claiming from one queue at once share the items without overlap or loss."""
        directory = self.mktemp()
        q = self.make_queue(directory)
        ids = {q.enqueue(b"%d" % i, {"i": i}) for i in range(300)}
        start = time.time() + 1.0
        procs = [start_script(CLAIMER, directory, repr(start)) for _ in range(2)]
        got = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 0, err)
            got.append(out.split())
        first, second = set(got[0]), set(got[1])
        self.assertEqual(len(first) + len(second), sum(len(g) for g in got))  # no repeats
        self.assertEqual(first & second, set())
        self.assertEqual(first | second, ids)
        self.assertEqual((q.depth(), files(directory, "claimed")), (0, []))

    def test_sigkill_while_enqueueing_leaves_whole_items_or_nothing(self) -> None:
        """After 20 SIGKILLs at random moments of enqueueing, every visible item is whole and matches its checksum, and no tmp file is left."""
        directory = self.mktemp()
        rnd = random.Random(12)
        for round_ in range(20):
            proc = start_script(ENQUEUER, directory, str(round_))
            self.assertEqual(read_line(proc, 20), "ready")
            time.sleep(rnd.uniform(0.0, 0.5))
            kill(proc)
        q = self.make_queue(directory)  # open runs recover
        self.assertEqual(files(directory, "tmp"), [])
        self.assertEqual(files(directory, "owners"), [q.owner])
        seen = 0
        for _ in range(100_000):
            item = q.claim()
            if item is None:
                break
            body = item.message()
            digest, _, payload = body.partition(b"\n")
            self.assertEqual(hashlib.sha256(payload).hexdigest().encode(), digest, item.id)
            self.assertEqual((item.metadata["sha256"], item.metadata["size"]),
                             (digest.decode(), len(body)))
            q.finish(item)
            seen += 1
        self.assertGreater(seen, 0)
        self.assertEqual(files(directory, "bad"), [])


class StorageFailureTests(QueueTestCase):

    def assert_nothing_visible(self, q: DurableQueue) -> None:
        self.assertEqual((files(q.directory, "tmp"), files(q.directory, "new")), ([], []))
        self.assertIsNone(q.claim())

    def test_write_errors_raise_with_the_path_and_leave_nothing(self) -> None:
        """ENOSPC, EDQUOT and EIO while writing raise OSError naming the file, map to 452 4.3.1, and leave no item."""
        q = self.make_queue()
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            calls = []

            def failing_write(fd: int, data: bytes, code: int = code) -> None:
                calls.append(data)
                if len(calls) > 1:
                    raise OSError(code, os.strerror(code))
                os.write(fd, data)

            self.patch(queue_module, "_write_all", failing_write)
            with self.assertRaises(OSError) as caught:
                q.enqueue([b"a", b"b"], {})
            self.assertEqual(caught.exception.errno, code)
            self.assertTrue(str(caught.exception.filename).startswith(os.path.join(q.directory, "tmp")))
            self.assertEqual(replies.storage_failure(caught.exception), replies.STORAGE_ERROR)
            self.assert_nothing_visible(q)

    def test_failed_directory_fsync_removes_the_renamed_item(self) -> None:
        """When the fsync of new/ fails after the rename, the item is removed again and the error names it."""
        q = self.make_queue()

        def failing_fsync_dir(path: str) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(queue_module, "fsync_dir", failing_fsync_dir)
        with self.assertRaises(OSError) as caught:
            q.enqueue(b"m", {})
        self.assertTrue(str(caught.exception.filename).startswith(os.path.join(q.directory, "new")))
        self.assert_nothing_visible(q)

    def test_full_tmpfs_raises_enospc_and_leaves_nothing(self) -> None:
        """On a really full file system enqueue raises ENOSPC and no part of the item remains; a small one fits afterwards."""
        path = mount_tmpfs(self, "256k")
        q = self.make_queue(os.path.join(path, "queue"))
        with self.assertRaises(OSError) as caught:
            q.enqueue((b"x" * 65536 for _ in range(16)), {"big": True})
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        self.assertIsNotNone(caught.exception.filename)
        self.assert_nothing_visible(q)
        q.enqueue(b"small", {})
        self.assertEqual(self.claim(q).message(), b"small")


class ListingTests(QueueTestCase):
    """claim_many's listing of new/, kept for LISTING_TTL: a consumer
    claiming one item at a time (the forwarder's senders) does not list
    and sort the whole backlog for every item."""

    def count_listings(self, q: DurableQueue) -> list[str]:
        listed: list[str] = []
        real = os.listdir

        def listdir(path: str) -> list[str]:
            if path == os.path.join(q.directory, "new"):
                listed.append(path)
            return real(path)

        self.patch(queue_module.os, "listdir", listdir)
        return listed

    def test_draining_a_backlog_one_by_one_lists_once(self) -> None:
        """200 items claimed one at a time, each once, with one listing."""
        clock = [1_700_000_000.0]
        q = self.make_queue(clock=lambda: clock[0])
        ids = q.enqueue_many([(b"m%d" % i, {}) for i in range(200)])
        listed = self.count_listings(q)
        got = []
        for _ in range(200):
            clock[0] += 0.001
            got.append(self.claim(q).id)
        self.assertEqual(sorted(got), sorted(ids))  # one due time: any order among them
        self.assertEqual(len(listed), 1)
        self.assertIsNone(q.claim())  # used up: listed again, and empty
        self.assertEqual(len(listed), 2)

    def test_new_item_is_found_when_the_listing_holds_nothing_due(self) -> None:
        """An item enqueued after the listing, due before the listed ones
        (these were retried to later), is claimed at once: a listing whose
        first name is not due is made again."""
        clock = [1_700_000_000.0]
        q = self.make_queue(clock=lambda: clock[0], base_delay=60)
        q.enqueue(b"old", {})
        q.retry(self.claim(q), "node away")  # due in 60 s
        self.assertIsNone(q.claim())
        fresh = q.enqueue(b"fresh", {})
        self.assertEqual(self.claim(q).id, fresh)
        clock[0] += 61
        self.assertEqual(self.claim(q).message(), b"old")

    def test_listing_expires(self) -> None:
        """Items another queue object (another process) adds are found once
        the listing is older than LISTING_TTL, even while it still holds due names."""
        clock = [1_700_000_000.0]
        q = self.make_queue(clock=lambda: clock[0])
        other = self.make_queue(q.directory, clock=lambda: clock[0] - 10)
        q.enqueue_many([(b"a", {}), (b"b", {})])
        self.assertEqual(self.claim(q).message(), b"a")
        early = other.enqueue(b"early", {})  # due 10 s before the others
        self.assertEqual(self.claim(q).message(), b"b")  # the listing still serves
        q.enqueue(b"c", {})
        clock[0] += queue_module.LISTING_TTL + 0.1
        self.assertEqual(self.claim(q).id, early)


class EnqueueManyTests(QueueTestCase):

    def test_batch_is_written_with_one_directory_fsync(self) -> None:
        """enqueue_many writes every item whole, in order, with one fsync of new/ for the batch."""
        q = self.make_queue()
        synced: list[str] = []
        real = queue_module.fsync_dir

        def counting_fsync_dir(path: str) -> None:
            synced.append(path)
            real(path)

        self.patch(queue_module, "fsync_dir", counting_fsync_dir)
        results = q.enqueue_many([(b"one", {"n": 1}), ([b"tw", b"o"], {"n": 2}), (b"three", {"n": 3})])
        self.assertEqual(synced, [os.path.join(q.directory, "new")])
        self.assertTrue(all(isinstance(r, str) for r in results))
        items = [self.claim(q) for _ in range(3)]
        self.assertEqual([(i.id, i.metadata["n"], i.message()) for i in items],
                         list(zip(results, [1, 2, 3], [b"one", b"two", b"three"])))

    def test_one_failed_item_does_not_fail_the_others(self) -> None:
        """A write error fails only its own item (with the file named); the rest of the batch is stored."""
        q = self.make_queue()
        real = queue_module._write_all

        def failing_write(fd: int, data: bytes) -> None:
            if data == b"bad":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd, data)

        self.patch(queue_module, "_write_all", failing_write)
        results = q.enqueue_many([(b"good1", {}), (b"bad", {}), (b"good2", {})])
        self.assertIsInstance(results[1], OSError)
        error = results[1]
        assert isinstance(error, OSError)
        self.assertEqual(error.errno, errno.ENOSPC)
        self.assertTrue(str(error.filename).startswith(os.path.join(q.directory, "tmp")))
        self.assertEqual(files(q.directory, "tmp"), [])
        stored = sorted(self.claim(q).message() for _ in range(2))
        self.assertEqual(stored, [b"good1", b"good2"])
        self.assertIsNone(q.claim())

    def test_failed_directory_fsync_fails_the_whole_batch_and_removes_it(self) -> None:
        """When the fsync of new/ fails, every item of the batch is removed again and each gets the error."""
        q = self.make_queue()

        def failing_fsync_dir(path: str) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(queue_module, "fsync_dir", failing_fsync_dir)
        results = q.enqueue_many([(b"a", {}), (b"b", {})])
        self.assertEqual([getattr(r, "errno", None) for r in results], [errno.EIO, errno.EIO])
        self.assertEqual((files(q.directory, "tmp"), files(q.directory, "new")), ([], []))

    def test_writeback_of_the_whole_batch_starts_before_the_first_fsync(self) -> None:
        """Every file of a batch is written and its writeback started
        (posix_fadvise DONTNEED) before any is fsync'ed; each is still
        fsync'ed before any rename makes it visible."""
        q = self.make_queue()
        calls: list[str] = []
        real_fsync, real_rename, real_write = os.fsync, os.rename, queue_module._write_all

        def write(fd: int, data: bytes) -> None:
            calls.append("write")
            real_write(fd, data)

        def advise(fd: int, offset: int, length: int, advice: int) -> None:
            self.assertEqual((offset, length, advice), (0, 0, os.POSIX_FADV_DONTNEED))
            calls.append("writeback")

        def fsync(fd: int) -> None:
            calls.append("fsync")
            real_fsync(fd)

        def rename(src: str, dst: str) -> None:
            calls.append("rename")
            real_rename(src, dst)

        self.patch(queue_module, "_write_all", write)
        self.patch(queue_module.os, "posix_fadvise", advise)
        self.patch(queue_module.os, "fsync", fsync)
        self.patch(queue_module.os, "rename", rename)
        results = q.enqueue_many([(b"a", {}), (b"b", {}), (b"c", {})])
        self.assertTrue(all(isinstance(r, str) for r in results))
        # Two writes an item (header, message); the directory fsync last.
        self.assertEqual(calls, ["write"] * 6 + ["writeback"] * 3 + ["fsync"] * 3
                         + ["rename"] * 3 + ["fsync"])
        self.assertEqual(sorted(self.claim(q).message() for _ in range(3)), [b"a", b"b", b"c"])

    def test_failed_fsync_fails_only_its_item(self) -> None:
        """An fsync that fails (EIO) fails its own item, with the file named
        and removed; the items before and after it in the batch are stored."""
        q = self.make_queue()
        real_fsync = os.fsync
        count = [0]

        def failing_second_fsync(fd: int) -> None:
            count[0] += 1
            if count[0] == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fsync(fd)

        self.patch(queue_module.os, "fsync", failing_second_fsync)
        results = q.enqueue_many([(b"one", {}), (b"two", {}), (b"three", {})])
        error = results[1]
        assert isinstance(error, OSError)
        self.assertEqual(error.errno, errno.EIO)
        self.assertTrue(str(error.filename).startswith(os.path.join(q.directory, "tmp")))
        self.assertEqual(files(q.directory, "tmp"), [])
        self.assertEqual(sorted(self.claim(q).message() for _ in range(2)), [b"one", b"three"])
        self.assertIsNone(q.claim())

    def test_unserialisable_metadata_fails_only_that_item(self) -> None:
        """Metadata that is not JSON fails its own item with the TypeError and creates no file for it."""
        q = self.make_queue()
        results = q.enqueue_many([(b"a", {"x": object()}), (b"b", {})])
        self.assertIsInstance(results[0], TypeError)
        self.assertIsInstance(results[1], str)
        self.assertEqual(self.claim(q).message(), b"b")


# -- processes ---------------------------------------------------------------------------

_PRELUDE = "import sys, time\nfrom mppproxy.spool.queue import DurableQueue\n"

# Opens the queue, claims one item, says so, and waits to be killed (30 s at most).
HOLDER = _PRELUDE + """
q = DurableQueue(sys.argv[1]); q.open()
item = q.claim()
print("claimed", item.id, flush=True)
time.sleep(30)
"""

# Waits for the start time, then claims and finishes until the queue is empty.
CLAIMER = _PRELUDE + """
q = DurableQueue(sys.argv[1]); q.open()
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
for _ in range(10000):
    item = q.claim()
    if item is None:
        break
    print(item.id)
    q.finish(item)
"""

# Enqueues items whose payload carries its own SHA-256, until killed (10 s at most).
ENQUEUER = _PRELUDE + """
import hashlib, random
q = DurableQueue(sys.argv[1]); q.open()
rnd = random.Random(int(sys.argv[2]))
print("ready", flush=True)
deadline = time.monotonic() + 10
n = 0
while time.monotonic() < deadline:
    body = rnd.randbytes(rnd.randrange(0, 65536))
    payload = hashlib.sha256(body).hexdigest().encode() + b"\\n" + body
    chunks = [payload[i:i + 8192] for i in range(0, len(payload), 8192)]
    q.enqueue(iter(chunks), {"n": n, "sha256": payload[:64].decode(), "size": len(payload)})
    n += 1
"""


def start_script(script: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The process's next stdout line, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        kill(proc)
        raise AssertionError(f"no output within {timeout} s")
    line = proc.stdout.readline().strip()
    if not line:
        kill(proc)
        assert proc.stderr is not None
        raise AssertionError(f"the process ended: {proc.stderr.read()}")
    return line


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
