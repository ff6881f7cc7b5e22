"""The messages of a corpus, one at a time: Maildirs, mboxes, folders of
``.eml`` files and single files, in a stable order.

Stage: the input of ``mppproxy replay`` (composition floor, but it imports
nothing of ours).  Each message comes with a label the report shows -- its
file, or ``FILE#N`` for the N-th message of an mbox -- and its octets with
CRLF line ends, as a client sends them in DATA (RFC 5321 2.3.8): Maildir
files and mboxes store LF.

What a PATH is:

* a directory with ``cur/`` or ``new/``: a Maildir; the files of both, by
  name (``tmp/`` holds deliveries not finished, and is left alone);
* another directory: its ``*.eml`` files (one message each) and ``*.mbox``
  files, by name, not recursing;
* a file whose first line starts with ``From ``: an mbox (RFC 4155); a
  ``>From `` line loses one ``>`` (mboxrd, what ``mppproxy quarantine
  export`` writes);
* any other file: one message.

A message larger than ``max_size`` is not kept in memory: it comes with its
size only (the edge refuses it before DATA ends, RFC 1870 / RFC 5321
4.5.3.1.7).  An unreadable file is a message with an ``error``, never an
exception: one bad file must not end a replay of thousands.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Optional

_MBOX_QUOTED = re.compile(rb"^>(>*From )")


class CorpusError(ValueError):
    """A PATH that names nothing to read (a usage error: exit status 2)."""


@dataclass(frozen=True)
class CorpusMessage:
    """One message of the corpus: ``data`` with CRLF line ends, or None
    with ``error`` (could not be read) or ``size`` over the bound."""

    path: str
    data: Optional[bytes]
    size: int = 0
    error: str = ""


@dataclass(frozen=True)
class _Source:
    path: str
    kind: str  # "file" (one message) or "mbox"


def sources(paths: Iterable[str]) -> list[_Source]:
    """The files to read for ``paths``, in order; ``CorpusError`` for a
    path that does not exist."""
    found: list[_Source] = []
    for path in paths:
        if os.path.isdir(path):
            found.extend(_directory(path))
        elif os.path.exists(path):
            found.append(_Source(path, "mbox" if _looks_like_mbox(path) else "file"))
        else:
            raise CorpusError(f"{path}: no such file or directory")
    return found


def _directory(path: str) -> list[_Source]:
    subdirs = [os.path.join(path, d) for d in ("cur", "new") if os.path.isdir(os.path.join(path, d))]
    if subdirs:
        return [_Source(os.path.join(d, name), "file")
                for d in subdirs for name in sorted(os.listdir(d))
                if not name.startswith(".") and os.path.isfile(os.path.join(d, name))]
    found = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(".") or not os.path.isfile(full):
            continue
        lower = name.lower()
        if lower.endswith(".eml"):
            found.append(_Source(full, "file"))
        elif lower.endswith(".mbox"):
            found.append(_Source(full, "mbox"))
    return found


def _looks_like_mbox(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(5) == b"From "
    except OSError:
        return False  # read again as one message, which reports why


def count(paths: Iterable[str]) -> int:
    """How many messages ``messages`` will give (for the progress bar):
    one per file, the ``From `` lines of an mbox."""
    total = 0
    for source in sources(paths):
        if source.kind == "file":
            total += 1
            continue
        try:
            with open(source.path, "rb") as f:
                total += sum(1 for _ in _mbox_starts(f))
        except OSError:
            total += 1
    return total


def _mbox_starts(f: BinaryIO) -> Iterator[None]:
    previous_empty = True
    for line in f:
        if previous_empty and line.startswith(b"From "):
            yield None
        previous_empty = line in (b"\n", b"\r\n")


def messages(paths: Iterable[str], max_size: int) -> Iterator[CorpusMessage]:
    """Every message of ``paths``; see the module docstring."""
    for source in sources(paths):
        if source.kind == "mbox":
            yield from _mbox(source.path, max_size)
        else:
            yield _file(source.path, max_size)


def _file(path: str, max_size: int) -> CorpusMessage:
    try:
        size = os.path.getsize(path)
        if size > max_size:
            return CorpusMessage(path, None, size)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return CorpusMessage(path, None, error=f"cannot read: {e.strerror or e}")
    return CorpusMessage(path, crlf(data), len(data))


def _mbox(path: str, max_size: int) -> Iterator[CorpusMessage]:
    number = 0
    lines: list[bytes] = []
    size = 0
    previous_empty = True
    try:
        f = open(path, "rb")
    except OSError as e:
        yield CorpusMessage(path, None, error=f"cannot read: {e.strerror or e}")
        return
    with f:
        try:
            for line in f:
                if previous_empty and line.startswith(b"From "):
                    if number:
                        yield _mbox_message(path, number, lines, size, max_size)
                    number += 1
                    lines, size = [], 0
                    previous_empty = False
                    continue
                previous_empty = line in (b"\n", b"\r\n")
                if not number:
                    continue  # text before the first From line belongs to no message
                size += len(line)
                if size <= max_size:
                    lines.append(_MBOX_QUOTED.sub(rb"\1", line))
        except OSError as e:
            yield CorpusMessage(f"{path}#{number + 1}", None, error=f"cannot read: {e.strerror or e}")
            return
    if number:
        yield _mbox_message(path, number, lines, size, max_size)


def _mbox_message(path: str, number: int, lines: list[bytes], size: int,
                  max_size: int) -> CorpusMessage:
    label = f"{path}#{number}"
    # The empty line before the next From line separates; it is not content.
    if lines and lines[-1] in (b"\n", b"\r\n"):
        size -= len(lines[-1])
        lines = lines[:-1]
    if size > max_size:
        return CorpusMessage(label, None, size)
    data = crlf(b"".join(lines))
    return CorpusMessage(label, data, len(data))


def crlf(data: bytes) -> bytes:
    """``data`` with every line ending CRLF, as SMTP carries it (RFC 5321 2.3.8)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
