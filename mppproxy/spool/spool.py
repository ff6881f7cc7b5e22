"""The message spool: memory first, a temporary file past a bound.

Stage: DATA.  The framing reader writes unstuffed message content here; the
relay and (later) the scanners read it back.  Past ``memory_limit`` bytes the
content moves to an anonymous temporary file, so a large or hostile message
cannot pin memory (docs/design.md promise 6).  A write the disk cannot take
raises its ``OSError`` from ``write`` (the framing reader turns it into a
refusal at the end of data: 452 4.3.1 for a full disk).
"""
from __future__ import annotations

import errno
import io
import os
import tempfile
from typing import BinaryIO, Iterator, Optional

READ_CHUNK = 65536


class Spool:
    """Append-only message buffer.  Closing it frees the memory or file."""

    def __init__(self, memory_limit: int, directory: Optional[str] = None):
        self._limit = memory_limit
        self._dir = directory
        self._mem: Optional[io.BytesIO] = io.BytesIO()
        self._file: Optional[BinaryIO] = None
        self.size = 0
        # The OSError of a failed write; the spool is then empty and refuses
        # further writes with it.
        self.error: Optional[OSError] = None

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        """Append ``data``.  A write the disk cannot take (full, quota, I/O
        error) raises the ``OSError`` here, at once, with the spool
        directory as its ``filename``; the spool then keeps it in ``error``
        and holds nothing (see ``_fail``)."""
        if self.error is not None:
            raise self.error
        if not data:
            return
        try:
            self._write(data)
        except OSError as e:
            self._fail(e)
            raise

    def _write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is None and self.size > self._limit:
            # The file is unlinked at creation: nothing to clean up after a
            # crash.  Unbuffered, so a full disk shows in the write that
            # meets it, not in a flush long after (or in close()).
            self._file = tempfile.TemporaryFile(prefix="mpp-spool-", dir=self._dir, buffering=0)
            assert self._mem is not None
            # Released even when the write fails: a view still exported
            # would make the BytesIO refuse to be freed (BufferError).
            with self._mem.getbuffer() as held:
                _write_all(self._file, held)
            self._mem = None
        if self._file is not None:
            _write_all(self._file, data)
        else:
            assert self._mem is not None
            self._mem.write(data)

    def _fail(self, error: OSError) -> None:
        """Remember a failed write and drop the content: the temporary file
        is closed now, so on a full disk the space this message took goes
        back to the other sessions at once, not at the end of its DATA."""
        if error.filename is None:
            # The file is unlinked: its directory is the place to look at.
            error.filename = self._dir or tempfile.gettempdir()
        self.error = error
        self.close()

    def chunks(self, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The content from the start, in chunks of at most ``size``."""
        if self._file is None:
            assert self._mem is not None
            if self.size <= size:
                # One chunk (nearly every message): no buffer view to manage.
                if self.size:
                    yield self._mem.getvalue()
                return
            # A view is taken per chunk and released before the yield: one
            # held across a yield stays exported while a reader that stopped
            # half-way (a failed write) keeps the generator, and the
            # BytesIO then cannot be freed (BufferError).
            mem = self._mem
            for i in range(0, self.size, size):
                with mem.getbuffer() as view:
                    chunk = bytes(view[i:i + size])
                yield chunk
            return
        # os.pread at an offset of our own, not seek + read: several readers
        # (the relay, scanners running at once) may interleave their
        # iterations, and a shared file position would mix their chunks.
        fd = self._file.fileno()
        offset = 0
        while offset < self.size:
            block = os.pread(fd, min(size, self.size - offset), offset)
            if not block:
                break
            offset += len(block)
            yield block

    def getvalue(self) -> bytes:
        return b"".join(self.chunks())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._mem = None


def _write_all(file: BinaryIO, data: bytes | memoryview) -> None:
    """Write all of ``data`` to an unbuffered file: write(2) may take only
    part of it (a disk that fills up in the middle takes what fits, and the
    next call gets ENOSPC)."""
    view = memoryview(data)
    try:
        while view:
            written = file.write(view)
            if not written:
                # Regular files never do this; a loop without progress must end.
                raise OSError(errno.EIO, "spool write made no progress")
            view = view[written:]
    finally:
        # A failed write's traceback must not keep the buffer exported.
        view.release()
