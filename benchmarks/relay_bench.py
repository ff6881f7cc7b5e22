#!/usr/bin/env python3
"""Relay benchmark for mppproxy: throughput, latency and CPU next to smtp-sink.

One run measures, for every cell of (message size x concurrent sessions):

* ``sink``            Postfix's smtp-sink, driven directly: the limit of this
                      loopback path, and the denominator of every ratio;
* ``mppproxy``        the proxy (``twistd -n mppproxy``) relaying in lockstep
                      to a second smtp-sink (the *backend*);
* ``mppproxy-w2``     the same with ``--workers 2``, if the proxy has it;
* ``mppproxy-metrics`` the plain proxy with ``[metrics]`` on (issue 16: its
                      ratio to ``mppproxy`` is the cost of the metrics);
* ``mppproxy-scan``, ``mppproxy-dkim`` scanning on (127.0.0.1 untrusted), DKIM and
                      DMARC off and on (issue 14: on / off >= 0.9); with
                      mppproxy-dkim in the run every server gets one
                      DKIM-signed message per size (``auth_bench.py``).
* peers (``--peers``) Haraka 3.3 ``queue/smtp_proxy`` with 1 and 2 workers and
                      the minimal Twisted relay probe, started from the server
                      definitions of /work/shared/bench/anchors.py.

The load generator is Postfix's ``smtp-source`` with one new TCP connection per
message (its default; what an MX sees).  Each measurement has two phases:

1. *throughput*: smtp-source alone sends COUNT messages over SESSIONS
   sessions; msgs/s = COUNT / wall time; server CPU is read from /proc before
   and after; the backend smtp-sink's message counter must grow by COUNT.
2. *latency*: smtp-source again, with SESSIONS - P sessions, while P Python
   probe sessions (threads in this process) time each of their messages; so
   the server sees the same concurrency, and phase 1's numbers are not
   perturbed by the probe.  Counter checked again (smtp-source's + probe's).

Loopback only, high ports (2625-2650); every run is bounded in time; every
process started is stopped by process group at the end, also on Ctrl-C.

usage: python3 relay_bench.py [--reps N] [--sizes 1024,65536,1048576]
          [--conc 1,20,100] [--servers sink,mppproxy,...] [--peers]
          [--scale F] [--json FILE]
"""
import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# shared/ lies beside the project checkout (../shared/bench from the repo root).
SHARED_BENCH = os.environ.get(
    "MPP_SHARED_BENCH",
    os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench")))
# writable copy of shared/bench/peers (npm ci needs to write node_modules);
# laid out as PEERS_ROOT/peers/ because anchors.py finds it at HERE/peers
PEERS_ROOT = os.path.join(HERE, ".peers")
RUN_DIR = os.path.join(HERE, "results", "run")
HZ = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"

BACKEND_PORT = 2626
PORTS = {
    "sink": 2625,
    "mppproxy": 2627,
    "mppproxy-w2": 2628,
    "mppproxy-policy": 2629,
    "mppproxy-copyall": 2630,
    # issue 14: scanning on, DKIM/DMARC off and on (auth_bench.py's configs)
    "mppproxy-scan": 2637,
    "mppproxy-dkim": 2638,
    "mppproxy-metrics": 2631,
    "haraka-proxy-n1": 2633,
    "haraka-proxy-n2": 2634,
    "twisted-relay-nodelay": 2644,
}
PEERS = ["haraka-proxy-n1", "haraka-proxy-n2", "twisted-relay-nodelay"]
HARAKA = ["haraka-proxy-n1", "haraka-proxy-n2"]

# Messages per run for each payload size (x --scale), the same as anchors.py
# so ratios are comparable with the anchors: the slowest peer finishes a run
# in seconds and the sink run is not much shorter than ~0.2 s.
BASE_COUNT = {1024: 3000, 65536: 1000, 1048576: 100}
RUN_TIMEOUT = 120      # s; a smtp-source run that takes longer is failed
START_TIMEOUT = 45     # s; a server that has not said 220 by then is skipped
PROBE_SHARE = 0.1      # latency probe sessions: a tenth of the cell's (>= 1)
PROBE_MAX_SESSIONS = 10
PROBE_MIN_SAMPLES = 100
PROBE_WINDOW = (0.5, 3.0)  # s; bounds of the latency phase's duration
PROBE_IO_TIMEOUT = 30  # s; a probe message slower than this is an error

# the twistd next to this interpreter, as an operator would run it; if the
# script is missing, the same entry point through -c
_BIN_TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
TWISTD = [_BIN_TWISTD] if os.access(_BIN_TWISTD, os.X_OK) else [
    sys.executable, "-c",
    "import sys; from twisted.scripts.twistd import run; "
    "sys.argv[0] = 'twistd'; sys.exit(run())"]
# {python} and {twistd} expand to this interpreter; {port}, {backend_port}
# and {data_dir} to the run's values.
DEFAULT_PROXY_CMD = (
    "{twistd} -n --pidfile= mppproxy --listen tcp:{port}:interface=127.0.0.1"
    " --backend 127.0.0.1:{backend_port} --relay-domain example.net"
    " --trusted-network 127.0.0.0/8 --data-dir {data_dir}")
# mppproxy-policy: the same proxy with a realistic pre-DATA policy (issue #4):
# access lists of a realistic length, spam traps, thresholds, greylisting with
# a warm auto-whitelist, two DNS lists served by a local authoritative server.
# 127.0.0.1 is not trusted, so every check runs for every message.
DNS_PORT = 2653
GREYLIST_DELAY = 1.0
POLICY_PROXY_CMD = (
    "{twistd} -n --pidfile= mppproxy --config {config} --listen tcp:{port}:interface=127.0.0.1"
    " --backend 127.0.0.1:{backend_port} --relay-domain example.net"
    " --trusted-network 10.255.255.0/24 --data-dir {data_dir}")
SMTP_SOURCE_ARGS = ["-f", "a@example.com", "-t", "b@example.net",
                    "-M", "loadgen.test"]

NOTES = []  # printed above the table: what was skipped, and why
# size -> a DKIM-signed message file (LF lines) that smtp-source -F and the
# latency probe send instead of their generated one: set when mppproxy-dkim
# is in the run, for every server of the run alike (issue 14).
SIGNED_FILES = {}
AUTH_SERVERS = ("mppproxy-scan", "mppproxy-dkim")


def note(text):
    """Record a note for the report and show it on stderr at once."""
    NOTES.append(text)
    print(f"NOTE: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# processes


class Server:
    """One process (group) under test, or the backend sink.

    start_new_session=True makes the pid a session and process-group leader,
    so the CPU of all its children (Haraka's and twistd's workers) can be
    summed by session id, and the whole tree stopped with one killpg.
    """

    def __init__(self, name, port, argv, relay, counter_path=None, env=None):
        self.name, self.port, self.argv, self.relay = name, port, argv, relay
        self.counter_path = counter_path  # smtp-sink -c output, if a sink
        self.env = env
        self.proc = None

    def start(self):
        if not port_free(self.port):
            raise SystemExit(f"127.0.0.1:{self.port} is already in use "
                             f"(a leftover server?); not starting {self.name}")
        log = open(os.path.join(RUN_DIR, f"{self.name}.log"), "wb")
        out = open(self.counter_path, "wb") if self.counter_path else log
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=REPO, env=self.env)

    def cpu(self):
        return session_cpu(self.proc.pid)

    def messages(self):
        return sink_counter(self.counter_path)

    def stop(self):
        """SIGTERM the group, then SIGKILL what is left after 5 s."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:  # workers may outlive their leader: kill the group regardless
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def port_free(port):
    """True if nothing listens on 127.0.0.1:port.

    A leftover server from an earlier run would answer 220 and be measured
    in place of the new one, so a taken port is an error, not a wait.
    SO_REUSEADDR, as servers set it, so that the TIME_WAIT connections an
    earlier run leaves behind do not count as "in use".
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def wait_220(server, timeout=START_TIMEOUT):
    """Wait until the server greets with 220; '' when it did, else why not."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            return f"exited with rc={server.proc.returncode}"
        try:
            with socket.create_connection((HOST, server.port), 0.5) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return ""
        except OSError:
            time.sleep(0.2)
    return f"no 220 on 127.0.0.1:{server.port} within {timeout}s"


def listen_overflows():
    """The kernel's count of connections dropped because a listener's accept
    queue was full (TcpExt ListenOverflows, all sockets of this host).

    A server listening with a small backlog (Twisted's default is 50) drops
    the SYNs of a burst of new connections; the client retries after 1 s, 3 s
    ..., so msgs/s collapses while every message is still delivered.  Counted
    so that such a run is marked, not mistaken for slow code.
    """
    try:
        with open("/proc/net/netstat") as f:
            lines = [ln.split() for ln in f if ln.startswith("TcpExt:")]
        names, values = lines[0], lines[1]
        return int(values[names.index("ListenOverflows")])
    except (OSError, IndexError, ValueError):
        return 0


def sink_argv(port):
    """smtp-sink with -c: a running message counter on stdout.

    The counter ("mesg=N", bumped at each end of data) is what proves the
    backend received every message.  It costs the sink a small write per
    event (measured: within the run-to-run noise, ~2 %).
    """
    argv = ["smtp-sink", "-c"]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without
    return argv + [f"{HOST}:{port}", "1024"]


_MESG = re.compile(rb"mesg=(\d+)")


def sink_counter(path):
    """Last value of smtp-sink's running message counter."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 256))
        hits = _MESG.findall(f.read())
    return int(hits[-1]) if hits else 0


def session_pids(sid):
    """Live pids in session `sid` (to see that --workers 2 really runs 2)."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(pid))
    return pids


def session_cpu(sid):
    """CPU seconds used by every process in session `sid`.

    Per thread, /proc/PID/task/TID/schedstat's first field is the time on a
    CPU in ns: exact, where utime+stime in /proc/PID/stat count 10 ms ticks
    (a 70 ms sink run would be measured to +-15 %).  Children that already
    exited are only in their parent's cutime+cstime (ticks); added so a
    worker that exits is not lost.
    """
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            # fields after "(comm) ": state=0 ... session=3, cutime=13,
            # cstime=14 (proc(5) numbers them 3, 6, 16, 17)
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != sid:
                continue
            total += (int(fields[13]) + int(fields[14])) / HZ
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the process or thread went away meanwhile
    return total


# --------------------------------------------------------------------------
# server definitions


def proxy_server(name, template, backend_port, extra=()):
    """The proxy (or a stand-in template) with a fresh data directory."""
    data_dir = os.path.join(RUN_DIR, name, "data")
    shutil.rmtree(os.path.join(RUN_DIR, name), ignore_errors=True)
    os.makedirs(data_dir)
    cmd = template.format(
        python=shlex.quote(sys.executable),
        twistd=" ".join(shlex.quote(a) for a in TWISTD),
        port=PORTS[name], backend_port=backend_port, data_dir=data_dir)
    env = dict(os.environ)
    # so that twistd finds mppproxy and twisted/plugins/ even when the
    # package is not pip-installed
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return Server(name, PORTS[name], shlex.split(cmd) + list(extra), True,
                  env=env)


def copyall_server(template, backend_port):
    """The proxy keeping an archive copy of every relayed message (issue 12:
    ``[archive] copy = "all"``): each copy is written to the durable queue
    (fsync'ed) after the backend's 250 and before the client's, and the
    node's own writer stores it in the embedded SQLite store."""
    server = proxy_server("mppproxy-copyall", template, backend_port)
    config = os.path.join(RUN_DIR, "mppproxy-copyall", "copyall.toml")
    with open(config, "w") as f:
        f.write('[archive]\ncopy = "all"\n')
    server.argv += ["--config", config]
    return server


# mppproxy-metrics: the plain proxy with [metrics] on (issue 16); the cost
# of the metrics is its ratio to mppproxy in the same run.  Its exposition
# is scraped once at the end of the run (a check that it counted).
METRICS_PORT = 2632


def metrics_server(template, backend_port):
    """The proxy with Prometheus metrics on (issue 16: at most 3 % of the
    relay rate): every transaction counted through the hooks into the
    shared metric files, the gauges refreshed every 5 s."""
    server = proxy_server("mppproxy-metrics", template, backend_port)
    config = os.path.join(RUN_DIR, "mppproxy-metrics", "metrics.toml")
    with open(config, "w") as f:
        f.write(f'[metrics]\nenabled = true\n'
                f'listen = ["tcp:{METRICS_PORT}:interface=127.0.0.1"]\n')
    server.argv += ["--config", config]
    return server


def scrape_metrics():
    """The relayed count the metrics server's exposition reports, or None."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://{HOST}:{METRICS_PORT}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r'^mppproxy_transactions_total\{disposition="relayed",reason=""\} (\S+)$',
                  text, re.M)
    return float(m.group(1)) if m else None


def auth_server(name, backend_port):
    """mppproxy-scan (scan.enabled) or mppproxy-dkim (the same plus
    scan.dkim and scan.dmarc), configured as auth_bench.py does: its DNS
    server answers the key and the DMARC record, 127.0.0.1 is untrusted."""
    import auth_bench
    config = os.path.join(RUN_DIR, f"{name}.toml")
    with open(config, "w") as f:
        f.write(auth_bench.config_text(name))
    return proxy_server(name, POLICY_PROXY_CMD.replace("{config}", config), backend_port)


def start_auth(sizes):
    """For mppproxy-dkim: one RSA 2048 key, a message signed with it for
    each size (SIGNED_FILES), and auth_bench.py's DNS server; its stop."""
    import auth_bench
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(65537, 2048)
    pub = None
    for size in sizes:
        message, pub = auth_bench.signed_message(size, key)
        path = os.path.join(RUN_DIR, f"signed-{size}.eml")
        with open(path, "wb") as f:
            f.write(message)
        SIGNED_FILES[size] = path
    note("mppproxy-dkim is in the run: every server gets the same DKIM-signed message "
         "of the cell's size (smtp-source -F; From: and d= bench.test, RSA 2048)")
    return auth_bench.start_dns(pub)


def policy_config(path):
    """The realistic policy of mppproxy-policy as a TOML file."""
    clients = [f'"198.{18 + i // 256}.{i % 256}.0/24"' for i in range(1000)]
    senders = [f'".spam{i}.example"' for i in range(500)]
    text = f"""
[dns]
nameservers = ["127.0.0.1:{DNS_PORT}"]
timeout = 2.0

[policies.default.access]
blacklist_clients = [{", ".join(clients)}]
blacklist_senders = [{", ".join(senders)}]
whitelist_recipients = ["postmaster@", "abuse@"]

[policies.default.spamtrap]
enabled = true
patterns = ['^trap@', '^spamtrap-.*@example\\.net$']

[policies.default.thresholds]
enabled = true
period = 60
max_messages = 100000000
max_spam = 100

[policies.default.greylisting]
enabled = true
delay = {GREYLIST_DELAY}
auto_whitelist_after = 1

[[policies.default.dnsbl.lists]]
zone = "zen.test"
score = 5
codes = ["127.0.0.2-127.0.0.11"]

[[policies.default.dnsbl.lists]]
zone = "dbl.test"
kind = "domain"
score = 3
"""
    with open(path, "w") as f:
        f.write(text)


def policy_server(backend_port):
    data_dir = os.path.join(RUN_DIR, "mppproxy-policy", "data")
    config = os.path.join(RUN_DIR, "policy.toml")
    server = proxy_server("mppproxy-policy", POLICY_PROXY_CMD.replace("{config}", config),
                          backend_port)
    policy_config(config)
    return server


def start_dns():
    """The local authoritative server for zen.test and dbl.test (test
    records only; 127.0.0.1 is not listed)."""
    env = dict(os.environ, DNSBL_PORT=str(DNS_PORT), DNSBL_DIR=os.path.join(RUN_DIR, "dns"))
    script = os.path.join(REPO, "scripts", "services", "start-dnsbl-dns.py")
    r = subprocess.run([sys.executable, script], env=env, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"the DNS server for mppproxy-policy did not start: "
                         f"{(r.stdout + r.stderr).decode(errors='replace')[-300:]}")
    return lambda: subprocess.run([sys.executable, script, "stop"], env=env,
                                  capture_output=True, timeout=60)


def warm_greylist(server):
    """Greylisting with a warm whitelist: the first messages are deferred,
    the retry after the delay passes and auto-whitelists 127.0.0.0/24."""
    run_smtp_source(server.port, 1024, 1, 2)
    time.sleep(GREYLIST_DELAY + 0.3)
    run_smtp_source(server.port, 1024, 1, 2)


def proxy_has_workers():
    """Probe `twistd mppproxy --help` for --workers (and for the plugin)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    try:
        out = subprocess.run(TWISTD + ["mppproxy", "--help"], cwd=REPO,
                             env=env, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, "twistd mppproxy --help timed out"
    text = (out.stdout + out.stderr).decode(errors="replace")
    if out.returncode != 0 or "--backend" not in text:
        last = text.strip().splitlines()[-1:] or ["(no output)"]
        return None, f"twistd mppproxy --help failed: {last[0][:160]}"
    return "--workers" in text, ""


def load_anchors():
    """Import shared/bench/anchors.py and point it at our copies.

    Its haraka_dir() writes a Haraka config tree from Haraka's shipped
    defaults plus the bench settings; reusing it keeps the peers configured
    exactly as in the anchors.  It reads three module globals, so we set them:
    where the (writable) peers copy is, where run dirs go, the backend port.
    """
    path = os.path.join(SHARED_BENCH, "anchors.py")
    spec = importlib.util.spec_from_file_location("shared_anchors", path)
    mod = importlib.util.module_from_spec(spec)
    sys.dont_write_bytecode = True  # shared/ is read-only
    spec.loader.exec_module(mod)
    mod.shared_backend_port = mod.BACKEND_PORT  # baked into SERVERS' args
    mod.HERE, mod.RUN_DIR, mod.BACKEND_PORT = PEERS_ROOT, RUN_DIR, BACKEND_PORT
    return mod


def ensure_haraka():
    """Copy shared/bench/peers and `npm ci` it once; return the haraka bin or
    None with a note (Haraka is optional: the rest of the run goes on)."""
    peers = os.path.join(PEERS_ROOT, "peers")
    haraka = os.path.join(peers, "node_modules", ".bin", "haraka")
    if os.access(haraka, os.X_OK):
        return haraka
    if not shutil.which("npm"):
        note("Haraka skipped: npm not found (Haraka 3.3 needs Node >= 20)")
        return None
    shutil.rmtree(peers, ignore_errors=True)
    shutil.copytree(os.path.join(SHARED_BENCH, "peers"), peers)
    for root, dirs, files in os.walk(peers):  # shared/ files are read-only
        for n in dirs + files:
            os.chmod(os.path.join(root, n), 0o755 if n in dirs else 0o644)
    print("npm ci in benchmarks/.peers/peers ...", file=sys.stderr, flush=True)
    try:
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=peers,
                           capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        note("Haraka skipped: npm ci timed out")
        return None
    if r.returncode != 0 or not os.access(haraka, os.X_OK):
        err = r.stderr.decode(errors="replace").strip().splitlines()[-1:]
        note(f"Haraka skipped: npm ci failed: {err}")
        return None
    return haraka


def peer_server(name, anchors, haraka_bin):
    """A peer from anchors.SERVERS, on our port, relaying to our backend."""
    _, kind, extra = anchors.SERVERS[name]
    port = PORTS[name]
    if kind == "haraka":
        d = anchors.haraka_dir(name, port, extra["queue"], extra["nodes"])
        return Server(name, port, [haraka_bin, "-c", d], True)
    script = os.path.join(SHARED_BENCH, "probes", extra["script"])
    args = [str(BACKEND_PORT) if x == str(anchors.shared_backend_port) else x
            for x in extra.get("args", [])]
    return Server(name, port, [sys.executable, script, str(port)] + args, True)


def build_servers(names, a):
    """Server objects for `names` (sink first), skipping with a note what
    cannot run here; the proxy's options are probed, never assumed."""
    servers = {}
    counter = os.path.join(RUN_DIR, "sink.count")
    servers["sink"] = Server("sink", PORTS["sink"], sink_argv(PORTS["sink"]),
                             False, counter_path=counter)
    template = a.proxy_cmd or DEFAULT_PROXY_CMD
    if a.proxy_cmd:
        note(f"mppproxy is the stand-in command: {a.proxy_cmd}")
    workers = None
    if any(n.startswith("mppproxy") for n in names) and not a.proxy_cmd:
        workers, why = proxy_has_workers()
        if workers is None:
            note(f"mppproxy may not start: {why}")
    anchors = haraka = None
    if any(n in PEERS for n in names):
        anchors = load_anchors()
        if any(n in HARAKA for n in names):
            haraka = ensure_haraka()
    for n in names:
        if n == "sink":
            continue
        if n == "mppproxy":
            servers[n] = proxy_server(n, template, BACKEND_PORT)
        elif n == "mppproxy-policy":
            servers[n] = policy_server(BACKEND_PORT)
        elif n == "mppproxy-copyall":
            servers[n] = copyall_server(template, BACKEND_PORT)
        elif n in AUTH_SERVERS:
            servers[n] = auth_server(n, BACKEND_PORT)
        elif n == "mppproxy-metrics":
            servers[n] = metrics_server(template, BACKEND_PORT)
        elif n == "mppproxy-w2":
            if a.proxy_cmd:
                note("mppproxy-w2 skipped: --proxy-cmd given (cannot probe "
                     "a stand-in for --workers)")
            elif workers is None:
                note("mppproxy-w2 skipped: `twistd mppproxy --help` failed")
            elif not workers:
                note("mppproxy-w2 skipped: `twistd mppproxy --help` shows "
                     "no --workers option")
            else:
                servers[n] = proxy_server(n, template, BACKEND_PORT,
                                          ["--workers", "2"])
        elif n in HARAKA and haraka is None:
            continue  # noted in ensure_haraka
        elif n in PEERS:
            servers[n] = peer_server(n, anchors, haraka)
        else:
            raise SystemExit(f"unknown server {n!r}; "
                             f"known: {', '.join(PORTS)}")
    return servers


# --------------------------------------------------------------------------
# load and measurement


def run_smtp_source(port, size, sessions, count):
    """Time one smtp-source run; (wall s, error text, generator CPU s).

    The wall clock starts just before the fork, so it includes smtp-source's
    start-up (~1 ms), the same for every server.
    """
    payload = ["-F", SIGNED_FILES[size]] if size in SIGNED_FILES else ["-l", str(size)]
    argv = ["smtp-source", "-s", str(sessions), "-m", str(count)] + payload \
        + SMTP_SOURCE_ARGS + [f"{HOST}:{port}"]
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    err_chunks = []
    drain = threading.Thread(target=lambda: err_chunks.append(p.stderr.read()),
                             daemon=True)  # a full stderr pipe would block it
    drain.start()
    deadline = t0 + RUN_TIMEOUT
    while True:
        try:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        except BaseException:  # Ctrl-C/SIGTERM: do not leave it running
            p.kill()
            p.wait()
            raise
        if pid:
            break
        if time.perf_counter() > deadline:
            p.kill()
            os.wait4(p.pid, 0)
            p.returncode = -9
            return None, f"timeout after {RUN_TIMEOUT}s", 0.0
        time.sleep(0.002)  # polling granularity bounds the wall-time error
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    drain.join(5)
    err = b"".join(err_chunks).decode(errors="replace").strip()
    if p.returncode != 0:
        return None, f"smtp-source rc={p.returncode}: {err[-160:]}", 0.0
    # smtp-source warns (and goes on) on a refused message; keep the first
    return wall, err.splitlines()[0][:160] if err else "", \
        ru.ru_utime + ru.ru_stime


def probe_message(size):
    """A message like smtp-source's: a few headers and `size` bytes of body in
    short lines that never start with '.', so no dot-stuffing is needed.
    The signed message instead when there is one of this size."""
    if size in SIGNED_FILES:
        with open(SIGNED_FILES[size], "rb") as f:
            lines = f.read().split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                        for line in lines) + b".\r\n"
    head = (b"From: <a@example.com>\r\nTo: <b@example.net>\r\n"
            b"Subject: latency probe\r\n\r\n")
    line = b"La de da de da 1. La de da de da 2. La de da de da 3.\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return head + body.rstrip(b"\r\n") + b"\r\n.\r\n"


def _reply(f):
    """Read one (multi-line) SMTP reply; return its code as bytes."""
    while True:
        line = f.readline(1024)
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line[:3]


def _expect(f, code):
    got = _reply(f)
    if got != code:
        raise ConnectionError(f"expected {code.decode()}, got {got!r}")


def probe_session(port, message, stop, out):
    """One latency probe session: new connection per message, until `stop`.

    Appends (t_connect, t_eod_reply, ok) per message.  Latency is connect ->
    the reply to end of data: how long a client waits until its message is
    accepted (for a lockstep relay: after the backend accepted it).  QUIT is
    not in it.  TCP_NODELAY so the client's Nagle does not add delay.
    """
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with socket.create_connection((HOST, port), PROBE_IO_TIMEOUT) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                f = s.makefile("rb")
                _expect(f, b"220")
                for cmd, code in ((b"EHLO loadgen.test", b"250"),
                                  (b"MAIL FROM:<a@example.com>", b"250"),
                                  (b"RCPT TO:<b@example.net>", b"250"),
                                  (b"DATA", b"354")):
                    s.sendall(cmd + b"\r\n")
                    _expect(f, code)
                s.sendall(message)
                _expect(f, b"250")
                t1 = time.perf_counter()
                out.append((t0, t1, True))
                s.sendall(b"QUIT\r\n")
                _reply(f)
        except (OSError, ConnectionError) as e:
            if not out or out[-1][1] < t0:  # not after a delivered message
                out.append((t0, time.perf_counter(), False))
            if not isinstance(e, ConnectionError):
                time.sleep(0.01)  # do not spin on a refused connect


def latency_phase(server, size, sessions, rate):
    """Phase 2: P probe threads + smtp-source with SESSIONS-P, so the server
    sees the cell's concurrency.  Returns (samples ms, delivered-by-probe,
    probe errors, smtp-source count, error text).

    Its length is aimed at PROBE_MIN_SAMPLES probe messages at the rate of
    phase 1, within PROBE_WINDOW: the fast, short cells get their samples;
    the slow 1 MiB cells give fewer (the table prints n).
    """
    # a fixed share keeps the mix of clients the same in every cell; the cap
    # keeps the probe's GIL-bound Python from becoming the slow client
    p = max(1, min(PROBE_MAX_SESSIONS, round(sessions * PROBE_SHARE)))
    bg = sessions - p
    window = PROBE_MIN_SAMPLES * sessions / (p * rate)
    window = min(max(window, PROBE_WINDOW[0]), PROBE_WINDOW[1])
    message = probe_message(size)
    stop = threading.Event()
    outs = [[] for _ in range(p)]
    threads = [threading.Thread(target=probe_session, daemon=True,
                                args=(server.port, message, stop, o))
               for o in outs]
    bg_count, err = 0, ""
    for t in threads:
        t.start()
    t_load = time.perf_counter()
    if bg:
        bg_count = max(bg, round(rate * window * bg / sessions))
        wall, err, _ = run_smtp_source(server.port, size, bg, bg_count)
    else:
        time.sleep(window)
    t_end = time.perf_counter()
    stop.set()
    for t in threads:
        t.join(PROBE_IO_TIMEOUT + 5)
    rows = [r for o in outs for r in o]
    # only messages that started and ended while the load ran
    samples = sorted((t1 - t0) * 1000 for t0, t1, ok in rows
                     if ok and t0 >= t_load and t1 <= t_end)
    delivered = sum(1 for r in rows if r[2])
    errors = sum(1 for r in rows if not r[2])
    return samples, delivered, errors, bg_count, err


def wait_count(sink, expected, settle=3.0):
    """The backend's counter once it equals `expected` or stops moving.

    A lockstep relay's 250 comes after the backend's, so the count is final
    when smtp-source exits; the wait is for a relay that queues first.
    """
    end = time.monotonic() + settle
    last = sink.messages()
    while last != expected and time.monotonic() < end:
        time.sleep(0.05)
        last = sink.messages()
    return last


def measure(server, counter_sink, size, sessions, count, latency):
    """Both phases for one server and cell; a dict for the JSON and table."""
    r = dict(server=server.name, size=size, conc=sessions, count=count)
    n0 = counter_sink.messages()
    c0, b0, o0 = server.cpu(), counter_sink.cpu(), listen_overflows()
    wall, err, gen_cpu = run_smtp_source(server.port, size, sessions, count)
    c1, b1, o1 = server.cpu(), counter_sink.cpu(), listen_overflows()
    r.update(wall=wall, err=err, gen_cpu=gen_cpu, server_cpu=c1 - c0,
             backend_cpu=(b1 - b0) if server.relay else 0.0,
             listen_overflows=o1 - o0)
    r["delivered"] = wait_count(counter_sink, n0 + count) - n0
    if wall:
        # Little's law: the mean time one smtp-source session spends per
        # message (connect to QUIT), its own queueing included; JSON only
        r["little_ms"] = sessions * wall / count * 1000
    r["samples"], r["lat_check"] = [], None
    if wall is None or not latency:
        return r
    n1 = counter_sink.messages()
    samples, probe_ok, probe_err, bg_count, bg_err = latency_phase(
        server, size, sessions, count / wall)
    expected = bg_count + probe_ok
    got = wait_count(counter_sink, n1 + expected) - n1
    r.update(samples=samples, probe_errors=probe_err, lat_bg_err=bg_err,
             lat_check=[got, expected])
    return r


def cell_count(size, sessions, scale):
    """Messages per run, as anchors.py: a tenth at 1 session (latency-bound),
    never fewer than 20 or than the session count."""
    count = int(BASE_COUNT.get(size, 1000) * scale)
    if sessions == 1:
        count //= 10
    return max(sessions, 20, count)


# --------------------------------------------------------------------------
# report


def fmt_size(s):
    return f"{s // 1048576} MiB" if s >= 1048576 else f"{s // 1024} KiB"


def percentile(xs, q):
    """Nearest-rank percentile (no interpolation: with few samples p99 is
    the largest, which the table shows by printing n)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(q / 100 * len(xs) + 0.5) - 1))]


def delivery_failures(runs):
    """'ok' if every run delivered what it should, else loud text; plus a
    warning when the kernel dropped connections at the server's listener."""
    bad = []
    for r in runs:
        if r["wall"] is not None and r["delivered"] != r["count"]:
            bad.append(f"rep{r['rep']} {r['delivered']}/{r['count']}")
        if r.get("lat_check") and r["lat_check"][0] != r["lat_check"][1]:
            bad.append(f"rep{r['rep']} latency phase "
                       f"{r['lat_check'][0]}/{r['lat_check'][1]}")
    text = "**FAILED** delivered " + ", ".join(bad) if bad else "ok"
    drops = sum(r.get("listen_overflows", 0) for r in runs)
    if drops:
        text += f"; WARNING {drops} SYNs dropped (accept queue full)"
    return text


def summarize(rows, name, size, conc):
    """Medians over reps for one table row, or None if it never ran."""
    runs = [r for r in rows if (r["server"], r["size"], r["conc"]) ==
            (name, size, conc)]
    if not runs:
        return None
    ok = [r for r in runs if r["wall"]]
    sink = {r["rep"]: r for r in rows if (r["server"], r["size"], r["conc"])
            == ("sink", size, conc) and r["wall"]}
    s = dict(runs=len(runs), failed=len(runs) - len(ok),
             err=next((r["err"] for r in runs if not r["wall"]), ""),
             check=delivery_failures(runs))
    if not ok:
        return s
    rates = [r["count"] / r["wall"] for r in ok]
    ratios = [r["count"] / r["wall"] / (sink[r["rep"]]["count"] /
                                        sink[r["rep"]]["wall"])
              for r in ok if r["rep"] in sink]
    samples = [x for r in ok for x in r["samples"]]
    s.update(
        rate=statistics.median(rates),
        ratio=statistics.median(ratios) if ratios else float("nan"),
        p50=percentile(samples, 50), p99=percentile(samples, 99),
        n=len(samples),
        cpu=statistics.median(r["server_cpu"] / r["count"] * 1000 for r in ok),
        bcpu=statistics.median(r["backend_cpu"] / r["count"] * 1000
                               for r in ok))
    return s


def print_table(rows, names, relays, sizes, concs):
    print("| size | sessions | server | msgs/s | ratio to sink | p50 ms | "
          "p99 ms (n) | server CPU ms/msg | delivery |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for size in sizes:
        for conc in concs:
            for n in names:
                s = summarize(rows, n, size, conc)
                if s is None:
                    continue
                head = f"| {fmt_size(size)} | {conc} | {n} |"
                if "rate" not in s:
                    print(f"{head} failed | | | | | {s['err'][:70]} |")
                    continue
                cpu = f"{s['cpu']:.3f}"
                if n in relays:
                    cpu += f" (+sink {s['bcpu']:.3f})"
                fails = f" ({s['failed']} of {s['runs']} runs failed)" \
                    if s["failed"] else ""
                lat = (f"{s['p50']:.2f} | {s['p99']:.2f} ({s['n']})"
                       if s["n"] else "- | - (0)")
                print(f"{head} {s['rate']:.1f} | {s['ratio']:.3f} | {lat} | "
                      f"{cpu} | {s['check']}{fails} |")
    print_peer_lines(rows, names, sizes, concs)
    print_policy_lines(rows, names, sizes, concs)
    print_auth_lines(rows, names, sizes, concs)


def print_auth_lines(rows, names, sizes, concs):
    """Per cell, DKIM/DMARC on (mppproxy-dkim) as a share of off
    (mppproxy-scan), both scanning: issue 14's target is at least 0.9."""
    if not all(n in names for n in AUTH_SERVERS):
        return
    print()
    for size in sizes:
        for conc in concs:
            on = summarize(rows, "mppproxy-dkim", size, conc)
            off = summarize(rows, "mppproxy-scan", size, conc)
            if not on or not off or "rate" not in on or "rate" not in off:
                continue
            print(f"- {fmt_size(size)} x {conc}: DKIM/DMARC on {on['rate']:.1f}/s, off "
                  f"{off['rate']:.1f}/s -> on / off = {on['rate'] / off['rate']:.2f} "
                  f"(target >= 0.9; CPU ms/msg {on['cpu']:.3f} vs {off['cpu']:.3f})")


def print_policy_lines(rows, names, sizes, concs):
    """Per cell, the policy-on proxy's rate as a share of the policy-off one
    (issue #4's target: at least 0.8)."""
    if "mppproxy-policy" not in names or "mppproxy" not in names:
        return
    print()
    for size in sizes:
        for conc in concs:
            on = summarize(rows, "mppproxy-policy", size, conc)
            off = summarize(rows, "mppproxy", size, conc)
            if not on or not off or "rate" not in on or "rate" not in off:
                continue
            print(f"- {fmt_size(size)} x {conc}: policy on {on['rate']:.1f}/s, off "
                  f"{off['rate']:.1f}/s -> policy on / off = {on['rate'] / off['rate']:.2f} "
                  f"(CPU ms/msg {on['cpu']:.3f} vs {off['cpu']:.3f})")


def print_peer_lines(rows, names, sizes, concs):
    """Per cell, mppproxy's ratio next to Haraka's (only if Haraka ran)."""
    ours = [n for n in ("mppproxy", "mppproxy-w2") if n in names]
    theirs = [n for n in HARAKA if n in names]
    if not ours or not theirs:
        return
    print()
    for size in sizes:
        for conc in concs:
            got = {n: summarize(rows, n, size, conc) for n in ours + theirs}
            r = {n: s["ratio"] for n, s in got.items() if s and "ratio" in s}
            best = max((r[n] for n in theirs if n in r), default=None)
            parts = [f"{n} {r[n]:.3f}" if n in r else f"{n} failed"
                     for n in ours + theirs]
            line = f"- {fmt_size(size)} x {conc}: " + ", ".join(parts)
            if best and "mppproxy" in r:
                line += (" -> mppproxy / best Haraka = "
                         f"{r['mppproxy'] / best:.2f}x")
            print(line)


# --------------------------------------------------------------------------
# main


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="1024,65536,1048576",
                    help="smtp-source -l payload bytes")
    ap.add_argument("--conc", default="1,20,100",
                    help="smtp-source -s sessions")
    ap.add_argument("--servers", default="sink,mppproxy,mppproxy-w2",
                    help="comma list; sink is always added. Known: "
                    + ",".join(PORTS))
    ap.add_argument("--peers", action="store_true",
                    help="add " + ",".join(PEERS))
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the message counts")
    ap.add_argument("--no-latency", action="store_true",
                    help="skip the latency phase (throughput and CPU only)")
    ap.add_argument("--json", help="write the raw per-run results here")
    # hidden: run any command as "mppproxy" (a stand-in while it is built)
    ap.add_argument("--proxy-cmd", help=argparse.SUPPRESS)
    return ap.parse_args()


def on_signal(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def main():
    a = parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    concs = [int(x) for x in a.conc.split(",")]
    names = [n for n in a.servers.split(",") if n]
    names += [n for n in PEERS if a.peers and n not in names]
    names = ["sink"] + [n for n in names if n != "sink"]
    if not shutil.which("smtp-source") or not shutil.which("smtp-sink"):
        raise SystemExit("needs smtp-source and smtp-sink (Debian: postfix)")
    os.makedirs(RUN_DIR, exist_ok=True)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = []
    t_start = time.monotonic()
    stop_dns = stop_auth_dns = None
    try:
        if "mppproxy-policy" in names:
            stop_dns = start_dns()
        if "mppproxy-dkim" in names:
            stop_auth_dns = start_auth(sizes)
        backend = Server("backend", BACKEND_PORT, sink_argv(BACKEND_PORT),
                         False, counter_path=os.path.join(RUN_DIR,
                                                          "backend.count"))
        servers = build_servers(names, a)
        for srv in [backend] + list(servers.values()):
            srv.start()
            started.append(srv)
        for srv in [backend] + list(servers.values()):
            why = wait_220(srv)
            if why:
                if srv.name in ("backend", "sink"):
                    raise SystemExit(f"{srv.name} did not start ({why}); see "
                                     f"{RUN_DIR}/{srv.name}.log")
                note(f"{srv.name} skipped: {why} (see "
                     f"benchmarks/results/run/{srv.name}.log)")
                srv.stop()
                del servers[srv.name]
        names = [n for n in names if n in servers]
        print(f"servers up after {time.monotonic() - t_start:.1f}s: "
              f"{', '.join(names)}", file=sys.stderr, flush=True)
        relays = {n for n, s in servers.items() if s.relay}
        # warm-up: a short run each (imports, JIT, pools, page cache)
        if "mppproxy-policy" in servers:
            warm_greylist(servers["mppproxy-policy"])
        for n in names:
            run_smtp_source(servers[n].port, 1024, 4, 200)
        nproc = {n: len(session_pids(servers[n].proc.pid)) for n in names}
        if nproc.get("mppproxy-w2", 2) < 2:
            note(f"mppproxy-w2 runs {nproc['mppproxy-w2']} process(es) after "
                 "warm-up, not 2: its workers did not start (see its log)")
        rows = run_matrix(a, servers, backend, names, sizes, concs)
        for r in rows:
            r["server_processes"] = nproc[r["server"]]
        if "mppproxy-metrics" in servers:
            counted = scrape_metrics()
            note(f"mppproxy-metrics counted {counted if counted is None else int(counted)} "
                 "relayed transactions (its /metrics after the runs)")
    finally:
        t_stop = time.monotonic()
        for srv in reversed(started):
            srv.stop()
        if stop_dns is not None:
            stop_dns()
        if stop_auth_dns is not None:
            stop_auth_dns()
        print(f"stopped {len(started)} servers in "
              f"{time.monotonic() - t_stop:.1f}s", file=sys.stderr)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(notes=NOTES, args=vars(a), rows=rows), f, indent=1)
    for text in NOTES:
        print(f"> note: {text}")
    if NOTES:
        print()
    print_table(rows, names, relays, sizes, concs)


def run_matrix(a, servers, backend, names, sizes, concs):
    """Every rep x cell x server, server order rotated each rep so drift
    (thermal, page cache, other tenants) hits all servers alike."""
    rows = []
    for rep in range(a.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for size in sizes:
            for conc in concs:
                count = cell_count(size, conc, a.scale)
                for n in order:
                    srv = servers[n]
                    counter = backend if srv.relay else srv
                    r = measure(srv, counter, size, conc, count,
                                not a.no_latency)
                    r["rep"] = rep
                    rows.append(r)
                    progress(r)
    return rows


def progress(r):
    """One stderr line per run, so a long run shows where it is."""
    if r["wall"]:
        what = f"{r['count'] / r['wall']:9.1f}/s"
        if r["delivered"] != r["count"]:
            what += f"  FAILED delivered {r['delivered']}/{r['count']}"
        if r["lat_check"] and r["lat_check"][0] != r["lat_check"][1]:
            what += f"  FAILED latency-phase {r['lat_check']}"
        if r["lat_check"]:
            what += f"  lat n={len(r['samples'])}"
        if r["listen_overflows"]:
            what += f"  WARNING {r['listen_overflows']} listen overflows"
    else:
        what = "failed: " + r["err"]
    print(f"rep{r['rep']} {fmt_size(r['size']):>7} x {r['conc']:>3} "
          f"{r['server']:<22} {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
