"""The archive store (mppproxy/store/): migrations, idempotent writes,
search, release, delete, legal hold, purge, message files, subjects and
``mppproxy db``.

Every store test runs against SQLite (a temporary directory) and against a
real MariaDB (``MPP_MARIADB_URL``, test_db_stores.py's ``require_mariadb``:
skipped locally without one, failed in CI).  On MariaDB each test's tables
carry a prefix of their own and are dropped at teardown, so tests running at
the same time in the shared ``test`` database never meet.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import given, settings, strategies as st
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from helpers import free_port
from test_db_stores import require_mariadb
from mppproxy import cli
from mppproxy.config.archive import StoreConfig
from mppproxy.store import (ArchiveStore, NewCopy, NotReleasing, RawMissing, SchemaNotCurrent,
                            Search, StoredRow, StoreError)
from mppproxy.store import migrate
from mppproxy.store.schema import SUBJECT_LENGTH
from mppproxy.store.compress import ZLIB_LEVEL
from mppproxy.store.store import ORPHAN_AGE, raw_key_for
from mppproxy.store.subject import subject_of

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["sqlite", "mariadb"]
T0 = 1_700_000_000.0
DAY = 86400.0


def message(subject: str = "hello", body: bytes = b"body\r\n") -> bytes:
    return (f"From: a@sender.example\r\nTo: x@a.example\r\nSubject: {subject}\r\n"
            f"Message-ID: <m@x>\r\n\r\n").encode() + body


def copy(i: int = 1, *, node: str = "edge1", received: float = T0,
         recipients: tuple[str, ...] = ("x@a.example",), sender: str = "bob@sender.example",
         subject: str = "hello", verdict: str = "spam", reasons: tuple[str, ...] = ("score 12",),
         raw: Optional[bytes] = None) -> NewCopy:
    return NewCopy(
        node=node, queue_id=f"Q{i:06d}", received=received, client="192.0.2.7", helo="client.test",
        tls=True, sender=sender, recipients=recipients, policy="default", verdict=verdict,
        disposition="hold", score=12.5, reasons=reasons,
        state_json=json.dumps({"queue_id": f"Q{i:06d}", "checks": [{"name": "spamd"}]}),
        message=raw if raw is not None else message(subject))


class Stores:
    """Makes stores for one test on one backend and removes them after."""

    def __init__(self, backend: str, tmp: str) -> None:
        self.backend = backend
        self.url = require_mariadb() if backend == "mariadb" else ""
        self.tmp = tmp
        self.prefix = f"t{uuid.uuid4().hex[:10]}_" if backend == "mariadb" else ""
        self.made: list[ArchiveStore] = []

    def make(self, open_it: bool = True, **config: Any) -> ArchiveStore:
        config.setdefault("url", self.url)
        store = ArchiveStore(StoreConfig(**config), self.tmp, table_prefix=self.prefix)
        self.made.append(store)
        if open_it:
            store.open()
        return store

    def cleanup(self) -> None:
        for store in self.made:
            store.close()
        if self.backend == "mariadb" and self.made:
            self.made[0].drop_all()
            self.made[0].close()


@pytest.fixture(params=BACKENDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    made = Stores(request.param, str(tmp_path))
    yield made
    made.cleanup()


@pytest.fixture
def store(stores: Stores) -> ArchiveStore:
    return stores.make()


def count_rows(store: ArchiveStore, table: str) -> int:
    t = getattr(store.tables, table)
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(t)).scalar_one())


# -- schema and migrations -----------------------------------------------------

def test_migration_creates_exactly_the_schema(stores: Stores) -> None:
    """After ``upgrade`` the reflected database matches schema.py's metadata:
    Alembic's autogenerate comparison finds no difference."""
    store = stores.make()
    prefix = store.tables.prefix

    def ours(name: Optional[str], type_: str, parent: Any) -> bool:
        if type_ == "table":
            # The store's tables (0001, 0004), the console's accounts and API tokens (0002, 0003).
            return bool(name) and str(name).startswith((f"{prefix}archive_", f"{prefix}web_"))
        return True

    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "version_table": store.tables.version_table, "include_name": ours,
            "compare_type": True})
        diffs = compare_metadata(context, store.tables.metadata)
    assert diffs == []
    assert migrate.current(store.engine, prefix) == migrate.head() == "0004"
    assert migrate.is_current(store.engine, prefix)


def test_version_table_is_the_stores_own(stores: Stores) -> None:
    """The revision is kept in <prefix>archive_alembic_version, never in
    alembic_version, so another application's migrations are not disturbed."""
    store = stores.make()
    with store.engine.connect() as conn:
        names = set(store.engine.dialect.get_table_names(conn))
        version = conn.execute(text(f"SELECT version_num FROM {store.tables.version_table}"))
        assert [r[0] for r in version] == ["0004"]
    assert store.tables.version_table in names
    assert "alembic_version" not in {n for n in names if n.startswith(store.tables.prefix)}


def test_open_twice_upgrades_once(stores: Stores) -> None:
    """A second store opened on a current database finds nothing to do."""
    stores.make()
    second = stores.make()
    assert second.schema_revision() == "0004"
    assert second.upgrade_schema() == ("0004", "0004")


def test_auto_upgrade_off_refuses_an_old_database(stores: Stores) -> None:
    """With auto_upgrade off an empty database is refused with a message
    that says what to run; nothing is created."""
    store = stores.make(open_it=False, auto_upgrade=False)
    with pytest.raises(SchemaNotCurrent, match="mppproxy db upgrade"):
        store.open()
    assert store.schema_revision() is None


def test_upgrade_from_two_processes_at_once(stores: Stores) -> None:
    """Two processes upgrading one empty database at the same moment both
    succeed and the schema is created once (GET_LOCK / BEGIN IMMEDIATE)."""
    script = (
        "import sys, time\n"
        "from mppproxy.config.archive import StoreConfig\n"
        "from mppproxy.store import ArchiveStore\n"
        "s = ArchiveStore(StoreConfig(url=sys.argv[1]), sys.argv[2], table_prefix=sys.argv[3])\n"
        "time.sleep(max(0.0, float(sys.argv[4]) - time.time()))\n"
        "s.open(); print(s.schema_revision()); s.close()\n")
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", script, stores.url, stores.tmp,
                               stores.prefix, str(start)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-2000:] for o in outs]
    assert [o[0].strip() for o in outs] == [b"0004", b"0004"]
    assert stores.make().schema_revision() == "0004"


def test_upgrades_in_two_threads_at_once_each_get_every_table(tmp_path: Path) -> None:
    """Two stores of one process (an all-in-one node's keeper and console
    at first start) upgrading at the same moment, each its own database:
    each ends with all its tables.  Alembic's ``op`` is a module-level proxy
    to the migration running now, so unserialised runs created one's tables
    on the other's connection and stamped a store without them."""
    rounds, deadline = 8, time.monotonic() + 60
    for n in range(rounds):
        stores = [ArchiveStore(StoreConfig(), str(tmp_path / f"{n}-{i}")) for i in range(2)]
        barrier = threading.Barrier(2, timeout=10)
        errors: list[BaseException] = []

        def open_store(store: ArchiveStore) -> None:
            try:
                barrier.wait()
                store.open()
            except BaseException as e:  # reported below, with the round
                errors.append(e)

        threads = [threading.Thread(target=open_store, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        try:
            assert errors == [], (n, errors)
            for store in stores:
                with store.engine.connect() as conn:
                    names = set(store.engine.dialect.get_table_names(conn))
                assert set(store.tables.metadata.tables) <= names, (n, names)
                assert store.schema_revision() == migrate.head()
        finally:
            for store in stores:
                store.close()
        assert time.monotonic() < deadline, f"{n + 1} of {rounds} rounds in 60 s"


def test_sqlite_store_fsyncs_every_commit(tmp_path: Path) -> None:
    """The SQLite store holds mail: its engine uses synchronous=FULL (2) and
    WAL, unlike the state database's NORMAL."""
    store = ArchiveStore(StoreConfig(), str(tmp_path / "new"))
    store.open()
    try:
        assert store.url.database == str(tmp_path / "new" / "archive.sqlite")
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        store.close()


# -- writing ---------------------------------------------------------------------

def test_rows_split_per_recipient_domain_raw_once(store: ArchiveStore) -> None:
    """One copy to three recipients in two domains gives two rows (domain
    lower-cased, that domain's recipients each) sharing one raw message."""
    c = copy(1, recipients=("x@A.example", "y@a.example", "z@c.example"))
    assert store.add_copies([c]) == 2
    rows = {r.rcpt_domain: r for r in store.search(Search())}
    assert set(rows) == {"a.example", "c.example"}
    assert rows["a.example"].recipients == ("x@A.example", "y@a.example")
    assert rows["c.example"].recipients == ("z@c.example",)
    assert rows["a.example"].raw_key == rows["c.example"].raw_key
    assert count_rows(store, "raw") == 1
    row = rows["c.example"]
    assert (row.node, row.queue_id, row.sender, row.subject) == ("edge1", "Q000001",
                                                                 "bob@sender.example", "hello")
    assert (row.verdict, row.disposition, row.score, row.reason) == ("spam", "hold", 12.5,
                                                                     "score 12")
    assert (row.client_ip, row.helo, row.status, row.legal_hold) == ("192.0.2.7", "client.test",
                                                                     "held", False)
    assert row.received == T0 and row.released_at is None and row.size == len(c.message)


def test_add_copies_twice_stores_once(store: ArchiveStore) -> None:
    """A retried batch stores nothing twice and says it inserted nothing."""
    batch = [copy(i, recipients=("x@a.example", "y@b.example")) for i in range(5)]
    assert store.add_copies(batch) == 10
    assert store.add_copies(batch) == 0
    assert store.add_copies(batch[2:] + [copy(99)]) == 1
    assert count_rows(store, "messages") == 11
    assert count_rows(store, "raw") == 6


def test_two_writers_store_one_batch_once(stores: Stores) -> None:
    """Two writers (two engines, two threads) storing the same batch at the
    same moment store each row once and leave no raw data unused."""
    first, second = stores.make(), stores.make()
    batch = [copy(i, recipients=("x@a.example", "y@b.example")) for i in range(200)]
    barrier = threading.Barrier(2, timeout=30)
    results: list[int] = []
    errors: list[BaseException] = []

    def write(s: ArchiveStore) -> None:
        try:
            barrier.wait()
            for start in range(0, len(batch), 20):
                results.append(s.add_copies(batch[start:start + 20]))
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(results) == 400
    assert count_rows(first, "messages") == 400
    assert count_rows(first, "raw") == 200


@pytest.mark.parametrize("raw", ["database", "files"])
def test_a_failed_batch_leaves_nothing(stores: Stores, raw: str) -> None:
    """add_copies is one transaction: when its insert of the rows fails,
    the raw data it wrote is rolled back and no message file stays; the
    batch tried again is stored whole."""
    store = stores.make(raw=raw)

    def fail(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT") and "archive_messages" in statement:
            raise OperationalError(statement, None, Exception("injected"))

    event.listen(store.engine, "before_cursor_execute", fail)
    try:
        with pytest.raises(DBAPIError):
            store.add_copies([copy(1), copy(2)])
    finally:
        event.remove(store.engine, "before_cursor_execute", fail)
    assert count_rows(store, "messages") == 0
    assert count_rows(store, "raw") == 0
    assert [p for p in Path(store.raw_dir).rglob("*") if p.is_file()] == []
    assert store.add_copies([copy(1), copy(2)]) == 2
    assert all(store.raw(r) == message() for r in store.search(Search()))


def test_values_longer_than_their_columns_are_cut(store: ArchiveStore) -> None:
    """Over-long values (a 2000-character sender, a huge reason list, a
    long HELO) are cut to their columns, never refused or silently lost."""
    c = copy(1, sender="s" * 2000 + "@x.example", reasons=tuple("r" * 50 for _ in range(100)))
    c = NewCopy(**{**c.__dict__, "helo": "h" * 999, "client": "c" * 99})
    assert store.add_copies([c]) == 1
    row = store.search(Search())[0]
    assert len(row.sender) == 512 and len(row.reason) == 1000
    assert len(row.helo or "") == 255 and len(row.client_ip) == 45


def test_raw_is_zlib_compressed(store: ArchiveStore) -> None:
    """The raw message is stored zlib-compressed (level ZLIB_LEVEL) and
    read back whole; the state JSON comes back parsed."""
    body = b"line of text that repeats\r\n" * 2000
    store.add_copies([copy(1, raw=message(body=body))])
    row = store.search(Search())[0]
    with store.engine.connect() as conn:
        data, size = conn.execute(select(store.tables.raw.c.data, store.tables.raw.c.size)).one()
    assert data == zlib.compress(message(body=body), ZLIB_LEVEL)
    assert size == len(message(body=body)) and len(data) < size // 10
    assert store.raw(row) == message(body=body)
    assert store.state(row)["checks"] == [{"name": "spamd"}]


# -- search ------------------------------------------------------------------------

@pytest.fixture
def filled(store: ArchiveStore) -> ArchiveStore:
    store.add_copies([
        copy(1, received=T0 + 1, recipients=("ann@a.example",), sender="Bob@Sender.example",
             subject="Cheap pills", verdict="spam", reasons=("spamd: 12.0",)),
        copy(2, received=T0 + 2, recipients=("ann@a.example", "zed@b.example"),
             sender="carol@other.example", subject="=?utf-8?q?R=C3=A9union?=", verdict="virus",
             reasons=("clamd: Eicar-Test-Signature",)),
        copy(3, received=T0 + 3, recipients=("bo_b@a.example",), sender="x_y@sender.example",
             subject="100% off", verdict="spam", reasons=("rbl: listed",)),
        copy(4, received=T0 + 4, recipients=("annex@a.example",), sender="",
             subject="bounce", verdict="spam", reasons=()),
    ])
    return store


def refs(rows: list[StoredRow]) -> list[str]:
    return [f"{r.queue_id[-1]}{r.rcpt_domain[0]}" for r in rows]


def test_search_newest_first_with_keyset_paging(filled: ArchiveStore) -> None:
    """Search lists newest first; before_id gives the next page, with no row
    twice or missed; count counts all matches."""
    assert refs(filled.search(Search())) == ["4a", "3a", "2b", "2a", "1a"]
    page1 = filled.search(Search(limit=2))
    page2 = filled.search(Search(limit=2, before_id=page1[-1].id))
    page3 = filled.search(Search(limit=2, before_id=page2[-1].id))
    assert refs(page1 + page2 + page3) == ["4a", "3a", "2b", "2a", "1a"]
    assert filled.count(Search()) == 5 and filled.count(Search(domain="A.example")) == 4


@pytest.mark.parametrize("search,expected", [
    (Search(domain="b.example"), ["2b"]),
    (Search(domains=("b.example", "none.example")), ["2b"]),
    (Search(domain="a.example", domains=("b.example",)), []),
    (Search(since=T0 + 2, until=T0 + 4), ["3a", "2b", "2a"]),
    (Search(sender="bob@sender.example"), ["1a"]),  # case does not matter
    (Search(sender="@sender.example"), ["3a", "1a"]),
    (Search(sender="x_y@*"), ["3a"]),
    (Search(sender="x?y@*"), []),
    (Search(sender="*_*"), ["3a"]),
    (Search(sender="*@*"), ["3a", "2b", "2a", "1a"]),
    (Search(rcpt="ann@a.example"), ["2a", "1a"]),  # not annex@
    (Search(rcpt="@b.example"), ["2b"]),
    (Search(rcpt="ann*"), ["4a", "2a", "1a"]),
    (Search(rcpt="*nn@a.example"), ["2a", "1a"]),
    (Search(rcpt="nn*"), []),  # a glob matches a whole address
    (Search(rcpt="zed@b.example"), ["2b"]),
    (Search(rcpt="bo_b@a.example"), ["3a"]),
    (Search(rcpt="bo%b@a.example"), []),
    (Search(subject="PILLS"), ["1a"]),
    (Search(subject="réunion"), ["2b", "2a"]),
    (Search(subject="100%"), ["3a"]),
    (Search(subject="0%"), ["3a"]),
    (Search(reason="eicar"), ["2b", "2a"]),
    (Search(reason="spam"), ["4a", "3a", "1a"]),
    (Search(ref="Q000002"), ["2b", "2a"]),
    (Search(ref="Q00000"), []),
])
def test_search_filters(filled: ArchiveStore, search: Search, expected: list[str]) -> None:
    """Each filter finds what its docs say (exact, @domain and * glob
    addresses; substrings of subject and reason; the verdict; the ref), with
    LIKE's own wildcards taken literally."""
    assert refs(filled.search(search)) == expected


def test_search_by_ids_and_status(filled: ArchiveStore) -> None:
    """Deleted rows are hidden unless their status is asked for; ids select
    rows whatever else matches."""
    rows = filled.search(Search(ref="Q000001"))
    assert filled.delete(Search(ref="Q000001"), "admin", "cli:admin@host") == 1
    assert filled.search(Search(ids=(rows[0].id,))) == []
    found = filled.search(Search(ids=(rows[0].id,), status=("deleted",)))
    assert [r.status for r in found] == ["deleted"]
    assert filled.search(Search(ids=(rows[0].id,), status=None))[0].id == rows[0].id
    got = filled.get(rows[0].id)
    assert got is not None and got.status == "deleted" and filled.get(10**9) is None


def test_row_to_json(filled: ArchiveStore) -> None:
    """to_json gives plain JSON values with ISO times in UTC."""
    data = filled.search(Search(ref="Q000001"))[0].to_json()
    json.dumps(data)
    assert data["recipients"] == ["ann@a.example"]
    assert data["received_iso"] == "2023-11-14T22:13:21Z" and data["released_at_iso"] is None


# -- release ----------------------------------------------------------------------

def test_claim_and_finish_release(store: ArchiveStore) -> None:
    """held -> releasing -> released (released_at set) or back to held;
    a second claim and a finish without a claim are refused; audited."""
    store.add_copies([copy(1), copy(2)])
    one, two = sorted(store.search(Search()), key=lambda r: r.queue_id)
    claimed = store.claim_release(one.id, "ann", "cli:ann@host")
    assert claimed is not None and claimed.status == "releasing"
    assert store.claim_release(one.id, "bob", "198.51.100.2") is None
    before = time.time()
    store.finish_release(one.id, "ann", "cli:ann@host", True, "250 2.0.0 ok")
    released = store.get(one.id)
    assert released is not None and released.status == "released"
    assert released.released_at is not None and released.released_at >= before - 1
    assert store.claim_release(one.id, "ann", "cli:ann@host") is None
    with pytest.raises(NotReleasing):
        store.finish_release(two.id, "ann", "cli:ann@host", True, "")
    assert store.claim_release(two.id, "ann", "cli:ann@host") is not None
    store.finish_release(two.id, "ann", "cli:ann@host", False, "451 4.3.0 backend down")
    again = store.get(two.id)
    assert again is not None and again.status == "held"
    audit = store.audit_rows()
    assert [(a["action"], a["row_id"], a["detail"]) for a in audit] == [
        ("release-failed", two.id, "451 4.3.0 backend down"),
        ("release-claim", two.id, ""),
        ("release", one.id, "250 2.0.0 ok"),
        ("release-claim", one.id, "")]
    assert audit[0]["actor"] == "ann" and audit[0]["origin"] == "cli:ann@host"
    assert audit[0]["queue_id"] == "Q000002" and audit[0]["rcpt_domain"] == "a.example"
    assert abs(audit[0]["at"] - time.time()) < 60


def test_concurrent_claims_from_two_threads_have_one_winner(stores: Stores) -> None:
    """Two threads (each with its own engine) claiming the same 30 rows at
    the same moment: every row is won exactly once."""
    first, second = stores.make(), stores.make()
    first.add_copies([copy(i) for i in range(30)])
    ids = sorted(r.id for r in first.search(Search(limit=100)))
    barrier = threading.Barrier(2, timeout=30)
    won: dict[str, list[int]] = {"first": [], "second": []}
    errors: list[BaseException] = []

    def claim(name: str, s: ArchiveStore) -> None:
        try:
            barrier.wait()
            for row_id in ids:
                if s.claim_release(row_id, name, "test") is not None:
                    won[name].append(row_id)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(n, s))
               for n, s in (("first", first), ("second", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(won["first"] + won["second"]) == ids
    assert len([a for a in first.audit_rows(limit=1000) if a["action"] == "release-claim"]) == 30


CLAIMER = """
import sys, time
from mppproxy.config.archive import StoreConfig
from mppproxy.store import ArchiveStore
s = ArchiveStore(StoreConfig(url=sys.argv[1]), sys.argv[2], table_prefix=sys.argv[3])
s.open()
ids = [int(x) for x in sys.argv[5].split(",")]
time.sleep(max(0.0, float(sys.argv[4]) - time.time()))
won = [i for i in ids if s.claim_release(i, "proc", "test") is not None]
print(",".join(map(str, won)))
s.close()
"""


def test_concurrent_claims_from_two_processes_have_one_winner(stores: Stores) -> None:
    """Two processes claiming the same 40 rows at one moment: each row is
    won by exactly one of them."""
    store = stores.make()
    store.add_copies([copy(i) for i in range(40)])
    ids = sorted(r.id for r in store.search(Search(limit=100)))
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, stores.url, stores.tmp,
                               stores.prefix, str(start), ",".join(map(str, ids))],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-2000:] for o in outs]
    won = [int(x) for o in outs for x in o[0].decode().strip().split(",") if x]
    assert sorted(won) == ids


# -- stuck releases ------------------------------------------------------------------

def age_claims(store: ArchiveStore, row_id: int, seconds: float) -> None:
    """Move the "release-claim" audit rows of ``row_id`` ``seconds`` into the
    past, as if the claiming process had died that long ago."""
    a = store.tables.audit
    with store.engine.begin() as conn:
        for audit_id, at in conn.execute(select(a.c.id, a.c.at).where(
                a.c.row_id == row_id, a.c.action == "release-claim")).all():
            conn.execute(a.update().where(a.c.id == audit_id)
                         .values(at=at - timedelta(seconds=seconds)))


def test_stuck_release_older_than_the_threshold_is_reset(store: ArchiveStore) -> None:
    """A row left in releasing by a claim 40 minutes old goes back to held
    with a "release-reset" audit row naming the claim and warning that the
    message may have been delivered; a claim of 5 minutes is left alone;
    a second reset finds nothing; the row can be released again."""
    store.add_copies([copy(1), copy(2)])
    old, young = sorted(store.search(Search()), key=lambda r: r.queue_id)
    assert store.claim_release(old.id, "ann", "cli:ann@laptop") is not None
    assert store.claim_release(young.id, "bob", "cli:bob@host") is not None
    age_claims(store, old.id, 40 * 60)
    age_claims(store, young.id, 5 * 60)
    stuck = store.stuck_releases(Search(), 30 * 60)
    assert [s.row.id for s in stuck] == [old.id] and stuck[0].claimed_by == "ann"
    reset = store.reset_stuck_releases(Search(), 30 * 60, "carol", "cli:carol@host")
    assert [(r.id, r.status) for r in reset] == [(old.id, "held")]
    assert store.get(young.id).status == "releasing"  # type: ignore[union-attr]
    last = store.audit_rows(limit=1)[0]
    assert (last["action"], last["row_id"], last["actor"], last["origin"]) == (
        "release-reset", old.id, "carol", "cli:carol@host")
    assert "claimed at" in last["detail"] and "by ann (cli:ann@laptop)" in last["detail"]
    assert "did not finish" in last["detail"]
    assert "may already have been delivered" in last["detail"]
    assert store.reset_stuck_releases(Search(), 30 * 60, "carol", "cli") == []
    assert store.claim_release(old.id, "carol", "cli") is not None
    # The young claim is stuck too once it is older than the threshold.
    later = time.time() + 26 * 60
    assert [r.id for r in store.reset_stuck_releases(Search(), 30 * 60, "carol", "cli",
                                                     now=later)] == [young.id]


def test_finish_of_a_reset_claim_leaves_the_newer_claim_alone(store: ArchiveStore) -> None:
    """A release that outlived its claim (reset as stuck, then claimed by
    another admin) cannot finish the newer claim: neither mark the row
    released nor put it back to held under the release still running;
    the newer claim finishes normally; without a claim id the old check
    (status releasing) is all."""
    store.add_copies([copy(1)])
    [row] = store.search(Search())
    slow = store.claim_release(row.id, "ann", "cli:ann@laptop")
    assert slow is not None and slow.claim_id > 0 and slow.id == row.id
    age_claims(store, row.id, 40 * 60)
    assert [r.id for r in store.reset_stuck_releases(Search(), 30 * 60, "carol", "cli")] == [row.id]
    newer = store.claim_release(row.id, "bob", "cli:bob@host")
    assert newer is not None and newer.claim_id > slow.claim_id
    for ok in (False, True):
        with pytest.raises(NotReleasing, match="claimed again"):
            store.finish_release(row.id, "ann", "cli:ann@laptop", ok, "late", slow.claim_id)
        assert store.get(row.id).status == "releasing"  # type: ignore[union-attr]
    store.finish_release(row.id, "bob", "cli:bob@host", True, "250 ok", newer.claim_id)
    assert store.get(row.id).status == "released"  # type: ignore[union-attr]
    assert [a["action"] for a in store.audit_rows(limit=2)] == ["release", "release-claim"]


def test_fresh_claim_is_never_reset(store: ArchiveStore) -> None:
    """A release that is still running (claimed a second ago) is not reset,
    nor listed as stuck, whatever the filters; a row in releasing with no
    claim audit row at all counts as stuck."""
    store.add_copies([copy(1), copy(2)])
    running, orphan = sorted(store.search(Search()), key=lambda r: r.queue_id)
    assert store.claim_release(running.id, "ann", "cli") is not None
    m = store.tables.messages
    with store.engine.begin() as conn:  # releasing, but its claim was never audited
        conn.execute(m.update().where(m.c.id == orphan.id).values(status="releasing"))
    assert [s.row.id for s in store.stuck_releases(Search(), 30 * 60)] == [orphan.id]
    assert store.stuck_releases(Search(), 30 * 60)[0].claimed_at is None
    assert store.reset_stuck_releases(Search(ref="Q000001"), 30 * 60, "bob", "cli") == []
    reset = store.reset_stuck_releases(Search(), 30 * 60, "bob", "cli")
    assert [r.id for r in reset] == [orphan.id]
    assert "no claim recorded" in store.audit_rows(limit=1)[0]["detail"]
    assert store.get(running.id).status == "releasing"  # type: ignore[union-attr]
    store.finish_release(running.id, "ann", "cli", True, "250 ok")  # it finishes normally
    with pytest.raises(StoreError):
        store.reset_stuck_releases(Search(), -1, "bob", "cli")


def test_concurrent_resets_reset_each_row_once(stores: Stores) -> None:
    """Two threads (each with its own engine) resetting the same 20 stuck
    rows at the same moment: each row is reset by exactly one of them, with
    one "release-reset" audit row."""
    first, second = stores.make(), stores.make()
    first.add_copies([copy(i) for i in range(20)])
    ids = sorted(r.id for r in first.search(Search(limit=100)))
    for row_id in ids:
        assert first.claim_release(row_id, "gone", "cli:gone@laptop") is not None
    later = time.time() + 3600
    barrier = threading.Barrier(2, timeout=30)
    reset: dict[str, list[int]] = {"first": [], "second": []}
    errors: list[BaseException] = []

    def run(name: str, s: ArchiveStore) -> None:
        try:
            barrier.wait()
            for row_id in ids:  # row by row, so the two really interleave
                for row in s.reset_stuck_releases(Search(ids=(row_id,)), 1800, name, "test",
                                                  now=later):
                    reset[name].append(row.id)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n, s))
               for n, s in (("first", first), ("second", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(reset["first"] + reset["second"]) == ids
    audits = [a for a in first.audit_rows(limit=1000) if a["action"] == "release-reset"]
    assert sorted(a["row_id"] for a in audits) == ids
    assert {r.status for r in first.search(Search(limit=100))} == {"held"}


# -- delete, hold, audit ------------------------------------------------------------

def test_delete_skips_legal_hold_and_keeps_raw_while_a_row_lives(store: ArchiveStore) -> None:
    """Deleting one domain's row keeps the message for the other domain's
    row; a row on legal hold is not deleted; the last live row's deletion
    removes the raw message; each deleted row is audited."""
    store.add_copies([copy(1, recipients=("x@a.example", "y@b.example")), copy(2)])
    assert store.set_hold(Search(ref="Q000002"), True, "legal", "cli:legal@host") == 1
    assert store.delete(Search(domain="a.example"), "ann", "cli:ann@host") == 1
    b_row = store.search(Search(domain="b.example"))[0]
    assert store.raw(b_row).startswith(b"From: ")
    assert store.delete(Search(domain="b.example"), "ann", "cli:ann@host") == 1
    with pytest.raises(RawMissing):
        store.raw(b_row)
    assert refs(store.search(Search())) == ["2a"]
    assert count_rows(store, "raw") == 1
    actions = [(a["action"], a["rcpt_domain"]) for a in store.audit_rows()]
    assert actions == [("delete", "b.example"), ("delete", "a.example"), ("hold", "a.example")]
    assert store.delete(Search(), "ann", "cli:ann@host") == 0  # the held one stays


def test_delete_leaves_a_release_in_flight_alone(store: ArchiveStore) -> None:
    """A row being released is not deleted under its release, which then
    finishes normally."""
    store.add_copies([copy(1)])
    row = store.search(Search())[0]
    assert store.claim_release(row.id, "ann", "cli") is not None
    assert store.delete(Search(), "bob", "cli") == 0
    store.finish_release(row.id, "ann", "cli", True, "250 ok")
    assert store.delete(Search(), "bob", "cli") == 1


def test_set_hold_on_and_off(store: ArchiveStore) -> None:
    """Legal hold is set and cleared for every matching row (not just one
    page), counted once per change, and audited."""
    store.add_copies([copy(i) for i in range(60)])
    assert store.set_hold(Search(limit=5), True, "legal", "web:192.0.2.1") == 60
    assert store.set_hold(Search(), True, "legal", "web:192.0.2.1") == 0
    assert all(r.legal_hold for r in store.search(Search(limit=100)))
    assert store.set_hold(Search(ref="Q000007"), False, "legal", "web:192.0.2.1") == 1
    assert [a["action"] for a in store.audit_rows(limit=2)] == ["unhold", "hold"]
    assert len(store.audit_rows(limit=1000, action="hold")) == 60
    assert [a["queue_id"] for a in store.audit_rows(queue_id="Q000007")] == ["Q000007"] * 2


def test_audit_of_other_actions(store: ArchiveStore) -> None:
    """audit() records an action the store did not do (a forward, an
    export), with or without a row; audit_rows filters by domain."""
    store.add_copies([copy(1)])
    row = store.search(Search())[0]
    store.audit("ann", "cli:ann@host", "forward", row, "to boss@a.example")
    store.audit("ann", "cli:ann@host", "export", None, "12 messages")
    assert [(a["action"], a["row_id"]) for a in store.audit_rows()] == [
        ("export", None), ("forward", row.id)]
    assert [a["action"] for a in store.audit_rows(domains=("A.example",))] == ["forward"]


# -- purge ------------------------------------------------------------------------------

def test_purge_honours_retention_per_domain_and_legal_hold(store: ArchiveStore) -> None:
    """Rows past their domain's retention are purged in batches with their
    raw data; legal hold rows stay; a domain with 0 days is kept for ever."""
    store.add_copies(
        [copy(i, received=T0 - 40 * DAY, recipients=("x@a.example",)) for i in range(7)]
        + [copy(100 + i, received=T0 - 10 * DAY, recipients=("x@b.example",)) for i in range(3)]
        + [copy(200, received=T0 - 400 * DAY, recipients=("x@keep.example",))]
        + [copy(300, received=T0 - 5 * DAY, recipients=("x@a.example",))])
    store.set_hold(Search(ref="Q000003"), True, "legal", "cli")
    purged = store.purge(T0, 30, {"B.example": 7, "keep.example": 0}, batch=2)
    assert purged == 6 + 3
    left = sorted(r.queue_id for r in store.search(Search(limit=100)))
    assert left == ["Q000003", "Q000200", "Q000300"]
    assert count_rows(store, "raw") == 3
    purges = store.audit_rows(action="purge", limit=100)
    assert sum(int(a["detail"].split()[0]) for a in purges) == 9
    assert store.purge(T0, 30, {"b.example": 7, "keep.example": 0}, batch=2) == 0
    assert store.purge(T0 + 1000 * DAY, 0, {}, batch=2) == 0  # 0: keep everything


# -- message files -------------------------------------------------------------------------

def test_files_mode_writes_files_and_creates_raw_dir(stores: Stores) -> None:
    """With raw = "files" a missing raw_dir is created, each message is a
    compressed file named by its key (the row's data is NULL), read back
    whole; deleting the last row removes the file."""
    raw_dir = os.path.join(stores.tmp, "deep", "raw")
    store = stores.make(raw="files", raw_dir=raw_dir)
    assert os.path.isdir(raw_dir)
    store.add_copies([copy(1, recipients=("x@a.example", "y@b.example")), copy(2)])
    rows = store.search(Search())
    with store.engine.connect() as conn:
        assert conn.execute(select(store.tables.raw.c.data)).scalars().all() == [None, None]
    path = store.raw_path(rows[-1].raw_key)
    assert path.startswith(raw_dir) and os.path.isfile(path)
    assert zlib.decompress(Path(path).read_bytes()) == message()
    assert all(store.raw(r) == message() for r in rows)
    assert [p.name for p in Path(raw_dir).rglob("*.tmp")] == []
    store.delete(Search(ref="Q000001"), "ann", "cli")
    gone = [r for r in rows if r.queue_id == "Q000001"][0]
    assert not os.path.exists(store.raw_path(gone.raw_key))
    kept = [r for r in rows if r.queue_id == "Q000002"][0]
    assert os.path.isfile(store.raw_path(kept.raw_key))


def test_files_without_rows_are_swept_when_old(stores: Stores) -> None:
    """A message file no row names (a batch that never committed) is
    removed by the purge once older than ORPHAN_AGE; a young one, maybe a
    batch still committing, and files of live rows stay."""
    store = stores.make(raw="files")
    store.add_copies([copy(1, received=time.time())])
    live = store.raw_path(store.search(Search())[0].raw_key)
    old_orphan = store.raw_path(raw_key_for("edge1", "LOST1"))
    young_orphan = store.raw_path(raw_key_for("edge1", "LOST2"))
    stale_tmp = store.raw_path(raw_key_for("edge1", "LOST3")) + ".tmp"
    for p in (old_orphan, young_orphan, stale_tmp):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        Path(p).write_bytes(zlib.compress(b"x"))
    now = time.time()
    for p in (old_orphan, stale_tmp, live):
        os.utime(p, (now - ORPHAN_AGE - 10, now - ORPHAN_AGE - 10))
    store.purge(now, 30, {}, batch=100)
    assert os.path.exists(live) and os.path.exists(young_orphan)
    assert not os.path.exists(old_orphan) and not os.path.exists(stale_tmp)


# -- a database that is down ---------------------------------------------------------------------

class Relay:
    """A loopback TCP relay to MariaDB that can be cut, as a database
    server going away under an open store."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.stopped.is_set():
                client.close()
                return
            server = socket.create_connection(self.target, timeout=5)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.stopped.set()
        try:
            # Wakes the accept() of the relay's thread (a close alone would
            # not, and the port would go on accepting).
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_a_database_that_goes_down_raises_without_hanging(tmp_path: Path) -> None:
    """MariaDB cut away under an open store: add_copies raises a DBAPIError
    within the connect timeout, and nothing hangs."""
    url = require_mariadb()
    from sqlalchemy.engine import make_url
    real = make_url(url)
    relay = Relay((real.host or "127.0.0.1", real.port or 3306))
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    through = real.set(port=relay.port).render_as_string(hide_password=False)
    store = ArchiveStore(StoreConfig(url=through), str(tmp_path), table_prefix=prefix)
    cleaner = ArchiveStore(StoreConfig(url=url), str(tmp_path), table_prefix=prefix)
    try:
        store.open()
        assert store.add_copies([copy(1)]) == 1
        relay.cut()
        started = time.monotonic()
        with pytest.raises(DBAPIError):
            store.add_copies([copy(2)])
        assert time.monotonic() - started < 15
    finally:
        relay.cut()
        store.close()
        cleaner.drop_all()


def test_a_closed_port_fails_open_at_once(tmp_path: Path) -> None:
    """A MariaDB URL whose port is closed: open() raises an
    OperationalError at once, and the message hides the password."""
    store = ArchiveStore(StoreConfig(url=f"mysql+pymysql://u:sekrit@127.0.0.1:{free_port()}/x"),
                         str(tmp_path))
    started = time.monotonic()
    with pytest.raises(OperationalError):
        store.open()
    assert time.monotonic() - started < 10
    assert "sekrit" not in store.display_url


# -- subjects ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,expected", [
    (b"Subject: plain words\r\n\r\nbody", "plain words"),
    (b"subject:   folded\r\n\t over\r\n  lines  \r\n\r\n", "folded over lines"),
    (b"Subject: =?utf-8?q?R=C3=A9union?= =?utf-8?b?w6AgUGFyaXM=?=\r\n\r\n", "Réunionà Paris"),  # RFC 2047 6.2
    (b"Subject: =?iso-8859-1?q?caf=E9?= ok\r\n\r\n", "café ok"),
    (b"Subject: 8-bit \xe9t\xe9 junk\r\n\r\n", "8-bit \ufffdt\ufffd junk"),
    (b"Subject: UTF-8 \xc3\xa9t\xc3\xa9\r\n\r\n", "UTF-8 été"),
    (b"Subject: =?utf-8?b?####?=\r\n\r\n", None),
    (b"Subject: =?x-unknown-charset?q?abc?=\r\n\r\n", None),
    (b"Subject: =?utf-8?q?broken\r\n\r\n", "=?utf-8?q?broken"),
    (b"Subject: =?utf-8?b?/w==?=\r\n\r\n", None),
    (b"\r\nSubject: in the body\r\n", ""),
    (b"no header section at all", ""),
    (b"", ""),
    (b"From: a@b\r\nX-Subject: not this\r\n\r\nSubject: nor this\r\n", ""),
    (b"From: a@b\nSubject: bare LF\n\nbody", "bare LF"),
    (b"Subject: nul\x00byte\r\n\r\n", "nul\x00byte"),
    (b"Subject: " + b"long " * 300 + b"\r\n\r\n", ("long " * 300).strip()[:SUBJECT_LENGTH]),
])
def test_subjects(raw: bytes, expected: Optional[str]) -> None:
    """Subjects are decoded (RFC 2047), unfolded, whitespace folded and cut
    to 512 characters; garbage gives text or "" and never an exception."""
    found = subject_of(raw)
    assert isinstance(found, str) and len(found) <= SUBJECT_LENGTH
    if expected is not None:
        assert found == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.text(max_size=200))
def test_subject_never_raises(junk: bytes, words: str) -> None:
    """Any bytes at all, and any text in an encoded-word-looking Subject,
    give a string of at most 512 characters."""
    for raw in (junk, b"Subject: " + junk + b"\r\n\r\n",
                b"Subject: =?utf-8?q?" + words.encode("utf-8", "surrogatepass") + b"?=\r\n\r\n",
                b"Subject: =?" + junk + b"?=\r\n\r\n"):
        assert len(subject_of(raw)) <= SUBJECT_LENGTH


def test_stored_subject_is_decoded(store: ArchiveStore) -> None:
    """add_copies stores the decoded subject, and a message without one is
    stored with an empty subject."""
    store.add_copies([copy(1, subject="=?utf-8?b?w6l0w6k=?="), copy(2, raw=b"garbage\xff")])
    assert {r.queue_id: r.subject for r in store.search(Search())} == {"Q000001": "été",
                                                                      "Q000002": ""}


# -- mppproxy db ------------------------------------------------------------------------------

def write_config(tmp: Path, store_section: str) -> str:
    path = tmp / "mpp.toml"
    path.write_text(f'data_dir = "{tmp / "data"}"\n[store]\n{store_section}\n')
    return str(path)


def test_db_current_and_upgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``mppproxy db current`` reports an empty store without creating it;
    ``upgrade`` creates the schema (exit 0) and says so; again, it is
    already current."""
    config = write_config(tmp_path, "")
    assert cli.main(["db", "current", "--config", config]) == 0
    assert "revision none (empty)" in capsys.readouterr().out
    assert not (tmp_path / "data").exists()
    assert cli.main(["db", "upgrade", "--config", config]) == 0
    assert "upgraded from revision none (empty) to 0004" in capsys.readouterr().out
    assert cli.main(["db", "upgrade", "-c", config]) == 0
    assert "already at revision 0004" in capsys.readouterr().out
    assert cli.main(["db", "current", "-c", config]) == 0
    assert "revision 0004 (newest)" in capsys.readouterr().out


def test_db_upgrade_on_a_database_that_is_down(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A database that cannot be reached: exit 1, one line naming the store's
    URL without its password, no traceback."""
    url = f"mysql+pymysql://mpp:sekrit@127.0.0.1:{free_port()}/archive"
    config = write_config(tmp_path, f'url = "{url}"')
    assert cli.main(["db", "upgrade", "--config", config]) == 1
    err = capsys.readouterr().err
    assert "mysql+pymysql://mpp:***@127.0.0.1" in err and "[store] url" in err
    assert "sekrit" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_db_usage_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No --config, or a configuration with errors: exit 2."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["db", "upgrade"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        cli.main(["db"])
    assert exited.value.code == 2
    assert cli.main(["db", "current", "--config", write_config(tmp_path, "raw = 'tape'")]) == 2
    assert "store.raw" in capsys.readouterr().err
    assert cli.main(["db", "current", "--config", str(tmp_path / "missing.toml")]) == 2
