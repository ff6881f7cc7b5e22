"""Zero-downtime restart and upgrade (issue 16, mppproxy/restart.py) with a
real ``twistd mppproxy``: 20 clients send without pause while the main
process hands its listening sockets to a new one.

The backend is the all-in-one Maildir delivery in the node's data_dir: a
message is in ``new/`` (fsync'ed) before its client hears 250, so the files
there are what the node accepted.  Each message carries a unique token; a
client that hears no 250 sends the same token again on a new connection, as
an MTA retries a message.  Counted: connections refused, connections that
hung, messages answered 250, files delivered per token (lost: a 250 without
a file; duplicated: two files for one token), 421s heard.  The Postfix
version of the load test is tests/realmta/test_restart_under_load.py.

Placing inherited sockets (``place_inherited``) is tested without processes.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional


from helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
          "--pidfile="]
CLIENTS = 20
PER_SESSION = 3
MAX_PER_CLIENT = 1000
# A pause between a client's sessions: the load stays continuous without
# filling the disk with tens of thousands of files.
PAUSE = 0.05
GRACE = 6.0
ANSWERED_BEFORE_RESTART = 40
BODY = ("x" * 76 + "\r\n") * 30  # ~2.3 KB
TOKEN = re.compile(rb"restart-token-([0-9a-f]{32})")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _config(tmp: Path, port: int, workers: int = 1, extra: str = "",
            unix: Optional[str] = None) -> Path:
    cfg = tmp / "mpp.toml"
    listen = f'"tcp:{port}:interface=127.0.0.1"' + (f', "unix:{unix}"' if unix else "")
    cfg.write_text(f'listen = [{listen}]\nrelay_domains = ["example.com"]\n'
                   f'data_dir = "{tmp / "data"}"\nworkers = {workers}\n'
                   f'[smtp]\nhostname = "proxy.test"\n'
                   f'[web]\nenabled = false\n'
                   f'[timeouts]\nshutdown_grace = {GRACE}\n{extra}')
    return cfg


def _greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.settimeout(5)
            return s.recv(512).startswith(b"220")
    except OSError:
        return False


def _greets_unix(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            return s.recv(512).startswith(b"220")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Running (a zombie left to a PID 1 that does not reap counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    return state not in ("Z", "X")


def _children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


class Load:
    """20 client threads sending until told to stop, each message with a
    token; bounded in count (MAX_PER_CLIENT) and time (the deadline)."""

    def __init__(self, port: int, pause: float = PAUSE):
        self.port = port
        self.pause = pause
        self.lock = threading.Lock()
        self.answered: collections.Counter[str] = collections.Counter()  # token -> 250s heard
        self.codes: collections.Counter[Any] = collections.Counter()
        self.refused = 0
        self.hung = 0  # a connection with no greeting within the timeout
        self.heard_421 = 0
        self.cut = 0  # a session closed without a reply to a command
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, seconds: float = 90.0) -> None:
        deadline = time.monotonic() + seconds
        self.threads = [threading.Thread(target=self._client, args=(deadline,), daemon=True)
                        for _ in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(40)
        assert not any(t.is_alive() for t in self.threads), "a client never finished"

    def total_answered(self) -> int:
        with self.lock:
            return sum(self.answered.values())

    def _client(self, deadline: float) -> None:
        pending: Optional[str] = None
        sent = 0
        while not self.stop.is_set() and time.monotonic() < deadline and sent < MAX_PER_CLIENT:
            try:
                smtp = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test",
                                    timeout=20)
            except ConnectionRefusedError:
                with self.lock:
                    self.refused += 1
                time.sleep(0.05)
                continue
            except (OSError, smtplib.SMTPException):
                with self.lock:
                    self.hung += 1
                continue
            try:
                if smtp.ehlo()[0] != 250:
                    with self.lock:
                        self.heard_421 += 1
                    continue
                for _ in range(PER_SESSION):
                    token = pending or uuid.uuid4().hex
                    pending = token
                    sent += 1
                    code = self._one(smtp, token)
                    with self.lock:
                        self.codes[code] += 1
                        if code == 250:
                            self.answered[token] += 1
                        elif code == 421:
                            self.heard_421 += 1
                        elif code is None:
                            self.cut += 1
                    if code != 250:
                        break
                    pending = None
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass
            finally:
                smtp.close()
            time.sleep(self.pause)

    @staticmethod
    def _one(smtp: smtplib.SMTP, token: str) -> Optional[int]:
        try:
            code, _ = smtp.mail("sender@client.test")
            if code != 250:
                return code
            code, _ = smtp.rcpt("someone@example.com")
            if code != 250:
                return code
            code, _ = smtp.docmd("DATA")
            if code != 354:
                return code
            smtp.send((f"From: sender@client.test\r\nTo: someone@example.com\r\n"
                       f"Subject: restart-token-{token}\r\n\r\n{BODY}.\r\n").encode())
            return smtp.getreply()[0]
        except (smtplib.SMTPServerDisconnected, OSError):
            return None


def _delivered(data_dir: Path) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for path in data_dir.rglob("*"):
        if path.parent.name == "new" and path.is_file():
            m = TOKEN.search(path.read_bytes()[:4096])
            if m:
                found[m.group(1).decode()] += 1
    return found


class Notify:
    """A stand-in for systemd's notification socket: each datagram with
    the pid that sent it (SO_PASSCRED)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mpp-n-")  # sun_path is short
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.got: list[tuple[int, str]] = []

    def drain(self) -> list[tuple[int, str]]:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(8192, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return self.got
            pid = 0
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", value[:12])[0]
            self.got.append((pid, data.decode()))

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _start(cfg: Path, tmp: Path, port: int, env: dict[str, str]) -> tuple[subprocess.Popen, Any]:
    log = open(tmp / "twistd.out", "wb")
    proc = subprocess.Popen([*TWISTD, "mppproxy", "--config", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env,
                            start_new_session=True)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"twistd exited with {proc.returncode}: "
                                 f"{(tmp / 'twistd.out').read_text()[-3000:]}")
        return _greets(port)

    wait_for(up, 30, what="proxy greeting")
    return proc, log


def _kill_all(proc: subprocess.Popen, *pids: Optional[int]) -> None:
    for pid in pids:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the new process kept the session's group
    except OSError:
        pass
    if proc.poll() is None:
        proc.wait(10)


def _restart_under_load(tmp: Path, workers: int, restart: Any, notify: Optional[Notify] = None,
                        unix: Optional[str] = None) -> dict[str, Any]:
    """Run the load, call ``restart(old_pid)`` once ANSWERED_BEFORE_RESTART
    messages were answered, wait for the old process to end, go on for two
    seconds, stop; returns what was counted."""
    port = free_port()
    cfg = _config(tmp, port, workers, unix=unix)
    env = _env()
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.path
    proc, log = _start(cfg, tmp, port, env)
    old_pid = proc.pid
    new_pid: Optional[int] = None
    load = Load(port)
    try:
        if workers > 1:
            wait_for(lambda: len(_children(old_pid)) >= workers - 1, 30, what="workers")
        old_workers = _children(old_pid)
        load.start()
        wait_for(lambda: load.total_answered() >= ANSWERED_BEFORE_RESTART, 60,
                 what=f"{ANSWERED_BEFORE_RESTART} messages answered")
        before = load.total_answered()
        started = time.monotonic()
        restart(old_pid, cfg)
        proc.wait(GRACE * 2 + 20)
        switch = time.monotonic() - started
        record = json.loads((tmp / "data" / "restart.json").read_text())
        new_pid = int(record["new_pid"])
        after_old_exit = load.total_answered()
        time.sleep(2.0)  # the new process alone
        load.finish()
        delivered = _delivered(tmp / "data")
        result = {
            "old_pid": old_pid, "new_pid": new_pid, "record": record,
            "old_workers": old_workers, "new_children": _children(new_pid),
            "new_alive": _alive(new_pid), "new_greets": _greets(port),
            "unix_greets": bool(unix) and _greets_unix(unix),
            "old_exit": proc.returncode, "switch_seconds": switch,
            "answered": sum(load.answered.values()), "answered_tokens": set(load.answered),
            "answered_twice": [t for t, n in load.answered.items() if n > 1],
            "before": before, "by_old_exit": after_old_exit,
            "refused": load.refused, "hung": load.hung, "heard_421": load.heard_421,
            "cut": load.cut, "codes": dict(load.codes), "delivered": delivered,
            "log": (tmp / "twistd.out").read_text(errors="replace"),
        }
        if notify is not None:
            os.kill(new_pid, signal.SIGTERM)
            wait_for(lambda: not _alive(new_pid), GRACE + 15, what="the new process to stop")
            result["notify"] = list(notify.drain())
        return result
    finally:
        load.stop.set()
        _kill_all(proc, new_pid)
        log.close()


def _check(result: dict[str, Any], what: str) -> None:
    delivered: collections.Counter[str] = result["delivered"]
    answered = result["answered_tokens"]
    lost = answered - set(delivered)
    unanswered_delivered = set(delivered) - answered
    duplicated = [t for t, n in delivered.items() if n > 1]
    print(f"\n{what}: old pid {result['old_pid']} -> new pid {result['new_pid']}, "
          f"old exited {result['switch_seconds']:.1f} s after the restart began; "
          f"answered 250: {result['answered']} ({result['before']} before the restart, "
          f"{result['by_old_exit']} by the old process's exit); delivered {sum(delivered.values())}; "
          f"lost {len(lost)}, duplicated {len(duplicated)}, delivered without 250 "
          f"{len(unanswered_delivered)}; refused connections {result['refused']}, hung "
          f"{result['hung']}, 421 heard {result['heard_421']}, sessions cut {result['cut']}; "
          f"replies {result['codes']}")
    assert result["record"]["state"] == "ready", result["record"]
    assert result["old_exit"] == 0, result["old_exit"]
    assert result["new_alive"] and result["new_greets"]
    assert result["refused"] == 0 and result["hung"] == 0
    assert not lost, lost
    assert not duplicated and not result["answered_twice"], duplicated
    assert not unanswered_delivered, unanswered_delivered
    assert result["cut"] == 0 and result["heard_421"] == 0
    assert result["answered"] > result["by_old_exit"] > result["before"]
    assert "Traceback" not in result["log"], result["log"][-3000:]


def test_sigusr2_restart_under_load_loses_nothing(tmp_path: Path) -> None:
    """SIGUSR2 under 20 sending clients: no refused or hung connection, no 421, every message answered 250 delivered once and none without; the old pid exits 0, the new one serves (its Unix listener too: the old one did not unlink its path), and systemd hears MAINPID=<new> with READY=1 from the old pid and STOPPING=1 later from the new one."""
    notify = Notify()
    try:
        result = _restart_under_load(
            tmp_path, 1, lambda pid, cfg: os.kill(pid, signal.SIGUSR2), notify,
            unix=os.path.join(notify.dir, "smtp"))
    finally:
        notify.close()
    _check(result, "SIGUSR2 restart")
    assert result["unix_greets"]
    old, new = result["old_pid"], result["new_pid"]
    got = result["notify"]
    assert any(pid == old and "READY=1" in text and "MAINPID" not in text for pid, text in got), got
    assert any(pid == old and f"MAINPID={new}" in text.split("\n") and "READY=1" in text
               for pid, text in got), got
    assert any(pid == new and "STOPPING=1" in text for pid, text in got), got
    # The new process never claimed readiness itself, nor the old one stopping.
    assert not any(pid == new and "READY=1" in text for pid, text in got), got
    assert not any(pid == old and "STOPPING=1" in text for pid, text in got), got


def _checkout_copy(dest: Path) -> Path:
    """A second installation: a copy of the package with another version."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "mppproxy", dest / "mppproxy", ignore=ignore)
    shutil.copytree(ROOT / "templates", dest / "templates", ignore=ignore)
    (dest / "twisted" / "plugins").mkdir(parents=True)
    shutil.copy(ROOT / "twisted" / "plugins" / "mppproxy_plugin.py", dest / "twisted" / "plugins")
    init = dest / "mppproxy" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "0.1.0+upgraded"',
                           init.read_text()))
    return dest


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mppproxy", "restart", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_upgrade_to_another_checkout_with_two_workers_under_load(tmp_path: Path) -> None:
    """mppproxy restart --command (another checkout, version 0.1.0+upgraded) with workers = 2 under 20 sending clients: no refused or hung connection, nothing lost or duplicated; the old main and its worker are gone, the new main runs the other checkout's code with a new worker."""
    checkout = _checkout_copy(tmp_path / "checkout")
    outputs: list[subprocess.CompletedProcess[str]] = []

    def upgrade(pid: int, cfg: Path) -> None:
        command = shlex.join(["env", f"PYTHONPATH={checkout}", *TWISTD, "mppproxy",
                              "--config", str(cfg)])
        outputs.append(_cli("--pid", str(pid), "--config", str(cfg), "--command", command,
                            "--wait", "40"))

    result = _restart_under_load(tmp_path, 2, upgrade)
    out = outputs[0]
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"process {result['new_pid']} serves" in out.stdout
    _check(result, "upgrade to another checkout, workers = 2")
    assert f"mppproxy 0.1.0+upgraded from {checkout / 'mppproxy'}" in result["log"]
    assert result["old_workers"] and not any(_alive(p) for p in result["old_workers"])
    assert len(result["new_children"]) == 1 and not result["new_children"] & result["old_workers"]
    assert not (tmp_path / "data" / "restart-command").exists()  # used once


def test_a_failed_new_process_leaves_the_old_one_serving(tmp_path: Path) -> None:
    """A new process whose configuration is invalid exits; the old one keeps serving, logs RESTART FAILED, writes the failure in restart.json, and mppproxy restart --wait exits 1 saying so."""
    port = free_port()
    cfg = _config(tmp_path, port)
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("workers = 1", "workers = -3"))
    proc, log = _start(cfg, tmp_path, port, _env())
    try:
        command = shlex.join([*TWISTD, "mppproxy", "--config", str(bad)])
        out = _cli("--pid", str(proc.pid), "--config", str(cfg), "--command", command,
                   "--wait", "40")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "FAILED" in out.stderr and "keeps serving" in out.stderr
        record = json.loads((tmp_path / "data" / "restart.json").read_text())
        assert record["state"] == "failed" and record["old_pid"] == proc.pid
        assert proc.poll() is None and _greets(port)
        text = (tmp_path / "twistd.out").read_text()
        assert "RESTART FAILED" in text and "workers" in text
        # The next restart (its own command line) goes through.  (Once in
        # CI its new process ended with status 1 before twistd's first log
        # line, not reproduced since: the log's tail says more.)
        again = _cli("--pid", str(proc.pid), "--config", str(cfg), "--wait", "40")
        assert again.returncode == 0, (again.stdout + again.stderr + "\n--- twistd.out:\n"
                                       + (tmp_path / "twistd.out").read_text()[-4000:])
        proc.wait(GRACE * 2 + 10)
        new_pid = json.loads((tmp_path / "data" / "restart.json").read_text())["new_pid"]
        assert _greets(port) and _alive(new_pid)
    finally:
        _kill_all(proc)
        log.close()


def test_cli_usage_errors() -> None:
    """mppproxy restart names a process that does not exist: exit 3; without --pid/--pidfile/--systemd: exit 2."""
    out = _cli("--pid", "999999999")
    assert out.returncode in (2, 3), out.stderr
    assert _cli().returncode == 2


# ------------------------------------------------------------- without processes


def _listening(port: int = 0, reuseport: bool = False) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(5)
    return s


def test_place_inherited_matches_by_text_or_address_and_keeps_every_socket() -> None:
    """Inherited sockets go to the listener with the same text, else the same address; surplus sockets are kept for this process; a listener no longer configured is closed; one that needs more gets SO_REUSEPORT siblings."""
    from twisted.internet.task import Clock

    from mppproxy.restart import place_inherited

    a = [_listening(reuseport=True)]
    port_a = a[0].getsockname()[1]
    a += [_listening(port_a, reuseport=True) for _ in range(2)]
    b = _listening()
    port_b = b.getsockname()[1]
    gone = _listening()
    inherited = {f"tcp:{port_a}:interface=127.0.0.1": list(a),
                 "tcp:old-text-for-b": [b], "tcp:removed": [gone]}
    placed: dict[str, list[socket.socket]] = {}
    try:
        # Two processes now: a's three sockets give two plus one extra; b
        # (one socket, no SO_REUSEPORT) is found by its address.
        placed, extras = place_inherited(
            Clock(), inherited, [f"tcp:{port_a}:interface=127.0.0.1",
                                 f"tcp:port={port_b}:interface=127.0.0.1"], 2)
        assert placed[f"tcp:{port_a}:interface=127.0.0.1"] == a[:2]
        assert extras == [(f"tcp:{port_a}:interface=127.0.0.1", a[2])]
        assert placed[f"tcp:port={port_b}:interface=127.0.0.1"] == [b]  # shared by all
        assert gone.fileno() == -1  # closed
        # Four processes: a gets a fourth socket on its port.
        more, extras = place_inherited(Clock(), {"tcp:x": list(a)}, [
            f"tcp:{port_a}:interface=127.0.0.1"], 4)
        group = more[f"tcp:{port_a}:interface=127.0.0.1"]
        assert len(group) == 4 and not extras
        assert {s.getsockname()[1] for s in group} == {port_a}
        group[3].close()
    finally:
        for s in [*a, b, gone]:
            s.close()


def test_take_inherited_reads_and_removes_the_variable() -> None:
    """MPP_LISTEN_FDS names listening sockets by endpoint and is taken out of the environment; a descriptor that is no listening socket is left alone."""
    from mppproxy.restart import LISTEN_FDS_ENV, take_inherited

    lsock = _listening()
    plain = socket.socket()
    try:
        env = {LISTEN_FDS_ENV: json.dumps({"tcp:1": [os.dup(lsock.fileno()), plain.fileno()]})}
        got = take_inherited(env)
        assert LISTEN_FDS_ENV not in env
        assert list(got) == ["tcp:1"] and len(got["tcp:1"]) == 1
        assert got["tcp:1"][0].getsockname() == lsock.getsockname()
        got["tcp:1"][0].close()
        assert plain.fileno() != -1  # detached, not closed
    finally:
        lsock.close()
        plain.close()
