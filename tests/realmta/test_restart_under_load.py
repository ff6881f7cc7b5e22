"""A restart and an upgrade of a real ``twistd mppproxy`` (edge, workers = 2)
in front of the real Postfix while 20 clients send (issue 16,
mppproxy/restart.py).

One run, two switches under continuous load: SIGUSR2 to the main process
(the same code again), then ``mppproxy restart --command`` naming another
checkout (a copy of the package with another version).  Counted at Postfix
by the unique token of each message: nothing answered 250 is missing,
nothing arrives twice, nothing arrives without its 250; no connection is
refused or hangs, no client hears 421.  The load and the checkout copy are
tests/test_restart.py's.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from helpers import free_port, wait_for
from test_restart import TWISTD, Load, _alive, _checkout_copy, _children, _cli, _greets

from .conftest import _subprocess_env

if TYPE_CHECKING:
    from .conftest import PostfixBackend

GRACE = 6.0
WORKERS = 2
# Between a client's sessions: about 50 messages a second in all, so that
# Postfix has delivered them all soon after the run.
PAUSE = 1.0
STEP = 40  # messages answered between one switch and the next
TOKEN = re.compile(rb"restart-token-([0-9a-f]{32})")


def _tokens(postfix: "PostfixBackend") -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for raw in postfix.messages("example.com"):
        m = TOKEN.search(raw)
        if m:
            found[m.group(1).decode()] += 1
    return found


def test_restart_and_upgrade_under_load_lose_nothing_at_postfix(postfix: "PostfixBackend",
                                                                tmp_path: Path) -> None:
    """SIGUSR2 then an upgrade to another checkout, each under 20 sending clients, workers = 2, Postfix behind: every 250 delivered once, nothing without 250, no refused or hung connection, no 421; each old main and worker gone, the last process runs the other checkout's code."""
    port = free_port()
    cfg = tmp_path / "mpp.toml"
    cfg.write_text(f'listen = ["tcp:{port}:interface=127.0.0.1"]\nrelay_domains = ["example.com"]\n'
                   f'trusted_networks = ["10.255.255.0/24"]\ndata_dir = "{tmp_path / "data"}"\n'
                   f'workers = {WORKERS}\nmode = "edge"\n'
                   f'[backend]\nhost = "{postfix.host}"\nport = {postfix.port}\n'
                   f'[smtp]\nhostname = "proxy.test"\n[timeouts]\nshutdown_grace = {GRACE}\n')
    checkout = _checkout_copy(tmp_path / "checkout")
    env = _subprocess_env(None)
    log = open(tmp_path / "twistd.out", "wb")
    proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "mppproxy", "--config", str(cfg)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path, env=env, start_new_session=True)
    load = Load(port, pause=PAUSE)
    pids: list[int] = [proc.pid]
    workers: list[set[int]] = []
    switches: list[float] = []
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"twistd exited: {(tmp_path / 'twistd.out').read_text()[-3000:]}")
            return _greets(port) and len(_children(proc.pid)) >= WORKERS - 1

        wait_for(up, 30, what="proxy greeting and its worker")
        workers.append(_children(proc.pid))
        load.start(120)

        def next_step() -> None:
            target = load.total_answered() + STEP
            wait_for(lambda: load.total_answered() >= target, 60, what=f"{STEP} more answered")

        def switched(old: int) -> int:
            wait_for(lambda: not _alive(old), GRACE * 2 + 20, what=f"old process {old} to end")
            record = json.loads((tmp_path / "data" / "restart.json").read_text())
            assert record["state"] == "ready" and record["old_pid"] == old, record
            new = int(record["new_pid"])
            wait_for(lambda: len(_children(new)) >= WORKERS - 1, 30, what="the new worker")
            return new

        next_step()
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGUSR2)
        proc.wait(GRACE * 2 + 20)
        assert proc.returncode == 0
        pids.append(switched(proc.pid))
        switches.append(time.monotonic() - started)
        workers.append(_children(pids[-1]))

        next_step()
        started = time.monotonic()
        command = shlex.join(["env", f"PYTHONPATH={checkout}", *TWISTD, "-n", "--pidfile=",
                              "mppproxy", "--config", str(cfg)])
        out = _cli("--pid", str(pids[-1]), "--config", str(cfg), "--command", command,
                   "--wait", "40")
        assert out.returncode == 0, out.stdout + out.stderr
        pids.append(switched(pids[-1]))
        switches.append(time.monotonic() - started)
        workers.append(_children(pids[-1]))

        next_step()
        load.finish()
        answered = set(load.answered)
        postfix.wait_messages("example.com", len(answered), timeout=90)
        time.sleep(2)  # a quiet moment: anything delivered late shows up too
        delivered = _tokens(postfix)
        text = (tmp_path / "twistd.out").read_text(errors="replace")
        lost = answered - set(delivered)
        extra = set(delivered) - answered
        twice = [t for t, n in delivered.items() if n > 1]
        print(f"\nrestart + upgrade under load at Postfix: pids {' -> '.join(map(str, pids))}, "
              f"old main gone {', '.join(f'{s:.1f}' for s in switches)} s after each switch "
              f"began; answered 250 {sum(load.answered.values())}, delivered "
              f"{sum(delivered.values())}; lost {len(lost)}, duplicated {len(twice)}, without "
              f"250 {len(extra)}; refused {load.refused}, hung {load.hung}, 421 "
              f"{load.heard_421}, cut {load.cut}; replies {dict(load.codes)}")
        assert not lost, lost
        assert not twice and not [t for t, n in load.answered.items() if n > 1], twice
        assert not extra, extra
        assert load.refused == 0 and load.hung == 0
        assert load.heard_421 == 0 and load.cut == 0
        assert _alive(pids[-1]) and _greets(port)
        assert not any(_alive(p) for p in pids[:-1])
        assert not any(_alive(w) for group in workers[:-1] for w in group)
        assert all(len(group) == WORKERS - 1 for group in workers)
        assert f"mppproxy 0.1.0+upgraded from {checkout / 'mppproxy'}" in text
        assert "Traceback" not in text, text[-3000:]
    finally:
        load.stop.set()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        if proc.poll() is None:
            proc.wait(10)
        log.close()
