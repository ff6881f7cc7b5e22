"""``mppproxy restart``: restart or upgrade a running proxy without downtime
(mppproxy/restart.py; docs/operations.md, "Restart and upgrade without
downtime").

Floor 4 (entry point).  The command sends SIGUSR2 to the proxy's main
process; with ``--command`` it first leaves the new process's command in
``data_dir/restart-command`` (an upgrade to another installation), and with
``--wait`` it waits for the outcome the proxy writes in
``data_dir/restart.json``.  The main process is named by ``--pid``,
``--pidfile`` or ``--systemd UNIT`` (its ``MainPID``).

Exit status: 0 the signal was sent (with ``--wait``: the new process
serves), 1 the restart failed or did not end within ``--wait``, 2 a usage
or configuration error, 3 no such process.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Optional

from mppproxy.config.errors import ConfigError
from mppproxy.restart import COMMAND_FILE, read_status

EXIT_HELP = ("exit status: 0 sent (with --wait: the new process serves), 1 the restart "
             "failed or took longer than --wait, 2 usage or configuration error, "
             "3 no such process")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``restart`` to ``mppproxy``'s subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "restart", help="restart or upgrade the running proxy without downtime (SIGUSR2)",
        description="A new main process takes over the listening sockets; the running one "
                    "lets its sessions end and exits (docs/operations.md).",
        epilog=EXIT_HELP)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid", type=int, help="the proxy's main process")
    who.add_argument("--pidfile", help="a file holding the main process's pid")
    who.add_argument("--systemd", metavar="UNIT", help="the MainPID of this systemd unit")
    parser.add_argument("--config", "-c", help="the proxy's configuration (its data_dir "
                        "is where --command and --wait look)")
    parser.add_argument("--config-command", help="command whose output is the configuration")
    parser.add_argument("--command", help="the new process's command line (an upgrade to "
                        "another installation); default: $MPP_RESTART_COMMAND of the running "
                        "process, else its own command line")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for the new process to serve (0: do not wait)")
    parser.set_defaults(func=run)
    return parser


def _main_pid(args: argparse.Namespace) -> int:
    if args.pid is not None:
        return int(args.pid)
    if args.pidfile:
        with open(args.pidfile, encoding="ascii") as f:
            return int(f.read().strip())
    out = subprocess.run(["systemctl", "show", "--property=MainPID", "--value", args.systemd],
                         capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise ValueError(f"systemctl show {args.systemd}: {out.stderr.strip()}")
    pid = int(out.stdout.strip() or "0")
    if pid <= 0:
        raise ValueError(f"{args.systemd} has no main process (not running?)")
    return pid


def _data_dir(args: argparse.Namespace) -> str:
    from mppproxy.quarantine_cli import load_config

    return load_config(args.config, args.config_command).data_dir


def run(args: argparse.Namespace) -> int:
    """``mppproxy restart``."""
    try:
        pid = _main_pid(args)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        print(f"mppproxy restart: {e}", file=sys.stderr)
        return 2
    data_dir: Optional[str] = None
    if args.command is not None or args.wait > 0:
        try:
            data_dir = _data_dir(args)
        except ConfigError as e:
            print("mppproxy restart: the configuration has errors:", file=sys.stderr)
            for line in e.errors:
                print(f"  {line}", file=sys.stderr)
            return 2
    if args.command is not None:
        assert data_dir is not None
        if not shlex.split(args.command):
            print("mppproxy restart: --command is empty", file=sys.stderr)
            return 2
        path = os.path.join(data_dir, COMMAND_FILE)
        try:
            # Readable by the proxy's user (a command line is no secret).
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(args.command.strip() + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as e:
            print(f"mppproxy restart: cannot write {path}: {e.strerror or e}", file=sys.stderr)
            return 2
    sent_at = time.time()
    try:
        os.kill(pid, signal.SIGUSR2)
    except ProcessLookupError:
        print(f"mppproxy restart: no process {pid}", file=sys.stderr)
        return 3
    except PermissionError as e:
        print(f"mppproxy restart: cannot signal process {pid}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"mppproxy restart: SIGUSR2 sent to process {pid}")
    if args.wait <= 0:
        return 0
    assert data_dir is not None
    return _wait(data_dir, pid, sent_at, args.wait)


def _wait(data_dir: str, pid: int, sent_at: float, seconds: float) -> int:
    """Poll ``restart.json`` until process ``pid`` wrote this restart's
    outcome; bounded by ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        record = read_status(data_dir)
        if (record is not None and record.get("old_pid") == pid
                and float(record.get("time", 0)) >= sent_at - 1
                and record.get("state") in ("ready", "failed")):
            if record["state"] == "ready":
                print(f"mppproxy restart: process {record.get('new_pid')} serves; process "
                      f"{pid} lets its sessions end and exits")
                return 0
            print(f"mppproxy restart: FAILED, process {pid} keeps serving: "
                  f"{record.get('error')}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"mppproxy restart: no outcome within {seconds:g} s (see the proxy's log)",
          file=sys.stderr)
    return 1
