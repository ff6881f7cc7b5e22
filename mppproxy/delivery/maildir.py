"""Local Maildir delivery, used when no backend MTA is configured.

Stage: action (the all-in-one default).  docs/design.md promise 1: the client
hears 250 only after every recipient's copy is written, fsync'ed, moved from
tmp/ into new/ and the directory fsync'ed, so a crash at any instant after
that loses nothing.  The disk work runs in the thread pool; the reactor never
blocks on it.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from typing import Callable, Iterable, Iterator

from mppproxy.logsetup import Logger
from mppproxy.smtp.address import Address, normalise_domain
from mppproxy.spool.durable import fsync_dir

log = Logger()

_counter_lock = threading.Lock()
_counter = 0


def _safe_part(text: str) -> str:
    """A path component from client-chosen text: no separators, no dot
    files, nothing that climbs out of the maildir root, and no two
    addresses on one path (any other character is written as _XX hex,
    "_" itself included, so the mapping is one-to-one)."""
    text = text.strip('"')
    out = []
    for ch in text:
        if ch.isascii() and (ch.isalnum() or ch in ".+=-"):
            out.append(ch)
        else:
            out.append("".join(f"_{b:02X}" for b in ch.encode("utf-8")))
    safe = "".join(out)
    if safe.startswith("."):
        safe = "_2E" + safe[1:]
    return safe or "_"


def expand_path(template: str, rcpt: Address, data_dir: str) -> str:
    """Fill the macros %U% %D% %U1% %U2% %D1% %D2% for one recipient."""
    user = _safe_part(rcpt.local.lower() if rcpt.local.isascii() else rcpt.local)
    domain = _safe_part(normalise_domain(rcpt.domain) if rcpt.domain else "localhost")
    values = {
        "%U%": user, "%D%": domain,
        "%U1%": user[:1], "%U2%": user[1:2] or "_",
        "%D1%": domain[:1], "%D2%": domain[1:2] or "_",
    }
    # A lone "." from a one-letter macro could join another into "..".
    values = {k: ("_" if v == "." else v) for k, v in values.items()}
    path = re.sub(r"%(U|D)[12]?%", lambda m: values[m.group(0)], template)
    if not os.path.isabs(path):
        path = os.path.join(data_dir, path)
    return path


def _unique_name() -> str:
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    now = time.time()
    host = socket.gethostname().replace("/", "_").replace(":", "_")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{n}.{host}"


def _ensure_maildir(path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


def _to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Maildir files use LF line ends; a CR LF pair split over two chunks
    still becomes one LF."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        if data.endswith(b"\r"):
            data, carry = data[:-1], b"\r"
        else:
            carry = b""
        yield data.replace(b"\r\n", b"\n")
    if carry:
        yield carry


def deliver(chunks_factory: Callable[[], Iterable[bytes]], sender: Address,
            recipients: list[Address], template: str, data_dir: str) -> list[str]:
    """Write one copy per recipient; return the final paths.  Runs in a
    thread.  Any OSError propagates, with the file or directory it concerns
    as its ``filename``, and the client gets a 4xx (452 4.3.1 for a full
    disk, ``replies.storage_failure``).

    All recipients or none: every copy is written and fsync'ed in tmp/
    before any is moved into new/, and a failure at any step (a full disk
    in the middle of a copy, a rename that finds no room for the directory
    entry, an fsync that fails) removes every copy of this message, in tmp/
    and in new/, so the client's retry cannot duplicate them
    (docs/design.md promise 1)."""
    staged: list[tuple[str, str, str]] = []
    done: list[str] = []
    try:
        for rcpt in recipients:
            root = expand_path(template, rcpt, data_dir)
            _ensure_maildir(root)
            name = _unique_name()
            tmp_path = os.path.join(root, "tmp", name)
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            staged.append((tmp_path, os.path.join(root, "new", name), root))
            try:
                _write_copy(fd, sender, rcpt, chunks_factory())
            except OSError as e:
                _name_file(e, tmp_path)
                raise
        for tmp_path, new_path, root in staged:
            try:
                # rename(2) may need room for the new directory entry (ENOSPC).
                os.rename(tmp_path, new_path)
                done.append(new_path)
                fsync_dir(os.path.join(root, "new"))
            except OSError as e:
                _name_file(e, new_path)
                raise
    except BaseException:
        _remove([tmp for tmp, _, _ in staged] + done)
        raise
    return done


def _write_copy(fd: int, sender: Address, rcpt: Address, chunks: Iterable[bytes]) -> None:
    """One recipient's copy into the open file ``fd``, fsync'ed; closes it."""
    with os.fdopen(fd, "wb") as f:
        # RFC 5321 4.4: the final delivery adds Return-Path.
        f.write(f"Return-Path: <{sender.text}>\nDelivered-To: {rcpt.text}\n".encode("utf-8"))
        for block in _to_lf(chunks):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def _name_file(error: OSError, path: str) -> None:
    """Say which file a write or fsync failed on (their errors carry no
    name), for the log line."""
    if error.filename is None:
        error.filename = path


def _remove(paths: list[str]) -> None:
    """Unlink the copies of a message that failed; a path already gone
    (moved to new/, or never created) is fine."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            # Nothing more can be done here; the delivery error goes up.
            log.error("could not remove {path} after a failed delivery: {error}",
                      path=path, error=str(e))
