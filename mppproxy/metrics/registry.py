"""The metric objects of one process, and the shared directory their values
live in (prometheus-client's multiprocess mode).

Composition floor, as the whole package (docs/design.md, "Floors").

Every process of a node (the main one and its workers, ``workers.py``)
writes its values into memory-mapped files under
``data_dir/run/metrics`` (one file per process and kind), and the main
process's scrape sums them (``MultiProcessCollector``).  The mode is used
with ``workers = 1`` too: one code path, and the counts of a process that
hands over to a new one in a restart (``restart.py``) stay in the sum while
it finishes its sessions.

How each gauge combines over the processes (``multiprocess_mode``; the
``live`` modes leave out processes that ended, whose files
``forget_process`` removes):

=======================================  ==========  ===============================
gauge                                    mode        why
=======================================  ==========  ===============================
sessions_open, backend_connections       livesum     each process holds its own
engine_up, dns_list_up, backend_up       livemin     down if any process finds it down
engine_signature_age_seconds             livemax     the oldest signatures any process saw
dns_list_suspended                       livemax     suspended by any process's guard
=======================================  ==========  ===============================

Counters and histograms are summed over every file, those of processes
that ended included (a restarted worker's counts are not lost); the files
of processes no longer running are removed when the main process starts
(``prepare_directory``), which Prometheus sees as a counter reset.

The node-wide figures only the main process knows (build, configuration
generation, certificates, queues, state table sizes) are not in the files:
``node.py`` adds them at each scrape.
"""
from __future__ import annotations

import glob
import os
import re
from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import mark_process_dead

ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: from a cached DNS answer (1 ms) to an engine's scan of a large
# message (its default timeout is 120 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)

_FILE = re.compile(r"^(?:counter|histogram|summary|gauge_[a-z]+)_(\d+)\.db$")


def directory_for(data_dir: str) -> str:
    """Where the node's processes keep their metric files."""
    return os.path.join(data_dir, "run", "metrics")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone's process: alive
    return True


def prepare_directory(directory: str, clean: bool) -> None:
    """Make this process write its metric values under ``directory``.

    ``clean`` (the main process at start): first remove the files of every
    process no longer running, a previous run's; the files of processes
    still running (the old main process and workers of a restart, still
    finishing their sessions) stay, so their counts stay in the sum.

    Must run before the first metric object is made (``Metrics``); a
    second call (a test starting another node in the same process) closes
    the files of the first."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if clean:
        for name in os.listdir(directory):
            m = _FILE.match(name)
            if m is not None and not _alive(int(m.group(1))):
                try:
                    os.remove(os.path.join(directory, name))
                except FileNotFoundError:
                    pass
    os.environ[ENV] = directory
    # The workers are started with this environment (workers.py copies it).
    values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]  # prometheus-client's is unannotated
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]  # prometheus-client's is unannotated


def forget_process(directory: str, pid: int) -> None:
    """A process ended: its gauges leave the live sums (its counters stay)."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]  # prometheus-client's is unannotated


def forget_dead(directory: str) -> int:
    """Forget the gauges of every process that is no longer running (the
    supervisor tells of its workers at once; this finds the rest: the old
    processes of a restart).  Returns how many.  Blocking: a listing."""
    dead = set()
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        m = _FILE.match(os.path.basename(path))
        if m is not None and not _alive(int(m.group(1))):
            dead.add(int(m.group(1)))
    for pid in dead:
        forget_process(directory, pid)
    return len(dead)


class Metrics:
    """The metric objects a process writes (not registered anywhere: the
    scrape reads the files).  Names and labels: docs/operations.md."""

    def __init__(self) -> None:
        none = None  # registry=None: kept out of the default registry
        self.sessions_open = Gauge(
            "mppproxy_sessions_open", "SMTP sessions open now", registry=none,
            multiprocess_mode="livesum")
        self.sessions = Counter(
            "mppproxy_sessions", "SMTP sessions accepted", registry=none)
        self.transactions = Counter(
            "mppproxy_transactions",
            "Transactions by what became of them (the dashboard's words) and the "
            "check or reason that decided", ["disposition", "reason"], registry=none)
        self.refusals = Counter(
            "mppproxy_refusals",
            "Refusals by what decided them: a recipient refused before DATA (stage rcpt) "
            "or a message refused after it (stage data); reply 4xx or 5xx",
            ["check", "stage", "reply"], registry=none)
        self.check_seconds = Histogram(
            "mppproxy_check_duration_seconds",
            "Time of the pre-DATA checks that waited (DNS lists, SPF, state database)",
            ["check"], buckets=LATENCY_BUCKETS, registry=none)
        self.check_errors = Counter(
            "mppproxy_check_errors", "Pre-DATA checks that failed or timed out",
            ["check", "kind"], registry=none)
        self.engine_seconds = Histogram(
            "mppproxy_engine_duration_seconds", "Time of each post-DATA scanner's answer",
            ["engine"], buckets=LATENCY_BUCKETS, registry=none)
        self.engine_errors = Counter(
            "mppproxy_engine_errors", "Scanner calls without an answer, by kind",
            ["engine", "kind"], registry=none)
        self.engine_up = Gauge(
            "mppproxy_engine_up", "1 when the engine answered its last health check",
            ["engine"], registry=none, multiprocess_mode="livemin")
        self.engine_signature_age = Gauge(
            "mppproxy_engine_signature_age_seconds",
            "Age of the engine's signatures (engines that tell it)", ["engine"],
            registry=none, multiprocess_mode="livemax")
        self.dns_list_up = Gauge(
            "mppproxy_dns_list_up", "0 once a DNS list's last lookups all failed",
            ["list"], registry=none, multiprocess_mode="livemin")
        self.dns_list_suspended = Gauge(
            "mppproxy_dns_list_suspended",
            "1 while the DNS-list guard keeps the list out of the score", ["list"],
            registry=none, multiprocess_mode="livemax")
        self.backend_connections = Gauge(
            "mppproxy_backend_connections", "Backend connections open now, idle or busy",
            ["state"], registry=none, multiprocess_mode="livesum")
        self.backend_up = Gauge(
            "mppproxy_backend_up", "1 when the last connection to the backend succeeded",
            ["backend"], registry=none, multiprocess_mode="livemin")
        self.backend_connects = Counter(
            "mppproxy_backend_connections_opened", "Backend connections opened",
            registry=none)
        self.backend_connect_failures = Counter(
            "mppproxy_backend_connect_failures", "Backend connections that could not be opened",
            registry=none)

