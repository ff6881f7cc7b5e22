"""The table and queries of the threshold counters shared through the state
database (issue 16, "Shared limits and counters"); the counting itself is
``policy/sharedcounters.py``.

A leaf (db/).  ``thresholds.shared = true`` in a policy counts its clients
here: with ``workers = 2`` or two edges behind one MX, a client spreading
its mail over the processes meets the same ``max_messages``/``max_spam``
as one talking to a single process.

How it stays off the hot path: each process counts its own messages
exactly, in memory (``RateCounters``), and adds what the others counted
from its last look at the database.  Every ``SYNC_INTERVAL`` seconds it
writes its new counts (one upsert that adds to the rows, per
``BUCKET_SECONDS`` time bucket, client, policy and process) and reads the
other processes' buckets of the clients it has seen lately (their
windows).  So a count is exact for this process and at most
``SYNC_INTERVAL`` seconds behind for the others, and the window's edges
are ``BUCKET_SECONDS`` coarse for them.  A database that cannot be read
or written leaves each process counting alone (one warning), and the
writes it missed are kept for the next sync (bounded).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

from sqlalchemy import BigInteger, Column, Integer, String, Table, and_, delete, func, select
from sqlalchemy.engine import Engine

from mppproxy.db.engine import WRITE
from mppproxy.db.models import NETWORK_LENGTH, StateTables, create_missing
from mppproxy.db.upsert import add_counts

# Seconds between two syncs with the database.
SYNC_INTERVAL = 2.0
# The time resolution of the other processes' counts.
BUCKET_SECONDS = 5
# Pending keys kept while the database cannot be written (a flood of
# distinct clients for a long outage); past it the oldest are dropped.
MAX_PENDING = 50_000
# Clients asked about per query (the IN list).
QUERY_CHUNK = 500
POLICY_LENGTH = 64
SOURCE_LENGTH = 96
MESSAGES, SPAM = "m", "s"

Key = tuple[str, str, str]  # (kind, policy, network)


def rate_table(tables: StateTables) -> Table:
    """The shared counts' table in ``tables``' metadata (made once)."""
    name = f"{tables.prefix}rate_counts"
    found = tables.metadata.tables.get(name)
    if found is not None:
        return found
    return Table(
        name, tables.metadata,
        # The bucket's start in Unix seconds (a multiple of BUCKET_SECONDS):
        # first in the key, so the purge and the window reads are ranges.
        Column("bucket", BigInteger, primary_key=True, autoincrement=False),
        Column("kind", String(1), primary_key=True),
        Column("network", String(NETWORK_LENGTH), primary_key=True),
        Column("policy", String(POLICY_LENGTH), primary_key=True),
        # host:pid:random of the process that counted (its own rows are
        # never read back: it knows its counts exactly).
        Column("source", String(SOURCE_LENGTH), primary_key=True),
        Column("n", Integer, nullable=False),
    )


def write_counts(engine: Engine, table: Table, source: str,
                 counts: dict[tuple[int, str, str, str], int]) -> None:
    """Add ``counts`` ((bucket, kind, policy, network) -> n) to this
    source's rows in one transaction (blocking)."""
    if not counts:
        return
    rows = [{"bucket": b, "kind": k, "policy": p, "network": net, "source": source, "n": n}
            for (b, k, p, net), n in sorted(counts.items())]
    add_counts(engine, table, ("bucket", "kind", "network", "policy", "source"), rows,
               QUERY_CHUNK)


def read_others(engine: Engine, table: Table, source: str, since_bucket: int,
                networks: list[str]) -> dict[Key, list[tuple[int, int]]]:
    """The other sources' buckets from ``since_bucket`` on for ``networks``
    (blocking): (kind, policy, network) -> [(bucket, n)]."""
    out: dict[Key, list[tuple[int, int]]] = defaultdict(list)
    with engine.connect() as conn:
        for i in range(0, len(networks), QUERY_CHUNK):
            chunk = networks[i:i + QUERY_CHUNK]
            q = (select(table.c.kind, table.c.policy, table.c.network, table.c.bucket,
                        func.sum(table.c.n))
                 .where(and_(table.c.bucket >= since_bucket, table.c.source != source,
                             table.c.network.in_(chunk)))
                 .group_by(table.c.kind, table.c.policy, table.c.network, table.c.bucket))
            for kind, policy, network, bucket, n in conn.execute(q):
                out[(kind, policy, network)].append((int(bucket), int(n)))
    return dict(out)


def purge_counts(engine: Engine, table: Table, before_bucket: int) -> int:
    """Delete every source's buckets older than ``before_bucket``."""
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        return int(conn.execute(delete(table).where(table.c.bucket < before_bucket)).rowcount)


def sync_counts(engine: Engine, tables: StateTables, source: str,
          pending: dict[tuple[int, str, str, str], int], since_bucket: int,
          networks: list[str], purge_before: Optional[int]) -> dict[Key, list[tuple[int, int]]]:
    """One sync (blocking): make the table if missing, write ours, purge
    now and then, read the others'."""
    table = rate_table(tables)
    create_missing(engine, [table])
    write_counts(engine, table, source, pending)
    if purge_before is not None:
        purge_counts(engine, table, purge_before)
    return read_others(engine, table, source, since_bucket, networks)
