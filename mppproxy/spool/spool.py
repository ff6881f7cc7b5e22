"""The message spool: memory first, a temporary file past a bound.

Stage: DATA.  The framing reader writes unstuffed message content here; the
relay and (later) the scanners read it back.  Past ``memory_limit`` bytes the
content moves to an anonymous temporary file, so a large or hostile message
cannot pin memory (docs/design.md promise 6).
"""
from __future__ import annotations

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

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self._file is None and self.size > self._limit:
            # The file is unlinked at creation: nothing to clean up after a crash.
            self._file = tempfile.TemporaryFile(prefix="mpp-spool-", dir=self._dir)
            assert self._mem is not None
            self._file.write(self._mem.getbuffer())
            self._mem = None
        (self._file or self._mem).write(data)  # type: ignore[union-attr]

    def chunks(self, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The content from the start, in chunks of at most ``size``."""
        if self._file is None:
            assert self._mem is not None
            if self.size <= size:
                # One chunk (nearly every message): no buffer view to manage.
                if self.size:
                    yield self._mem.getvalue()
                return
            view = self._mem.getbuffer()
            try:
                for i in range(0, len(view), size):
                    yield bytes(view[i:i + size])
            finally:
                view.release()
            return
        # os.pread at an offset of our own, not seek + read: several readers
        # (the relay, scanners running at once) may interleave their
        # iterations, and a shared file position would mix their chunks.
        self._file.flush()
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
