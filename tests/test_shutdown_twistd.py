"""A real ``twistd -n mppproxy`` stopping (issue 15): SIGTERM ends it within
``timeouts.shutdown_grace`` whatever its log sink does (a pipe nobody reads,
a log file on a full disk); listeners are bound before ``--uid``/``--gid``
drops root; ``--help`` offers only the modes there are.

The stop tests need no outside service; the tmpfs and the ``--uid`` tests
need root and are skipped without it.
"""
from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import site
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
TWISTD_ARGS = ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
GRACE = 5.0
# What a process may take past the grace to exit: the log writer's last
# drain (logsetup.EXIT_DRAIN_SECONDS, 2 s) and the interpreter's exit.
EXIT_SLACK = 3.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs, --uid)")


def _env(extra_path: tuple[str, ...] = ()) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), *extra_path, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)


def _config(tmp: Path, port: int, extra: str = "") -> Path:
    cfg = tmp / "mpp.toml"
    cfg.write_text(f'listen = ["tcp:{port}:interface=127.0.0.1"]\nrelay_domains = ["example.com"]\n'
                   f'data_dir = "{tmp / "data"}"\n[timeouts]\nshutdown_grace = {GRACE}\n{extra}')
    return cfg


def _greeting(port: int) -> Optional[socket.socket]:
    """A connection that has read the 220 greeting, or None if nothing answers yet."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return None
    try:
        s.settimeout(5)
        if s.recv(512).startswith(b"220"):
            return s
    except OSError:
        pass
    s.close()
    return None


def _start(args: list[str], port: int, stdout: Any, cwd: Path, twistd_opts: tuple[str, ...] = (),
           python: str = sys.executable, env: Optional[dict[str, str]] = None
           ) -> tuple[subprocess.Popen, socket.socket]:
    """``twistd -n TWISTD_OPTS mppproxy ARGS``; the process and an idle
    session that has read its 220."""
    proc = subprocess.Popen([python, *TWISTD_ARGS, *twistd_opts, "mppproxy", *args],
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                            cwd=cwd, env=env or _env(), start_new_session=True)
    try:
        session = wait_for(lambda: _greeting(port) or proc.poll() is not None, 30,
                           what="proxy greeting")
    except TimeoutError:
        _kill(proc)
        raise
    if proc.poll() is not None:
        raise AssertionError(f"twistd exited with {proc.returncode} before greeting")
    return proc, session


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _stop_and_time(proc: subprocess.Popen, session: socket.socket) -> tuple[float, bytes]:
    """SIGTERM; the seconds until the process exited (bounded) and what the idle session heard."""
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    session.settimeout(GRACE + EXIT_SLACK)
    try:
        heard = session.recv(512)
    except OSError:
        heard = b""
    try:
        proc.wait(GRACE + EXIT_SLACK + 10)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise AssertionError("twistd did not exit after SIGTERM (killed)")
    return time.monotonic() - started, heard


def _fill_pipe(w: int) -> threading.Thread:
    """Fill the pipe whose write end is ``w`` (blocking, shared with the
    child: O_NONBLOCK would change the child's stdout too) from a daemon
    thread, and return once it is full (the thread then waits in write)."""
    def fill() -> None:
        try:
            while True:
                os.write(w, b"f" * 4096)
        except OSError:  # the read end closed at the end of the test
            pass

    t = threading.Thread(target=fill, daemon=True)
    t.start()
    wait_for(lambda: not select.select([], [w], [], 0)[1], 10, what="a full stdout pipe")
    return t


def test_stop_with_stdout_a_pipe_nobody_reads(tmp_path):
    """With twistd's stdout a full pipe nobody reads, SIGTERM still says 421 to an idle session and the process exits within the grace."""
    port = free_port()
    cfg = _config(tmp_path, port)
    r, w = os.pipe()
    proc: Optional[subprocess.Popen] = None
    try:
        proc, session = _start(["--config", str(cfg)], port, w, tmp_path)
        with session:
            _fill_pipe(w)
            # The proxy keeps serving while its log cannot be written.
            session.sendall(b"EHLO client.test\r\n")
            assert session.recv(4096).startswith(b"250")
            took, heard = _stop_and_time(proc, session)
        assert heard.startswith(b"421 4.3.2 "), heard
        assert took < GRACE + EXIT_SLACK, took
        assert proc.returncode == -signal.SIGTERM
    finally:
        if proc is not None:
            _kill(proc)
        os.close(r)  # the filler's write fails now, and it ends
        os.close(w)


@pytest.fixture
def full_tmpfs() -> Iterator[Path]:
    """A 64 KiB tmpfs under /tmp, filled to the last block; unmounted afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix="mpp-full-", dir="/tmp"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
        mnt.rmdir()


def _fill_disk(mnt: Path) -> None:
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1000):  # 64 KiB is 16 writes; bounded anyway
            try:
                os.write(fd, b"x" * 4096)
            except OSError:
                return
    finally:
        os.close(fd)
    raise AssertionError(f"{mnt} never filled")


@needs_root
def test_stop_with_the_log_on_a_full_disk(tmp_path, full_tmpfs):
    """With --logfile on a full file system, the proxy serves and SIGTERM ends it within the grace."""
    port = free_port()
    cfg = _config(tmp_path, port)
    logfile = full_tmpfs / "twistd.log"
    proc, session = _start(["--config", str(cfg)], port, subprocess.DEVNULL, tmp_path,
                           twistd_opts=(f"--logfile={logfile}",))
    try:
        with session:
            _fill_disk(full_tmpfs)
            for i in range(3):  # sessions that log into the full file system
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    assert s.recv(512).startswith(b"220")
                    s.sendall(b"QUIT\r\n")
                    assert s.recv(512).startswith(b"221")
            session.sendall(b"EHLO client.test\r\n")
            assert session.recv(4096).startswith(b"250")
            took, heard = _stop_and_time(proc, session)
        assert heard.startswith(b"421 4.3.2 "), heard
        assert took < GRACE + EXIT_SLACK, took
    finally:
        _kill(proc)


def _python_for(user: str) -> Optional[tuple[str, tuple[str, ...]]]:
    """An interpreter ``user`` can run with this one's packages (the one
    running the tests may live under /root), and the extra import path; None
    if there is none."""
    site_dirs = tuple(site.getsitepackages())
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, shutil.which(ver) or "", f"/usr/bin/{ver}"):
        if not python:
            continue
        try:
            ok = subprocess.run([python, "-c", "import sysconfig, twisted, mppproxy"],
                                user=user, capture_output=True, env=_env(site_dirs),
                                cwd="/", timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return python, site_dirs
    return None


def _free_privileged_port() -> int:
    for port in range(990, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


@needs_root
def test_uid_and_gid_serve_a_privileged_port(tmp_path):
    """Started as root with --uid=nobody --gid=nogroup, the proxy answers 220 on a port below 1024 and runs as nobody."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    found = _python_for("nobody")
    if found is None:
        pytest.skip("no interpreter that user nobody may run with these packages")
    python, site_dirs = found
    port = _free_privileged_port()
    # A directory nobody can reach (pytest's tmp_path is root's alone).
    work = Path(tempfile.mkdtemp(prefix="mpp-uid-", dir="/tmp"))
    try:
        work.chmod(0o755)
        (work / "data").mkdir()
        os.chown(work / "data", nobody.pw_uid, nobody.pw_gid)
        cfg = _config(work, port)
        log = open(tmp_path / "twistd.log", "wb")
        proc, session = _start(["--config", str(cfg)], port, log, work, python=python,
                               env=_env(site_dirs), twistd_opts=("--uid=nobody", "--gid=nogroup"))
        try:
            with session:
                session.sendall(b"EHLO client.test\r\n")
                assert session.recv(4096).startswith(b"250")
            status = Path(f"/proc/{proc.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            assert set(map(int, uids)) == {nobody.pw_uid}, status
            assert "Traceback" not in (tmp_path / "twistd.log").read_text()
        finally:
            _kill(proc)
            log.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_help_offers_only_the_modes_there_are(capsys):
    """--help lists the modes this version runs, archive among them; --mode archive without its key file is refused naming archive_node.key_file."""
    from mppproxy.config.schema import IMPLEMENTED_MODES, MODES
    from mppproxy.tap import Options

    assert set(IMPLEMENTED_MODES) == set(MODES)
    help_text = str(Options())
    mode_line = " ".join(help_text[help_text.index("--mode"):].split("\n--")[0].split())
    for mode in IMPLEMENTED_MODES:
        assert mode in mode_line
    with pytest.raises(SystemExit):
        Options().parseOptions(["--mode", "archive"])
    err = capsys.readouterr().err
    assert "archive_node.key_file:" in err and "Traceback" not in err


@pytest.mark.parametrize("mode", ["edge", "policy", "scan", "archive"])
def test_privileged_start_binds_the_tcp_listeners(mode):
    """privilegedStartService (run by twistd before --uid/--gid drop root) already holds each TCP listener of the mode's service."""
    from dataclasses import replace

    from twisted.internet import reactor

    from mppproxy.archivenode.service import ArchiveService
    from mppproxy.config.schema import ProxyConfig
    from mppproxy.policyd.service import PolicyServerService
    from mppproxy.scanservice.service import ScanService
    from mppproxy.service import ProxyService
    from mppproxy.workers import close_sockets

    port = free_port()
    desc = f"tcp:{port}:interface=127.0.0.1"
    config = ProxyConfig()
    if mode == "edge":
        service: Any = ProxyService(replace(config, listen=(desc,)), reactor)
    elif mode == "policy":
        service = PolicyServerService(
            replace(config, policyd=replace(config.policyd, listen=(desc,))), reactor)
    elif mode == "archive":
        service = ArchiveService(
            replace(config, archive_node=replace(config.archive_node, listen=(desc,))), reactor)
    else:
        service = ScanService(replace(config, scanservice=replace(
            config.scanservice, smtp_listen=(desc,), http_listen=())), reactor)
    service.privilegedStartService()
    try:
        assert list(service.prebound) == [desc]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the kernel accepts into the backlog: the socket listens
    finally:
        close_sockets(service.prebound)
