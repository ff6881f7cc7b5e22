"""Small helpers shared by the test suites (no fixtures here: see conftest.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import unittest as stdlib_unittest
from typing import Callable, TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind to port 0).

    The port is released before returning, so another process could take it; on a
    test machine that race is rare enough, and the caller's bind fails loudly if it
    happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Bounded in time: raises ``TimeoutError`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.1f} s")
        time.sleep(interval)


def stop_process(proc: "subprocess.Popen", grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def mount_tmpfs(case: object, size: str = "1m", prefix: str = "mpp-full-") -> str:
    """A tmpfs of ``size`` on a fresh directory, unmounted after the test
    (``case.addCleanup``): a real file system that fills up.  Needs root:
    without it the test is skipped, or failed under MPP_REQUIRE_SERVICES=1
    (CI), where it must run."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                           capture_output=True, text=True, timeout=30)
        problem = None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    if problem is not None:
        os.rmdir(path)
        why = f"cannot mount a tmpfs (needs root): {problem}"
        if os.environ.get("MPP_REQUIRE_SERVICES") == "1":
            case.fail(why)  # type: ignore[attr-defined]
        raise stdlib_unittest.SkipTest(why)

    def unmount() -> None:
        r = subprocess.run(["umount", path], capture_output=True, timeout=30)
        if r.returncode != 0:  # still in use by a closing process: detach it
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)
        os.rmdir(path)

    case.addCleanup(unmount)  # type: ignore[attr-defined]
    return path
