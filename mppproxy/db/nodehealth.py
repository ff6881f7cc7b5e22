"""Each node's scan engines and DNS lists as it last saw them, in the state
database, for the web console's dashboard (issue 13) wherever it runs.

A leaf (docs/design.md, "Floors").  Engine health lives in the memory of
the edge process that watches the engines (``scan/health.py``), and DNS
list health in its policy engine's (``policy/dnshealth.py``); the console
runs in the archive node, or in another process of all-in-one.  So each
edge process writes its view with its traffic counts
(``traffic.TrafficRecorder``, every ``database.traffic_flush`` seconds:
one upsert of a few rows), and the console reads the rows back
(``read_health``) and judges them (``health_summary``): a row its node has
not written for ``STALE_AFTER`` seconds is "stale", a configured engine or
list no node reported is "unknown".  Rows not written for ``KEEP`` seconds
(a node taken out of service) are deleted by the state purge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from sqlalchemy import delete, select
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Engine

from mppproxy.db.engine import WRITE
from mppproxy.db.models import (HEALTH_NAME_LENGTH, HEALTH_TEXT_LENGTH, NODE_LENGTH,
                                StateTables, clip)

ENGINE = "engine"
DNS_LIST = "dns_list"
# Seconds without a report after which a node's row is shown as stale:
# ten default flushes (a node that stopped, or stopped counting).
STALE_AFTER = 300.0
# Seconds after which the purge deletes a row nobody wrote again.
KEEP = 7 * 86400.0


@dataclass(frozen=True)
class HealthReport:
    """What one process says about one engine or DNS list."""

    kind: str  # ENGINE or DNS_LIST
    name: str
    up: bool
    version: str = ""
    # Unix time of the engine's signature database, when it tells.
    signatures_time: Optional[float] = None
    # Why it is down, or what it said.
    detail: str = ""


@dataclass(frozen=True)
class HealthRow:
    """A stored report: a ``HealthReport`` with its node and time."""

    node: str
    report: HealthReport
    reported: float


@dataclass(frozen=True)
class HealthStatus:
    """One line of the dashboard's health table."""

    kind: str
    name: str
    node: str  # "" for a configured engine or list no node reported
    state: str  # "up", "down", "stale" or "unknown"
    version: str = ""
    # Seconds since the signatures were made, when known.
    signature_age: Optional[float] = None
    detail: str = ""
    reported: Optional[float] = None


def write_health(engine: Engine, tables: StateTables, node: str,
                 reports: Sequence[HealthReport], now: float) -> int:
    """Upsert ``node``'s reports (blocking); the rows written."""
    if not reports:
        return 0
    t = tables.node_health
    rows = [{"node": clip(node, NODE_LENGTH), "kind": r.kind,
             "name": clip(r.name, HEALTH_NAME_LENGTH), "up": r.up,
             "version": clip(r.version, HEALTH_TEXT_LENGTH),
             "signatures_time": r.signatures_time,
             "detail": clip(r.detail, HEALTH_TEXT_LENGTH), "reported": now}
            for r in reports]
    fields = ("up", "version", "signatures_time", "detail", "reported")
    statement: Any
    if engine.dialect.name == "sqlite":
        lite = sqlite.insert(t)
        statement = lite.on_conflict_do_update(
            index_elements=[t.c.node, t.c.kind, t.c.name],
            set_={f: lite.excluded[f] for f in fields})
    else:
        my = mysql.insert(t)
        statement = my.on_duplicate_key_update({f: my.inserted[f] for f in fields})
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        conn.execute(statement, rows)
    return len(rows)


def read_health(engine: Engine, tables: Optional[StateTables] = None,
                node: Optional[str] = None) -> list[HealthRow]:
    """Every stored report (or ``node``'s), by kind, name and node (blocking)."""
    t = (tables if tables is not None else StateTables()).node_health
    query = select(t).order_by(t.c.kind, t.c.name, t.c.node)
    if node is not None:
        query = query.where(t.c.node == node)
    with engine.connect() as conn:
        return [HealthRow(r.node, HealthReport(r.kind, r.name, bool(r.up), r.version,
                                               r.signatures_time, r.detail), float(r.reported))
                for r in conn.execute(query)]


def purge_health(engine: Engine, tables: StateTables, now: float) -> int:
    """Delete the rows not written for ``KEEP`` seconds (blocking)."""
    t = tables.node_health
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        return int(conn.execute(delete(t).where(t.c.reported < now - KEEP)).rowcount)


_KIND_ORDER = {ENGINE: 0, DNS_LIST: 1}


def health_summary(rows: Iterable[HealthRow], now: float, engines: Iterable[str] = (),
                   dns_lists: Iterable[str] = (),
                   stale_after: float = STALE_AFTER) -> list[HealthStatus]:
    """The dashboard's table: one line per stored row (up, down, or stale
    when its node has not written it for ``stale_after`` seconds), plus an
    "unknown" line for each configured engine or DNS list that no node
    reported; engines first, then by name and node."""
    out: list[HealthStatus] = []
    seen: set[tuple[str, str]] = set()
    for row in rows:
        r = row.report
        seen.add((r.kind, r.name))
        state = ("stale" if now - row.reported > stale_after else "up" if r.up else "down")
        age = None if r.signatures_time is None else max(0.0, now - r.signatures_time)
        out.append(HealthStatus(r.kind, r.name, row.node, state, r.version, age, r.detail,
                                row.reported))
    for kind, names in ((ENGINE, engines), (DNS_LIST, dns_lists)):
        for name in names:
            if (kind, name) not in seen:
                seen.add((kind, name))
                out.append(HealthStatus(kind, name, "", "unknown",
                                        detail="no node has reported it"))
    out.sort(key=lambda s: (_KIND_ORDER.get(s.kind, 2), s.kind, s.name, s.node))
    return out
