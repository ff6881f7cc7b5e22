"""Log files reopened on SIGUSR1, for logrotate (mppproxy/logsetup.py,
issue 16 "systemd ... log-file reopen for logrotate").

logrotate renames the file, then signals the process; the process must
write its next lines to a new file at the old path.  twistd's own SIGUSR1
handler renames the file itself (to ``.1``) and does nothing once the file
has been moved, and its ``LogFile`` rotates every 1 MB with no end to the
``.N`` files: mppproxy reopens instead and leaves rotation to logrotate.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from twisted.logger import LogLevel, LogPublisher
from twisted.python.logfile import LogFile

from helpers import free_port, wait_for
from mppproxy import logsetup
from test_logsetup import RunningClock, event
from test_shutdown_twistd import TWISTD_ARGS, _config, _env, _greeting, _kill


def test_batched_log_file_reopens_at_its_path(tmp_path):
    """After the file is renamed, reopen() makes the next lines go to a new file at the path; twistd's size rotation is off."""
    clock = RunningClock()
    before = len(logsetup._batched)
    made = logsetup.text_log_observer({"logfile": str(tmp_path / "twistd.log")}, clock)
    assert made is not None
    batched = made
    logfile = batched._out
    publisher = LogPublisher()
    publisher.addObserver(batched)
    try:
        assert len(logsetup._batched) == before + 1
        assert batched.reopens
        assert logfile.rotateLength is None
        publisher(event("before the rotation", LogLevel.warn))
        assert batched._writer is not None and batched._writer.wait_idle(10)
        os.rename(tmp_path / "twistd.log", tmp_path / "twistd.log.1")
        batched.reopen()
        publisher(event("after the rotation", LogLevel.warn))
        assert batched._writer.wait_idle(10)
        assert "before the rotation" in (tmp_path / "twistd.log.1").read_text()
        new = (tmp_path / "twistd.log").read_text()
        assert "after the rotation" in new and "before" not in new
    finally:
        logsetup._batched.remove(batched)
        logfile.close()


def test_a_reopen_that_fails_keeps_the_old_file(tmp_path):
    """A log directory that cannot be written keeps the lines in the old file, with an error line."""
    clock = RunningClock()
    directory = tmp_path / "logs"
    directory.mkdir()
    logfile = LogFile.fromFullPath(str(directory / "twistd.log"))
    batched = logsetup.BatchedTextLogObserver(logfile, clock)
    try:
        os.rename(directory / "twistd.log", tmp_path / "moved.log")
        # A file where the directory was: the path cannot be opened.
        os.rmdir(directory)
        (tmp_path / "logs").write_text("")
        batched.reopen()
        batched(event("still written", LogLevel.warn))
        assert batched._writer is not None and batched._writer.wait_idle(10)
        text = (tmp_path / "moved.log").read_text()
        assert "cannot reopen the log file" in text and "still written" in text
    finally:
        logfile.close()


def test_usr1_without_log_files_leaves_the_handler(monkeypatch):
    """With only standard output (no --logfile, no JSON log) SIGUSR1's handler is left alone."""
    monkeypatch.setattr(logsetup, "_batched", [])
    monkeypatch.setattr(logsetup, "_json_paths", {})
    old = signal.getsignal(signal.SIGUSR1)
    assert not logsetup.reopen_on_usr1(RunningClock())
    assert signal.getsignal(signal.SIGUSR1) is old


def test_twistd_reopens_logfile_and_json_log_on_usr1(tmp_path):
    """A real twistd with --logfile and logging.json_file: after logrotate's rename and SIGUSR1 the next lines go to new files at the old paths."""
    port = free_port()
    log, json_log = tmp_path / "twistd.log", tmp_path / "mpp.json"
    cfg = _config(tmp_path, port, f'[logging]\njson_file = "{json_log}"\n')
    proc = subprocess.Popen([sys.executable, *TWISTD_ARGS, f"--logfile={log}", "mppproxy",
                             "--config", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                            env=_env(), start_new_session=True)
    try:
        session = wait_for(lambda: _greeting(port) or proc.poll() is not None, 60,
                           what="proxy greeting")
        assert proc.poll() is None, f"twistd exited with {proc.returncode}"
        session.close()
        wait_for(lambda: "listening on" in log.read_text(), 30, what="the start in the log")
        # logrotate (create mode): rename, then signal.
        os.rename(log, tmp_path / "twistd.log.1")
        os.rename(json_log, tmp_path / "mpp.json.1")
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(lambda: log.exists() and json_log.exists(), 30, what="the reopened files")
        # Anything logged from now on goes to the new files.
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log.read_text(), 30,
                 what="the reload in the new log")
        wait_for(lambda: "configuration reloaded" in json_log.read_text(), 30,
                 what="the reload in the new JSON log")
        assert "configuration reloaded" not in (tmp_path / "twistd.log.1").read_text()
        assert "configuration reloaded" not in (tmp_path / "mpp.json.1").read_text()
        assert "listening on" in (tmp_path / "twistd.log.1").read_text()
        assert proc.poll() is None, "SIGUSR1 must not stop the proxy"
        assert not (tmp_path / "twistd.log.2").exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        _kill(proc)
