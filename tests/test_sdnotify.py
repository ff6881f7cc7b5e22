"""systemd's notify protocol (mppproxy/sdnotify.py) and the unit file
(contrib/systemd/mppproxy.service), issue 16 "systemd".

The protocol is tested against real datagram sockets the test binds (a
path and an abstract name), then with a real ``twistd -n mppproxy``
started with ``$NOTIFY_SOCKET`` set: READY=1 arrives once the port
answers, RELOADING=1 and READY=1 around a SIGHUP, STOPPING=1 at SIGTERM,
every datagram from the main process (``SO_PASSCRED``), none from its
workers.  The unit file is checked by ``systemd-analyze verify`` (skipped
without it; a failure under ``MPP_REQUIRE_SERVICES=1``, as CI runs).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from helpers import free_port
from mppproxy import sdnotify
from test_shutdown_twistd import TWISTD_ARGS, _config, _env, _greeting, _kill

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "mppproxy.service"
SYSUSERS = ROOT / "contrib" / "systemd" / "mppproxy.sysusers.conf"
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Listener:
    """A datagram socket bound where systemd's would be, reading each
    message with the sender's pid (``SO_PASSCRED``)."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)

    def receive(self, timeout: float) -> Optional[tuple[str, int]]:
        """(message, sender pid), or None after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CRED.size))
        except socket.timeout:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CRED.unpack(payload[:_CRED.size])[0]
        return data.decode(), pid

    def wait_for(self, field: str, timeout: float, seen: list[tuple[str, int]],
                 proc: Optional[subprocess.Popen] = None) -> str:
        """The first message holding the line ``field``; every message read
        is appended to ``seen``.  Fails at once when ``proc`` has exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.receive(min(0.5, max(0.01, deadline - time.monotonic())))
            if got is None:
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"no {field}: the process exited with "
                                         f"{proc.returncode}; got {seen}")
                continue
            seen.append(got)
            if field in got[0].split("\n"):
                return got[0]
        raise AssertionError(f"no {field} within {timeout} s; got {seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    sock = Listener(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


# -- the protocol ---------------------------------------------------------------

def test_fields_reach_a_path_socket(listener):
    """ready, reloading, stopping and status each send one datagram of KEY=VALUE lines to a path socket."""
    n = sdnotify.Notifier(listener.address)
    assert n.ready("up: listening on tcp:25")
    assert listener.receive(5) == ("READY=1\nSTATUS=up: listening on tcp:25", os.getpid())
    assert n.reloading()
    message = listener.receive(5)[0].split("\n")
    assert message[0] == "RELOADING=1"
    assert message[1].startswith("MONOTONIC_USEC=")
    usec = int(message[1].split("=")[1])
    assert abs(usec - time.monotonic_ns() // 1000) < 10_000_000
    assert n.stopping("stopping\nnow")
    assert listener.receive(5)[0] == "STOPPING=1\nSTATUS=stopping now"
    assert n.status("42 sessions")
    assert listener.receive(5)[0] == "STATUS=42 sessions"


def test_abstract_socket():
    """An address starting with @ is an abstract socket (a NUL byte first)."""
    name = f"@mppproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = Listener(name)
    try:
        assert sdnotify.Notifier(name).ready()
        assert sock.receive(5)[0] == "READY=1"
    finally:
        sock.close()


def test_nothing_without_notify_socket():
    """Without $NOTIFY_SOCKET nothing is sent and nothing fails."""
    env = {"PATH": "/bin"}
    n = sdnotify.take_from_environment(env)
    assert not n.enabled
    assert not n.ready() and not n.stopping() and not n.reloading()
    assert sdnotify.notifier() is n


def test_take_from_environment_unsets_it(listener):
    """The variable is taken out of the environment, so child processes do not inherit it."""
    env = {"NOTIFY_SOCKET": listener.address, "PATH": "/bin"}
    try:
        n = sdnotify.take_from_environment(env)
        assert env == {"PATH": "/bin"}
        assert n.enabled and sdnotify.notifier() is n
        assert sdnotify.notifier().ready()
        assert listener.receive(5)[0] == "READY=1"
    finally:
        sdnotify.take_from_environment({})


def test_unusable_addresses_never_raise(tmp_path):
    """A socket nobody binds, or an address of another kind, gives False (logged), never an exception."""
    assert not sdnotify.Notifier(str(tmp_path / "nobody.sock")).ready()
    n = sdnotify.Notifier("vsock:2:1234")
    assert not n.ready() and not n.stopping()


# -- a real twistd process -------------------------------------------------------

def _start(tmp_path: Path, listener: Listener, port: int, workers: int = 1) -> subprocess.Popen:
    """``twistd -n mppproxy`` with $NOTIFY_SOCKET naming ``listener``."""
    cfg = _config(tmp_path, port)
    cfg.write_text(f"workers = {workers}\n" + cfg.read_text())
    env = dict(_env(), NOTIFY_SOCKET=listener.address)
    # Its log stays in tmp_path/twistd.out for a failure's diagnosis.
    with open(tmp_path / "twistd.out", "ab") as out:
        return subprocess.Popen([sys.executable, *TWISTD_ARGS, "mppproxy", "--config", str(cfg)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path, env=env, start_new_session=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_twistd_ready_reload_stopping(tmp_path, listener, workers):
    """READY=1 comes once the port greets; SIGHUP gives RELOADING=1 then READY=1; SIGTERM gives STOPPING=1; all from the main process."""
    port = free_port()
    proc = _start(tmp_path, listener, port, workers)
    seen: list[tuple[str, int]] = []
    try:
        ready = listener.wait_for("READY=1", 60, seen, proc)
        # Ready means listening: the port greets at once.
        session = _greeting(port)
        assert session is not None, "READY=1 came before the port accepted connections"
        session.close()
        assert "STATUS=all-in-one: listen tcp:" in ready
        if workers > 1:
            assert f"{workers} workers" in ready
        os.kill(proc.pid, signal.SIGHUP)
        listener.wait_for("RELOADING=1", 30, seen, proc)
        reloaded = listener.wait_for("READY=1", 30, seen, proc)
        assert "STATUS=configuration reloaded" in reloaded
        os.kill(proc.pid, signal.SIGTERM)
        stopping = listener.wait_for("STOPPING=1", 30, seen)
        assert "STATUS=stopping" in stopping
        # twistd ends with the signal it stopped for; systemd counts a
        # SIGTERM death as a clean stop.
        assert proc.wait(30) == -signal.SIGTERM
        # Nothing else, and nothing from a worker.
        while (got := listener.receive(0.5)) is not None:
            seen.append(got)
        assert {pid for _, pid in seen} == {proc.pid}, seen
        assert [m.split("\n")[0] for m, _ in seen] == ["READY=1", "RELOADING=1", "READY=1",
                                                        "STOPPING=1"]
    finally:
        _kill(proc)


def test_failed_reload_is_ready_again(tmp_path, listener):
    """A reload whose configuration has errors still ends with READY=1, saying the running configuration is kept."""
    port = free_port()
    proc = _start(tmp_path, listener, port)
    seen: list[tuple[str, int]] = []
    try:
        listener.wait_for("READY=1", 60, seen, proc)
        cfg = tmp_path / "mpp.toml"
        cfg.write_text(cfg.read_text() + "[limits]\nmax_recipients = 0\n")
        os.kill(proc.pid, signal.SIGHUP)
        listener.wait_for("RELOADING=1", 30, seen)
        assert "reload failed" in listener.wait_for("READY=1", 30, seen)
        assert _greeting(port) is not None
    finally:
        _kill(proc)


def test_no_ready_when_the_port_cannot_be_opened(tmp_path, listener):
    """When the listener cannot open, the process exits 1 and READY=1 is never sent."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    proc = _start(tmp_path, listener, port)
    try:
        assert proc.wait(60) == 1
    finally:
        _kill(proc)
        taken.close()
    messages = []
    while (got := listener.receive(0.5)) is not None:
        messages.append(got[0])
    assert not any("READY=1" in m.split("\n") for m in messages), messages


# -- the unit file ---------------------------------------------------------------

def _require_systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("MPP_REQUIRE_SERVICES") == "1":
            raise AssertionError("systemd-analyze is missing (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    return path


def test_unit_file_verifies(tmp_path):
    """systemd-analyze verify passes without a warning on the unit, its ExecStart pointed at this environment's twistd."""
    analyze = _require_systemd_analyze()
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists(), f"{twistd}: twistd is not beside the interpreter"
    text = UNIT.read_text()
    assert "ExecStart=/opt/mppproxy/bin/twistd " in text
    unit = tmp_path / "mppproxy.service"
    unit.write_text(text.replace("/opt/mppproxy/bin/twistd", str(twistd)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, output
    assert "mppproxy.service" not in output, output


def test_unit_file_as_shipped_names_only_the_missing_twistd(tmp_path):
    """The shipped file fails verify only for its ExecStart, which the installer adjusts (docs/operations.md)."""
    analyze = _require_systemd_analyze()
    unit = tmp_path / "mppproxy.service"
    shutil.copy(UNIT, unit)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120)
    # verify also loads the units of the machine; what it says about those
    # (say, galera-4's garb.service) is not about ours.
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if line.strip() and (line.startswith(unit.name) or line.startswith(str(unit)))]
    if Path("/opt/mppproxy/bin/twistd").exists():
        assert not lines, lines
    else:
        assert lines == [f"{unit.name}: Command /opt/mppproxy/bin/twistd is not executable: "
                         "No such file or directory"], lines


def test_unit_file_settings():
    """The unit runs Type=notify as the mppproxy user with only CAP_NET_BIND_SERVICE, reloads with SIGHUP and is hardened."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    expect = {"Type": "notify", "NotifyAccess": "main", "User": "mppproxy",
              "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
              "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE", "NoNewPrivileges": "yes",
              "ExecReload": "/bin/kill -HUP $MAINPID", "ProtectSystem": "strict",
              "PrivateTmp": "yes", "ProtectHome": "yes", "KillMode": "mixed",
              "SystemCallFilter": "@system-service"}
    for key, value in expect.items():
        assert settings.get(key) == [value], key
    assert "--nodaemon" in settings["ExecStart"][0]
    assert "/var/lib/mppproxy" in settings["ReadWritePaths"][0]


def test_sysusers_snippet():
    """The sysusers snippet makes the mppproxy user (checked by systemd-sysusers --dry-run where present)."""
    text = SYSUSERS.read_text()
    assert any(line.startswith("u mppproxy ") for line in text.splitlines())
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        return
    proc = subprocess.run([tool, "--dry-run", str(SYSUSERS)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
