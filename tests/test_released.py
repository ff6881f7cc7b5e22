"""The X-MPP-Released mark of a released message (mppproxy/archive/released.py,
issue 12 "Release done right") and the local key file (archive/keys.py)."""
from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from mppproxy.archive.keys import Key, KeyFileError, KeyRing, load_or_create_keys
from mppproxy.archive.released import (FIELD, MARK_LIFETIME, find_field, mark, split_message,
                                       verify_mark)
from mppproxy.archive.state import BodyDigest, parse_fields

KEYS = KeyRing.of(Key("k1", b"a" * 32))
OTHER = KeyRing.of(Key("k1", b"b" * 32))
BODY = b"Hello,\r\nthe body.\r\n"
NOW = 1_800_000_000.0


def _value(line: bytes) -> str:
    fields = parse_fields(line + b"\r\n")
    value = find_field(fields)
    assert value is not None
    return value


def test_a_mark_verifies_for_its_body_only() -> None:
    """A mark verifies with the key that made it, for the body it was made
    for, and names the held copy's reference."""
    value = _value(mark("ref-1", NOW, BodyDigest.of([BODY]), KEYS))
    found = verify_mark(value, BodyDigest.of([BODY]), KEYS, NOW + 10)
    assert found is not None and found.ref == "ref-1"
    assert verify_mark(value, BodyDigest.of([BODY + b"x"]), KEYS, NOW) is None
    assert verify_mark(value, BodyDigest.of([BODY]), OTHER, NOW) is None


def test_a_stale_or_future_mark_is_ignored() -> None:
    """Honoured for a day after the release (and a little clock skew before)."""
    value = _value(mark("ref-1", NOW, BodyDigest.of([BODY]), KEYS))
    digest = BodyDigest.of([BODY])
    assert verify_mark(value, digest, KEYS, NOW + MARK_LIFETIME - 1) is not None
    assert verify_mark(value, digest, KEYS, NOW + MARK_LIFETIME + 1) is None
    assert verify_mark(value, digest, KEYS, NOW - 3600) is None


@pytest.mark.parametrize("edit", [
    lambda v: v.replace("ref=ref-1", "ref=ref-2"),
    lambda v: v.replace("at=", "at=1"),
    lambda v: v.replace("v=1", "v=2"),
    lambda v: v.replace("k=k1", "k=k2"),
    lambda v: v + "; extra",
    lambda v: v.replace("b=", "b=!!"),
    lambda v: "",
    lambda v: "garbage \x00 ;;;",
])
def test_an_altered_or_garbled_mark_is_ignored(edit) -> None:
    """Any change to a mark, or one that does not parse, makes it no mark
    (the message is judged as any other), never an exception."""
    value = _value(mark("ref-1", NOW, BodyDigest.of([BODY]), KEYS))
    assert verify_mark(edit(value), BodyDigest.of([BODY]), KEYS, NOW) is None


def test_two_marks_count_as_none() -> None:
    """A second X-MPP-Released field is not ours: no mark is honoured."""
    line = mark("ref-1", NOW, BodyDigest.of([BODY]), KEYS)
    assert find_field(parse_fields(line + line + b"\r\n")) is None
    assert line.startswith(FIELD.encode() + b": ")


def test_split_message() -> None:
    """The header section keeps its empty line; no empty line means no body."""
    assert split_message(b"A: 1\r\n\r\nbody\r\n") == (b"A: 1\r\n\r\n", b"body\r\n")
    assert split_message(b"A: 1\r\n") == (b"A: 1\r\n", b"")


def test_local_key_file_is_made_once_with_mode_600(tmp_path: Path) -> None:
    """A missing key file is made with one 32-octet key, mode 600; the next
    start reads the same key."""
    path = str(tmp_path / "archive.keys")
    first = load_or_create_keys(path, "local-1")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert first.signing.id == "local-1" and len(first.signing.secret) == 32
    assert load_or_create_keys(path, "local-2").signing == first.signing


def _make(path: str, queue: "multiprocessing.Queue[bytes]") -> None:
    queue.put(load_or_create_keys(path, f"k{os.getpid()}").signing.secret)


def test_two_processes_starting_at_once_share_one_key(tmp_path: Path) -> None:
    """Processes racing to make the file all end up with the same key."""
    path = str(tmp_path / "archive.keys")
    queue: "multiprocessing.Queue[bytes]" = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_make, args=(path, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    secrets = {queue.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(timeout=30)
    assert len(secrets) == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_an_unwritable_directory_is_a_key_file_error(tmp_path: Path) -> None:
    """No traceback: a KeyFileError naming the file."""
    if os.geteuid() == 0:
        path = "/proc/mppproxy-no-such-dir/archive.keys"
    else:
        os.chmod(tmp_path, 0o500)
        path = str(tmp_path / "archive.keys")
    with pytest.raises(KeyFileError, match="archive.keys"):
        load_or_create_keys(path, "k")
