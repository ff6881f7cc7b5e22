"""The web console's cookie-signing key (``web.secret_file``): 32 random
bytes, made with mode 0600 at first start and read by every process of
the node after, so a session cookie one process issued is good in all.

Floor 3 (``mppproxy/web/``).  Blocking file I/O, done once at start.
Two processes starting at once: the file is made under a temporary name
and linked into place (``os.link`` fails if the name exists), so exactly
one key wins and both read that one.
"""
from __future__ import annotations

import os
import secrets

# 256 bits: the HMAC-SHA256 key length RFC 2104 section 3 recommends
# (at least the hash's output length).
KEY_BYTES = 32


class SecretFileError(Exception):
    """The key file cannot be read or made; the text says why."""


def load_or_create_secret(path: str) -> bytes:
    """The key in ``path``, made first if the file does not exist."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES).hex().encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process was first: its key is the key
    finally:
        os.unlink(tmp)
    return _read(path)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        data = f.read(4096)
    if mode & 0o077:
        raise SecretFileError(f"{path}: readable by others (mode {mode & 0o777:o}); "
                              f"chmod 600 it: whoever reads it can forge console sessions")
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SecretFileError(f"{path}: not a hex key (delete it to have a new one made; "
                              f"that logs everybody out)") from None
    if len(key) < 16:
        raise SecretFileError(f"{path}: the key is shorter than 16 bytes")
    return key
