"""What makes a file on the message path durable (docs/design.md promise 1):
after a file is written and fsync'ed and renamed into place, its directory
is fsync'ed too, or a crash may lose the rename.  Shared by the Maildir
delivery and the durable queue.
"""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """fsync the directory ``path``, so the renames and unlinks in it survive
    a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
