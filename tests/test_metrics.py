"""Prometheus metrics (mppproxy/metrics/, issue 16): counted through the real
hooks and read back from prometheus-client's multiprocess files, and, end to
end, a real twistd proxy (one and two workers) relaying to a loopback sink,
scraped over HTTP: the counts equal what the test sent."""
from __future__ import annotations

import os
import signal
import smtplib
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from helpers import free_port, wait_for
from mppproxy import probes, txlog
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping
from mppproxy.db import traffic
from mppproxy.metrics.hooks import HotPath
from mppproxy.metrics.registry import Metrics, forget_dead, prepare_directory
from mppproxy.results import Disposition
from mppproxy.smtp.replies import Reply

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _read(directory: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, directory)
    return _samples(generate_latest(registry).decode())


# -- in one process ----------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _own_value_class() -> Any:
    """prepare_directory sets the process's environment and value class: put them back."""
    from prometheus_client import values

    saved, env = values.ValueClass, os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    yield
    values.close_all_multiprocess_files()
    values.ValueClass = saved
    if env is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = env


class _Txn:
    def __init__(self, refusals: Optional[list[tuple[str, str, Reply]]] = None):
        self.refusals = refusals


def test_hot_path_counts_through_the_hooks(tmp_path: Path) -> None:
    """The tally, the transaction observer and the probes land in the shared files with their
    labels; uninstalled, nothing more is counted."""
    directory = str(tmp_path / "metrics")
    prepare_directory(directory, clean=True)
    hot = HotPath(Metrics())
    hot.install()
    try:
        for _ in range(3):
            for tally in traffic.tallies:
                tally(traffic.Counted.RELAYED, "")
        refused = Reply(550, "5.7.1", "no")
        greylisted = Reply(451, "4.7.1", "later")
        for observe in txlog.observers:
            observe(_Txn([("a@x", "relay control", refused), ("b@x", "greylisting", greylisted)]),
                    Disposition.REFUSED, greylisted, None, {})
            observe(_Txn(), Disposition.REJECT, refused, "virus", {})
        probes.check_done("dnsbl", 0.02, "ok")
        probes.check_done("dnsbl", 3.0, "timeout")
        probes.engine_done("clamd", 0.5, "down")
    finally:
        hot.uninstall()
    probes.check_done("dnsbl", 0.02, "ok")  # not counted any more
    got = _read(directory)
    assert got[("mppproxy_transactions_total", (("disposition", "relayed"), ("reason", "")))] == 3
    assert got[("mppproxy_refusals_total", (("check", "relay control"), ("reply", "5xx"),
                                           ("stage", "rcpt")))] == 1
    assert got[("mppproxy_refusals_total", (("check", "greylisting"), ("reply", "4xx"),
                                           ("stage", "rcpt")))] == 1
    assert got[("mppproxy_refusals_total", (("check", "virus"), ("reply", "5xx"),
                                           ("stage", "data")))] == 1
    assert got[("mppproxy_check_duration_seconds_count", (("check", "dnsbl"),))] == 2
    assert got[("mppproxy_check_errors_total", (("check", "dnsbl"), ("kind", "timeout")))] == 1
    assert got[("mppproxy_engine_errors_total", (("engine", "clamd"), ("kind", "down")))] == 1
    assert got[("mppproxy_engine_duration_seconds_bucket", (("engine", "clamd"), ("le", "0.5")))] == 1
    assert hot.tally not in traffic.tallies and hot.observe not in txlog.observers


def test_dead_processes_are_cleaned_and_forgotten(tmp_path: Path) -> None:
    """At start the main process removes the files of processes no longer running and keeps
    those of running ones; forget_dead drops a dead process's live gauges, not its counters."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name in (f"counter_{dead.pid}.db", f"gauge_livesum_{dead.pid}.db",
                 f"counter_{os.getppid()}.db"):
        (directory / name).write_bytes(b"")
    prepare_directory(str(directory), clean=True)
    left = sorted(p.name for p in directory.iterdir())
    assert left == [f"counter_{os.getppid()}.db"]
    (directory / f"gauge_livesum_{dead.pid}.db").write_bytes(b"")
    (directory / f"counter_{dead.pid}.db").write_bytes(b"")
    assert forget_dead(str(directory)) == 1
    assert not (directory / f"gauge_livesum_{dead.pid}.db").exists()
    assert (directory / f"counter_{dead.pid}.db").exists()


def test_metrics_section_defaults_and_errors() -> None:
    """[metrics] is off by default on loopback port 9125; a bad value is named by its key."""
    config = from_mapping({})
    assert not config.metrics.enabled
    assert config.metrics.listen == ("tcp:9125:interface=127.0.0.1",)
    with pytest.raises(ConfigError) as e:
        from_mapping({"metrics": {"refresh": 0, "listen": ["nonsense:1"]}})
    text = str(e.value)
    assert "metrics.refresh: must be at least 0.1" in text and "metrics.listen" in text


# -- a real proxy --------------------------------------------------------------------------

class _SinkHandler(socketserver.StreamRequestHandler):
    """A loopback backend: 250 to everything, counts each message."""

    timeout = 30

    def handle(self) -> None:
        server: Any = self.server

        def reply(text: bytes) -> None:
            self.wfile.write(text + b"\r\n")
            self.wfile.flush()

        reply(b"220 sink.test ESMTP")
        for _ in range(10_000):
            line = self.rfile.readline(65536)
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                reply(b"250-sink.test\r\n250 8BITMIME")
            elif verb == b"DATA":
                reply(b"354 go on")
                for _ in range(100_000):
                    data = self.rfile.readline(65536)
                    if not data or data == b".\r\n":
                        break
                with server.lock:
                    server.messages += 1
                reply(b"250 2.0.0 queued")
            elif verb == b"QUIT":
                reply(b"221 2.0.0 bye")
                return
            else:
                reply(b"250 2.0.0 ok")


class _Sink(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.lock = threading.Lock()
        self.messages = 0


@pytest.fixture
def sink() -> Any:
    server = _Sink()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def _scrape(port: int) -> Optional[dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return _samples(r.read().decode())
    except OSError:
        return None


def _is_worker_of(pid: int, config: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"--worker-fds" in cmdline and str(config).encode() in cmdline


def _workers(config: Path) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_worker_of(int(p), config)]


def _send(port: int, relayed: int, refused: int) -> None:
    for i in range(relayed):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.sendmail("a@example.net", [f"u{i}@example.com"], b"Subject: m\r\n\r\nbody\r\n")
    for _ in range(refused):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.ehlo("client.test")
            s.mail("a@example.net")
            assert s.rcpt("x@example.org")[0] == 554  # not a relay domain: relay control


RELAYED_KEY = ("mppproxy_transactions_total", (("disposition", "relayed"), ("reason", "")))
REFUSED_KEY = ("mppproxy_transactions_total", (("disposition", "refused"),
                                               ("reason", "relay control")))
REFUSALS_KEY = ("mppproxy_refusals_total", (("check", "relay control"), ("reply", "5xx"),
                                            ("stage", "rcpt")))


@pytest.mark.parametrize("workers", [1, 2])
def test_scraped_counts_equal_what_was_sent(tmp_path: Path, sink: Any, workers: int) -> None:
    """A twistd proxy with [metrics] on, relaying to a loopback sink: after 30 messages relayed
    and 5 refused by relay control, one scrape says exactly that (with two workers: summed over
    both processes, each of which took some); a worker killed and restarted loses none of it."""
    smtp_port, metrics_port = free_port(), free_port()
    data = tmp_path / "data"
    config = tmp_path / "mpp.toml"
    config.write_text(
        f'listen = ["tcp:{smtp_port}:interface=127.0.0.1"]\nrelay_domains = ["example.com"]\n'
        f'trusted_networks = ["10.255.255.0/24"]\ndata_dir = "{data}"\nworkers = {workers}\n'
        f'[backend]\nhost = "127.0.0.1"\nport = {sink.server_address[1]}\n'
        f'[metrics]\nenabled = true\nlisten = ["tcp:{metrics_port}:interface=127.0.0.1"]\n'
        f'refresh = 0.2\nstate_cache = 0\n')
    log = tmp_path / "proxy.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(TWISTD + ["mppproxy", "--config", str(config)], cwd=tmp_path,
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        # Ready when the metrics answer (an SMTP probe would count a session).
        wait_for(lambda: _scrape(metrics_port) or proc.poll() is not None, 30, what="metrics")
        assert proc.poll() is None, log.read_text()
        if workers > 1:
            wait_for(lambda: "inherited listeners" in log.read_text(), 30, what="worker ready")
        relayed, refused = 30, 5
        _send(smtp_port, relayed, refused)
        assert sink.messages == relayed
        got = _scrape(metrics_port)
        assert got is not None
        assert got[RELAYED_KEY] == relayed
        assert got[REFUSED_KEY] == refused
        assert got[REFUSALS_KEY] == refused
        # The gauges and the sessions' counter follow within metrics.refresh.
        wait_for(lambda: (_scrape(metrics_port) or {}).get(("mppproxy_sessions_total", ()))
                 == relayed + refused, 10, what="sessions counted")
        got = _scrape(metrics_port)
        assert got is not None
        assert got[("mppproxy_sessions_open", ())] == 0
        assert got[("mppproxy_backend_up", (("backend", f"127.0.0.1:{sink.server_address[1]}"),))] == 1
        assert got[("mppproxy_backend_connections", (("state", "busy"),))] == 0
        assert got[("mppproxy_backend_connections_opened_total", ())] >= workers - 1
        assert got[("mppproxy_config_generation", ())] == 1
        assert got[("mppproxy_queue_items", (("queue", "archive"), ("state", "queued")))] == 0
        assert ("mppproxy_state_entries", (("table", "greylist"),)) in got
        assert got[("mppproxy_tls_certificate_expiry_timestamp_seconds",
                    (("certificate", str(data / "tls" / "selfsigned.crt")),))] > time.time()
        assert ("mppproxy_build_info", (("python", ".".join(map(str, sys.version_info[:3]))),
                                        ("version", "0.1.0"))) in got
        if workers > 1:
            # Each process's own file: both served some of the 35 sessions
            # (SO_REUSEPORT hashes the client ports; all on one: p ~ 1e-10).
            per_process = []
            for path in sorted((data / "run" / "metrics").glob("counter_*.db")):
                counts = MultiProcessCollector.merge([str(path)])
                per_process.append(sum(s.value for m in counts for s in m.samples
                                       if s.name == "mppproxy_sessions_total"))
            assert len(per_process) == 2 and all(n > 0 for n in per_process), per_process
            # A worker killed: its counts stay, its gauges go, a new one comes.
            first = wait_for(lambda: _workers(config), 10, what="worker")
            os.kill(first[0], signal.SIGKILL)
            wait_for(lambda: [p for p in _workers(config) if p not in first], 30,
                     what="restarted worker")
            wait_for(lambda: not (data / "run" / "metrics" / f"gauge_livesum_{first[0]}.db")
                     .exists(), 10, what="dead worker's gauges forgotten")
            _send(smtp_port, 4, 0)
            got = _scrape(metrics_port)
            assert got is not None and got[RELAYED_KEY] == relayed + 4
        else:
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(lambda: (_scrape(metrics_port) or {}).get(("mppproxy_config_generation", ()))
                     == 2, 15, what="reload counted")
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    # The main process forgot its own gauges at the stop.
    assert not list((data / "run" / "metrics").glob(f"gauge_*_{proc.pid}.db"))


def test_metrics_off_installs_no_hook() -> None:
    """With [metrics] off (the default) nothing is hooked into the hot path."""
    from mppproxy.metrics.service import for_proxy

    class Proxy:
        config = from_mapping({})

    assert for_proxy(Proxy()) is None
    assert not txlog.observers and not probes.check_timers and not probes.engine_timers
