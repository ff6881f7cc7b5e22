"""A full disk on the message path (issue #15): every write of a message
(the spool, its cleaned copy, the Maildir, the archive queue of held
messages, the state database's file) that the disk cannot take ends in a 4xx for that
message, never a dropped connection and never a 250, and the session goes
on (docs/design.md promises 1 and 4).

Two kinds of test: fakes that raise ``OSError(ENOSPC)`` (they run
anywhere), and a real full file system: a tmpfs of 1 MiB mounted for the
test (root only), filled with a file until the next write gets ENOSPC.
Without root the tmpfs tests skip, or fail with ``MPP_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import errno
import glob
import os
import time
from dataclasses import replace
from typing import Any, Callable, Optional

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from fakes_backend import FakeBackend, poll_until
from helpers import mount_tmpfs
from loopback import RawClient, proxy_config, start_proxy, wait_reactor_quiet
from mppproxy.config.schema import LimitsConfig
from mppproxy.db import StateDatabase, StateDatabaseError
from mppproxy.delivery import maildir
from mppproxy.actions.quarantine import hold
from mppproxy.message import prepare
from mppproxy.results import Disposition
from mppproxy.config.database import DatabaseConfig
from mppproxy.config.policy import GreylistConfig
from mppproxy.smtp import replies
from mppproxy.smtp.framing import DataError, DataReader
from mppproxy.smtp.replies import Reply
from mppproxy.spool import spool as spool_module
from mppproxy.spool.spool import Spool
from mppproxy.verdict import Verdict
from test_edge_handler import make_config, make_gateway, make_session, make_txn, temp_dir
from test_server import ServerTestCase, codes, split_replies, tuned


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullFile:
    """An unbuffered temporary file with ``room`` octets left on its disk,
    taking at most ``step`` octets per write (a short write, as write(2)
    may do); past ``room`` every write raises ENOSPC."""

    def __init__(self, room: int = 0, step: Optional[int] = None):
        self.room = room
        self.step = step
        self.data = bytearray()
        self.closed = False

    def write(self, data: Any) -> int:
        if self.room <= 0:
            raise no_space()
        n = min(len(data), self.room, self.step or len(data))
        self.data += bytes(data[:n])
        self.room -= n
        return n

    def close(self) -> None:
        self.closed = True


class FakeTempfile:
    """Stands in for the ``tempfile`` module of ``mppproxy.spool.spool``:
    each TemporaryFile is ``make()``'s file (or ``make()`` raises)."""

    def __init__(self, make: Callable[[], Any]):
        self.make = make
        self.files: list[Any] = []
        self.dirs: list[Optional[str]] = []

    def TemporaryFile(self, prefix: str = "", dir: Optional[str] = None,
                      buffering: int = -1) -> Any:
        self.dirs.append(dir)
        f = self.make()
        self.files.append(f)
        return f

    @staticmethod
    def gettempdir() -> str:
        return "/fake-tmp"


def errors_logged(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_level") == LogLevel.error]


# --- the reply -----------------------------------------------------------------------

class StorageReplyTests(SynchronousTestCase):

    def test_full_disk_is_452_4_3_1_any_other_error_451_4_3_0(self) -> None:
        """ENOSPC, EDQUOT and EIO answer 452 4.3.1 (RFC 5321 4.2.2, RFC 3463 4.3.1); other OSErrors 451 4.3.0."""
        table = {errno.ENOSPC: (452, "4.3.1"), errno.EDQUOT: (452, "4.3.1"),
                 errno.EIO: (452, "4.3.1"), errno.EACCES: (451, "4.3.0"),
                 errno.EROFS: (451, "4.3.0"), errno.ENOENT: (451, "4.3.0")}
        for code, expected in table.items():
            reply = replies.storage_failure(OSError(code, os.strerror(code)))
            self.assertEqual((reply.code, reply.enhanced), expected, errno.errorcode[code])


# --- the spool -----------------------------------------------------------------------

class SpoolTests(SynchronousTestCase):

    def test_write_past_memory_on_full_disk_raises_enospc_naming_the_directory(self) -> None:
        """A spool write the disk cannot take raises ENOSPC at once, with the spool directory as its file name."""
        fake = FakeTempfile(lambda: FullFile(room=0))
        self.patch(spool_module, "tempfile", fake)
        spool = Spool(10, "/var/spool/mpp")
        spool.write(b"0123456789")  # still in memory
        with self.assertRaises(OSError) as caught:
            spool.write(b"more")
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        self.assertEqual(caught.exception.filename, "/var/spool/mpp")
        self.assertEqual(fake.dirs, ["/var/spool/mpp"])

    def test_failed_spool_frees_its_file_and_refuses_more_writes(self) -> None:
        """After a failed write the temporary file is closed at once (its space freed) and later writes fail too."""
        fake = FakeTempfile(lambda: FullFile(room=15))
        self.patch(spool_module, "tempfile", fake)
        spool = Spool(10)
        spool.write(b"0123456789")
        self.assertRaises(OSError, spool.write, b"x" * 100)
        self.assertTrue(fake.files[0].closed)
        self.assertIsNotNone(spool.error)
        self.assertEqual(spool.error.filename, "/fake-tmp")
        self.assertRaises(OSError, spool.write, b"y")
        spool.close()  # a second close is harmless

    def test_short_writes_are_completed(self) -> None:
        """A write(2) that takes only part of the data is continued until all of it is in the file."""
        fake = FakeTempfile(lambda: FullFile(room=10 ** 6, step=7))
        self.patch(spool_module, "tempfile", fake)
        spool = Spool(5)
        spool.write(b"abcdef")
        spool.write(b"0123456789" * 10)
        self.assertEqual(bytes(fake.files[0].data), b"abcdef" + b"0123456789" * 10)
        self.assertIsNone(spool.error)


# --- framing -------------------------------------------------------------------------

class FramingTests(SynchronousTestCase):

    def test_sink_error_reads_on_to_the_end_of_data_and_drops_the_rest(self) -> None:
        """A sink that raises OSError makes a STORAGE error; reading goes on to CRLF.CRLF, in any chunking, without more sink calls."""
        message = b"Subject: x\r\n\r\n" + b"line\r\n" * 2000 + b".\r\nQUIT\r\n"
        for size in (1, 7, 4096, len(message)):
            calls: list[int] = []

            def sink(data: bytes) -> None:
                calls.append(len(data))
                raise no_space()

            reader = DataReader(sink, 10 ** 6)
            rest = b""
            for i in range(0, len(message), size):
                chunk = message[i:i + size]
                used = reader.feed(chunk)
                if reader.done:
                    rest = chunk[used:] + message[i + size:]
                    break
            self.assertTrue(reader.done, size)
            self.assertEqual(rest, b"QUIT\r\n", size)
            self.assertIs(reader.error, DataError.STORAGE)
            self.assertEqual(reader.storage_error.errno, errno.ENOSPC)
            self.assertEqual(len(calls), 1, size)


# --- the session ---------------------------------------------------------------------

BIG_BODY = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 200   # ~15.6 KiB
SMALL = b"Subject: small\r\n\r\nhello\r\n.\r\n"


class SessionTests(ServerTestCase):
    """The session with its spool on a full disk (a fake temporary file)."""

    def full_disk(self, make: Callable[[], Any] = lambda: FullFile(room=0)) -> FakeTempfile:
        fake = FakeTempfile(make)
        self.patch(spool_module, "tempfile", fake)
        return fake

    def config(self) -> Any:
        return replace(tuned(limits={"memory_spool_bytes": 4096}), spool_dir="/spool/full")

    def test_full_spool_answers_452_at_end_of_data_and_the_session_goes_on(self) -> None:
        """A message that meets a full spool gets 452 4.3.1 after CRLF.CRLF; RSET, a small message (250) and QUIT follow."""
        self.full_disk()
        proto, transport, handler = self.connect(self.config())
        self.start_transaction(proto, transport)
        self.assertEqual(codes(self.talk(proto, transport, b"DATA\r\n")), [354])
        with capturedLogs() as events:
            out = b""
            # In odd chunks, as a client's TCP segments come.
            data = BIG_BODY + b".\r\n"
            for i in range(0, len(data), 1000):
                out += self.talk(proto, transport, data[i:i + 1000])
        self.assertEqual(out, replies.STORAGE_ERROR.to_bytes())
        self.assertNotIn("data_end", handler.calls)
        self.assertEqual(len(handler.resets), 1)
        self.assertIn("could not be stored", handler.resets[0])
        [logged] = errors_logged(events)
        self.assertEqual(logged["errno"], errno.ENOSPC)
        self.assertEqual(logged["path"], "/spool/full")
        self.assertTrue(logged["queue_id"])
        out = self.talk(proto, transport, b"RSET\r\nMAIL FROM:<a@client.example>\r\n"
                                          b"RCPT TO:<r@example.com>\r\nDATA\r\n" + SMALL)
        self.assertEqual(codes(out), [250, 250, 250, 354, 250])
        self.assertEqual(handler.messages, [b"Subject: small\r\n\r\nhello\r\n"])
        self.assertEqual(codes(self.talk(proto, transport, b"QUIT\r\n")), [221])
        self.assertTrue(transport.disconnecting)

    def test_pipelined_commands_after_the_refused_message_are_answered(self) -> None:
        """Commands pipelined after the refused message's CRLF.CRLF are read as commands and answered in order."""
        self.full_disk()
        proto, transport, handler = self.connect(self.config())
        self.start_transaction(proto, transport)
        out = self.talk(proto, transport, b"DATA\r\n" + BIG_BODY + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        self.assertEqual(codes(out), [354, 452, 250, 250, 221])
        self.assertTrue(split_replies(out)[1].startswith(b"452 4.3.1 "))

    def test_other_spool_error_answers_451_4_3_0(self) -> None:
        """A spool that cannot be created for another reason (EACCES) gets 451 4.3.0, not a dropped connection."""
        def refuse() -> Any:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/spool/full")

        self.full_disk(refuse)
        proto, transport, handler = self.connect(self.config())
        self.start_transaction(proto, transport)
        out = self.talk(proto, transport, b"DATA\r\n" + BIG_BODY + b".\r\n")
        self.assertEqual(split_replies(out)[1], replies.LOCAL_ERROR.to_bytes())
        self.assertFalse(transport.disconnecting)

    def test_message_that_fits_in_memory_never_needs_the_disk(self) -> None:
        """A message under memory_spool_bytes is accepted with the disk full: it never touches it."""
        fake = self.full_disk()
        proto, transport, handler = self.connect(self.config())
        self.start_transaction(proto, transport)
        self.assertEqual(codes(self.talk(proto, transport, b"DATA\r\n" + SMALL)), [354, 250])
        self.assertEqual(fake.files, [])


# --- Maildir delivery ------------------------------------------------------------------

def maildir_files(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "**", "tmp", "*"), recursive=True)
                  + glob.glob(os.path.join(root, "**", "new", "*"), recursive=True))


RCPTS = ("<a@example.com>", "<b@example.com>")


class MaildirTests(SynchronousTestCase):

    def deliver(self, data_dir: str, message: bytes = b"Subject: m\r\n\r\nbody\r\n") -> list[str]:
        txn = make_txn(message, recipients=RCPTS)
        return maildir.deliver(txn.spool.chunks, txn.sender, list(txn.recipients), "%D%/%U%",
                               data_dir)

    def test_failed_rename_removes_every_copy(self) -> None:
        """A rename into new/ that fails (ENOSPC) for the second recipient removes the first one's copy too."""
        data_dir = temp_dir(self)
        real_rename = os.rename
        renames: list[str] = []

        def rename(src: str, dst: str) -> None:
            renames.append(dst)
            if len(renames) == 2:
                raise no_space()
            real_rename(src, dst)

        self.patch(os, "rename", rename)
        with self.assertRaises(OSError) as caught:
            self.deliver(data_dir)
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        self.assertEqual(caught.exception.filename, renames[1])
        self.assertEqual(maildir_files(data_dir), [])

    def test_failed_write_removes_the_tmp_copies_and_names_the_file(self) -> None:
        """A copy whose fsync fails (EIO) leaves no file in tmp/ or new/, and the error names the tmp file."""
        data_dir = temp_dir(self)
        real_fsync = os.fsync
        calls: list[int] = []

        def fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        with self.assertRaises(OSError) as caught:
            self.deliver(data_dir)
        self.assertIn(os.sep + "tmp" + os.sep, caught.exception.filename)
        self.assertEqual(maildir_files(data_dir), [])


# --- the edge and its actions ---------------------------------------------------------

class EdgeTests(SynchronousTestCase):

    def data_end(self, gw: Any, txn: Any) -> Reply:
        return self.successResultOf(Deferred.fromCoroutine(gw.on_data_end(make_session(), txn)))

    def failing_fsync(self, code: int) -> None:
        def fsync(fd: int) -> None:
            raise OSError(code, os.strerror(code))

        self.patch(os, "fsync", fsync)

    def test_local_delivery_on_full_disk_is_452_and_logged_as_our_fault(self) -> None:
        """All-in-one delivery that meets ENOSPC answers 452 4.3.1, logs the path, errno and queue id, and leaves no file."""
        data_dir = temp_dir(self)
        gw, _ = make_gateway(make_config(data_dir))
        self.failing_fsync(errno.ENOSPC)
        txn = make_txn(b"Subject: m\r\n\r\nbody\r\n", recipients=RCPTS)
        with capturedLogs() as events:
            reply = self.data_end(gw, txn)
        self.assertEqual(reply, replies.STORAGE_ERROR)
        [logged] = errors_logged(events)
        self.assertEqual((logged["what"], logged["errno"], logged["queue_id"]),
                         ("maildir delivery", errno.ENOSPC, txn.id))
        self.assertTrue(logged["path"].startswith(data_dir))
        self.assertEqual(maildir_files(data_dir), [])

    def test_local_delivery_other_error_is_451(self) -> None:
        """A Maildir write error that is not a full disk (EROFS) answers 451 4.3.0."""
        data_dir = temp_dir(self)
        gw, _ = make_gateway(make_config(data_dir))
        self.failing_fsync(errno.EROFS)
        self.assertEqual(self.data_end(gw, make_txn(b"Subject: m\r\n\r\nbody\r\n")),
                         replies.LOCAL_ERROR)

    def test_quarantine_on_full_disk_is_452_and_says_quarantine(self) -> None:
        """The archive queue on a full disk answers 452 4.3.1 for a held message, the log line names the quarantine, and nothing is queued."""
        data_dir = temp_dir(self)
        _, ctx = make_gateway(make_config(data_dir))
        ctx.archive.open()
        self.addCleanup(ctx.archive.close)
        self.failing_fsync(errno.EDQUOT)
        txn = make_txn(b"Subject: m\r\n\r\nbody\r\n")
        message, _ = prepare(make_session(), txn, None)
        with capturedLogs() as events:
            reply = self.successResultOf(Deferred.fromCoroutine(
                hold(ctx.archive, make_session(), txn, message,
                     Verdict(Disposition.QUARANTINE), time.time())))
        self.assertEqual(reply, replies.STORAGE_ERROR)
        [logged] = errors_logged(events)
        self.assertEqual(logged["what"], "quarantine")
        queue = ctx.archive.queue
        self.assertEqual(queue.stats().depth, 0)
        self.assertEqual(os.listdir(os.path.join(queue.directory, "tmp")), [])
        self.assertEqual(maildir_files(data_dir), [])

    def test_cleaned_copy_on_full_disk_is_452(self) -> None:
        """A message whose X-MPP-* headers are removed into a new spool that meets a full disk gets 452 4.3.1."""
        fake = FakeTempfile(lambda: FullFile(room=0))
        self.patch(spool_module, "tempfile", fake)
        data_dir = temp_dir(self)
        config = make_config(data_dir, limits=LimitsConfig(memory_spool_bytes=0))
        gw, _ = make_gateway(config)
        txn = make_txn(b"X-MPP-Scan: forged\r\nSubject: m\r\n\r\nbody\r\n")
        spool = txn.spool
        with capturedLogs() as events:
            reply = self.data_end(gw, txn)
        self.assertEqual(reply, replies.STORAGE_ERROR)
        self.assertEqual(errors_logged(events)[0]["what"], "spool copy")
        self.assertIs(txn.spool, spool)  # the client's spool is kept as it was
        self.assertTrue(fake.files[0].closed)
        self.assertEqual(maildir_files(data_dir), [])


# --- a real full file system (tmpfs, root) ---------------------------------------------

def fill(path: str, leave: int = 0) -> str:
    """Fill the file system of ``path`` with one file until ENOSPC, then
    give back ``leave`` octets (rounded to pages by tmpfs); the file's path."""
    filler = os.path.join(path, "filler")
    with open(filler, "wb", buffering=0) as f:
        block = b"\0" * 65536
        # Bounded: 4096 blocks are 256 MiB, far more than a test's tmpfs.
        for _ in range(4096):
            try:
                f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
        else:
            raise AssertionError(f"{path} did not fill up")
        if leave:
            f.truncate(max(0, f.tell() - leave))
    return filler


class TmpfsUnitTests(SynchronousTestCase):

    def test_spool_on_full_tmpfs_raises_enospc(self) -> None:
        """On a really full file system the spool's write past memory raises ENOSPC naming its directory."""
        path = mount_tmpfs(self)
        fill(path)
        spool = Spool(100, path)
        spool.write(b"x" * 100)
        with self.assertRaises(OSError) as caught:
            spool.write(b"y" * 10000)
        self.assertEqual((caught.exception.errno, caught.exception.filename), (errno.ENOSPC, path))
        self.assertEqual(os.listdir(path), ["filler"])

    def test_maildir_on_full_tmpfs_keeps_all_or_none(self) -> None:
        """A Maildir with room for one recipient's copy but not the second keeps neither."""
        path = mount_tmpfs(self)
        message = b"Subject: m\r\n\r\n" + b"x" * 300_000 + b"\r\n"
        fill(path, leave=400_000)
        txn = make_txn(message, recipients=RCPTS)
        with self.assertRaises(OSError) as caught:
            maildir.deliver(txn.spool.chunks, txn.sender, list(txn.recipients), "%D%/%U%", path)
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        self.assertEqual(maildir_files(path), [])


async def _store_fails_then_recovers(case: Any, db: StateDatabase, filler: str) -> None:
    grey = GreylistConfig(enabled=True, delay=300.0, retry_window=3600.0, lifetime=86400.0,
                          auto_whitelist_after=0)
    # Enough new triplets in one batch that the WAL must grow.
    checks = [db.greylist.check("192.0.2.0/24", f"s{i}@client.test", "r@example.com", grey)
              for i in range(500)]
    results = await defer.DeferredList([Deferred.fromCoroutine(c) for c in checks],
                                       consumeErrors=True)
    failures = [r for ok, r in results if not ok]
    case.assertEqual(len(failures), 500)
    failures[0].trap(StateDatabaseError)
    case.assertIn("disk is full", failures[0].getErrorMessage())
    os.unlink(filler)
    wait = await Deferred.fromCoroutine(
        db.greylist.check("192.0.2.0/24", "s0@client.test", "r@example.com", grey))
    case.assertEqual(wait, 300.0)


def converse(client: RawClient, steps: list[tuple[bytes, int]]) -> list[tuple[int, bytes]]:
    """Send each step's bytes (a command or a whole message) and read one
    reply each; the replies."""
    got = []
    for data, _ in steps:
        client.send(data)
        got.append(client.reply())
    return got


class TmpfsLoopbackTests(unittest.TestCase):
    """The proxy in-process on loopback with its disk on a full tmpfs."""

    timeout = 60

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    def client_session(self, port: int, steps: list[tuple[bytes, int]]) -> list[tuple[int, bytes]]:
        """A new connection: the greeting, then each step's reply."""
        c = RawClient(port)
        try:
            return [c.reply()] + converse(c, steps)
        finally:
            c.sock.close()

    async def warm_up(self, port: int) -> None:
        """One RCPT through the policy checks before the disk is filled, so
        the state database's tables exist (its start runs in a thread)."""
        steps = [(b"EHLO client.test\r\n", 250), (b"MAIL FROM:<s@client.test>\r\n", 250),
                 (b"RCPT TO:<a@example.com>\r\n", 250), (b"QUIT\r\n", 221)]
        self.assert_codes(await deferToThread(self.client_session, port, steps), steps)

    def assert_codes(self, got: list[tuple[int, bytes]], steps: list[tuple[bytes, int]]) -> None:
        self.assertEqual([c for c, _ in got], [220] + [code for _, code in steps], got)

    async def test_edge_spool_full_gets_452_and_backend_never_gets_the_message(self) -> None:
        """Edge mode: a message past memory_spool_bytes on a full spool gets 452 4.3.1, the backend sees no DATA; RSET and a small message then get 250."""
        spool_dir = mount_tmpfs(self)
        fill(spool_dir)
        fake = FakeBackend()
        config = replace(proxy_config(self.mktemp(), fake.start_for(self),
                                      limits={"memory_spool_bytes": 65536}), spool_dir=spool_dir)
        proxy = start_proxy(self, config)
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 200 + b".\r\n"
        steps = [(b"EHLO client.test\r\n", 250), (b"MAIL FROM:<s@client.test>\r\n", 250),
                 (b"RCPT TO:<a@example.com>\r\n", 250), (b"DATA\r\n", 354), (big, 452),
                 (b"RSET\r\n", 250), (b"MAIL FROM:<s@client.test>\r\n", 250),
                 (b"RCPT TO:<a@example.com>\r\n", 250), (b"DATA\r\n", 354),
                 (b"Subject: small\r\n\r\nhello\r\n.\r\n", 250), (b"QUIT\r\n", 221)]
        got = await deferToThread(self.client_session, proxy.port, steps)
        self.assert_codes(got, steps)
        self.assertTrue(got[5][1].startswith(b"4.3.1 "), got[5])
        [msg] = fake.messages
        self.assertIn(b"Subject: small", msg.data)
        self.assertEqual(fake.verbs().count("DATA"), 1)

    async def test_all_in_one_maildir_full_gets_452_then_recovers(self) -> None:
        """All-in-one mode: a Maildir on a full disk gets 452 4.3.1; once space is back the same session delivers with 250."""
        data_dir = mount_tmpfs(self)
        config = proxy_config(data_dir)
        proxy = start_proxy(self, config)
        await self.warm_up(proxy.port)
        # The node's own archive store (archivenode/keeper.py) is made in
        # data_dir at start: filled before it is, its SQLite journal could
        # give space back under the test.
        keeper = proxy.service.keeper
        assert keeper is not None
        await poll_until(reactor, lambda: keeper.writer.store_ready, 20.0, "the archive store open")
        filler = fill(data_dir)
        msg = b"Subject: m\r\n\r\nbody\r\n.\r\n"
        first = [(b"EHLO client.test\r\n", 250), (b"MAIL FROM:<s@client.test>\r\n", 250),
                 (b"RCPT TO:<a@example.com>\r\n", 250), (b"DATA\r\n", 354), (msg, 452),
                 (b"RSET\r\n", 250), (b"NOOP\r\n", 250)]
        c = RawClient(proxy.port)
        try:
            got = await deferToThread(lambda: [c.reply()] + converse(c, first))
            self.assert_codes(got, first)
            self.assertTrue(got[5][1].startswith(b"4.3.1 "), got[5])
            self.assertEqual(maildir_files(data_dir), [])
            os.unlink(filler)
            again = [(b"MAIL FROM:<s@client.test>\r\n", 250), (b"RCPT TO:<a@example.com>\r\n", 250),
                     (b"DATA\r\n", 354), (msg, 250), (b"QUIT\r\n", 221)]
            got = await deferToThread(converse, c, again)
            self.assertEqual([code for code, _ in got], [code for _, code in again], got)
        finally:
            c.sock.close()
        self.assertEqual(len(maildir_files(data_dir)), 1)

    async def test_state_database_on_full_disk_tempfails_greylisting(self) -> None:
        """The state-database checks whose SQLite file cannot be written (disk full) answer 451 4.3.0, not a pass, and work again once space is back."""
        data_dir = mount_tmpfs(self)
        filler = fill(data_dir)
        fake = FakeBackend()
        config = proxy_config(data_dir, fake.start_for(self), policy={
            "policies": {"default": {"greylisting": {"enabled": True, "delay": 60}}}})
        with capturedLogs() as events:
            proxy = start_proxy(self, config)
            steps = [(b"EHLO client.test\r\n", 250), (b"MAIL FROM:<s@client.test>\r\n", 250),
                     (b"RCPT TO:<a@example.com>\r\n", 451), (b"RSET\r\n", 250)]
            got = await deferToThread(self.client_session, proxy.port, steps)
        self.assert_codes(got, steps)
        self.assertTrue(got[3][1].startswith(b"4.3.0 "), got[3])
        # The auto-blacklist lookup (before greylisting) meets it first.
        failed = [e for e in events if e.get("check") in ("blacklist", "greylisting")
                  and "error" in e]
        self.assertTrue(failed, "no log line for the failed check")
        self.assertIn("database or disk is full", failed[0]["error"])
        self.assertTrue(self.flushLoggedErrors(StateDatabaseError))
        os.unlink(filler)
        got = await deferToThread(self.client_session, proxy.port, steps)
        self.assertEqual(got[3][0], 451)
        self.assertTrue(got[3][1].startswith(b"4.7.1 "), got[3])  # greylisted: it works
        self.assertEqual(fake.messages, [])

    async def test_state_database_store_fails_when_the_wal_cannot_grow(self) -> None:
        """A running greylist store whose disk fills fails every check of the batch with a StateDatabaseError, then recovers."""
        data_dir = mount_tmpfs(self)
        from twisted.internet import reactor
        db = StateDatabase(DatabaseConfig(purge_interval=1e9, pool_max=2), data_dir, reactor)
        self.addCleanup(db.stop)
        self.assertTrue(await db.start())
        filler = fill(data_dir)
        await _store_fails_then_recovers(self, db, filler)
