"""The durable queue: message copies kept on disk until they are sent on.

Ground floor (spool/), for the hold action and the archive copies (issue
12, "Edge side").  The proxy enqueues a copy and answers ``250`` only once
``enqueue`` has returned: by then the item is written, fsync'ed, renamed into
``new/`` and ``new/`` is fsync'ed (docs/design.md promise 1).  A forwarder (to come) claims items,
sends them, and finishes, retries or gives them up to ``bad/``.  The queue
never decides what an item means; it keeps bytes and a small JSON dict.

The model is Mailman 3's switchboard (``core/switchboard.py``): a file per
item written as a temporary file and renamed into place, claimed by a
rename (its ``.bak``), finished by an unlink, poison items kept in a bad
queue, claimed items of a dead process put back at start, a counted number
of times.  Unlike the switchboard, every rename that must survive a crash is
followed by an fsync of the directory, and several processes may share one
queue (the proxy's workers): the owner of a claim is a process, not "the
runner".

Layout under the queue directory::

    tmp/      <owner>_<id>.tmp       being written by enqueue (or a bad reason)
    new/      <due>_<id>_<attempts>_<recoveries>
                                     waiting; claimable once <due> has passed
    claimed/  <id>_<attempts>_<recoveries>_<owner>
                                     taken by the process <owner>
    bad/      <id>_<attempts>_<recoveries> and <id>.reason.json
                                     given up: kept for a person, never deleted
    owners/   <owner>                one lock file per open queue (flock)

``<id>`` is ``<enqueued µs, 16 digits>-<pid>-<counter>-<random>``: unique
across processes and restarts, and it carries the enqueue time (the item's
age).  ``<due>`` is the time, in µs and 16 digits, from which the item may be
claimed, so the names of ``new/`` sort in due order.  ``<owner>`` is
``<pid>-<random>``, the token of one open ``DurableQueue``, whose file in
``owners/`` it holds locked (``fcntl.flock``) while it is open: the kernel
drops the lock when the process dies, however it dies, so "is the owner
alive?" is "is its lock free?", with no pid-reuse guessing.  flock needs a
local file system (not NFS).

An item file is ``MPPQ1 <n>\\n``, ``n`` octets of JSON metadata, ``\\n``, then
the message octets.  It is only ever visible in ``new/`` once whole.

Every method that touches the disk blocks (writes, fsyncs, renames): the
proxy calls them in the thread pool (``deferToThreadPool``), never on the
reactor thread.  This module imports no reactor.
"""
from __future__ import annotations

import enum
import errno
import fcntl
import io
import json
import os
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from mppproxy.logsetup import Logger
from mppproxy.spool.durable import fsync_dir

log = Logger()

MAGIC = b"MPPQ1"
READ_CHUNK = 65536
# The metadata is a small dict (envelope, state headers); a header claiming
# more is a damaged file, not one to read into memory.
MAX_METADATA = 1024 * 1024
# An item file up to this size is read whole when it is claimed: one open
# and one read instead of the header's and then the message's (the archive
# writer reads every message it claims; most mail is small).
WHOLE_ITEM = 64 * 1024
# Tries to register as an owner when another process's recover keeps
# taking the staging file (see ``open``).
OPEN_TRIES = 20
# Retry delays (seconds) and the age after which an item goes to bad/
# rather than back to new/.  The forwarder's config (issue 12) sets them.
DEFAULT_BASE_DELAY = 60.0
DEFAULT_MAX_DELAY = 3600.0
DEFAULT_MAX_AGE = 5 * 86400.0
# Claimed by a process that died this many times: the item itself is likely
# what kills it (Mailman's MAX_BAK_COUNT), so it goes to bad/.
DEFAULT_MAX_RECOVERIES = 3
# Seconds one sorted listing of new/ serves further claims (claim_many).
# Listing and sorting a queue that grew while its consumer was away costs
# ~0.5 us a name (100,000 names: ~50 ms); done for every claim of one item
# (the forwarder's senders), draining such a backlog cost O(n) a copy.
LISTING_TTL = 2.0

_SUBDIRS = ("tmp", "new", "claimed", "bad", "owners")
_ID = r"\d{16}-\d+-\d+-[0-9a-f]+"
_OWNER = r"\d+-[0-9a-f]+"
_NEW_NAME = re.compile(rf"(\d{{16}})_({_ID})_(\d+)_(\d+)")
_CLAIMED_NAME = re.compile(rf"({_ID})_(\d+)_(\d+)_({_OWNER})")
_TMP_NAME = re.compile(rf"({_OWNER})_(.+)\.tmp")

_counter_lock = threading.Lock()
_counter = 0

Message = Union[bytes, Iterable[bytes]]


class ItemState(enum.Enum):
    """Where an item is; its directory says it, a rename moves it.

    - ``WRITING``: in ``tmp/``, being written by ``enqueue``; invisible to
      ``claim``.  A crash leaves it there; ``recover`` deletes it once its
      owner is dead.  Moves to QUEUED by the rename at the end of ``enqueue``.
    - ``QUEUED``: in ``new/``, whole and durable, claimable from its due
      time.  ``claim`` moves it to CLAIMED.
    - ``CLAIMED``: in ``claimed/``, taken by one open queue (one process).
      ``finish`` removes it; ``retry`` moves it back to QUEUED with a later
      due time (or to BAD once too old); ``bad`` moves it to BAD; the death
      of its owner sends it back to QUEUED at the next ``recover``.
    - ``BAD``: in ``bad/``, given up, with a reason file and an error log
      line; kept for a person to look at.  Nothing moves it on.
    """

    WRITING = "writing"
    QUEUED = "queued"
    CLAIMED = "claimed"
    BAD = "bad"


@dataclass(frozen=True)
class QueueItem:
    """A claimed item: its metadata, and its message read from ``path``."""

    id: str
    metadata: dict[str, Any]
    # Failed sends so far (``retry`` counts them).
    attempts: int
    # Times a process died holding it (``recover`` counts them).
    recoveries: int
    enqueued: float
    path: str
    # Where the message octets begin in the file, and how many there are.
    offset: int
    size: int
    # The message, when the item was small enough to be read whole
    # (WHOLE_ITEM); else it is read from ``path`` when asked for.
    data: Optional[bytes] = field(default=None, repr=False, compare=False)

    def chunks(self, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The message in chunks of at most ``size`` octets (memory stays
        bounded whatever the message's size)."""
        if self.data is not None:
            for start in range(0, len(self.data), size):
                yield self.data[start:start + size]
            return
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            while True:
                block = f.read(size)
                if not block:
                    return
                yield block

    def message(self) -> bytes:
        if self.data is not None:
            return self.data
        return b"".join(self.chunks())


@dataclass(frozen=True)
class QueueStats:
    """What ``stats`` counts: items waiting, items claimed, items in bad/,
    and the age in seconds of the oldest waiting or claimed item."""

    queued: int
    claimed: int
    bad: int
    oldest_age: Optional[float]

    @property
    def depth(self) -> int:
        return self.queued + self.claimed


class DurableQueue:
    """One queue directory (see the module docstring for the layout).

    Construction does no I/O; ``open`` creates the directories, takes this
    process's owner lock and runs ``recover``.  Several ``DurableQueue``
    objects, in one process or many, may share a directory."""

    def __init__(self, directory: str, *, clock: Callable[[], float] = time.time,
                 base_delay: float = DEFAULT_BASE_DELAY, max_delay: float = DEFAULT_MAX_DELAY,
                 max_age: float = DEFAULT_MAX_AGE,
                 max_recoveries: int = DEFAULT_MAX_RECOVERIES):
        self.directory = directory
        self._clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_age = max_age
        self.max_recoveries = max_recoveries
        self.owner = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._owner_file: Optional[BinaryIO] = None
        # new/'s names, sorted, not yet tried by claim_many, and when they
        # were listed; one claim at a time takes from them.
        self._listing: deque[str] = deque()
        self._listed_at = float("-inf")
        self._listing_lock = threading.Lock()

    def _dir(self, sub: str) -> str:
        return os.path.join(self.directory, sub)

    # -- open, close, recover ----------------------------------------------------

    def open(self) -> None:
        """Create the layout, take the owner lock, recover (blocking)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for sub in _SUBDIRS:
            os.makedirs(self._dir(sub), mode=0o700, exist_ok=True)
        fsync_dir(self.directory)
        # The lock file is locked before it appears in owners/, so a
        # recover running meanwhile never sees it free and takes our claims.
        # (A crash before the rename leaves the dot file, unlocked: the next
        # recover removes it like any dead owner's file.)  Another process's
        # recover may also meet the dot file in the instant between its
        # creation and our lock: its probe then holds the lock (ours fails)
        # or it removes the file as a dead owner's (our rename fails).  Two
        # processes opening one queue at once (workers starting together)
        # met it.  Then a new dot file is made, under a new name that the
        # other recover has not seen, and the next try succeeds.
        for attempt in range(OPEN_TRIES):
            staging = os.path.join(self._dir("owners"), f".{self.owner}.{attempt}.new")
            f = open(staging, "wb")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(staging, os.path.join(self._dir("owners"), self.owner))
            except (BlockingIOError, FileNotFoundError):
                f.close()
                _unlink_quietly(staging)
                if attempt + 1 == OPEN_TRIES:
                    raise
                time.sleep(0.01)
                continue
            except BaseException:
                f.close()
                _unlink_quietly(staging)
                raise
            break
        self._owner_file = f
        self.recover()

    def close(self) -> None:
        """Drop the owner lock: items still claimed by this queue go back to
        new/ at the next ``recover`` of any process."""
        if self._owner_file is not None:
            _unlink_quietly(os.path.join(self._dir("owners"), self.owner))
            self._owner_file.close()
            self._owner_file = None

    @property
    def is_open(self) -> bool:
        """True between ``open`` and ``close``."""
        return self._owner_file is not None

    def _check_open(self) -> None:
        # Our files in tmp/ and claimed/ are safe from other processes'
        # recover only while our owner lock is held.
        if self._owner_file is None:
            raise RuntimeError(f"the queue {self.directory} is not open")

    def __enter__(self) -> "DurableQueue":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> int:
        """Clean up after processes that died: their half-written files in
        tmp/ are deleted, their claimed items go back to new/ (or to bad/
        after ``max_recoveries`` deaths), their owner files are removed.
        Items of live owners are left alone.  Returns the items put back."""
        dead: dict[str, bool] = {}

        def is_dead(owner: str) -> bool:
            if owner not in dead:
                dead[owner] = owner != self.owner and not self._owner_alive(owner)
            return dead[owner]

        for name in sorted(os.listdir(self._dir("tmp"))):
            m = _TMP_NAME.fullmatch(name)
            if m is not None and is_dead(m.group(1)):
                _unlink_quietly(os.path.join(self._dir("tmp"), name))
        put_back = 0
        for name in sorted(os.listdir(self._dir("claimed"))):
            m = _CLAIMED_NAME.fullmatch(name)
            if m is None:
                log.warn("unknown file {path} in the queue's claimed/ left alone",
                         path=os.path.join(self._dir("claimed"), name))
                continue
            item_id, attempts, recoveries, owner = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            if not is_dead(owner):
                continue
            path = os.path.join(self._dir("claimed"), name)
            recoveries += 1
            if recoveries >= self.max_recoveries:
                self._to_bad(path, item_id, attempts, recoveries,
                             f"claimed {recoveries} times by a process that died")
                continue
            try:
                os.rename(path, os.path.join(self._dir("new"), _new_name(
                    _enqueued(item_id), item_id, attempts, recoveries)))
            except FileNotFoundError:
                continue  # another process recovered it first
            put_back += 1
            log.warn("queue item {item_id} put back: its process died while holding it",
                     item_id=item_id, recoveries=recoveries, queue=self.directory)
        if put_back:
            fsync_dir(self._dir("new"))
        for owner, was_dead in dead.items():
            if was_dead:
                _unlink_quietly(os.path.join(self._dir("owners"), owner))
        # Owners that died holding nothing leave only their file.
        for owner in os.listdir(self._dir("owners")):
            if owner not in dead and is_dead(owner):
                _unlink_quietly(os.path.join(self._dir("owners"), owner))
        return put_back

    def _owner_alive(self, owner: str) -> bool:
        """True while the queue ``owner`` is open: its lock file is locked."""
        try:
            fd = os.open(os.path.join(self._dir("owners"), owner), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the lock, if we got it
        return False

    # -- enqueue -----------------------------------------------------------------

    def enqueue(self, message: Message, metadata: Mapping[str, Any],
                due: Optional[float] = None) -> str:
        """Store one item; return its id (blocking).  When this returns the
        item is durable and visible in new/; the caller may answer 250.

        ``message`` is bytes or an iterable of chunks, streamed to the file
        (memory stays bounded).  ``metadata`` must be JSON-serialisable.  A
        failed write, fsync or rename (ENOSPC, EDQUOT, EIO...) raises its
        ``OSError`` with the path it concerns as ``filename``, and leaves
        nothing visible: the client gets a 4xx (``replies.storage_failure``)
        and keeps its message."""
        result = self.enqueue_many([(message, metadata)], due)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def enqueue_many(self, items: Sequence[tuple[Message, Mapping[str, Any]]],
                     due: Optional[float] = None) -> list[Union[str, Exception]]:
        """Store several items with one fsync of new/ for all (blocking): for
        each, in order, its id once it is durable and visible, or the
        exception that failed it, with nothing of that item left visible
        (as ``enqueue``; one item's full disk does not fail the others that
        were already written).  ``spool/committer.py`` batches the items of
        many sessions through this.

        Each file is written and fsync'ed before any is renamed, so every
        rename makes visible a whole, durable file; the one directory fsync
        after the renames makes them survive a crash.  Only once it has
        returned may a caller answer 250.

        All the files are written first, their writeback started together
        (``_start_writeback``), and fsync'ed after: written and fsync'ed in
        turn, each item waited for a journal commit of its own."""
        self._check_open()
        now = self._clock()
        results: list[Union[str, Exception]] = []
        # (index, id, tmp path, new path, descriptor) of the files written
        # and not yet fsync'ed (their descriptors open: at most a batch's).
        unsynced: deque[tuple[int, str, str, str, int]] = deque()
        # (index, id, tmp path, new path) of the items written and fsync'ed.
        written: list[tuple[int, str, str, str]] = []
        try:
            for index, (message, metadata) in enumerate(items):
                item_id = _new_id(now)
                tmp_path = os.path.join(self._dir("tmp"), f"{self.owner}_{item_id}.tmp")
                new_path = os.path.join(self._dir("new"), _new_name(
                    now if due is None else due, item_id, 0, 0))
                try:
                    fd = _write_unsynced(tmp_path, message, metadata)
                except Exception as e:
                    results.append(_with_path(e, tmp_path))
                    continue
                results.append(item_id)
                unsynced.append((index, item_id, tmp_path, new_path, fd))
            for *_, fd in unsynced:
                _start_writeback(fd)
            while unsynced:
                index, item_id, tmp_path, new_path, fd = unsynced.popleft()
                try:
                    _sync_and_close(fd, tmp_path)
                except Exception as e:
                    results[index] = _with_path(e, tmp_path)
                    continue
                written.append((index, item_id, tmp_path, new_path))
            renamed: list[tuple[int, str]] = []
            for index, item_id, tmp_path, new_path in written:
                try:
                    # rename(2) may need room for the directory entry (ENOSPC too).
                    os.rename(tmp_path, new_path)
                except OSError as e:
                    _unlink_quietly(tmp_path)
                    results[index] = _with_path(e, tmp_path)
                    continue
                renamed.append((index, new_path))
            written = []
            if renamed:
                try:
                    fsync_dir(self._dir("new"))
                except OSError as e:
                    # Visible but not known durable: the clients will be
                    # told 4xx and send again, so these copies must go (no
                    # duplicate).
                    for index, new_path in renamed:
                        _unlink_quietly(new_path)
                        results[index] = _with_path(e, new_path)
        except BaseException:
            # Interrupted (KeyboardInterrupt, MemoryError): nothing of this
            # call may stay behind half-known.
            for _, _, tmp_path, _, fd in unsynced:
                _close_quietly(fd)
                _unlink_quietly(tmp_path)
            for _, _, tmp_path, _ in written:
                _unlink_quietly(tmp_path)
            raise
        return results

    # -- claim, finish, retry, bad -------------------------------------------------

    def claim(self) -> Optional[QueueItem]:
        """The item with the earliest due time that has passed, now claimed
        by this queue, or None (blocking).  The claim is a rename: of two
        processes renaming the same file one succeeds, the other gets
        ENOENT and tries the next.  Not fsync'ed: after a power loss the
        item is in new/ or in claimed/, and either way comes back."""
        items = self.claim_many(1)
        return items[0] if items else None

    def claim_many(self, limit: int, max_size: Optional[int] = None) -> list[QueueItem]:
        """Up to ``limit`` due items, earliest first, claimed as ``claim``
        claims one, with one listing of new/ (blocking).  A consumer that
        works in batches (the archive writer) pays one listing per batch:
        listing and sorting a queue that grew while its consumer was away
        (20,000 items) takes ~10 ms, which per item would cap the rate at
        ~100 items a second.  ``max_size``: stop once the claimed messages
        reach this many octets (the first item is always taken)."""
        self._check_open()
        now = self._clock()
        now_us = _micros(now)
        out: list[QueueItem] = []
        total = 0
        with self._listing_lock:
            names = self._due_names(now, now_us)
            # The bounds are checked before the next name is taken: a name
            # taken from the listing and not tried would wait for the next.
            while len(out) < limit and not (max_size is not None and out and total >= max_size):
                parsed = next(names, None)
                if parsed is None:
                    break
                item = self._claim_name(parsed)
                if item is not None:
                    out.append(item)
                    total += item.size
        return out

    def _due_names(self, now: float, now_us: int) -> Iterator[re.Match[str]]:
        """new/'s items whose due time has passed, earliest first, each
        taken from the listing as it is yielded (under _listing_lock), its
        name parsed once.  The listing is made again when it is used up,
        older than LISTING_TTL, or when its first item is not due yet (an
        item enqueued since may be due before it); at most once per call.
        A name another process (or a release, a retry) has since moved is
        skipped by the rename; one that is not an item is dropped."""
        listing = self._listing
        relisted = False
        while True:
            head = _NEW_NAME.fullmatch(listing[0]) if listing else None
            if listing and head is None:
                listing.popleft()
                continue
            if head is None or now - self._listed_at > LISTING_TTL or int(head.group(1)) > now_us:
                if relisted:
                    return
                listing.clear()
                listing.extend(sorted(os.listdir(self._dir("new"))))
                self._listed_at = now
                relisted = True
                continue
            listing.popleft()
            yield head

    def _claim_name(self, m: re.Match[str]) -> Optional[QueueItem]:
        """Claim the item of new/ whose parsed name is ``m`` (a rename), or
        None when it is gone (an unreadable one goes to bad/)."""
        item_id, attempts, recoveries = m.group(2), int(m.group(3)), int(m.group(4))
        path = os.path.join(self._dir("claimed"),
                            f"{item_id}_{attempts}_{recoveries}_{self.owner}")
        try:
            os.rename(os.path.join(self._dir("new"), m.string), path)
        except FileNotFoundError:
            return None  # claimed by another process
        try:
            metadata, offset, size, data = _read_item(path)
        except (OSError, ValueError) as e:
            self._to_bad(path, item_id, attempts, recoveries, f"unreadable item: {e}")
            return None
        return QueueItem(item_id, metadata, attempts, recoveries, _enqueued(item_id),
                         path, offset, size, data)

    def finish(self, item: QueueItem) -> None:
        """The item was sent: remove it, durably (blocking)."""
        self.finish_many([item])

    def finish_many(self, items: Iterable[QueueItem], durable: bool = True) -> None:
        """Items sent: remove them, with one fsync of claimed/ for all
        (blocking).  ``durable`` False skips that fsync, for a consumer whose
        far end is idempotent (the archive stores a copy once by node and
        queue id): a removal a power cut undoes costs one more send that
        stores nothing, and each send saves a directory sync."""
        removed = False
        for item in items:
            os.unlink(item.path)
            removed = True
        if removed and durable:
            fsync_dir(self._dir("claimed"))

    def retry(self, item: QueueItem, error: str) -> ItemState:
        """A send failed in a way that may pass: put the item back, due after
        ``min(base_delay * 2**attempts, max_delay)`` seconds, or to bad/ once
        it is older than ``max_age`` (blocking).  Returns where it went."""
        now = self._clock()
        age = now - item.enqueued
        attempts = item.attempts + 1
        if age >= self.max_age:
            self._to_bad(item.path, item.id, attempts, item.recoveries,
                         f"older than {self.max_age:g} s; last error: {error}", now)
            return ItemState.BAD
        delay = self.backoff(item.attempts)
        os.rename(item.path, os.path.join(self._dir("new"), _new_name(
            now + delay, item.id, attempts, item.recoveries)))
        fsync_dir(self._dir("new"))
        log.info("queue item {item_id} will be tried again in {delay:.0f} s: {error}",
                 item_id=item.id, delay=delay, attempts=attempts, error=error,
                 age=age, queue=self.directory)
        return ItemState.QUEUED

    def release(self, item: QueueItem) -> None:
        """Hand a claimed item back unsent and uncounted (blocking): it goes
        back to new/ as ``recover`` puts items back, due from its enqueue
        time, but with its attempts and recoveries as they were.  For a
        clean stop that cut a send short: neither the item nor the node
        failed, so neither ``retry``'s backoff nor ``recover``'s count (which
        sends an item to bad/ after ``max_recoveries``) applies."""
        os.rename(item.path, os.path.join(self._dir("new"), _new_name(
            item.enqueued, item.id, item.attempts, item.recoveries)))
        fsync_dir(self._dir("new"))

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try of an item that failed ``attempts``
        times before this failure."""
        # 2**64 already passes any sane max_delay; the cap keeps it a float.
        return float(min(self.max_delay, self.base_delay * 2.0 ** min(attempts, 64)))

    def bad(self, item: QueueItem, reason: str) -> None:
        """Give the item up (a permanent refusal): move it to bad/ with its
        reason, and log it (blocking)."""
        self._to_bad(item.path, item.id, item.attempts, item.recoveries, reason)

    def _to_bad(self, path: str, item_id: str, attempts: int, recoveries: int, reason: str,
                now: Optional[float] = None) -> None:
        now = self._clock() if now is None else now
        age = now - _enqueued(item_id)
        try:
            # First the move, which at most one process can make (two
            # recovering the same dead owner's items race here).
            os.rename(path, os.path.join(self._dir("bad"), f"{item_id}_{attempts}_{recoveries}"))
        except FileNotFoundError:
            return
        record = json.dumps({"id": item_id, "reason": reason, "attempts": attempts,
                             "recoveries": recoveries, "age": age, "time": now}).encode("utf-8")
        reason_tmp = os.path.join(self._dir("tmp"), f"{self.owner}_{item_id}.reason.tmp")
        try:
            fd = os.open(reason_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, record)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(reason_tmp, os.path.join(self._dir("bad"), f"{item_id}.reason.json"))
        except OSError as e:
            # The item is in bad/ all the same; the log line below has the reason.
            _unlink_quietly(reason_tmp)
            log.error("could not write the reason file of queue item {item_id}: {error}",
                      item_id=item_id, error=str(e), queue=self.directory)
        fsync_dir(self._dir("bad"))
        log.error("queue item {item_id} moved to bad/ after {attempts} attempt(s), "
                  "{age:.0f} s old: {reason}", item_id=item_id, age=age, attempts=attempts,
                  recoveries=recoveries, reason=reason, queue=self.directory)

    # -- depth and age -----------------------------------------------------------------

    def stats(self) -> QueueStats:
        """Count the items (blocking: lists three directories)."""
        oldest: Optional[float] = None
        counts = []
        for sub, pattern, group in (("new", _NEW_NAME, 2), ("claimed", _CLAIMED_NAME, 1)):
            n = 0
            for name in os.listdir(self._dir(sub)):
                m = pattern.fullmatch(name)
                if m is None:
                    continue
                n += 1
                enqueued = _enqueued(m.group(group))
                oldest = enqueued if oldest is None else min(oldest, enqueued)
            counts.append(n)
        bad = sum(1 for name in os.listdir(self._dir("bad")) if not name.endswith(".json"))
        age = None if oldest is None else max(0.0, self._clock() - oldest)
        return QueueStats(counts[0], counts[1], bad, age)

    def depth(self) -> int:
        return self.stats().depth

    def oldest_age(self) -> Optional[float]:
        return self.stats().oldest_age

    def log_stats(self) -> QueueStats:
        """Log the queue's depth and oldest age (the forwarder calls it every
        minute from a LoopingCall, in the thread pool); returns the counts."""
        stats = self.stats()
        log.info("queue {queue}: {depth} item(s), oldest {oldest_age} s, {bad} in bad/",
                 queue=self.directory, depth=stats.depth, queued=stats.queued,
                 claimed=stats.claimed, bad=stats.bad,
                 oldest_age=None if stats.oldest_age is None else round(stats.oldest_age, 1))
        return stats


# -- names and files ---------------------------------------------------------------------

def _micros(when: float) -> int:
    return max(0, int(when * 1_000_000))


def _new_id(now: float) -> str:
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return f"{_micros(now):016d}-{os.getpid()}-{n}-{secrets.token_hex(4)}"


def _enqueued(item_id: str) -> float:
    return int(item_id.split("-", 1)[0]) / 1_000_000


def _new_name(due: float, item_id: str, attempts: int, recoveries: int) -> str:
    return f"{_micros(due):016d}_{item_id}_{attempts}_{recoveries}"


def _read_item(path: str) -> tuple[dict[str, Any], int, int, Optional[bytes]]:
    """(metadata, offset of the message, message size, the message when
    the file is at most WHOLE_ITEM octets, else None) of an item file;
    ValueError for a file that is no item."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > WHOLE_ITEM:
            metadata, offset = _read_header(f)
            return metadata, offset, size - offset, None
        whole = f.read()
    metadata, offset = _read_header(io.BytesIO(whole))
    return metadata, offset, len(whole) - offset, whole[offset:]


def _read_header(f: BinaryIO) -> tuple[dict[str, Any], int]:
    """(metadata, offset of the message) of the item file open as ``f``,
    read from its start; ValueError for a file that is no item."""
    first = f.readline(32)
    magic, _, length = first.rstrip(b"\n").partition(b" ")
    if magic != MAGIC or not first.endswith(b"\n") or not length.isdigit():
        raise ValueError("no queue item header")
    n = int(length)
    if n > MAX_METADATA:
        raise ValueError(f"metadata of {n} octets")
    raw = f.read(n + 1)
    if len(raw) != n + 1 or not raw.endswith(b"\n"):
        raise ValueError("truncated metadata")
    metadata = json.loads(raw[:-1])
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    return metadata, len(first) + n + 1


def _write_unsynced(path: str, message: Message, metadata: Mapping[str, Any]) -> int:
    """Write one item file at ``path`` (created, never overwritten) and
    return its open descriptor, not yet fsync'ed (``_sync_and_close``); on
    any failure the file is removed and the error raised."""
    header = json.dumps(dict(metadata), separators=(",", ":"), sort_keys=True).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, MAGIC + b" %d\n" % len(header) + header + b"\n")
        for chunk in ([message] if isinstance(message, bytes) else message):
            _write_all(fd, chunk)
    except BaseException:
        _close_quietly(fd)
        _unlink_quietly(path)
        raise
    return fd


def _sync_and_close(fd: int, path: str) -> None:
    """fsync and close the item file ``_write_unsynced`` wrote at ``path``;
    on a failure the file is removed and the error raised."""
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(path)
        raise


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages now, without
    waiting (a hint: the fsync that follows is what makes it durable).

    Why: under ext4's delayed allocation a file's blocks are allocated only
    when its pages are written back, so an fsync commits the journal for
    that file alone, and a batch's fsyncs in turn each waited for a commit
    of their own (~320 us an item on this project's test machines).  With
    the writeback of the whole batch started first, the allocations share
    the commit the first fsync waits for and the later fsyncs find little
    left: ~140 us an item in batches of 32 (benchmarks/README.md).
    ``posix_fadvise(POSIX_FADV_DONTNEED)`` is how Linux starts writeback
    from Python (``sync_file_range`` is not in ``os``): PostgreSQL's
    ``pg_flush_data`` falls back on it the same way.  The pages being
    written are not dropped from the cache (only clean ones are), so the
    writer that reads the item soon after still finds it there.  Where
    the call is missing or refused, nothing changes but the speed."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _with_path(error: Exception, path: str) -> Exception:
    """``error`` with ``path`` as its file name when it is an ``OSError``
    without one (the log line and the 4xx name the file that failed)."""
    if isinstance(error, OSError) and error.filename is None:
        error.filename = path
    return error


def _write_all(fd: int, data: bytes) -> None:
    """write(2) may take only part of ``data`` (a disk filling up)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if not written:
            raise OSError(errno.EIO, "queue write made no progress")
        view = view[written:]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("could not remove {path}: {error}", path=path, error=str(e))
