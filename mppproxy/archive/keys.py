"""The keys that sign and verify the transaction state of archive copies.

Stage: beside the archive copy (issue 12, "Forwarder"); read by the edges
(to sign) and the archive node (to verify), at start and on reload.  Hands
on a ``KeyRing``: one key that signs, every key that verifies.

The key file (``archive.key_file`` once the ``[archive]`` section exists):

    # comments and blank lines are ignored
    2024-01 = 9cV1Lr2E4mYb0n5yqgkC3vQ0o7l0m8bC9y2pQ3l5qXU=
    2024-07 = Zm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXkgISEhISEhISE=

* one key a line, ``key-id = secret``; the id is 1 to 64 of ``A-Z a-z 0-9 . _ -``
  and travels in the ``X-MPP-Key-Id`` header, the secret is base64 (standard
  or URL-safe alphabet, padding optional) of at least 32 random octets
  (HMAC-SHA256's block is 64, its output 32: RFC 2104 section 3 asks for
  keys no shorter than the output);
* the **last** key signs, every key verifies: to rotate, append the new key
  on the archive node first, then on the edges, and remove the old one once
  the edges' queues hold no copy signed with it;
* the file must be a regular file that neither group nor others may read or
  write (``chmod 600``): it is a shared secret.

Every problem is a ``KeyFileError`` (a ``ConfigError``) naming the file and
the line, never a traceback and never the secret.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from mppproxy.config.archive import key_file_path
from mppproxy.config.errors import ConfigError

if TYPE_CHECKING:
    from mppproxy.config.schema import ProxyConfig

# RFC 2104 section 3: less than L (32 octets for SHA-256) weakens the MAC.
MIN_KEY_OCTETS = 32
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
# A key file is a few lines; anything larger is not one.
_MAX_FILE_OCTETS = 64 * 1024
# The id of the key a node makes for itself (node_keys).
LOCAL_KEY_ID = "local-1"


class KeyFileError(ConfigError):
    """A key file that cannot be used: one ``file:line: problem`` per error."""


@dataclass(frozen=True)
class Key:
    """One shared secret and the id that names it in ``X-MPP-Key-Id``."""

    id: str
    # Never printed: not in repr, not in any error message.
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class KeyRing:
    """The keys loaded: ``signing`` signs new copies, each of ``keys``
    (by id, ``signing`` among them) verifies."""

    signing: Key
    keys: dict[str, Key] = field(repr=False)

    def get(self, key_id: str) -> Union[Key, None]:
        return self.keys.get(key_id)

    @classmethod
    def of(cls, *keys: Key) -> "KeyRing":
        """A ring of ``keys``, the last one signing (as in the key file)."""
        if not keys:
            raise ValueError("a key ring needs at least one key")
        return cls(keys[-1], {k.id: k for k in keys})


def parse_keys(text: str, source: str) -> KeyRing:
    """The keys of a key file's ``text``; ``source`` names it in errors."""
    errors: list[str] = []
    keys: list[Key] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, equals, secret_text = (part.strip() for part in line.partition("="))
        where = f"{source}:{number}"
        if not equals:
            errors.append(f"{where}: expected 'key-id = base64-secret'")
            continue
        if not KEY_ID.fullmatch(key_id):
            errors.append(f"{where}: key id must be 1 to 64 of A-Z a-z 0-9 . _ -")
            continue
        if key_id in seen:
            errors.append(f"{where}: key id {key_id} already given on line {seen[key_id]}")
            continue
        seen[key_id] = number
        secret = _decode_secret(secret_text)
        if secret is None:
            errors.append(f"{where}: key {key_id}: the secret is not base64")
            continue
        if len(secret) < MIN_KEY_OCTETS:
            errors.append(f"{where}: key {key_id}: the secret is {len(secret)} octets, "
                          f"at least {MIN_KEY_OCTETS} are needed")
            continue
        keys.append(Key(key_id, secret))
    if not errors and not keys:
        errors.append(f"{source}: no key in the file (one 'key-id = base64-secret' a line)")
    if errors:
        raise KeyFileError(errors)
    return KeyRing.of(*keys)


def _decode_secret(text: str) -> Union[bytes, None]:
    if not _BASE64.fullmatch(text):
        return None
    bare = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(bare + "=" * (-len(bare) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def load_keys(path: str) -> KeyRing:
    """The key ring of the key file at ``path``, after checking that it is
    a regular file only its owner may read or write (checked on the open
    file, so the file read is the file checked)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise KeyFileError([f"{path}: cannot open the key file: {e.strerror}"]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError([f"{path}: the key file is not a regular file"])
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError([f"{path}: the key file is readable or writable by group or "
                                f"others (mode {mode:04o}); it holds shared secrets: chmod 600 it"])
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_FILE_OCTETS:
            chunk = os.read(fd, _MAX_FILE_OCTETS + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise KeyFileError([f"{path}: cannot read the key file: {e.strerror}"]) from None
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_OCTETS:
        raise KeyFileError([f"{path}: larger than {_MAX_FILE_OCTETS} octets: not a key file"])
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise KeyFileError([f"{path}:{line}: not ASCII text"]) from None
    return parse_keys(text, path)


def load_or_create_keys(path: str, key_id: str) -> KeyRing:
    """The key ring at ``path``, made first with one new random key named
    ``key_id`` when no file is there.  Written to a temporary file, then
    linked into place: ``link(2)`` fails when ``path`` exists, so of two
    processes starting at once one file wins whole and both read it.  For a
    node that keeps its copies on its own host, where no administrator
    shares a key file between hosts."""
    if not os.path.lexists(path):
        secret = base64.b64encode(os.urandom(MIN_KEY_OCTETS)).decode("ascii")
        text = ("# mppproxy archive keys, made at first start (mppproxy/archive/keys.py)\n"
                f"{key_id} = {secret}\n").encode("ascii")
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                         0o600)
            try:
                os.write(fd, text)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        except OSError as e:
            raise KeyFileError([f"{path}: cannot create the key file: {e.strerror}"]) from None
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    return load_keys(path)


def node_keys(config: "ProxyConfig") -> Union[KeyRing, None]:
    """The archive keys of a node: the archive node's
    ``archive_node.key_file`` (shared with its edges; None without one), an
    edge's ``archive.key_file``, or, where an edge or all-in-one node has
    none, the key file it makes under ``data_dir`` at first start.  They
    sign the copies' state and the X-MPP-Released mark of released mail,
    and verify both."""
    if config.mode == "archive":
        return load_keys(config.archive_node.key_file) if config.archive_node.key_file else None
    if config.archive.key_file:
        return load_keys(config.archive.key_file)
    path = key_file_path(config.mode, config.archive, config.archive_node, config.data_dir)
    return load_or_create_keys(path, LOCAL_KEY_ID)
