"""Query times of the archive store's hot queries with a million rows
(issue 12, "Tests and figures": p99 under 50 ms on MariaDB).

    .venv/bin/python benchmarks/archive_queries.py                 # 1,000,000 rows, both backends
    .venv/bin/python benchmarks/archive_queries.py --rows 100000   # a quick look
    .venv/bin/python benchmarks/archive_queries.py --url sqlite --url mysql+pymysql://u:p@host/db

For each backend the store is created by ``ArchiveStore.open`` (its own
Alembic migration, so the indexes are the shipped ones), then filled
directly with bulk INSERTs into its tables (executemany, 10,000 rows per
transaction; every row points at one shared raw message, since the queries
never read it).  The message table's indexes are dropped first and built
again after the load from the store's own schema, and their names checked
to be back (SQLite's unique key, part of its table, stays throughout).
The rows: 5,000 recipient domains with a Zipf skew (the biggest holds about
a tenth of the rows), 30 days of arrivals in time order (ids grow with
time, as the writer makes them), 50,000 senders (also skewed, 2 % bounces),
one message in ten addressed to two domains (two rows, one reference),
statuses mostly held.

Then each query runs ``--iterations`` times (default 200) with random
parameters, through ``ArchiveStore.search`` (so the SQL is the store's own
and the time includes building the rows):

* newest 50 for a domain: ``Search(domain=d)``, d drawn with the skew (the
  big domains, whose admins look most, come up most);
* date range + sender: ``Search(sender=s, since=t, until=t + 1..7 days)``;
* by reference id: ``Search(ref=q)``.

It prints p50/p95/p99 in milliseconds per query and backend, whether p99
is under 50 ms, and the plan of each query (MariaDB ``EXPLAIN``, SQLite
``EXPLAIN QUERY PLAN``) so the index each one uses is visible.

SQLite lives in a temporary directory, removed at the end.  MariaDB gets
tables of its own (prefix ``bench<random>_`` in the given database); they
are dropped at the end, and nothing else is touched.  MariaDB's table
statistics are refreshed (``ANALYZE TABLE``) after the load, as InnoDB
does by itself once a tenth of a table has changed; SQLite gets no
``ANALYZE``, as the store never runs one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Optional, Sequence

from sqlalchemy import UniqueConstraint, event, insert, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import AddConstraint, CreateIndex, DropConstraint, DropIndex

from mppproxy.config.archive import StoreConfig
from mppproxy.store.store import ArchiveStore, Search

MARIADB_URL = os.environ.get("MPP_MARIADB_URL", "mysql+pymysql://test:test@127.0.0.1:3306/test")
DOMAINS = 5000
SENDERS = 50_000
DAYS = 30
CHUNK = 10_000
TARGET_P99_MS = 50.0
EPOCH = datetime(1970, 1, 1)
WORDS = ("invoice", "meeting", "offer", "your", "account", "update", "report", "delivery",
         "password", "order", "payment", "reminder", "urgent", "newsletter", "photos",
         "contract", "question", "weekly", "free", "winner", "shipping", "security")
VERDICTS = (("hold", 0.55), ("reject", 0.35), ("relay", 0.10))
STATUSES = (("held", 0.9), ("released", 0.08), ("deleted", 0.02))
RAW_KEY = "bench-shared-raw"
RAW_MESSAGE = (b"From: someone@example.net\r\nTo: you@example.com\r\nSubject: benchmark\r\n\r\n"
               + b"Hello.\r\n" * 40)
STATE = json.dumps({"v": 1, "checks": [{"name": "clamav", "score": 10.0}], "verdict": "hold"})


def zipf_cumulative(n: int, s: float = 1.0) -> list[float]:
    """Cumulative weights 1/rank^s (rank 1 first): a few big, many small."""
    return list(itertools.accumulate(1.0 / (rank ** s) for rank in range(1, n + 1)))


def weighted(pairs: Sequence[tuple[str, float]]) -> tuple[list[str], list[float]]:
    return [p[0] for p in pairs], list(itertools.accumulate(p[1] for p in pairs))


@dataclass
class Population:
    """The names rows are drawn from, and the queries' parameters."""

    domains: list[str]
    domain_weights: list[float]
    senders: list[str]
    sender_weights: list[float]
    start: float
    end: float
    refs: list[str]  # a sample of stored references (queue ids)

    @classmethod
    def make(cls, rng: random.Random, now: float) -> "Population":
        domains = [f"{rng.choice(WORDS)}{n}.example" for n in range(DOMAINS)]
        senders = []
        for n in range(SENDERS):
            local = f"{rng.choice(WORDS)}.{rng.choice(WORDS)}{n % 97}"
            senders.append(f"{local}@{rng.choice(WORDS)}{n % 2000}.test")
        return cls(domains, zipf_cumulative(DOMAINS), senders, zipf_cumulative(SENDERS, 0.8),
                   now - DAYS * 86400.0, now, [])


def generate(rng: random.Random, pop: Population, rows: int, prefix: str,
             store_ids: Callable[[list[dict[str, Any]]], None]) -> None:
    """``rows`` rows in time order, handed over CHUNK at a time."""
    span = pop.end - pop.start
    verdicts, verdict_w = weighted(VERDICTS)
    statuses, status_w = weighted(STATUSES)
    n = 0
    previous: Optional[dict[str, Any]] = None
    for first in range(0, rows, CHUNK):
        size = min(CHUNK, rows - first)
        # Arrival times of this chunk: its slice of the 30 days, sorted.
        lo = pop.start + span * first / rows
        hi = pop.start + span * (first + size) / rows
        times = sorted(rng.uniform(lo, hi) for _ in range(size))
        domains = rng.choices(pop.domains, cum_weights=pop.domain_weights, k=size)
        senders = rng.choices(pop.senders, cum_weights=pop.sender_weights, k=size)
        verdict_list = rng.choices(verdicts, cum_weights=verdict_w, k=size)
        status_list = rng.choices(statuses, cum_weights=status_w, k=size)
        batch = []
        for i in range(size):
            domain = domains[i]
            if (previous is not None and rng.random() < 0.1
                    and previous["rcpt_domain"] != domain):
                # The same message to a second domain: its second row.
                row = dict(previous, rcpt_domain=domain, recipients=f"user{i % 50}@{domain}")
                previous = None
            else:
                n += 1
                sender = "" if rng.random() < 0.02 else senders[i]
                subject = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))
                verdict = verdict_list[i]
                row = {
                    "node": f"edge{n % 3 + 1}", "queue_id": f"{prefix}{n:09X}",
                    "rcpt_domain": domain,
                    "received": EPOCH + timedelta(seconds=times[i]),
                    "sender": sender, "recipients": f"user{i % 50}@{domain}",
                    "subject": subject.capitalize(), "verdict": verdict,
                    "disposition": "hold" if verdict != "relay" else "relay",
                    "score": round(rng.uniform(0, 30), 1),
                    "reason": "clamav: Eicar-Signature" if verdict == "reject" else "rspamd: spam",
                    "client_ip": f"192.0.2.{n % 250 + 1}", "helo": "mx.sender.test",
                    "size": 4096 + n % 50_000, "status": status_list[i], "legal_hold": False,
                    "released_at": None, "state": STATE, "raw_key": RAW_KEY}
                if len(pop.refs) < 20_000 and rng.random() < 0.05:
                    pop.refs.append(row["queue_id"])
                previous = row  # a second row is made of a first one only
            batch.append(row)
        store_ids(batch)


def load(store: ArchiveStore, rng: random.Random, pop: Population,
         rows: int) -> tuple[float, float]:
    """Fill the store's tables: (rows per second inserted, seconds to
    build the indexes after)."""
    engine = store.engine
    tables = store.tables
    sqlite = engine.dialect.name == "sqlite"
    done = [0]
    tty = sys.stderr.isatty()
    with engine.connect() as conn:
        raw_connection: Any = conn.connection.dbapi_connection
        if sqlite:
            # The load is not what is measured: no fsync per chunk, a big
            # page cache (set on the driver's connection: SQLAlchemy's would
            # open a transaction first, and SQLite refuses the pragma there).
            raw_connection.execute("PRAGMA synchronous = OFF")
            raw_connection.execute("PRAGMA cache_size = -262144")
        expected = index_names(conn, tables.messages.name)
        rebuild = drop_indexes(conn, store, sqlite)
        with conn.begin():
            conn.execute(insert(tables.raw), [{"raw_key": RAW_KEY, "size": len(RAW_MESSAGE),
                                               "data": zlib.compress(RAW_MESSAGE)}])
        started = time.perf_counter()

        def store_ids(batch: list[dict[str, Any]]) -> None:
            with conn.begin():
                conn.execute(insert(tables.messages), batch)
            done[0] += len(batch)
            elapsed = time.perf_counter() - started
            line = f"  loaded {done[0]:,}/{rows:,} rows ({done[0] / elapsed:,.0f} rows/s)"
            if tty:
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            elif done[0] % 100_000 == 0 or done[0] == rows:
                print(line, file=sys.stderr, flush=True)

        generate(rng, pop, rows, f"B{rng.randrange(16 ** 4):04X}", store_ids)
        rate = rows / (time.perf_counter() - started)
        if tty:
            print("", file=sys.stderr)
        print("  building the indexes", file=sys.stderr, flush=True)
        started = time.perf_counter()
        for statement in rebuild:
            with conn.begin():
                conn.execute(statement)
        index_seconds = time.perf_counter() - started
        found = index_names(conn, tables.messages.name)
        if found != expected:
            raise SystemExit(f"the rebuilt indexes differ from the store's: {sorted(found)} "
                             f"against {sorted(expected)}")
        if sqlite:
            raw_connection.execute("PRAGMA synchronous = FULL")
            raw_connection.execute("PRAGMA cache_size = -2000")
        else:
            conn.exec_driver_sql(f"ANALYZE TABLE {tables.messages.name}").fetchall()
            conn.commit()
    return rate, index_seconds


def index_names(conn: Any, table: str) -> set[str]:
    conn.rollback()  # inspect() reads outside any transaction of ours
    found = inspect(conn)
    names = {i["name"] for i in found.get_indexes(table) if i["name"]}
    names |= {u["name"] for u in found.get_unique_constraints(table) if u["name"]}
    conn.rollback()
    return names


def drop_indexes(conn: Any, store: ArchiveStore, sqlite: bool) -> list[Any]:
    """Drop the message table's secondary indexes before the load (a
    database builds an index from sorted rows far faster than it keeps one
    up to date through a million random inserts); the statements that make
    them again, from the store's own schema.  SQLite's unique key is part
    of its table and stays."""
    m = store.tables.messages
    again: list[Any] = []
    with conn.begin():
        for index in sorted(m.indexes, key=lambda i: str(i.name)):
            conn.execute(DropIndex(index))
            again.append(CreateIndex(index))
        if not sqlite:
            for constraint in m.constraints:
                if isinstance(constraint, UniqueConstraint):
                    conn.execute(DropConstraint(constraint))
                    again.append(AddConstraint(constraint))
    return again


@dataclass
class Query:
    name: str
    make: Callable[[random.Random, Population], Search]


QUERIES = (
    Query("newest 50 for a domain", lambda rng, pop: Search(
        domain=rng.choices(pop.domains, cum_weights=pop.domain_weights)[0])),
    Query("date range + sender", lambda rng, pop: _date_sender(rng, pop)),
    Query("by reference id", lambda rng, pop: Search(ref=rng.choice(pop.refs))),
)


def _date_sender(rng: random.Random, pop: Population) -> Search:
    since = rng.uniform(pop.start, pop.end - 86400.0)
    until = since + rng.uniform(1, 7) * 86400.0
    sender = rng.choices(pop.senders, cum_weights=pop.sender_weights)[0]
    return Search(sender=sender, since=since, until=until)


def percentile(sorted_ms: list[float], q: float) -> float:
    return statistics.quantiles(sorted_ms, n=100, method="inclusive")[int(q) - 1]


@dataclass
class Timing:
    backend: str
    query: str
    times_ms: list[float]
    rows_found: int

    def line(self) -> str:
        t = sorted(self.times_ms)
        p50, p95, p99 = (percentile(t, q) for q in (50, 95, 99))
        ok = "yes" if p99 < TARGET_P99_MS else "NO"
        return (f"| {self.backend:<7} | {self.query:<23} | {len(t):>4} | {p50:>7.2f} | "
                f"{p95:>7.2f} | {p99:>7.2f} | {self.rows_found / len(t):>9.1f} | {ok:<8} |")


def measure(store: ArchiveStore, backend: str, pop: Population, iterations: int,
            seed: int) -> list[Timing]:
    out = []
    for query in QUERIES:
        rng = random.Random(f"{seed}-{query.name}")
        for _ in range(5):  # warm the pool and the caches a little
            store.search(query.make(rng, pop))
        times, found = [], 0
        for _ in range(iterations):
            search = query.make(rng, pop)
            started = time.perf_counter()
            rows = store.search(search)
            times.append((time.perf_counter() - started) * 1000.0)
            found += len(rows)
        out.append(Timing(backend, query.name, times, found))
    return out


def backend_name(engine: Engine) -> str:
    return "sqlite" if engine.dialect.name == "sqlite" else "mariadb"


def short_sql(statement: str, table: str) -> str:
    """The statement on one line, its column list and table names elided."""
    flat = " ".join(statement.split()).replace(f"{table}.", "")
    return re.sub(r"^SELECT .*? FROM ", "SELECT <row columns> FROM ", flat)


def plans(store: ArchiveStore, pop: Population, seed: int) -> list[str]:
    """Each query's plan, from the SQL the store itself sent."""
    engine: Engine = store.engine
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    lines = []
    try:
        for query in QUERIES:
            captured.clear()
            store.search(query.make(random.Random(seed), pop))
            statement, parameters = captured[-1]
            sqlite = engine.dialect.name == "sqlite"
            with engine.connect() as conn:
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                cursor.execute(("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement,
                               parameters)
                names = [d[0] for d in cursor.description]
                result = cursor.fetchall()
                cursor.close()
            lines.append(f"-- {backend_name(engine)}: {query.name}")
            lines.append("   " + short_sql(statement, store.tables.messages.name))
            for row in result:
                if sqlite:
                    lines.append(f"   plan: {row[-1]}")
                else:
                    fields = dict(zip(names, row))
                    lines.append("   explain: " + ", ".join(
                        f"{k}={fields.get(k)}" for k in ("table", "type", "possible_keys", "key",
                                                         "key_len", "ref", "rows", "Extra")))
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return lines


def run_backend(url: str, rows: int, iterations: int, seed: int) -> tuple[list[Timing], list[str]]:
    sqlite = url == "sqlite"
    backend = "sqlite" if sqlite else "mariadb"
    data_dir = tempfile.mkdtemp(prefix="mpp-archive-bench-")
    prefix = "" if sqlite else f"bench{uuid.uuid4().hex[:8]}_"
    store = ArchiveStore(StoreConfig(url="" if sqlite else url), data_dir, table_prefix=prefix)
    notes = []
    try:
        print(f"{backend}: {store.display_url} (tables {prefix}archive_*)", file=sys.stderr)
        store.open()
        rng = random.Random(seed)
        pop = Population.make(rng, time.time())
        rate, index_seconds = load(store, rng, pop, rows)
        notes.append(f"{backend}: {rows:,} rows inserted at {rate:,.0f} rows/s, "
                     f"indexes built in {index_seconds:.1f} s")
        if sqlite:
            size = os.path.getsize(os.path.join(data_dir, "archive.sqlite"))
            notes.append(f"{backend}: database file {size / 2 ** 20:,.0f} MiB")
        timings = measure(store, backend, pop, iterations, seed)
        notes.extend(plans(store, pop, seed))
        return timings, notes
    finally:
        if not sqlite:
            try:
                store.drop_all()  # only the bench<random>_ tables made above
            except DBAPIError as e:
                print(f"{backend}: could not drop the {prefix}archive_* tables: {e}",
                      file=sys.stderr)
        store.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate")
    parser.add_argument("--url", action="append", default=[],
                        help=f"'sqlite' (a temporary file) or a MariaDB URL; repeatable "
                             f"(default: sqlite and {MARIADB_URL})")
    parser.add_argument("--iterations", type=int, default=200, help="runs of each query")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    urls = args.url or ["sqlite", MARIADB_URL]
    timings: list[Timing] = []
    notes: list[str] = []
    for url in urls:
        try:
            found, more = run_backend(url, args.rows, args.iterations, args.seed)
        except DBAPIError as e:
            shown = url if url == "sqlite" else make_url(url).render_as_string(hide_password=True)
            notes.append(f"{shown}: skipped, the database failed: {' '.join(str(e.orig).split())}")
            continue
        timings.extend(found)
        notes.extend(more)
    print(f"\n{args.rows:,} rows, {args.iterations} runs per query "
          f"(target: p99 < {TARGET_P99_MS:g} ms on MariaDB)\n")
    print("| backend | query                   |    n |  p50 ms |  p95 ms |  p99 ms | rows/query"
          " | p99 < 50 |")
    print("| ------- | ----------------------- | ---- | ------- | ------- | ------- | ---------:"
          " | -------- |")
    for t in timings:
        print(t.line())
    print()
    for line in notes:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
