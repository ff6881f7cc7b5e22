"""Connection limits per node across worker processes: ``max_connections``
and ``max_connections_per_ip`` counted in a table of shared memory (issue
16, "Shared limits and counters").

Ground floor.  With ``workers > 1`` every process used to count only its
own connections, so two workers let a client hold twice its share.  Now
the main process makes one table file before it starts the workers
(``ConnectionTable.create``); each process opens it (``MPP_CONNECTION_TABLE``
and its column, ``MPP_CONNECTION_COLUMN``, in its environment) and counts
into its own column of it, under an ``fcntl`` lock held for a few
microseconds per connection and per hang-up.

Why columns: a worker that dies (SIGKILL, a crash) cannot take its
connections back.  The supervisor, which sees it die, clears its column
(``clear_column``) before starting the next one, so nothing it held stays
counted.

The table is a file under ``data_dir/run`` mapped into memory (mmap): a
header (magic, slots, columns, used slots), the total of each column, then
``slots`` slots of (client key, used flag, one count per column), open
addressing with linear probing on a hash of the client's address.  A slot
whose counts are all zero is reused by the next new address; when more
than half the slots have been used the table is compacted in place, so a
lookup stays a few probes.  ``slots`` is at least four times
``max_connections``: a table can never be full of live addresses.
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from typing import Optional

ENV_PATH = "MPP_CONNECTION_TABLE"
ENV_COLUMN = "MPP_CONNECTION_COLUMN"

_MAGIC = b"MPPCONN1"
_HEADER = struct.Struct("<8sIII")  # magic, slots, columns, used slots
_KEY = 16
_SLOT_HEAD = _KEY + 8  # key, used flag, padding to 8
MAX_SLOTS = 1 << 18


def slots_for(max_connections: int) -> int:
    """A power of two of at least four slots per connection allowed."""
    n = 64
    while n < 4 * max_connections and n < MAX_SLOTS:
        n *= 2
    return n


def _key(host: str) -> bytes:
    return hashlib.blake2b(host.encode("utf-8", "surrogatepass"), digest_size=_KEY).digest()


class ConnectionTable:
    """The shared table, opened in this process (``create`` or ``attach``)."""

    def __init__(self, path: str, fd: int, mapped: mmap.mmap, slots: int, columns: int):
        self.path = path
        self._fd = fd
        self._mm = mapped
        self.slots = slots
        self.columns = columns
        self._totals = _HEADER.size
        self._slot0 = self._totals + 8 * columns
        self._slot_size = _SLOT_HEAD + 4 * columns
        self._counts = struct.Struct(f"<{columns}i")

    @classmethod
    def create(cls, path: str, slots: int, columns: int) -> "ConnectionTable":
        """A new, empty table at ``path`` (replacing one left by a
        previous run)."""
        size = _HEADER.size + 8 * columns + slots * (_SLOT_HEAD + 4 * columns)
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, _HEADER.pack(_MAGIC, slots, columns, 0), 0)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mmap.mmap(fd, size), slots, columns)

    @classmethod
    def attach(cls, path: str) -> "ConnectionTable":
        """The table the main process made; ValueError when the file is not one."""
        fd = os.open(path, os.O_RDWR)
        try:
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) != _HEADER.size:
                raise ValueError(f"{path}: not a connection table (too short)")
            magic, slots, columns, _ = _HEADER.unpack(head)
            if magic != _MAGIC:
                raise ValueError(f"{path}: not a connection table")
            size = os.fstat(fd).st_size
            return cls(path, fd, mmap.mmap(fd, size), slots, columns)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)

    # -- locked operations ------------------------------------------------------------

    def _lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def add(self, column: int, host: str) -> None:
        self._lock()
        try:
            self._add_total(column, 1)
            slot = self._find(_key(host), insert=True)
            assert slot is not None
            self._add_count(slot, column, 1)
        finally:
            self._unlock()

    def remove(self, column: int, host: str) -> None:
        self._lock()
        try:
            self._add_total(column, -1)
            slot = self._find(_key(host), insert=False)
            if slot is not None:
                self._add_count(slot, column, -1)
        finally:
            self._unlock()

    def total(self) -> int:
        self._lock()
        try:
            return sum(max(0, v) for v in struct.unpack_from(
                f"<{self.columns}q", self._mm, self._totals))
        finally:
            self._unlock()

    def per_host(self, host: str) -> int:
        self._lock()
        try:
            slot = self._find(_key(host), insert=False)
            if slot is None:
                return 0
            return sum(max(0, v) for v in self._counts.unpack_from(self._mm, slot + _SLOT_HEAD))
        finally:
            self._unlock()

    def clear_column(self, column: int) -> None:
        """Forget every connection ``column`` counted (its process is gone)."""
        self._lock()
        try:
            struct.pack_into("<q", self._mm, self._totals + 8 * column, 0)
            for i in range(self.slots):
                struct.pack_into("<i", self._mm, self._slot0 + i * self._slot_size + _SLOT_HEAD
                                 + 4 * column, 0)
        finally:
            self._unlock()

    # -- the table (the lock held) ---------------------------------------------------

    def _add_total(self, column: int, delta: int) -> None:
        at = self._totals + 8 * column
        (value,) = struct.unpack_from("<q", self._mm, at)
        struct.pack_into("<q", self._mm, at, max(0, value + delta))

    def _add_count(self, slot: int, column: int, delta: int) -> None:
        at = slot + _SLOT_HEAD + 4 * column
        (value,) = struct.unpack_from("<i", self._mm, at)
        struct.pack_into("<i", self._mm, at, max(0, value + delta))

    def _used(self) -> int:
        return int(_HEADER.unpack_from(self._mm, 0)[3])

    def _set_used(self, n: int) -> None:
        struct.pack_into("<I", self._mm, 16, n)  # after magic, slots, columns

    def _find(self, key: bytes, insert: bool) -> Optional[int]:
        """The offset of ``key``'s slot; with ``insert``, a slot made for it
        (the first reusable one on its probe path, else the never-used one
        that ends it).  The whole path is looked at first, so a key is
        never in the table twice."""
        mask = self.slots - 1
        i = int.from_bytes(key[:4], "little") & mask
        reusable: Optional[int] = None
        empty: Optional[int] = None
        for _ in range(self.slots):
            at = self._slot0 + i * self._slot_size
            if self._mm[at + _KEY] == 0:
                empty = at  # never used: the key is not further on
                break
            if self._mm[at:at + _KEY] == key:
                return at
            if reusable is None and not any(self._counts.unpack_from(self._mm, at + _SLOT_HEAD)):
                reusable = at
            i = (i + 1) & mask
        if not insert:
            return None
        target = reusable if reusable is not None else empty
        if target is None:  # cannot happen: slots_for keeps 4 slots per connection
            raise RuntimeError(f"connection table {self.path} is full")
        if target == empty:
            self._set_used(self._used() + 1)
        self._mm[target:target + _KEY] = key
        self._mm[target + _KEY] = 1
        if self._used() * 2 > self.slots:
            self._compact(keep=key)
            return self._find(key, insert=False)
        return target

    def _compact(self, keep: bytes) -> None:
        """More than half the slots have been used: put the live ones (and
        ``keep``, just inserted, still at zero) back into an empty table."""
        live = []
        for i in range(self.slots):
            at = self._slot0 + i * self._slot_size
            if self._mm[at + _KEY]:
                key = bytes(self._mm[at:at + _KEY])
                counts = self._counts.unpack_from(self._mm, at + _SLOT_HEAD)
                if any(counts) or key == keep:
                    live.append((key, counts))
        start = self._slot0
        self._mm[start:start + self.slots * self._slot_size] = bytes(self.slots * self._slot_size)
        self._set_used(0)
        for key, counts in live:
            self._place(key, counts)

    def _place(self, key: bytes, counts: tuple[int, ...]) -> None:
        mask = self.slots - 1
        i = int.from_bytes(key[:4], "little") & mask
        while True:
            at = self._slot0 + i * self._slot_size
            if self._mm[at + _KEY] == 0:
                self._mm[at:at + _KEY] = key
                self._mm[at + _KEY] = 1
                self._counts.pack_into(self._mm, at + _SLOT_HEAD, *counts)
                self._set_used(self._used() + 1)
                return
            i = (i + 1) & mask


class _PerHost:
    """``counter.per_host.get(host, 0)`` as the SMTP server asks it."""

    def __init__(self, table: ConnectionTable):
        self._table = table

    def get(self, host: str, default: int = 0) -> int:
        return self._table.per_host(host) or default


class SharedConnectionCounter:
    """``smtp.server.ConnectionCounter``'s interface over one column of the
    shared table: ``total`` and ``per_host`` are the node's, ``add`` and
    ``remove`` this process's."""

    def __init__(self, table: ConnectionTable, column: int):
        self.table = table
        self.column = column
        self.per_host = _PerHost(table)

    @property
    def total(self) -> int:
        return self.table.total()

    def add(self, host: str) -> None:
        self.table.add(self.column, host)

    def remove(self, host: str) -> None:
        self.table.remove(self.column, host)


def from_environment() -> Optional[SharedConnectionCounter]:
    """The worker's counter on the table its main process named, or None."""
    path, column = os.environ.get(ENV_PATH), os.environ.get(ENV_COLUMN)
    if not path or not column or not column.isdigit():
        return None
    table = ConnectionTable.attach(path)
    if int(column) >= table.columns:
        table.close()
        raise ValueError(f"{path}: column {column} of a table of {table.columns}")
    return SharedConnectionCounter(table, int(column))
