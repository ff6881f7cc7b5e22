"""The web console's pages with 1,000,000 stored items on MariaDB (issue 13,
"Benchmark": p99 under 200 ms for the list and search pages, and a
release round trip -- click to delivered at the backend -- under 2 s).

    .venv/bin/python benchmarks/console_bench.py                  # 1,000,000 rows
    .venv/bin/python benchmarks/console_bench.py --rows 100000    # a quick look
    .venv/bin/python benchmarks/console_bench.py --keep            # leave the tables
    .venv/bin/python benchmarks/console_bench.py --prefix benchXXXXXXXX_   # reuse them

The rows are archive_queries.py's (its generator and bulk load: 5,000
recipient domains with a Zipf skew, 30 days, 50,000 senders, the store's
own schema and indexes, ``ANALYZE TABLE`` after the load), in tables of
their own (prefix ``bench<random>_`` in the given database), dropped at the
end unless ``--keep``.

The console is the real one: ``WebConsole`` (the service the archive node
and all-in-one run) in a process of its own (this script with
``--serve``), over that store, listening on loopback; its release route
is a small SMTP sink in this process that notes when each message's DATA
ends.  This process logs in over HTTP (the login form, its CSRF token,
the session cookie) and times each request from sending it to the last
byte of the answer, one at a time on a kept-alive connection:

* the list, newest first, as the admin of the biggest domain (about a
  tenth of the rows) and as the superadmin (all of them);
* a search by sender, subject word and a 1-7 day range (superadmin);
* a message's page (superadmin; each view writes its audit row);
* a release round trip: the POST of the Release button until the sink
  has the message (and, apart, until the POST's answer), 20 held rows.

It prints p50/p95/p99 per page, whether p99 is under the target, and
how many list pages came without counts ("uncounted": the counts ran out
of their time, app.py COUNT_SECONDS).
"""
from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, cast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sqlalchemy import update  # noqa: E402

from archive_queries import MARIADB_URL, WORDS, Population, load  # noqa: E402

from mppproxy.config.archive import StoreConfig  # noqa: E402
from mppproxy.store.accounts import Accounts  # noqa: E402
from mppproxy.store.store import ArchiveStore, Search  # noqa: E402

PAGE_TARGET_MS = 200.0
RELEASE_TARGET_MS = 2000.0
PASSWORD = "benchmark password"
ROOT_NAME, DOMAIN_ADMIN = "root", "domainadmin"
# Bound on any wait of this script (the console starting, a release arriving).
WAIT = 60.0


# -- the release route: an SMTP sink that notes arrivals ---------------------


class Sink:
    """A minimal SMTP server on loopback, one thread per connection: every
    command accepted (RFC 5321 4.3.2), the monotonic time at each end of
    DATA kept.  Bounded: a connection ends after 10,000 lines or 30 s of
    silence; the server when stopped."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        f = conn.makefile("rb")
        try:
            conn.sendall(b"220 sink ESMTP\r\n")
            data = False
            for _ in range(10_000):
                line = f.readline()
                if not line:
                    return
                if data:
                    if line in (b".\r\n", b".\n"):
                        data = False
                        with self.lock:
                            self.arrivals.append(time.monotonic())
                        conn.sendall(b"250 2.0.0 queued\r\n")
                    continue
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    data = True
                    conn.sendall(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 ok\r\n")
        except OSError:
            return
        finally:
            f.close()
            conn.close()


# -- an HTTP client with a session -------------------------------------------


class Client:
    """One kept-alive HTTP/1.1 connection with a cookie jar (by name)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.cookies: dict[str, str] = {}
        self.uncounted = 0

    def request(self, method: str, path: str,
                form: Optional[dict[str, str]] = None) -> tuple[int, str, dict[str, str]]:
        headers = {"host": f"127.0.0.1:{self.port}"}
        if self.cookies:
            headers["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode("ascii")
            headers["content-type"] = "application/x-www-form-urlencoded"
        self.conn.request(method, path, body, headers)
        response = self.conn.getresponse()
        data = response.read()
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                pair = value.split(";", 1)[0]
                key, _, val = pair.partition("=")
                if "max-age=0" in value.lower() or not val:
                    self.cookies.pop(key, None)
                else:
                    self.cookies[key] = val
        return (response.status, data.decode("utf-8", "replace"),
                {k.lower(): v for k, v in response.getheaders()})

    def log_in(self, name: str) -> None:
        _, text, _ = self.request("GET", "/login")
        token = csrf_of(text)
        status, text, headers = self.request("POST", "/login", {
            "name": name, "password": PASSWORD, "csrf": token})
        if status != 303 or headers.get("location") != "/quarantine":
            raise SystemExit(f"logging in as {name} failed: {status} {text[:300]}")

    def timed(self, path: str) -> float:
        started = time.perf_counter()
        status, text, _ = self.request("GET", path)
        elapsed = (time.perf_counter() - started) * 1000.0
        if status != 200:
            raise SystemExit(f"GET {path}: {status} {text[:300]}")
        # The list's counts ran out of time (app.py COUNT_SECONDS).
        self.uncounted += "Not counted:" in text
        return elapsed


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]*)"', text)
    if found is None:
        raise SystemExit(f"no CSRF token in {text[:300]}")
    return found.group(1)


# -- figures -------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    times_ms: list[float]
    target_ms: float
    uncounted: int = 0  # list pages whose counts were skipped (out of time)

    def line(self) -> str:
        t = sorted(self.times_ms)
        q = statistics.quantiles(t, n=100, method="inclusive")
        p50, p95, p99 = q[49], q[94], q[98]
        ok = "yes" if p99 < self.target_ms else "NO"
        return (f"| {self.name:<44} | {len(t):>4} | {p50:>8.1f} | {p95:>8.1f} | {p99:>8.1f} | "
                f"{self.target_ms:>6.0f} | {ok:<3} | {self.uncounted:>9} |")


def measure(name: str, client: Client, paths: Callable[[random.Random], str], n: int,
            seed: int) -> Figure:
    rng = random.Random(f"{seed}-{name}")
    for _ in range(5):  # warm the pool, the caches and the templates
        client.timed(paths(rng))
    client.uncounted = 0
    times = [client.timed(paths(rng)) for _ in range(n)]
    return Figure(name, times, PAGE_TARGET_MS, client.uncounted)


def day(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d")


def search_path(pop: Population) -> Callable[[random.Random], str]:
    def make(rng: random.Random) -> str:
        sender = rng.choices(pop.senders, cum_weights=pop.sender_weights)[0]
        since = rng.uniform(pop.start, pop.end - 7 * 86400.0)
        until = since + rng.randint(1, 7) * 86400.0
        return "/quarantine?" + urllib.parse.urlencode({
            "sender": sender, "subject": rng.choice(WORDS), "since": day(since),
            "until": day(until)})
    return make


def releases(client: Client, sink: Sink, ids: list[int]) -> tuple[Figure, Figure]:
    """Release each row from its page's button: (POST to arrival at the
    sink, POST to its answer)."""
    arrival, answer = [], []
    for row_id in ids:
        _, text, _ = client.request("GET", f"/quarantine/{row_id}")
        token = csrf_of(text)
        before = sink.count()
        started = time.monotonic()
        status, text, _ = client.request("POST", f"/quarantine/{row_id}/action",
                                         {"action": "release", "csrf": token})
        answered = time.monotonic()
        if status != 200 or "1 of 1 released" not in text:
            raise SystemExit(f"release of {row_id}: {status} "
                             f"{re.sub(r'<[^>]+>', ' ', text)[-400:]}")
        deadline = time.monotonic() + WAIT
        while sink.count() <= before:
            if time.monotonic() > deadline:
                raise SystemExit(f"release of {row_id} did not reach the sink in {WAIT:.0f} s")
            time.sleep(0.001)
        with sink.lock:
            arrived = sink.arrivals[before]
        arrival.append((arrived - started) * 1000.0)
        answer.append((answered - started) * 1000.0)
    return (Figure("release: click to delivered at the backend", arrival, RELEASE_TARGET_MS),
            Figure("release: click to the answer page", answer, RELEASE_TARGET_MS))


# -- the console process -----------------------------------------------------------


def serve(url: str, prefix: str, data_dir: str, port: int, route: str) -> None:
    """The console (``--serve``): WebConsole over the prefixed store."""
    from twisted.internet import reactor as _reactor
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from mppproxy.config.load import from_mapping
    from mppproxy.web.service import WebConsole

    reactor: Any = _reactor
    warnings: Any = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer: Any = FilteringLogObserver(cast(Any, textFileLogObserver(sys.stderr)), [warnings])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    config = from_mapping({
        "data_dir": data_dir, "store": {"url": url},
        "release": {"default_route": route, "rescan": False},
        "web": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}})
    store = ArchiveStore(config.store, data_dir, table_prefix=prefix)
    console = WebConsole(config, reactor, store=store)
    reactor.callWhenRunning(console.startService)
    reactor.addSystemEventTrigger("before", "shutdown", console.stopService)
    reactor.run()


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the console process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the console did not listen on {port} within {WAIT:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the run ---------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--url", default=MARIADB_URL)
    parser.add_argument("--requests", type=int, default=200, help="requests per page")
    parser.add_argument("--releases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="leave the tables")
    parser.add_argument("--prefix", default="", help="reuse the tables of an earlier --keep")
    parser.add_argument("--serve", nargs=4, metavar=("PREFIX", "DATA", "PORT", "ROUTE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        prefix, data, port, route = args.serve
        serve(args.url, prefix, data, int(port), route)
        return 0

    data_dir = tempfile.mkdtemp(prefix="mpp-console-bench-")
    prefix = args.prefix or f"bench{uuid.uuid4().hex[:8]}_"
    store = ArchiveStore(StoreConfig(url=args.url), data_dir, table_prefix=prefix)
    rng = random.Random(args.seed)
    sink = Sink()
    proc: Optional[subprocess.Popen[bytes]] = None
    try:
        print(f"store: {store.display_url} (tables {prefix}archive_*)", file=sys.stderr)
        store.open()
        pop = Population.make(rng, time.time())
        if args.prefix:
            print("  reusing the rows of an earlier run", file=sys.stderr)
            count = store.count(Search(status=None))
        else:
            rate, index_seconds = load(store, rng, pop, args.rows)
            print(f"  {args.rows:,} rows at {rate:,.0f} rows/s, indexes in {index_seconds:.1f} s",
                  file=sys.stderr)
            accounts = Accounts(store)
            accounts.add(ROOT_NAME, PASSWORD, True, (), "bench", "bench")
            accounts.add(DOMAIN_ADMIN, PASSWORD, False, (pop.domains[0],), "bench", "bench")
            count = args.rows
        big = pop.domains[0]
        in_big = store.count(Search(domain=big, status=None))
        ids = [r.id for r in store.search(Search(limit=5000, status=("held",)))]
        held = rng.sample(ids, min(len(ids), args.releases))
        # The generator's rows say disposition "hold"; a release takes only
        # mail the edge quarantined (an archive copy of delivered mail is
        # not released again): these rows become quarantined ones.
        m = store.tables.messages
        with store.engine.begin() as conn:
            conn.execute(update(m).where(m.c.id.in_(held)).values(disposition="quarantine"))
        port = free_port()
        log = open(os.path.join(data_dir, "console.log"), "wb")
        proc = subprocess.Popen(
            [sys.executable, __file__, "--url", args.url, "--serve", prefix, data_dir,
             str(port), f"127.0.0.1:{sink.port}"], stdout=log, stderr=subprocess.STDOUT)
        wait_port(port, proc)
        root, admin = Client(port), Client(port)
        root.log_in(ROOT_NAME)
        admin.log_in(DOMAIN_ADMIN)
        n = args.requests
        all_ids = [r.id for r in store.search(Search(limit=20_000, status=None))]
        figures = [
            measure(f"list, newest first: domain admin ({in_big:,} rows)", admin,
                    lambda r: "/quarantine", n, args.seed),
            measure(f"list, newest first: superadmin ({count:,} rows)", root,
                    lambda r: "/quarantine", n, args.seed),
            measure("search: sender + subject + 1-7 days", root, search_path(pop), n,
                    args.seed),
            measure("message page", root, lambda r: f"/quarantine/{r.choice(all_ids)}", n,
                    args.seed),
        ]
        figures.extend(releases(root, sink, held))
        print(f"\n{count:,} rows on MariaDB; {n} requests per page, one at a time; "
              f"{len(held)} releases\n")
        print("| request                                      |    n |  p50 ms |  p95 ms |  "
              "p99 ms | target | met | uncounted |")
        print("| -------------------------------------------- | ---- | -------: | -------: | "
              "-------: | -----: | --- | --------: |")
        for figure in figures:
            print(figure.line())
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        sink.stop()
        if not args.keep:
            try:
                store.drop_all()
            except Exception as e:  # the figures are printed; say what is left behind
                print(f"could not drop the {prefix}archive_* tables: {e}", file=sys.stderr)
        else:
            print(f"tables kept: --prefix {prefix}", file=sys.stderr)
        store.close()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
