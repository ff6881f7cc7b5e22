"""The twistd service as a user runs it: reload on SIGHUP, workers, IPv6, JSON log."""
from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


def _banner(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(512).startswith(b"220")
    except OSError:
        return False


class Proxy:
    """A twistd mppproxy child process, stopped at the end of the test."""

    def __init__(self, tmp_path: Path, args: list[str], port: int):
        self.log = tmp_path / "proxy.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(TWISTD + ["mppproxy", *args], cwd=tmp_path, env=env,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_for(lambda: _banner(port) or self.proc.poll() is not None, 20, what="proxy banner")
        finally:
            if self.proc.poll() is not None:
                raise AssertionError("proxy exited:\n" + self.log.read_text())

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def start_proxy(tmp_path):
    started: list[Proxy] = []

    def start(args: list[str], port: int) -> Proxy:
        p = Proxy(tmp_path, args, port)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def _config(path: Path, ports: list[int], domains: list[str], data: Path, extra: str = "") -> None:
    listen = ", ".join(f'"tcp:{p}:interface=127.0.0.1"' for p in ports)
    doms = ", ".join(f'"{d}"' for d in domains)
    path.write_text(f'listen = [{listen}]\nrelay_domains = [{doms}]\n'
                    f'trusted_networks = ["10.255.255.0/24"]\ndata_dir = "{data}"\n{extra}')


def _maildir_files(data: Path) -> list[Path]:
    return sorted(data.glob("maildir/*/*/new/*"))


def test_sighup_reloads_without_dropping_sessions(tmp_path, start_proxy):
    """SIGHUP swaps in a new config (new listener, new relay domain) while an open session finishes."""
    port_a, port_b = free_port(), free_port()
    cfg, data = tmp_path / "mpp.toml", tmp_path / "data"
    _config(cfg, [port_a], ["example.com"], data)
    proxy = start_proxy(["--config", str(cfg)], port_a)

    old = smtplib.SMTP("127.0.0.1", port_a, timeout=10)
    old.ehlo("old.example")
    assert old.mail("a@example.net")[0] == 250
    assert old.rcpt("x@example.com")[0] == 250
    assert old.rcpt("x@example.org")[0] == 554  # not yet a relay domain

    _config(cfg, [port_a, port_b], ["example.com", "example.org"], data)
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: _banner(port_b), 10, what="new listener after SIGHUP")

    code, _ = old.data(b"Subject: before reload\r\n\r\nbody\r\n")
    assert code == 250
    old.quit()
    with smtplib.SMTP("127.0.0.1", port_b, timeout=10) as new:
        new.ehlo("new.example")
        new.mail("a@example.net")
        assert new.rcpt("y@example.org")[0] == 250
        assert new.data(b"Subject: after reload\r\n\r\nbody\r\n")[0] == 250
    assert len(_maildir_files(data)) == 2
    assert "configuration reloaded" in proxy.text()


def test_bad_reload_keeps_the_running_config(tmp_path, start_proxy):
    """A SIGHUP with a broken file logs each error and keeps serving with the old config."""
    port = free_port()
    cfg, data = tmp_path / "mpp.toml", tmp_path / "data"
    _config(cfg, [port], ["example.com"], data)
    proxy = start_proxy(["--config", str(cfg)], port)
    cfg.write_text(cfg.read_text() + "[limits]\nmax_errors = \"lots\"\n")
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the running configuration" in proxy.text(), 10, what="reload error")
    assert "limits.max_errors: must be a whole number" in proxy.text()
    # A file that parses but names a certificate that does not exist.
    _config(cfg, [port], ["example.com"], data, f'[tls]\ncert_file = "{tmp_path}/missing.pem"\n')
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proxy.text().count("keeping the running configuration") == 2, 10, what="second reload error")
    # Named as every config error is: the file, the key, the problem.
    assert f"{cfg}: tls.cert_file: cannot read {tmp_path}/missing.pem" in proxy.text()
    assert "Traceback" not in proxy.text()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("x")
        s.mail("a@example.net")
        assert s.rcpt("b@example.com")[0] == 250


def test_workers_share_the_listener_and_restart(tmp_path, start_proxy):
    """With --workers 2 a second process accepts on the same socket and is restarted if it dies."""
    port = free_port()
    data = tmp_path / "data"
    proxy = start_proxy(["--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(data),
                         "--workers", "2"], port)

    def worker_pids() -> list[int]:
        # Only this proxy's workers: an alternation like "worker-fds.*|..."
        # also matched every other proxy's workers on the machine (a
        # benchmark's), and the test then SIGKILLed one of those.
        out = subprocess.run(["pgrep", "-f", f"mppproxy --listen tcp:{port}:"],
                             capture_output=True, text=True).stdout.split()
        return [int(p) for p in out if int(p) != proxy.proc.pid and _is_worker(int(p))]

    first = wait_for(worker_pids, 15, what="worker process")
    wait_for(lambda: proxy.text().count("inherited listeners") == 1, 15, what="worker ready")
    for i in range(20):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("a@example.net", [f"u{i}@example.com"], b"Subject: w\r\n\r\nx\r\n")
    assert len(_maildir_files(data)) == 20
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: [p for p in worker_pids() if p not in first], 15, what="restarted worker")
    wait_for(lambda: proxy.text().count("inherited listeners") == 2, 15, what="restarted worker ready")
    assert "restarting" in proxy.text()
    # The main process dies hard: its workers must not serve on as orphans.
    workers = worker_pids()
    os.kill(proxy.proc.pid, signal.SIGKILL)
    proxy.proc.wait(10)
    wait_for(lambda: not any(_is_worker(p) for p in workers), 15, what="orphaned workers stopping")
    assert not _banner(port)


def _is_worker(pid: int) -> bool:
    try:
        return b"--worker-fds" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_listens_on_ipv6(tmp_path, start_proxy):
    """An IPv6 endpoint (tcp6, escaped colons) accepts mail on ::1."""
    port4, port6 = free_port(), free_port("127.0.0.1")
    data = tmp_path / "data"
    start_proxy(["--listen", f"tcp:{port4}:interface=127.0.0.1",
                 "--listen", f"tcp6:{port6}:interface=\\:\\:1", "--data-dir", str(data)], port4)
    wait_for(lambda: _banner(port6, "::1"), 10, what="IPv6 banner")
    with smtplib.SMTP("::1", port6, timeout=10) as s:
        s.sendmail("a@example.net", ["v6@example.com"], b"Subject: v6\r\n\r\nx\r\n")
    assert len(_maildir_files(data)) == 1


def test_json_log_has_one_event_per_transaction(tmp_path, start_proxy):
    """logging.json_file gets one transaction event with client, envelope, action and reply."""
    port = free_port()
    cfg, data = tmp_path / "mpp.toml", tmp_path / "data"
    jlog = tmp_path / "events.json"
    _config(cfg, [port], ["example.com"], data, f'[logging]\njson_file = "{jlog}"\n')
    start_proxy(["--config", str(cfg)], port)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("json.example")
        s.sendmail("a@example.net", ["j@example.com"], b"Subject: j\r\n\r\nx\r\n")

    def events() -> list[dict]:
        if not jlog.exists():
            return []
        out = []
        for line in jlog.read_text().splitlines():
            assert not line.startswith("\x1e"), "one plain JSON object per line"
            if line:
                ev = json.loads(line)
                if ev.get("mpp_event") == "transaction":
                    out.append(ev)
        return out

    (ev,) = wait_for(events, 10, what="transaction event")
    assert ev["client"] == "127.0.0.1" and ev["helo"] == "json.example"
    assert ev["sender"] == "a@example.net" and ev["recipients"] == ["j@example.com"]
    assert ev["action"] == "deliver" and ev["reply_code"] == 250
    assert ev["size"] > 0 and "data_ms" in ev["timings"]


def test_shutdown_says_421_to_open_sessions(tmp_path, start_proxy):
    """On SIGTERM an idle open session hears 421 4.3.2 before the close (RFC 5321 3.8)."""
    port = free_port()
    proxy = start_proxy(["--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(tmp_path / "d")], port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        replies = s.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        s.sendall(b"EHLO client.test\r\n")
        # The EHLO reply has been read to its last line: the session is idle.
        for _ in range(50):
            if replies.readline().startswith(b"250 "):
                break
        else:
            raise AssertionError("no end to the EHLO reply")
        proxy.proc.send_signal(signal.SIGTERM)
        assert replies.readline().startswith(b"421 4.3.2 ")
