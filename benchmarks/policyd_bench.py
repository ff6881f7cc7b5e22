#!/usr/bin/env python3
"""Policy-server benchmark: mppproxy --mode policy next to Debian's postgrey.

Both servers get the same stream of Postfix ``smtpd_access_policy`` RCPT
requests (all the attributes Postfix 3.7 sends) over CONNS concurrent
connections, each connection sending one request and waiting for its
answer, as a Postfix smtpd process does.  The stream mixes new triplets
(client, sender, recipient) with repeated ones from a small pool, a few
spam-trap recipients and blacklisted senders.  Measured per server:
requests/s (requests / wall time) and the latency of each request
(p50/p99/max), plus the answers seen, so a server that answers nonsense is
noticed.

Servers:

* ``postgrey``  Debian's postgrey (``apt-get install -y postgrey``; the
                image's policy-rc.d keeps apt from starting it) on its own
                --dbdir, --delay=300: greylisting only;
* ``mppproxy-grey``  the same with greylisting only (what postgrey does);
* ``mppproxy``  ``twistd -n mppproxy --mode policy``: access lists, spam
                traps, thresholds and, when this build has the SQL store
                (``mppproxy/db``), greylisting and the auto-blacklist with
                the same delay (``--greylisting auto``; say ``on``/``off``);

Loopback only, free high ports; bounded by --requests and --timeout per
run; every process started is stopped by pid at the end, also on Ctrl-C.

usage: python3 policyd_bench.py [--requests N] [--conns 40] [--reps N]
          [--servers postgrey,mppproxy-grey,mppproxy] [--greylisting auto|on|off]
          [--mpp-workers N (default: one per core)]
          [--database-url URL] [--timeout S] [--json FILE]

``--database-url`` puts ``[database] url = URL`` in mppproxy's config (the
state database; default: SQLite in its data_dir), e.g.
``mysql+pymysql://test:test@127.0.0.1:3306/test``.  The tables are shared
with whatever else uses that database: expect leftovers from earlier runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOST = "127.0.0.1"
GREY_DELAY = 300
# Recipients and senders that the mppproxy policy refuses (same stream for all).
TRAP = "spamtrap"
BAD_SENDER_DOMAIN = "bad-sender.example"

# What both mppproxy configurations share.
_MPP_SERVER = """\
mode = "policy"
data_dir = "{data}"
workers = {workers}
# the benchmark's clients are 198.18.0.0/15 (RFC 2544), not trusted
trusted_networks = ["127.0.0.0/8"]
[policyd]
listen = ["tcp:{port}:interface=127.0.0.1"]
"""

MPP_CONFIG = _MPP_SERVER + """\
[policies.default.access]
whitelist_clients = ["192.0.2.0/24", "2001:db8::/32"]
blacklist_clients = ["203.0.113.0/24"]
whitelist_senders = ["newsletter@partner.example", ".trusted.example"]
blacklist_senders = ["{bad}", "spammer@junk.example"]
blacklist_helos = [".dialup.example"]
[policies.default.spamtrap]
enabled = true
patterns = ["^{trap}[0-9]*@", "^honeypot@"]
[policies.default.thresholds]
enabled = true
period = 120
max_messages = 100000
[policies.default.blacklist]
enabled = {grey}
[policies.default.greylisting]
enabled = {grey}
delay = {delay}
"""


# What postgrey does and nothing else: the same greylisting (SQL store), no
# access lists, spam traps, thresholds or auto-blacklist.
MPP_GREY_CONFIG = _MPP_SERVER + """\
[policies.default.blacklist]
enabled = false
[policies.default.greylisting]
enabled = true
delay = {delay}
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


# -- the request stream ------------------------------------------------------------

def request(client: str, sender: str, recipient: str, instance: str, helo: str) -> bytes:
    attrs = [
        ("request", "smtpd_access_policy"), ("protocol_state", "RCPT"), ("protocol_name", "ESMTP"),
        ("client_address", client), ("client_name", "unknown"), ("client_port", "40123"),
        ("reverse_client_name", "unknown"), ("server_address", "127.0.0.1"), ("server_port", "25"),
        ("helo_name", helo), ("sender", sender), ("recipient", recipient), ("recipient_count", "0"),
        ("queue_id", ""), ("instance", instance), ("size", "0"), ("etrn_domain", ""), ("stress", ""),
        ("sasl_method", ""), ("sasl_username", ""), ("sasl_sender", ""), ("ccert_subject", ""),
        ("ccert_issuer", ""), ("ccert_fingerprint", ""), ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", "TLSv1.3"), ("encryption_cipher", "TLS_AES_256_GCM_SHA384"),
        ("encryption_keysize", "256"), ("policy_context", ""), ("compatibility_level", "3.6"),
        ("mail_version", "3.7.11"),
    ]
    return "".join(f"{k}={v}\n" for k, v in attrs).encode() + b"\n"


def make_stream(n: int, seed: int, tag: str) -> list[bytes]:
    """n requests: about half repeat one of 300 triplets, the rest are new;
    1 % spam-trap recipients, 1 % blacklisted senders."""
    rng = random.Random(seed)

    def client() -> str:
        return f"198.{18 + rng.randrange(2)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"

    def triplet() -> tuple[str, str, str]:
        return (client(), f"user{rng.randrange(10**6)}@sender{rng.randrange(5000)}.example",
                f"rcpt{rng.randrange(2000)}@{rng.choice(['example.com', 'example.net', 'example.org'])}")

    pool = [triplet() for _ in range(300)]
    out = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.01:
            c, s, r = triplet()
            r = f"{TRAP}{rng.randrange(10)}@example.com"
        elif roll < 0.02:
            c, s, r = triplet()
            s = f"x{rng.randrange(1000)}@{BAD_SENDER_DOMAIN}"
        elif roll < 0.5:
            c, s, r = rng.choice(pool)
        else:
            c, s, r = triplet()
        out.append(request(c, s, r, f"{tag}.{i:x}", f"mail{rng.randrange(100)}.sender.example"))
    return out


# -- the load generator ---------------------------------------------------------------

async def _connection(port: int, requests: list[bytes], deadline: float,
                      latencies: list[float], answers: dict[str, int]) -> int:
    reader, writer = await asyncio.open_connection(HOST, port)
    done = 0
    try:
        for req in requests:
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            writer.write(req)
            reply = await reader.readuntil(b"\n\n")
            latencies.append(time.perf_counter() - t0)
            word = reply[7:].split(b" ", 1)[0].strip().decode(errors="replace")
            answers[word] = answers.get(word, 0) + 1
            done += 1
    finally:
        writer.close()
    return done


async def _load(port: int, stream: list[bytes], conns: int, timeout: float) -> dict:
    slices = [stream[i::conns] for i in range(conns)]
    latencies: list[float] = []
    answers: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    t0 = time.perf_counter()
    counts = await asyncio.gather(*[_connection(port, s, deadline, latencies, answers) for s in slices])
    wall = time.perf_counter() - t0
    done = sum(counts)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0

    return {"requests": done, "complete": done == len(stream), "wall_s": round(wall, 3),
            "rps": round(done / wall, 1) if wall else 0.0, "p50_ms": round(pct(0.50), 2),
            "p99_ms": round(pct(0.99), 2), "max_ms": round(latencies[-1] * 1000, 2) if latencies else 0,
            "answers": answers}


def run_load(port: int, stream: list[bytes], conns: int, timeout: float) -> dict:
    # The load generator's own CPU per request too: on 2 cores it shares
    # the machine with the server, and at several thousand requests/s it
    # is part of what bounds the figure.
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = asyncio.run(_load(port, stream, conns, timeout))
    after = resource.getrusage(resource.RUSAGE_SELF)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["client_cpu_ms_per_req"] = round(used * 1000 / max(1, result["requests"]), 3)
    return result


# -- the servers -------------------------------------------------------------------------

class Server:
    name = ""
    note = ""

    def __init__(self, workdir: str):
        self.workdir = os.path.join(workdir, self.name)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.workdir, "server.log")

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                     cwd=self.workdir, env=self.env(), start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            if port_open(self.port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on {self.port}:\n{self.tail()}")

    def tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """CPU of every process of the server's session (its workers too)."""
        if self.proc is None:
            return 0.0
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid:  # session id: start_new_session
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Postgrey(Server):
    name = "postgrey"
    note = f"Debian postgrey, greylisting only, --delay={GREY_DELAY}"

    def command(self) -> list[str]:
        dbdir = os.path.join(self.workdir, "db")
        os.makedirs(dbdir, exist_ok=True)
        shutil.chown(dbdir, "postgrey", "postgrey")
        shutil.chown(self.workdir, "postgrey", "postgrey")
        return [shutil.which("postgrey") or "/usr/sbin/postgrey", f"--inet={HOST}:{self.port}",
                f"--dbdir={dbdir}", f"--delay={GREY_DELAY}", "--user=postgrey", "--group=postgrey",
                f"--pidfile={os.path.join(self.workdir, 'postgrey.pid')}"]


class Mppproxy(Server):
    name = "mppproxy"
    template = MPP_CONFIG

    def __init__(self, workdir: str, greylisting: bool, database_url: str = "", workers: int = 1):
        super().__init__(workdir)
        self.greylisting = greylisting
        self.database_url = database_url
        self.workers = workers
        self.note = ("access lists, spam traps, thresholds, greylisting + auto-blacklist (SQL store"
                     + (f", {_shown_url(database_url)}" if database_url else ", SQLite") + ")"
                     if greylisting else
                     "access lists, spam traps, thresholds; NO greylisting (no SQL store in this build)")
        if workers > 1:
            self.note += f"; workers = {workers}"

    def config(self) -> str:
        path = os.path.join(self.workdir, "policyd.toml")
        with open(path, "w") as f:
            f.write(self.template.format(data=os.path.join(self.workdir, "data"), port=self.port,
                                      bad=f".{BAD_SENDER_DOMAIN}".lstrip("."), trap=TRAP,
                                      grey="true" if self.greylisting else "false",
                                      delay=GREY_DELAY, workers=self.workers))
            if self.database_url:
                f.write(f"[database]\nurl = {json.dumps(self.database_url)}\n")
        return path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def command(self) -> list[str]:
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                "--pidfile=", "mppproxy", "--mode", "policy", "-c", self.config()]


class MppproxyGreylisting(Mppproxy):
    """mppproxy configured to do what postgrey does: greylisting only."""

    name = "mppproxy-grey"
    template = MPP_GREY_CONFIG

    def __init__(self, workdir: str, database_url: str = "", workers: int = 1):
        super().__init__(workdir, True, database_url, workers)
        self.note = ("greylisting only, like postgrey (SQL store"
                     + (f", {_shown_url(database_url)}" if database_url else ", SQLite") + ")"
                     + (f"; workers = {workers}" if workers > 1 else ""))


def _shown_url(url: str) -> str:
    # The backend and host, never the password.
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def have_sql_store() -> bool:
    return os.path.isdir(os.path.join(REPO, "mppproxy", "db"))


# -- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="timed requests per server and rep")
    ap.add_argument("--warmup", type=int, default=1000, help="untimed requests first")
    ap.add_argument("--conns", type=int, default=40)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--servers", default="postgrey,mppproxy-grey,mppproxy",
                    help="comma list of postgrey, mppproxy (the full policy), mppproxy-grey "
                         "(greylisting only, what postgrey does)")
    ap.add_argument("--greylisting", choices=("auto", "on", "off"), default="auto",
                    help="greylisting in the 'mppproxy' server (auto: on when mppproxy/db exists)")
    ap.add_argument("--database-url", default="",
                    help="mppproxy's state database ([database] url); default SQLite in its data_dir")
    # As docs/configuration.md advises for a busy node: one process per core.
    ap.add_argument("--mpp-workers", type=int, default=os.cpu_count() or 1,
                    help="mppproxy's workers (processes sharing the listener; default: one per "
                         "core, as the docs advise; 1 for one process)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per timed run")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    grey = {"on": True, "off": False, "auto": have_sql_store()}[args.greylisting]
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    workdir = tempfile.mkdtemp(prefix="policyd-bench-")
    os.chmod(workdir, 0o755)
    servers: list[Server] = []
    for n in names:
        if n == "postgrey":
            if not shutil.which("postgrey") and not os.path.exists("/usr/sbin/postgrey"):
                log("postgrey is not installed: apt-get install -y postgrey")
                return 2
            servers.append(Postgrey(workdir))
        elif n == "mppproxy":
            servers.append(Mppproxy(workdir, grey, args.database_url, args.mpp_workers))
        elif n == "mppproxy-grey":
            servers.append(MppproxyGreylisting(workdir, args.database_url, args.mpp_workers))
        else:
            log(f"unknown server {n}")
            return 2

    results: dict[str, list[dict]] = {s.name: [] for s in servers}
    stop_all = lambda *_: [s.stop() for s in servers]  # noqa: E731
    signal.signal(signal.SIGTERM, lambda *_: (stop_all(), sys.exit(1)))
    try:
        for s in servers:
            log(f"starting {s.name} on {HOST}:{s.port}")
            s.start()
        for rep in range(args.reps):
            order = servers[rep % len(servers):] + servers[:rep % len(servers)]
            for s in order:
                # Each server sees the same stream in the same rep; a new rep
                # brings new instances (and new triplets for the new half).
                warm = make_stream(args.warmup, 1000 + rep, f"w{rep}")
                timed = make_stream(args.requests, rep, f"r{rep}")
                run_load(s.port, warm, args.conns, args.timeout)
                cpu0 = s.cpu_seconds()
                r = run_load(s.port, timed, args.conns, args.timeout)
                r["server_cpu_ms_per_req"] = round((s.cpu_seconds() - cpu0) * 1000 / max(1, r["requests"]), 3)
                results[s.name].append(r)
                log(f"rep {rep + 1} {s.name}: {r}")
                if s.proc is not None and s.proc.poll() is not None:
                    raise RuntimeError(f"{s.name} died:\n{s.tail()}")
    finally:
        stop_all()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"\nPolicy servers, {args.conns} connections, {args.requests} requests per run, "
          f"{args.reps} reps (median); one request in flight per connection, as Postfix does\n")
    print("| server | requests/s | p50 ms | p99 ms | max ms | server CPU ms/req | load generator CPU ms/req | answers (last rep) | what it does |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for s in servers:
        last = results[s.name][-1]
        answers = ", ".join(f"{k} {v}" for k, v in sorted(last["answers"].items(), key=lambda kv: -kv[1]))
        print(f"| {s.name} | {med(s.name, 'rps'):.0f} | {med(s.name, 'p50_ms'):.2f} | "
              f"{med(s.name, 'p99_ms'):.2f} | {med(s.name, 'max_ms'):.1f} | "
              f"{med(s.name, 'server_cpu_ms_per_req'):.3f} | "
              f"{med(s.name, 'client_cpu_ms_per_req'):.3f} | {answers} | {s.note} |")
    if "postgrey" in results:
        base = med("postgrey", "rps")
        print()
        for s in servers:
            if s.name == "postgrey":
                continue
            ratio = med(s.name, "rps") / base if base else 0.0
            p99 = med(s.name, "p99_ms")
            print(f"{s.name}: {ratio:.2f}x postgrey's requests/s (target >= 3x: "
                  f"{'met' if ratio >= 3 else 'NOT met'}), p99 {p99:.1f} ms (target <= 50 ms: "
                  f"{'met' if p99 <= 50 else 'NOT met'})")
    if "mppproxy" in results and not grey:
        print("\nNOTE: the 'mppproxy' row ran WITHOUT greylisting: this build has no SQL "
              "greylist store (mppproxy/db); re-run after it lands (--greylisting auto turns it on).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "greylisting": grey, "results": results}, f, indent=1)
    for s in servers:
        # How the state database batched the run (logged by each process at stop).
        for line in s.tail().splitlines():
            if "state database" in line and "stopping:" in line:
                log(f"{s.name}: {line.split('] ', 1)[-1]}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
