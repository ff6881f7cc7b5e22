"""Connection limits per node across worker processes (mppproxy/connshare.py,
issue 16 "Shared limits and counters").

The table on its own (several real processes counting into it, a dead
process's column cleared, compaction after thousands of addresses), then a
real ``twistd mppproxy`` with ``--workers 2``: the kernel spreads one
client's connections over both processes (SO_REUSEPORT), and
``max_connections_per_ip`` and ``max_connections`` still hold for the node.
"""
from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import free_port, wait_for
from mppproxy.connshare import ConnectionTable, SharedConnectionCounter, slots_for
from test_service import Proxy, _config

ROOT = Path(__file__).resolve().parents[1]


def test_processes_count_into_one_table(tmp_path: Path) -> None:
    """Three processes add connections for two addresses: every process sees the node's totals; clearing a column forgets that process's connections."""
    path = str(tmp_path / "run" / "connections")
    table = ConnectionTable.create(path, slots_for(100), 3)
    script = ("import sys; from mppproxy.connshare import ConnectionTable as T\n"
              "t = T.attach(sys.argv[1]); c = int(sys.argv[2])\n"
              "for _ in range(int(sys.argv[3])): t.add(c, sys.argv[4])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for column, n, host in ((1, 4, "192.0.2.1"), (2, 3, "192.0.2.1"), (2, 2, "2001:db8::1")):
        subprocess.run([sys.executable, "-c", script, path, str(column), str(n), host],
                       check=True, env=env, timeout=60)
    counter = SharedConnectionCounter(table, 0)
    counter.add("192.0.2.1")
    assert counter.total == 10
    assert counter.per_host.get("192.0.2.1", 0) == 8
    assert counter.per_host.get("2001:db8::1", 0) == 2
    assert counter.per_host.get("198.51.100.9", 0) == 0
    table.clear_column(2)  # that process died holding 5
    assert (counter.total, counter.per_host.get("192.0.2.1", 0)) == (5, 5)
    counter.remove("192.0.2.1")
    assert (counter.total, counter.per_host.get("192.0.2.1", 0)) == (4, 4)


def test_many_addresses_over_time_stay_correct_and_small(tmp_path: Path) -> None:
    """20,000 distinct addresses coming and going in a 256-slot table (compaction) never lose a live count, and lookups stay correct."""
    table = ConnectionTable.create(str(tmp_path / "c"), 256, 2)
    counter = SharedConnectionCounter(table, 1)
    live = [f"10.0.{i // 250}.{i % 250}" for i in range(50)]
    for host in live:
        counter.add(host)
    started = time.monotonic()
    for i in range(20_000):
        host = f"172.16.{i // 250 % 250}.{i % 250}"
        counter.add(host)
        counter.remove(host)
    assert time.monotonic() - started < 60
    assert counter.total == 50
    assert all(counter.per_host.get(h, 0) == 1 for h in live)


def _open(port: int, n: int, source: str = "127.0.0.1") -> tuple[list[socket.socket], list[bytes]]:
    """``n`` connections from ``source`` kept open, and each one's first reply."""
    socks, greetings = [], []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        s.settimeout(10)
        socks.append(s)
        greetings.append(s.recv(512))
    return socks, greetings


def test_per_ip_and_total_limits_hold_across_two_workers(tmp_path: Path) -> None:
    """With --workers 2: 8 connections from one address get exactly 3 greetings (max_connections_per_ip = 3) and 421 for the rest, whichever process accepted them; a worker SIGKILLed while holding some frees its share."""
    port = free_port()
    cfg, data = tmp_path / "mpp.toml", tmp_path / "data"
    _config(cfg, [port], ["example.com"], data, "workers = 2\n[limits]\nmax_connections_per_ip = 3\n"
                                                "max_connections = 5\n")
    proxy = Proxy(tmp_path, ["--config", str(cfg)], port)
    try:
        # The node's own count, read from the table it shares: each step
        # starts once every earlier hang-up (the start-up probe's too) is
        # counted off, whichever process took it.
        [path] = wait_for(lambda: glob.glob(str(data / "run" / "connections.*")), 15,
                          what="the shared connection table")
        table = ConnectionTable.attach(path)
        idle = lambda: table.total() == 0  # noqa: E731
        wait_for(idle, 15, what="no connection counted")
        socks, greetings = _open(port, 8, "127.0.0.4")
        codes = [g[:3] for g in greetings]
        assert codes.count(b"220") == 3, greetings
        assert all(c == b"421" for c in codes if c != b"220"), greetings
        for s in socks:
            s.close()
        wait_for(idle, 15, what="the hang-ups counted off")
        # The node's total of 5: not reached per address from .2 and .3.
        extra = []
        for source in ("127.0.0.2", "127.0.0.3"):
            more, greetings = _open(port, 3, source)
            extra += more
            codes += [g[:3] for g in greetings]
        assert codes[8:].count(b"220") == 5, codes[8:]
        for s in extra:
            s.close()
        wait_for(idle, 15, what="the hang-ups counted off")
        # A worker SIGKILLed while it holds connections: what it held is
        # taken off the node's count (its column cleared), so the
        # connections left open are all that count.
        socks, greetings = _open(port, 3, "127.0.0.5")
        assert [g[:3] for g in greetings] == [b"220"] * 3
        worker = wait_for(lambda: _worker_pids(cfg), 15, what="the worker")[0]
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: "restarting in" in proxy.text(), 15, what="the supervisor to see it")
        alive = [s for s in socks if _still_open(s)]
        more, greetings = _open(port, 3, "127.0.0.5")
        assert [g[:3] for g in greetings].count(b"220") == 3 - len(alive), (len(alive), greetings)
        for s in socks + more:
            s.close()
        table.close()
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.text()


def _worker_pids(cfg: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"mppproxy --config {cfg}"], capture_output=True,
                         text=True).stdout.split()
    return [int(p) for p in out
            if b"--worker-fds" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _still_open(s: socket.socket) -> bool:
    """False once the server side is gone (EOF or a reset)."""
    s.settimeout(0.5)
    try:
        return s.recv(1) != b""
    except socket.timeout:
        return True
    except OSError:
        return False


