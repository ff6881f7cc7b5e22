"""The dashboard's traffic counts (``mppproxy.db.traffic``) and per-node
health rows (``mppproxy.db.nodehealth``): the disposition mapping, the
in-memory buffer and its bound, the adding upsert from two real processes
(SQLite file and MariaDB), the recorder's flush, failure and stop, the
console's queries and the purge, and the hot path through a real proxy on
loopback landing in the table.

MariaDB tests use ``require_mariadb`` (skip locally, fail under
``MPP_REQUIRE_SERVICES=1``), a table prefix of their own and drop their
tables afterwards, so parallel runs do not collide.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.trial import unittest

from loopback import proxy_config, start_proxy, wait_reactor_quiet
from fakes_backend import FakeBackend
from test_db_stores import require_mariadb
from test_policy_loopback import session
from mppproxy.config.database import DatabaseConfig
from mppproxy.config.schema import ProxyConfig
from mppproxy.db import StateDatabase
from mppproxy.db.engine import database_url, make_engine
from mppproxy.db.models import StateTables, create_missing
from mppproxy.db.nodehealth import (DNS_LIST, ENGINE, KEEP, HealthReport,
                                    health_summary, read_health, write_health)
from mppproxy.db.traffic import (HOUR, Counted, FlushState, TrafficCounts, TrafficRecorder,
                                 counted, hourly, nodes, per_hour, reason_key, tallies,
                                 top_reasons, upsert_counts)
from mppproxy.edge.traffic import health_reports
from mppproxy.policy.dnshealth import DOWN_AFTER, DnsListHealth
from mppproxy.results import Disposition
from mppproxy.scan.base import EngineHealth, Scanner
from mppproxy.scan.health import HealthMonitor
from mppproxy.scan.runtime import ScanStage

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parents[1]
# An hour (UTC) in November 2023.
H0 = 1_700_000_000 // HOUR * HOUR

# A process that adds to the rows: the same statement the recorder runs.
CHILD = """
import sys
from mppproxy.config.database import DatabaseConfig
from mppproxy.db.engine import database_url, make_engine
from mppproxy.db.models import StateTables, create_missing
from mppproxy.db.traffic import upsert_counts
url, prefix, node, hour, rounds = sys.argv[1:6]
cfg = DatabaseConfig(url=url, sqlite_in_reactor=False, pool_max=1)
engine = make_engine(database_url(cfg, "."), cfg)
tables = StateTables(prefix)
create_missing(engine, [tables.traffic])
for _ in range(int(rounds)):
    upsert_counts(engine, tables, node, {(int(hour), "relayed", ""): 1,
                                         (int(hour), "refused", "greylisting"): 2})
engine.dispose()
"""


def _engine(url: str) -> Any:
    cfg = DatabaseConfig(url=url, sqlite_in_reactor=False, pool_max=2)
    return make_engine(database_url(cfg, "."), cfg)


def _two_processes_add_up(url: str, prefix: str) -> None:
    rounds = 200
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, url, prefix, "edge1", str(H0),
                                  str(rounds)], env=env, stderr=subprocess.PIPE)
                for _ in range(2)]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
    engine = _engine(url)
    try:
        assert hourly(engine, H0, H0 + HOUR, tables=StateTables(prefix)) == [
            (H0, "refused", 4 * rounds), (H0, "relayed", 2 * rounds)]
    finally:
        engine.dispose()


# -- the vocabulary -------------------------------------------------------------

def test_dispositions_map_onto_the_dashboard_words() -> None:
    """Each disposition counts as the dashboard's word; a refusal before
    DATA with a 4xx is tempfailed, with a 5xx refused; aborted is not counted."""
    expect = {Disposition.RELAY: Counted.RELAYED, Disposition.DELIVER: Counted.RELAYED,
              Disposition.TAG: Counted.TAGGED, Disposition.QUARANTINE: Counted.QUARANTINED,
              Disposition.REJECT: Counted.REFUSED, Disposition.TEMPFAIL: Counted.TEMPFAILED,
              Disposition.DISCARD: Counted.DISCARDED}
    for action, word in expect.items():
        assert counted(action, 250) is word
    assert counted(Disposition.REFUSED, 451) is Counted.TEMPFAILED
    assert counted(Disposition.REFUSED, 554) is Counted.REFUSED
    assert counted(Disposition.ABORTED, None) is None
    assert reason_key("x" * 100) == "x" * 64 and reason_key(None) == ""


def test_counts_buffer_by_hour_and_drop_the_oldest_hour_past_the_cap() -> None:
    """The buffer keys by UTC hour; given back past its cap, the oldest
    hour goes first, with one error line per hour dropped."""
    now = [float(H0 + 10)]
    counts = TrafficCounts(clock=lambda: now[0], max_keys=3)
    counts.add(Counted.RELAYED, "")
    counts.add(Counted.RELAYED, "")
    now[0] += HOUR
    counts.add(Counted.REFUSED, "greylisting")
    taken = counts.take()
    assert taken == {(H0, "relayed", ""): 2, (H0 + HOUR, "refused", "greylisting"): 1}
    assert len(counts) == 0
    now[0] += HOUR
    counts.add(Counted.TAGGED, "headers")
    counts.add(Counted.TAGGED, "spamd")
    with capturedLogs() as events:
        counts.give_back(taken)
    assert (H0, "relayed", "") not in counts.pending
    assert len(counts) == 3 and counts.dropped == 2
    errors = [e for e in events if "dropped from the dashboard" in e.get("log_format", "")]
    assert len(errors) == 1


# -- the adding upsert ------------------------------------------------------------

def test_two_processes_add_to_one_sqlite_file(tmp_path: Path) -> None:
    """Two real processes writing the same keys into one SQLite file sum them."""
    _two_processes_add_up(f"sqlite:///{tmp_path}/state.sqlite", "mpp_")


def test_two_processes_add_to_one_mariadb() -> None:
    """Two real processes writing the same keys into one MariaDB sum them."""
    url = require_mariadb()
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    try:
        _two_processes_add_up(url, prefix)
    finally:
        engine = create_engine(url)
        StateTables(prefix).metadata.drop_all(engine)
        engine.dispose()


# -- the console's queries -------------------------------------------------------

def _fill(engine: Any, tables: StateTables) -> None:
    create_missing(engine, tables.metadata.sorted_tables)
    upsert_counts(engine, tables, "edge1", {
        (H0, "relayed", ""): 10, (H0, "refused", "greylisting"): 4,
        (H0 + HOUR, "tagged", "spamd"): 3, (H0 + HOUR, "refused", "relay control"): 1,
        (H0 + 5 * HOUR, "relayed", ""): 7})
    upsert_counts(engine, tables, "edge2", {
        (H0, "relayed", ""): 5, (H0 + HOUR, "refused", "greylisting"): 2,
        (H0 - HOUR, "relayed", ""): 99})


def _query_checks(engine: Any, tables: StateTables) -> None:
    _fill(engine, tables)
    assert hourly(engine, H0 + 30, H0 + 2 * HOUR, tables=tables) == [
        (H0, "refused", 4), (H0, "relayed", 15), (H0 + HOUR, "refused", 3),
        (H0 + HOUR, "tagged", 3)]
    assert hourly(engine, H0, H0 + 6 * HOUR, node="edge2", tables=tables) == [
        (H0, "relayed", 5), (H0 + HOUR, "refused", 2)]
    assert top_reasons(engine, H0, H0 + 24 * HOUR, tables=tables) == [
        ("greylisting", "refused", 6), ("spamd", "tagged", 3), ("relay control", "refused", 1)]
    assert top_reasons(engine, H0, H0 + 24 * HOUR, limit=1, node="edge1", tables=tables) == [
        ("greylisting", "refused", 4)]
    assert nodes(engine, H0, tables=tables) == ["edge1", "edge2"]
    assert per_hour(hourly(engine, H0, H0 + HOUR, tables=tables)) == {
        H0: {"refused": 4, "relayed": 15}}
    assert hourly(engine, H0 + 100 * HOUR, H0 + 200 * HOUR, tables=tables) == []


def test_queries_on_sqlite(tmp_path: Path) -> None:
    """hourly sums the nodes per hour and disposition within the range (or
    one node's); top_reasons orders by count, leaves out "" and limits."""
    engine = _engine(f"sqlite:///{tmp_path}/state.sqlite")
    try:
        _query_checks(engine, StateTables())
    finally:
        engine.dispose()


def test_queries_on_mariadb() -> None:
    """The same queries give the same answers on MariaDB."""
    url = require_mariadb()
    tables = StateTables(f"t{uuid.uuid4().hex[:10]}_")
    engine = _engine(url)
    try:
        _query_checks(engine, tables)
    finally:
        tables.metadata.drop_all(engine)
        engine.dispose()


def test_a_year_of_rows_is_read_through_the_key(tmp_path: Path) -> None:
    """A range over a year of hourly rows uses the key that leads with the
    hour (no table scan), and a week's chart is read quickly."""
    engine = _engine(f"sqlite:///{tmp_path}/state.sqlite")
    tables = StateTables()
    try:
        create_missing(engine, tables.metadata.sorted_tables)
        year = {}
        for i in range(366 * 24):
            for what, reason in (("relayed", ""), ("refused", "greylisting"),
                                 ("tagged", "spamd")):
                year[(H0 - i * HOUR, what, reason)] = i % 7 + 1
        upsert_counts(engine, tables, "edge1", year)
        started = time.monotonic()
        week = hourly(engine, H0 - 7 * 24 * HOUR, H0 + HOUR, tables=tables)
        top = top_reasons(engine, H0 - 7 * 24 * HOUR, H0 + HOUR, tables=tables)
        took = time.monotonic() - started
        assert len(week) == (7 * 24 + 1) * 3 and top[0][0] in ("greylisting", "spamd")
        assert took < 1.0, took
        t = tables.traffic
        sql = str(select(t.c.hour).where(t.c.hour >= 1, t.c.hour < 2).compile(
            engine, compile_kwargs={"literal_binds": True}))
        with engine.connect() as conn:
            plan = " ".join(str(r[-1]) for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
        assert "USING" in plan and "INDEX" in plan and "hour>" in plan, plan
    finally:
        engine.dispose()


# -- health rows --------------------------------------------------------------------

def test_health_rows_round_trip_and_summary(tmp_path: Path) -> None:
    """A node's reports are upserted (a later report replaces the earlier)
    and read back; the summary says up, down, stale or unknown."""
    engine = _engine(f"sqlite:///{tmp_path}/state.sqlite")
    tables = StateTables()
    try:
        create_missing(engine, tables.metadata.sorted_tables)
        write_health(engine, tables, "edge1", [
            HealthReport(ENGINE, "clamd", True, "ClamAV 1.4.6", float(H0 - 7200)),
            HealthReport(DNS_LIST, "zen", True)], float(H0))
        write_health(engine, tables, "edge1", [
            HealthReport(DNS_LIST, "zen", False, detail="last 3 lookups failed (timeout)")],
            float(H0 + 30))
        write_health(engine, tables, "edge2", [HealthReport(ENGINE, "clamd", True)],
                     float(H0 - 3600))
        rows = read_health(engine, tables)
        assert [(r.node, r.report.name, r.report.up) for r in rows] == [
            ("edge1", "zen", False), ("edge1", "clamd", True), ("edge2", "clamd", True)]
        summary = health_summary(rows, float(H0 + 60), engines=["clamd", "spamd"],
                                 dns_lists=["zen", "dbl"])
        assert [(s.kind, s.name, s.node, s.state) for s in summary] == [
            (ENGINE, "clamd", "edge1", "up"), (ENGINE, "clamd", "edge2", "stale"),
            (ENGINE, "spamd", "", "unknown"), (DNS_LIST, "dbl", "", "unknown"),
            (DNS_LIST, "zen", "edge1", "down")]
        assert summary[0].signature_age == 7260.0 and summary[0].version == "ClamAV 1.4.6"
        assert "timeout" in summary[4].detail
    finally:
        engine.dispose()


def test_dns_list_down_after_consecutive_failures_only() -> None:
    """A list is down once its last DOWN_AFTER lookups failed; an answer
    makes it up again."""
    health = DnsListHealth()
    health.note("zen", None)
    for _ in range(DOWN_AFTER - 1):
        health.note("zen", "timeout")
    assert not health.is_down("zen")
    health.note("zen", "servfail")
    assert health.is_down("zen")
    [report] = health.reports()
    assert (report.kind, report.name, report.up) == (DNS_LIST, "zen", False)
    assert "servfail" in report.detail
    health.note("zen", None)
    assert health.reports()[0].up and "2 answered" in health.reports()[0].detail


class _Engine(Scanner):
    """A scan engine that reports itself up, with a version and signatures."""

    name = "fakeav"

    async def health(self) -> EngineHealth:
        return EngineHealth(self.name, True, "FakeAV 1.0", float(H0), "ok")


class HealthReportTests(unittest.TestCase):

    async def test_engine_health_from_the_scan_stage_monitor(self) -> None:
        """The edge's reports carry the health monitor's last answer of each
        engine and the DNS lists the policy engine asked."""
        stage = ScanStage(ProxyConfig(), reactor)
        self.assertEqual(health_reports(stage, None), [])
        monitor = HealthMonitor([_Engine(None, reactor)], reactor)
        await monitor.check_all()
        stage.health = monitor
        self.assertEqual(health_reports(stage, None), [
            HealthReport(ENGINE, "fakeav", True, "FakeAV 1.0", float(H0), "ok")])


# -- the recorder ----------------------------------------------------------------------

class RecorderTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="mpp-traffic-")
        self.clock = Clock()
        self.clock.advance(H0 + 60)

    async def make_db(self, url: str = "", prefix: str = "mpp_") -> StateDatabase:
        db = StateDatabase(DatabaseConfig(url=url, pool_max=2, purge_interval=1e9),
                           self.data_dir, reactor, clock=self.clock, table_prefix=prefix)
        self.addCleanup(db.stop)
        await db.start()
        return db

    def recorder(self, db: Any, **kw: Any) -> TrafficRecorder:
        current = [db]
        rec = TrafficRecorder(reactor, "edge1", 1e6, lambda: current[0],
                              counts=TrafficCounts(clock=self.clock.seconds), **kw)
        rec.current = current  # type: ignore[attr-defined]  # the test swaps the database
        return rec

    async def test_flush_adds_and_stop_flushes_the_rest(self) -> None:
        """Counted transactions land in the table at a flush and add to the
        rows; what is counted after the last flush is written at stop; a
        stopped recorder no longer counts."""
        db = await self.make_db()
        rec = self.recorder(db)
        rec.start()
        self.assertIn(rec.counts.add, tallies)
        for tally in list(tallies):
            tally(Counted.RELAYED, "")
        rec.counts.add(Counted.REFUSED, "greylisting")
        await rec.flush()
        rec.counts.add(Counted.REFUSED, "greylisting")
        await rec.stop()
        self.assertNotIn(rec.counts.add, tallies)
        rows = await db.run(hourly, H0, H0 + HOUR, None, db.tables)
        self.assertEqual(rows, [(H0, "refused", 2), (H0, "relayed", 1)])
        self.assertEqual(len(rec.counts), 0)

    async def test_failed_flush_keeps_the_counts_for_the_next(self) -> None:
        """A database that cannot be reached (nothing listens on the port),
        then a stopped one: the counts stay, the outage is logged once, and
        the next flush to a working database writes them all."""
        dead = await self.make_db("mysql+pymysql://test:test@127.0.0.1:1/none")
        rec = self.recorder(dead)
        rec.counts.add(Counted.TEMPFAILED, "greylisting")
        with capturedLogs() as events:
            await rec.flush()
            rec.counts.add(Counted.TEMPFAILED, "greylisting")
            stopped = await self.make_db(prefix="t_stopped_")
            await stopped.stop()
            rec.current[0] = stopped  # type: ignore[attr-defined]
            await rec.flush()
        self.assertIs(rec.flush_state, FlushState.FAILING)
        self.assertEqual(rec.counts.pending, {(H0, "tempfailed", "greylisting"): 2})
        self.assertEqual(len([e for e in events if "kept for the next try"
                              in e.get("log_format", "")]), 1)
        good = await self.make_db()
        rec.current[0] = good  # type: ignore[attr-defined]
        await rec.flush()
        self.assertIs(rec.flush_state, FlushState.OK)
        self.assertEqual(await good.run(hourly, H0, H0 + HOUR, None, good.tables),
                         [(H0, "tempfailed", 2)])
        self.assertEqual(len(rec.counts), 0)

    async def test_no_database_keeps_counts_and_health_is_written_with_a_flush(self) -> None:
        """Without a database the counts wait; with one, the node's health
        reports are written beside them."""
        db = await self.make_db()
        rec = self.recorder(None, health=lambda: [HealthReport(ENGINE, "clamd", False,
                                                               detail="refused")])
        rec.counts.add(Counted.QUARANTINED, "clamd")
        await rec.flush()
        self.assertEqual(len(rec.counts), 1)
        rec.current[0] = db  # type: ignore[attr-defined]
        await rec.flush()
        [row] = await db.run(read_health, db.tables)
        self.assertEqual((row.node, row.report.name, row.report.up, row.reported),
                         ("edge1", "clamd", False, H0 + 60))
        self.assertEqual(await db.run(top_reasons, H0, H0 + HOUR, 10, None, db.tables),
                         [("clamd", "quarantined", 1)])

    async def test_purge_deletes_old_hours_and_silent_nodes(self) -> None:
        """The state purge deletes traffic hours past the retention and health
        rows no node wrote for KEEP seconds; the rest stays."""
        db = await self.make_db()
        days = db.config.traffic_retention_days
        await db.run(upsert_counts, db.tables, "edge1", {
            (H0 - (days + 2) * 86400, "relayed", ""): 1, (H0 - (days + 1) * 86400, "relayed", ""): 1,
            (H0 - 86400, "relayed", ""): 5})
        await db.run(write_health, db.tables, "old", [HealthReport(ENGINE, "clamd", True)],
                     H0 - KEEP - 10)
        await db.run(write_health, db.tables, "edge1", [HealthReport(ENGINE, "clamd", True)],
                     float(H0))
        counts = await db.purge_dashboard()
        self.assertEqual(counts, {"mpp_traffic": 2, "mpp_node_health": 1})
        self.assertEqual(await db.run(hourly, 0, H0 + HOUR, None, db.tables),
                         [(H0 - 86400, "relayed", 5)])
        self.assertEqual([r.node for r in await db.run(read_health, db.tables)], ["edge1"])


# -- through the proxy ------------------------------------------------------------------

SPAM = b"From: <s@client.test>\r\nSubject: Cheap meds today\r\n\r\nbody\r\n"
POLICY = {
    "database": {"traffic_flush": 3600},
    "policies": {"default": {
        "greylisting": {"enabled": True, "delay": 3600,
                        "whitelist_recipients": ["a@example.com"]},
        "scan": {"enabled": True, "headers": {"rules": [
            {"pattern": "(?i)cheap meds", "header": "Subject", "action": "score:6",
             "name": "CHEAP_MEDS"}]}},
        "scoring": {"tag": 5, "reject": 15}}}}


class ProxyCountingTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    async def test_transactions_through_the_proxy_land_in_the_table(self) -> None:
        """Relayed, tagged, refused at RCPT (relay control) and greylisted
        (451 at RCPT) transactions through a real proxy are counted with
        their reasons and written by a flush."""
        fake = FakeBackend()
        port = fake.start_for(self)
        proxy = start_proxy(self, proxy_config(self.mktemp(), port, policy=POLICY))
        out = await deferToThread(session, proxy.port, ("a@example.com",))
        self.assertEqual(out["data"][0], 250)
        out = await deferToThread(session, proxy.port, ("a@example.com",), message=SPAM)
        self.assertEqual(out["data"][0], 250)
        out = await deferToThread(session, proxy.port, ("x@elsewhere.test",))
        self.assertEqual(out["rcpt"][0][0], 554)
        out = await deferToThread(session, proxy.port, ("g@example.com",))
        self.assertEqual(out["rcpt"][0][0], 451)
        recorder = proxy.service.traffic
        assert recorder is not None and proxy.service.policy is not None
        self.assertEqual(recorder.node, "proxy.test")
        await recorder.flush()
        db = proxy.service.policy.database
        now = time.time()
        rows = await db.run(hourly, now - 2 * HOUR, now + HOUR, None, db.tables)
        self.assertEqual({d: n for _, d, n in rows},
                         {"relayed": 1, "tagged": 1, "refused": 1, "tempfailed": 1})
        reasons = await db.run(top_reasons, now - 2 * HOUR, now + HOUR, 10, None, db.tables)
        self.assertEqual(sorted(reasons), [("greylisting", "tempfailed", 1),
                                           ("relay control", "refused", 1),
                                           ("scan:headers", "tagged", 1)])

    async def test_counts_after_the_last_flush_are_written_at_stop(self) -> None:
        """A transaction counted after the last flush is in the table once
        the service has stopped."""
        fake = FakeBackend()
        port = fake.start_for(self)
        data_dir = self.mktemp()
        proxy = start_proxy(self, proxy_config(data_dir, port, policy=POLICY))
        out = await deferToThread(session, proxy.port, ("a@example.com",))
        self.assertEqual(out["data"][0], 250)
        await proxy.service.stopService()
        engine = _engine(f"sqlite:///{os.path.abspath(data_dir)}/state.sqlite")
        try:
            now = time.time()
            rows = hourly(engine, now - 2 * HOUR, now + HOUR)
        finally:
            engine.dispose()
        self.assertEqual([(d, n) for _, d, n in rows], [("relayed", 1)])
