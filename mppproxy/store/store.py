"""The quarantine and archive store (issue 12): the archive node's writer
puts copies in (``add_copies``), the quarantine CLI and the web console
search, read, release, delete and hold them, and a timer purges them.
Floor 1 (a leaf): it takes plain values (``NewCopy``) and knows nothing of
the SMTP stages, the queue or the signed state that produced them.

Every method blocks (SQLAlchemy, disk): callers run them in a thread pool.
One engine, a connection per call: the store is thread-safe, and several
processes (archive nodes writing one MariaDB) may use one database.

Promises kept here (docs/design.md, promise 1, "nothing accepted is lost";
the issue's "nothing stored twice"):

* ``add_copies`` is one transaction: a batch is stored whole or not at
  all, and a database error goes up so the writer keeps the copies queued
  and tries again.  A copy stored before (same node, queue id, recipient
  domain) is skipped by the database's unique key (``ON CONFLICT DO
  NOTHING`` on SQLite, ``INSERT IGNORE`` on MariaDB), so a retried batch
  or two writers holding the same copy store it once.
* With ``raw = "files"`` the message file is written, fsync'ed, renamed
  and its directory fsync'ed before the row that names it commits.  Each
  write gets a new key, so a file being deleted is never one a concurrent
  writer has just written; a file whose row never committed is harmless
  and the purge removes it.
* ``claim_release`` moves one row from held to releasing with a single
  conditional UPDATE: of two admins releasing at once, one wins (the
  issue's exactly-once release; Proxmox MG bug #6126).
* ``reset_stuck_releases`` is the way out for a row whose releasing
  process died between claim and finish (SIGKILL, power cut, a laptop
  closed): a row in releasing whose newest "release-claim" audit row is
  older than a threshold goes back to held, audited "release-reset".  The
  same kind of conditional UPDATE decides (still releasing, and no claim
  newer than the threshold), so a release still running is never reset and
  two resets at once reset a row once.  What it cannot know is whether the
  dead release had already delivered; its audit row says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Optional, Sequence

from sqlalchemy import (ColumnElement, Select, and_, delete, false, func, insert, not_, or_,
                        select, true, update)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError, OperationalError

from mppproxy.config.archive import StoreConfig
from mppproxy.config.database import DatabaseConfig
from mppproxy.db.engine import WRITE, database_url, make_engine
from mppproxy.spool.durable import fsync_dir
from mppproxy.store import migrate
from mppproxy.store.compress import compress_message
from mppproxy.store.schema import (ACTOR_LENGTH, CLIENT_IP_LENGTH, DELETED, DOMAIN_LENGTH,
                                   HELD, HELO_LENGTH, NODE_LENGTH, QUEUE_ID_LENGTH,
                                   REASON_LENGTH, RELEASED, RELEASING, SENDER_LENGTH,
                                   VERDICT_LENGTH, ArchiveTables)
from mppproxy.store.subject import subject_of

# Rows changed per transaction by delete and set_hold (a bulk form over a
# whole domain must not hold SQLite's write lock for seconds).
CHANGE_BATCH = 1000
# A message file with no row, older than this, is an orphan the purge
# removes (younger ones may belong to a batch still being committed).
ORPHAN_AGE = 3600.0
# MariaDB errors after which add_copies tries its transaction again at
# once: a deadlock (1213) or a lock wait timeout (1205) between writers.
RETRY_ERRORS = (1205, 1213)
ADD_TRIES = 3
# SQLite's limit on bound values per statement is 32766 (3.32+); IN
# lists stay well below it.
IN_CHUNK = 500
# A SELECT the server stopped at its time bound: MariaDB's
# ER_STATEMENT_TIMEOUT, MySQL's ER_QUERY_TIMEOUT.
STATEMENT_TIMEOUT_ERRORS = (1969, 3024)
# The audit actions of a release's claim and of its reset (reset_stuck_releases).
CLAIM_ACTION = "release-claim"
RESET_ACTION = "release-reset"


class StoreError(Exception):
    """The store cannot do what was asked (not a database failure)."""


class SchemaNotCurrent(StoreError):
    """The database's schema is not the one this version needs, and
    ``auto_upgrade`` is off."""


class RawMissing(StoreError):
    """A row's raw message is gone (deleted, purged)."""


class NotReleasing(StoreError):
    """``finish_release`` for a row that was not claimed."""


@dataclass(frozen=True)
class NewCopy:
    """One message as the writer hands it over (plain values: the store
    imports nothing of ``archive/``)."""

    node: str
    queue_id: str
    received: float  # epoch seconds, UTC
    client: str
    helo: Optional[str]
    tls: bool
    sender: str
    recipients: tuple[str, ...]
    policy: Optional[str]
    verdict: str
    disposition: str
    score: float
    reasons: tuple[str, ...]
    state_json: str  # the whole state, JSON text
    message: bytes  # the raw message (header + body, CRLF)


@dataclass(frozen=True)
class PreparedCopies:
    """Copies ready for their transaction (``ArchiveStore.prepare_copies``):
    the rows not stored yet, their raw rows, and the compressed messages
    by raw key."""

    rows: list[dict[str, Any]]
    raws: list[dict[str, Any]]
    data: dict[str, bytes]


@dataclass(frozen=True)
class StoredRow:
    """One stored (message, recipient domain) row, as lists show it."""

    id: int
    node: str
    queue_id: str
    rcpt_domain: str
    received: float
    sender: str
    recipients: tuple[str, ...]
    subject: str
    verdict: str
    disposition: str
    score: float
    reason: str
    client_ip: str
    helo: Optional[str]
    size: int
    status: str
    legal_hold: bool
    released_at: Optional[float]
    raw_key: str

    def to_json(self) -> dict[str, Any]:
        """For ``--json`` and the web API: plain JSON values, times as
        epoch seconds and as ISO 8601 UTC."""
        out = asdict(self)
        out["recipients"] = list(self.recipients)
        out["received_iso"] = _iso(self.received)
        out["released_at_iso"] = _iso(self.released_at) if self.released_at is not None else None
        return out


@dataclass(frozen=True)
class ClaimedRow(StoredRow):
    """A row ``claim_release`` moved to releasing, with its claim: the id of
    the claim's audit row.  ``finish_release`` given it finishes only that
    claim: not one made after a stuck-release reset took this one back."""

    claim_id: int = 0


@dataclass(frozen=True)
class StuckRelease:
    """A row left in releasing, with its newest claim ("release-claim"
    audit row; all None when there is none)."""

    row: StoredRow
    claimed_at: Optional[float]
    claimed_by: Optional[str]  # the claim's actor
    claimed_from: Optional[str]  # the claim's origin

    def detail(self) -> str:
        """What the reset's audit row (and the CLI's line) says."""
        if self.claimed_at is None:
            claim = "the release of this row (no claim recorded)"
        else:
            when = datetime.fromtimestamp(self.claimed_at, timezone.utc)
            claim = (f"the release claimed at {when:%Y-%m-%d %H:%M:%S} UTC by "
                     f"{self.claimed_by} ({self.claimed_from})")
        # It may have died after the route's 250 and before finish_release.
        return f"{claim} did not finish; the message may already have been delivered"


@dataclass(frozen=True)
class Search:
    """What to find; every field given must match (AND).

    ``sender`` and ``rcpt``: an exact address, ``@domain`` for a whole
    domain, or a pattern with ``*`` globs; ``subject``: a substring (case
    does not matter); ``reason``: a substring of the reasons, or the
    verdict itself; ``ref``: the queue id.  ``domains`` is an admin's
    scope (rcpt_domain IN ...), ANDed with ``domain``.  Pages come newest
    first; ``before_id`` is the last id of the previous page."""

    domain: Optional[str] = None
    since: Optional[float] = None
    until: Optional[float] = None
    sender: Optional[str] = None
    rcpt: Optional[str] = None
    subject: Optional[str] = None
    reason: Optional[str] = None
    ref: Optional[str] = None
    status: Optional[tuple[str, ...]] = (HELD, RELEASING, RELEASED)
    ids: Optional[tuple[int, ...]] = None
    limit: int = 50
    before_id: Optional[int] = None
    domains: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class Tally:
    """The list's counts (``ArchiveStore.tally``): matching rows, and per
    verdict and per reason (most first), over the newest ``total`` when
    ``capped``."""

    total: int
    capped: bool
    by_verdict: list[tuple[str, int]]
    by_reason: list[tuple[str, int]]


def _ranked(groups: Sequence[tuple[str, str, int]], key: int) -> list[tuple[str, int]]:
    """(verdict, reason, n) groups summed by one of the two, most first."""
    sums: dict[str, int] = {}
    for group in groups:
        name = str(group[key])
        sums[name] = sums.get(name, 0) + group[2]
    return sorted(sums.items(), key=lambda item: (-item[1], item[0]))


def raw_key_for(node: str, queue_id: str) -> str:
    """A new key for a message's raw data: a digest of (node, queue id),
    so files spread evenly over ``raw_dir``'s 256 subdirectories, then a
    random part, so no two writes ever share a key (or a file name)."""
    digest = hashlib.sha256(f"{node}\0{queue_id}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{digest[:32]}{secrets.token_hex(8)}"


def domain_of(address: str) -> str:
    """The lower-cased domain of a recipient ("" for ``<postmaster>``,
    RFC 5321 4.1.1.3)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


class ArchiveStore:
    """The store (module docstring).  Construction does no I/O; ``open``
    makes the engine and checks (or upgrades) the schema."""

    def __init__(self, config: StoreConfig, data_dir: str, table_prefix: str = "") -> None:
        self.config = config
        self.data_dir = data_dir
        self.tables = ArchiveTables(table_prefix)
        self.url = database_url(DatabaseConfig(url=config.url), data_dir, "archive.sqlite")
        # Relative to data_dir, like the store's SQLite file.
        self.raw_dir = os.path.join(data_dir, config.raw_dir or "archive-raw")
        self.files = config.raw == "files"
        self._engine: Optional[Engine] = None

    @property
    def display_url(self) -> str:
        """The URL for messages, without its password."""
        return self.url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise StoreError("the archive store is not open")
        return self._engine

    # -- life --------------------------------------------------------------

    def open(self) -> None:
        """Make the engine; bring the schema up to date (``auto_upgrade``)
        or refuse a database that is not.  Raises ``DBAPIError`` when the
        database cannot be reached, ``SchemaNotCurrent`` when it is behind."""
        if self._engine is not None:
            return
        if self.url.get_backend_name() == "sqlite" and self.url.database:
            os.makedirs(os.path.dirname(self.url.database), exist_ok=True)
        engine = make_engine(self.url, DatabaseConfig(url=self.config.url,
                                                      sqlite_in_reactor=False), durable=True)
        prefix = self.tables.prefix
        try:
            if self.config.auto_upgrade:
                migrate.upgrade(engine, prefix)
            else:
                found = migrate.current(engine, prefix)
                if found != migrate.head():
                    raise SchemaNotCurrent(
                        f"the archive store at {self.display_url} is at revision "
                        f"{found or 'none (empty)'}, this version needs {migrate.head()}: "
                        f"run 'mppproxy db upgrade --config FILE' ([store] auto_upgrade is off)")
            if self.files and not os.path.isdir(self.raw_dir):
                os.makedirs(self.raw_dir, exist_ok=True)
                fsync_dir(os.path.dirname(os.path.abspath(self.raw_dir)))
        except BaseException:
            engine.dispose()
            raise
        self._engine = engine

    def schema_revision(self) -> Optional[str]:
        """The database's schema revision (None: no store yet), with an
        engine of its own when the store is not open (``mppproxy db
        current``)."""
        if (self.url.get_backend_name() == "sqlite" and self.url.database
                and not os.path.exists(self.url.database)):
            return None  # asking must not create the file
        with self._some_engine() as engine:
            return migrate.current(engine, self.tables.prefix)

    def upgrade_schema(self) -> tuple[Optional[str], str]:
        """Bring the schema to the newest revision (``mppproxy db
        upgrade``); (revision before, revision after)."""
        if self.url.get_backend_name() == "sqlite" and self.url.database:
            os.makedirs(os.path.dirname(self.url.database), exist_ok=True)
        with self._some_engine() as engine:
            before = migrate.current(engine, self.tables.prefix)
            migrate.upgrade(engine, self.tables.prefix)
            after = migrate.current(engine, self.tables.prefix)
        return before, after or ""

    @contextmanager
    def _some_engine(self) -> Iterator[Engine]:
        if self._engine is not None:
            yield self._engine
            return
        engine = make_engine(self.url, DatabaseConfig(url=self.config.url,
                                                      sqlite_in_reactor=False), durable=True)
        try:
            yield engine
        finally:
            engine.dispose()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def drop_all(self) -> None:
        """Drop the store's tables and version table (tests; a site that
        removes the store).  Blocking; the store may be closed."""
        with self._some_engine() as engine:
            with engine.connect() as conn:
                conn.execution_options(**WRITE)
                with conn.begin():
                    self.tables.metadata.drop_all(conn)
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {self.tables.version_table}")

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A writing transaction (SQLite: BEGIN IMMEDIATE), committed at
        the end of the block, rolled back if it raises."""
        with self.engine.connect() as conn:
            conn.execution_options(**WRITE)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            with conn.begin():
                yield conn

    @property
    def _mysql(self) -> bool:
        return self.engine.dialect.name in ("mysql", "mariadb")

    # -- writing copies ------------------------------------------------------

    def add_copies(self, copies: Sequence[NewCopy]) -> int:
        """Store ``copies`` in one transaction, one row per (copy,
        recipient domain), the raw message once per copy; rows stored
        before are skipped.  Returns the rows inserted."""
        return self.store_prepared(self.prepare_copies(copies))

    def prepare_copies(self, copies: Sequence[NewCopy]) -> PreparedCopies:
        """The first half of ``add_copies``, which writes nothing: the
        rows, and the raw messages compressed (blocking: asks the database
        which rows it has).  The writer prepares the next batch while the
        database stores the last (``archive/writer.py``)."""
        if not copies:
            return PreparedCopies([], [], {})
        rows, messages = self._rows_of(copies)
        # Work a retried batch need not do again (compressing, writing
        # files) is skipped for the rows found here; the unique key still
        # decides, in the transaction, for a copy another writer stores
        # meanwhile (or since this was prepared).
        existing = self._existing({(r["queue_id"], r["node"]) for r in rows})
        rows = [r for r in rows if (r["queue_id"], r["node"], r["rcpt_domain"]) not in existing]
        raws: list[dict[str, Any]] = []
        data: dict[str, bytes] = {}
        for key in dict.fromkeys(r["raw_key"] for r in rows):
            message = messages[key]
            compressed = compress_message(message)
            raws.append({"raw_key": key, "data": None if self.files else compressed,
                         "size": len(message)})
            data[key] = compressed
        return PreparedCopies(rows, raws, data)

    def store_prepared(self, prepared: PreparedCopies) -> int:
        """The second half of ``add_copies``: the raw files (``raw =
        "files"``) and the one transaction.  Returns the rows inserted."""
        if not prepared.rows:
            return 0
        data = prepared.data
        if self.files:
            self._write_files(data)
        try:
            inserted, unused = self._insert_with_retry(prepared.rows, prepared.raws)
        except BaseException:
            if self.files:
                self._remove_files(list(data))  # no row names them
            raise
        if self.files:
            self._remove_files(unused)
        return inserted

    def _insert_with_retry(self, rows: list[dict[str, Any]],
                           raws: list[dict[str, Any]]) -> tuple[int, list[str]]:
        for attempt in range(ADD_TRIES):
            try:
                return self._insert(rows, raws)
            except OperationalError as e:
                if attempt + 1 == ADD_TRIES or _mysql_errno(e) not in RETRY_ERRORS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _rows_of(self, copies: Sequence[NewCopy]) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
        rows: list[dict[str, Any]] = []
        messages: dict[str, bytes] = {}
        for copy in copies:
            key = raw_key_for(copy.node, copy.queue_id)
            messages[key] = copy.message
            by_domain: dict[str, list[str]] = {}
            for rcpt in copy.recipients:
                by_domain.setdefault(domain_of(rcpt)[:DOMAIN_LENGTH], []).append(rcpt)
            subject = subject_of(copy.message)
            received = _utc(copy.received)
            for domain, rcpts in by_domain.items():
                rows.append({
                    "node": copy.node[:NODE_LENGTH], "queue_id": copy.queue_id[:QUEUE_ID_LENGTH],
                    "rcpt_domain": domain, "received": received,
                    "sender": copy.sender[:SENDER_LENGTH], "recipients": ", ".join(rcpts),
                    "subject": subject, "verdict": copy.verdict[:VERDICT_LENGTH],
                    "disposition": copy.disposition[:VERDICT_LENGTH], "score": float(copy.score),
                    "reason": "; ".join(copy.reasons)[:REASON_LENGTH],
                    "client_ip": copy.client[:CLIENT_IP_LENGTH],
                    "helo": None if copy.helo is None else copy.helo[:HELO_LENGTH],
                    "size": len(copy.message), "status": HELD, "legal_hold": False,
                    "released_at": None, "state": copy.state_json, "raw_key": key})
        return rows, messages

    def _existing(self, refs: set[tuple[str, str]]) -> set[tuple[str, str, str]]:
        """(queue_id, node, rcpt_domain) of the rows stored for ``refs``."""
        m = self.tables.messages
        found: set[tuple[str, str, str]] = set()
        queue_ids = sorted({q for q, _ in refs})
        with self._read() as conn:
            for chunk in _chunks(queue_ids, IN_CHUNK):
                for q, n, d in conn.execute(select(m.c.queue_id, m.c.node, m.c.rcpt_domain)
                                            .where(m.c.queue_id.in_(chunk))):
                    if (q, n) in refs:
                        found.add((q, n, d))
        return found

    def _insert(self, rows: list[dict[str, Any]],
                raws: list[dict[str, Any]]) -> tuple[int, list[str]]:
        """The transaction of ``add_copies``: (rows inserted, keys of raw
        data no inserted row uses, to remove)."""
        m, r = self.tables.messages, self.tables.raw
        with self._write() as conn:
            conn.execute(insert(r), raws)
            inserted = conn.execute(self._insert_ignore(), rows).rowcount
            unused: list[str] = []
            if inserted < len(rows):
                # Another writer stored some of these copies first: raw
                # data that no row of ours uses goes again.
                keys = {row["raw_key"] for row in rows}
                used: set[str] = set()
                for chunk in _chunks(sorted(keys), IN_CHUNK):
                    used.update(conn.execute(select(m.c.raw_key).where(m.c.raw_key.in_(chunk)))
                                .scalars())
                gone = sorted(keys - used)
                for chunk in _chunks(gone, IN_CHUNK):
                    conn.execute(delete(r).where(r.c.raw_key.in_(chunk)))
                unused = gone
        return inserted, unused

    def _insert_ignore(self) -> Any:
        m = self.tables.messages
        if self.engine.dialect.name == "sqlite":
            # Only the unique key's conflict is skipped (INSERT OR IGNORE
            # would skip a NOT NULL violation too).
            return sqlite_dialect.insert(m).on_conflict_do_nothing()
        if self._mysql:
            # MariaDB has no DO NOTHING; IGNORE also turns other errors
            # into warnings, which _rows_of rules out by cutting every value
            # to its column and never passing NULL to a NOT NULL column.
            # The affected-row count is then the rows inserted (ON DUPLICATE
            # KEY UPDATE id = id would count the skipped ones too, with the
            # FOUND_ROWS flag SQLAlchemy sets).
            return insert(m).prefix_with("IGNORE")
        raise StoreError(f"database {self.engine.dialect.name!r} is not supported")

    # -- message files (raw = "files") -----------------------------------------

    def raw_path(self, key: str) -> str:
        return os.path.join(self.raw_dir, key[:2], f"{key}.z")

    def _write_files(self, data: dict[str, bytes]) -> None:
        """Each file written to a temporary name, fsync'ed, renamed; then
        each directory touched fsync'ed once (the renames survive a crash)."""
        dirs: set[str] = set()
        for key, blob in data.items():
            path = self.raw_path(key)
            folder = os.path.dirname(path)
            if folder not in dirs and not os.path.isdir(folder):
                os.makedirs(folder, exist_ok=True)
                fsync_dir(self.raw_dir)
            tmp = f"{path}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            dirs.add(folder)
        for folder in dirs:
            fsync_dir(folder)

    def _remove_files(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                os.unlink(self.raw_path(key))
            except FileNotFoundError:
                pass

    # -- reading -------------------------------------------------------------

    def _where(self, s: Search) -> list[ColumnElement[bool]]:
        m = self.tables.messages
        where: list[ColumnElement[bool]] = []
        if s.domain is not None:
            where.append(m.c.rcpt_domain == s.domain.lower())
        if s.domains is not None:
            where.append(m.c.rcpt_domain.in_([d.lower() for d in s.domains]))
        if s.since is not None:
            where.append(m.c.received >= _utc(s.since))
        if s.until is not None:
            where.append(m.c.received < _utc(s.until))
        if s.sender:
            where.append(_address_match(m.c.sender, s.sender, single=True))
        if s.rcpt:
            where.append(_address_match(m.c.recipients, s.rcpt, single=False))
        if s.subject:
            where.append(m.c.subject.icontains(s.subject, autoescape=True))
        if s.reason:
            where.append(or_(m.c.reason.icontains(s.reason, autoescape=True),
                             m.c.verdict == s.reason))
        if s.ref is not None:
            where.append(m.c.queue_id == s.ref)
        if s.status is not None:
            where.append(m.c.status.in_(s.status))
        if s.ids is not None:
            where.append(m.c.id.in_(s.ids))
        return where

    def _row_columns(self) -> list[Any]:
        m = self.tables.messages
        return [c for c in m.c if c.name != "state"]

    def search(self, s: Search) -> list[StoredRow]:
        """Rows matching ``s``, newest first, at most ``s.limit``."""
        m = self.tables.messages
        with self._read() as conn:
            where = self._where(s)
            if s.before_id is not None:
                before = conn.execute(select(m.c.received).where(m.c.id == s.before_id)).scalar()
                if before is None:
                    where.append(m.c.id < s.before_id)
                else:
                    where.append(or_(m.c.received < before,
                                     and_(m.c.received == before, m.c.id < s.before_id)))
            query = (select(*self._row_columns()).where(*where)
                     .order_by(m.c.received.desc(), m.c.id.desc()).limit(max(0, s.limit)))
            return [_stored(row) for row in conn.execute(query)]

    def count(self, s: Search) -> int:
        m = self.tables.messages
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(m)
                                    .where(*self._where(s))).scalar_one())

    # Columns count_by may group on (the web console's counts per reason).
    COUNT_COLUMNS = ("verdict", "reason", "rcpt_domain", "status", "disposition")

    def count_by(self, s: Search, column: str, limit: int = 20) -> list[tuple[str, int]]:
        """Rows matching ``s`` (limit and paging ignored) per value of
        ``column``, the most frequent first, at most ``limit`` values."""
        if column not in self.COUNT_COLUMNS:
            raise StoreError(f"cannot count by {column!r}")
        m = self.tables.messages
        key = m.c[column]
        n = func.count().label("n")
        query = (select(key, n).where(*self._where(s)).group_by(key)
                 .order_by(n.desc(), key).limit(max(1, limit)))
        with self._read() as conn:
            return [(str(value), int(count)) for value, count in conn.execute(query)]

    def tally(self, s: Search, cap: int, seconds: Optional[float] = None) -> Optional["Tally"]:
        """The list's counts in one query: the rows matching ``s`` (limit
        and paging ignored), per verdict and per reason -- over the newest
        ``cap`` of them only (``Tally.capped``: ``cap`` or more match).  A
        count of every matching row reads each of them whenever the list
        is shown: with a million rows, seconds (benchmarks/console_bench.py);
        the newest ``cap`` come in the order of the index the list uses.

        ``seconds`` bounds the query on MariaDB/MySQL (the server stops it:
        max_statement_time, max_execution_time); None when it ran out -- a
        filter the indexes do not narrow (a subject, a reason) may read
        far more rows than it finds.  SQLite is not bounded."""
        m = self.tables.messages
        newest = (select(m.c.verdict, m.c.reason).where(*self._where(s))
                  .order_by(m.c.received.desc(), m.c.id.desc()).limit(max(1, cap))
                  .subquery())
        query = (select(newest.c.verdict, newest.c.reason, func.count().label("n"))
                 .group_by(newest.c.verdict, newest.c.reason))
        bound = self._statement_bound(seconds)
        with self._read() as conn:
            if bound:
                conn.exec_driver_sql(bound[0])
            try:
                groups = [(str(v), str(r or ""), int(n)) for v, r, n in conn.execute(query)]
            except OperationalError as e:
                if _mysql_errno(e) not in STATEMENT_TIMEOUT_ERRORS:
                    raise
                return None
            finally:
                if bound:
                    conn.exec_driver_sql(bound[1])
        total = sum(n for _, _, n in groups)
        return Tally(total, total >= max(1, cap), _ranked(groups, 0), _ranked(groups, 1))

    def _statement_bound(self, seconds: Optional[float]) -> Optional[tuple[str, str]]:
        """The statements that set and reset a session's time bound on
        SELECTs, or None (no bound asked, or SQLite)."""
        if seconds is None or not self._mysql:
            return None
        if getattr(self.engine.dialect, "is_mariadb", False):
            return (f"SET SESSION max_statement_time = {max(0.000001, seconds):.6f}",
                    "SET SESSION max_statement_time = 0")
        return (f"SET SESSION max_execution_time = {max(1, int(seconds * 1000))}",
                "SET SESSION max_execution_time = 0")

    def get(self, row_id: int) -> Optional[StoredRow]:
        """The row ``row_id`` whatever its status (deleted too)."""
        m = self.tables.messages
        with self._read() as conn:
            row = conn.execute(select(*self._row_columns()).where(m.c.id == row_id)).first()
        return None if row is None else _stored(row)

    def raw(self, row: StoredRow) -> bytes:
        """The message, decompressed.  ``RawMissing`` when it was removed."""
        r = self.tables.raw
        with self._read() as conn:
            found = conn.execute(select(r.c.data, r.c.size)
                                 .where(r.c.raw_key == row.raw_key)).first()
        if found is None:
            raise RawMissing(f"the message of row {row.id} (ref {row.queue_id}) is no longer stored")
        blob = found.data
        if blob is None:
            try:
                with open(self.raw_path(row.raw_key), "rb") as f:
                    blob = f.read()
            except FileNotFoundError:
                raise RawMissing(f"the message file of row {row.id} (ref {row.queue_id}) "
                                 f"is missing: {self.raw_path(row.raw_key)}") from None
        return zlib.decompress(blob)

    def state(self, row: StoredRow) -> dict[str, Any]:
        """The copy's whole state (``X-MPP-*``), parsed from its JSON."""
        m = self.tables.messages
        with self._read() as conn:
            text = conn.execute(select(m.c.state).where(m.c.id == row.id)).scalar()
        if text is None:
            raise StoreError(f"row {row.id} is no longer stored")
        parsed = json.loads(text)
        if not isinstance(parsed, dict):
            raise StoreError(f"row {row.id}: the stored state is not a JSON object")
        return parsed

    # -- release -------------------------------------------------------------

    def claim_release(self, row_id: int, actor: str, origin: str) -> Optional[ClaimedRow]:
        """held -> releasing, atomically; the row with its claim, or None
        when it is not held (another admin claimed it first, released,
        deleted)."""
        m = self.tables.messages
        with self._write() as conn:
            # One conditional UPDATE decides: the second of two racing
            # transactions waits for the first's row lock (MariaDB) or
            # write lock (SQLite), then finds the row no longer held.
            changed = conn.execute(update(m).where(m.c.id == row_id, m.c.status == HELD)
                                   .values(status=RELEASING)).rowcount
            if changed != 1:
                return None
            row = _stored(conn.execute(select(*self._row_columns())
                                       .where(m.c.id == row_id)).one())
            claim_id = self._audit(conn, actor, origin, CLAIM_ACTION, row, "")
        return ClaimedRow(**vars(row), claim_id=claim_id)

    def finish_release(self, row_id: int, actor: str, origin: str, ok: bool, detail: str,
                       claim_id: Optional[int] = None) -> None:
        """releasing -> released (``ok``) or back to held; audited.

        ``claim_id`` (``ClaimedRow.claim_id``): only while that claim is the
        row's newest.  A release that ran so long that a stuck-release reset
        took its claim back, and another admin claimed the row since, must
        neither mark that release done nor put the row back to held under
        it (the row could then be released a third time): NotReleasing."""
        m, a = self.tables.messages, self.tables.audit
        values: dict[str, Any] = ({"status": RELEASED, "released_at": _utc(time.time())}
                                  if ok else {"status": HELD})
        conditions: list[ColumnElement[bool]] = [m.c.id == row_id, m.c.status == RELEASING]
        with self._write() as conn:
            if claim_id is not None:
                # Audit ids only grow: a later claim of the row has a larger
                # one.  Found through the audit's queue_id index (there is
                # none on row_id).
                queue_id = conn.execute(select(m.c.queue_id).where(m.c.id == row_id)).scalar()
                conditions.append(~select(a.c.id).where(
                    a.c.queue_id == queue_id, a.c.row_id == row_id,
                    a.c.action == CLAIM_ACTION, a.c.id > claim_id).exists())
            changed = conn.execute(update(m).where(*conditions).values(**values)).rowcount
            if changed != 1:
                raise NotReleasing(f"row {row_id} is not being released"
                                   + (" under this claim (it was reset and claimed again)"
                                      if claim_id is not None else ""))
            row = _stored(conn.execute(select(*self._row_columns())
                                       .where(m.c.id == row_id)).one())
            self._audit(conn, actor, origin, "release" if ok else "release-failed", row, detail)

    # -- stuck releases ----------------------------------------------------------

    def stuck_releases(self, s: Search, older_than: float,
                       now: Optional[float] = None) -> list[StuckRelease]:
        """The rows matching ``s`` that ``reset_stuck_releases`` would
        reset now (a dry run), oldest id first; changes nothing."""
        cutoff = self._stuck_cutoff(older_than, now)
        m = self.tables.messages
        found: list[StuckRelease] = []
        after = 0
        for _ in range(1_000_000):  # bounded: each pass moves `after` on
            with self._read() as conn:
                rows = self._matching_ids(conn, s, [m.c.status == RELEASING], after, lock=False)
                if not rows:
                    break
                after = rows[-1].id
                found.extend(self._stuck_of(conn, rows, cutoff))
            if len(rows) < CHANGE_BATCH:
                break
        return found

    def reset_stuck_releases(self, s: Search, older_than: float, actor: str, origin: str,
                             now: Optional[float] = None) -> list[StoredRow]:
        """releasing -> held for the rows matching ``s`` (limit and paging
        ignored, as the bulk forms do) whose newest release claim is older
        than ``older_than`` seconds before ``now``, or that have no claim
        audit row at all: their releasing process died between
        ``claim_release`` and ``finish_release``.  One "release-reset"
        audit row each (``StuckRelease.detail``).  Returns the rows reset,
        now held.

        Per row, one conditional UPDATE decides (status still releasing,
        no claim at or after the cutoff): a release still running, or
        claimed again since the row was read, is left alone, and of two
        resets at once only one changes the row (rowcount, as in
        ``claim_release``).  On MariaDB the rows are also locked (SELECT
        ... FOR UPDATE) from the read to the commit.  Claim times are the
        claiming host's clock: with MariaDB shared by several hosts, keep
        ``older_than`` well above their clock differences."""
        cutoff = self._stuck_cutoff(older_than, now)
        m, a = self.tables.messages, self.tables.audit
        reset: list[StoredRow] = []
        after = 0
        for _ in range(1_000_000):  # bounded: each pass moves `after` on
            with self._write() as conn:
                rows = self._matching_ids(conn, s, [m.c.status == RELEASING], after)
                if not rows:
                    break
                after = rows[-1].id
                for stuck in self._stuck_of(conn, rows, cutoff):
                    row = stuck.row
                    # The audit's queue_id index finds the row's claims
                    # (there is none on row_id).
                    fresh = (select(a.c.id)
                             .where(a.c.queue_id == row.queue_id, a.c.row_id == row.id,
                                    a.c.action == CLAIM_ACTION, a.c.at >= cutoff)
                             .exists())
                    changed = conn.execute(update(m).where(m.c.id == row.id,
                                                           m.c.status == RELEASING, ~fresh)
                                           .values(status=HELD)).rowcount
                    if changed != 1:
                        continue  # another reset was first, or a release claimed it anew
                    now_held = _stored(conn.execute(select(*self._row_columns())
                                                    .where(m.c.id == row.id)).one())
                    self._audit(conn, actor, origin, RESET_ACTION, now_held, stuck.detail())
                    reset.append(now_held)
            if len(rows) < CHANGE_BATCH:
                break
        return reset

    @staticmethod
    def _stuck_cutoff(older_than: float, now: Optional[float]) -> datetime:
        if older_than < 0:
            raise StoreError(f"older_than must not be negative ({older_than:g} seconds)")
        return _utc((time.time() if now is None else now) - older_than)

    def _stuck_of(self, conn: Connection, rows: Sequence[Row[Any]],
                  cutoff: datetime) -> list[StuckRelease]:
        """Those of ``rows`` (in releasing) whose newest claim is before
        ``cutoff``, or that have none."""
        a = self.tables.audit
        ids = {int(row.id) for row in rows}
        # row id -> (at, audit id, actor, origin) of its newest claim
        newest: dict[int, tuple[datetime, int, str, str]] = {}
        for chunk in _chunks(sorted({row.queue_id for row in rows}), IN_CHUNK):
            query = (select(a.c.id, a.c.row_id, a.c.at, a.c.actor, a.c.origin)
                     .where(a.c.queue_id.in_(chunk), a.c.action == CLAIM_ACTION))
            for audit_id, row_id, at, actor, origin in conn.execute(query):
                if row_id is None or int(row_id) not in ids:
                    continue  # the same reference's row for another domain or node
                claim = (at, int(audit_id), actor, origin)
                best = newest.get(int(row_id))
                if best is None or claim[:2] > best[:2]:
                    newest[int(row_id)] = claim
        out: list[StuckRelease] = []
        for row in rows:
            found = newest.get(int(row.id))
            if found is None:
                out.append(StuckRelease(_stored(row), None, None, None))
            elif found[0] < cutoff:
                out.append(StuckRelease(_stored(row), _epoch(found[0]), found[2], found[3]))
        return out

    # -- delete, hold ----------------------------------------------------------

    def _matching_ids(self, conn: Connection, s: Search, extra: list[ColumnElement[bool]],
                      after: int, lock: bool = True) -> list[Row[Any]]:
        """Up to CHANGE_BATCH rows matching ``s`` (limit and paging
        ignored: the bulk forms act on every match), locked on MariaDB
        (unless ``lock`` is false: a read that changes nothing)."""
        m = self.tables.messages
        query: Select[Any] = (select(*self._row_columns())
                              .where(*self._where(s), *extra, m.c.id > after)
                              .order_by(m.c.id).limit(CHANGE_BATCH))
        if self._mysql and lock:
            query = query.with_for_update()
        return list(conn.execute(query))

    def delete(self, s: Search, actor: str, origin: str) -> int:
        """Mark every row matching ``s`` deleted (rows on legal hold or
        being released are skipped); a message's raw data goes when no live row of it is
        left.  One audit row per row; returns the rows deleted."""
        m = self.tables.messages
        total, after = 0, 0
        for _ in range(1_000_000):  # bounded: each pass moves `after` on
            removed: list[str] = []
            with self._write() as conn:
                # A row being released is left to its release (which
                # finishes it released, or held again).
                rows = self._matching_ids(conn, s, [m.c.status.not_in((DELETED, RELEASING)),
                                                    m.c.legal_hold == false()], after)
                if not rows:
                    break
                after = rows[-1].id
                ids = [row.id for row in rows]
                conn.execute(update(m).where(m.c.id.in_(ids)).values(status=DELETED))
                for row in rows:
                    self._audit(conn, actor, origin, "delete", _stored(row), "")
                removed = self._drop_unused_raw(conn, rows, live_only=True)
                total += len(rows)
            self._remove_files(removed)
            if len(rows) < CHANGE_BATCH:
                break
        return total

    def set_hold(self, s: Search, on: bool, actor: str, origin: str) -> int:
        """Legal hold on (exempt from delete and retention) or off, for
        every row matching ``s``; audited; returns the rows changed."""
        m = self.tables.messages
        total, after = 0, 0
        for _ in range(1_000_000):  # bounded: each pass moves `after` on
            with self._write() as conn:
                rows = self._matching_ids(conn, s, [m.c.legal_hold == (not on)], after)
                if not rows:
                    break
                after = rows[-1].id
                conn.execute(update(m).where(m.c.id.in_([row.id for row in rows]))
                             .values(legal_hold=on))
                for row in rows:
                    self._audit(conn, actor, origin, "hold" if on else "unhold", _stored(row), "")
                total += len(rows)
            if len(rows) < CHANGE_BATCH:
                break
        return total

    def _drop_unused_raw(self, conn: Connection, rows: Sequence[Row[Any]],
                         live_only: bool) -> list[str]:
        """Delete the raw data of ``rows`` that no (live) row uses any
        more; the keys whose files go after the commit."""
        m, r = self.tables.messages, self.tables.raw
        keys = {row.raw_key for row in rows}
        queue_ids = sorted({row.queue_id for row in rows})
        used: set[str] = set()
        # The rows of one message share its queue id: the unique key's
        # first column finds them without an index on raw_key.
        for chunk in _chunks(queue_ids, IN_CHUNK):
            query = select(m.c.raw_key).where(m.c.queue_id.in_(chunk))
            if live_only:
                query = query.where(m.c.status != DELETED)
            used.update(conn.execute(query).scalars())
        gone = sorted(keys - used)
        for chunk in _chunks(gone, IN_CHUNK):
            conn.execute(delete(r).where(r.c.raw_key.in_(chunk)))
        return gone if self.files else []

    # -- audit -----------------------------------------------------------------

    def audit(self, actor: str, origin: str, action: str, row: Optional[StoredRow],
              detail: str) -> None:
        """Record an action the store did not do itself (forward, export,
        a refused release)."""
        with self._write() as conn:
            self._audit(conn, actor, origin, action, row, detail)

    def _audit(self, conn: Connection, actor: str, origin: str, action: str,
               row: Optional[StoredRow], detail: str) -> int:
        """Add one audit row; its id."""
        result = conn.execute(insert(self.tables.audit).values(
            at=_utc(time.time()), actor=actor[:ACTOR_LENGTH], origin=origin[:ACTOR_LENGTH],
            action=action[:32], row_id=row.id if row else None,
            node=row.node if row else None, queue_id=row.queue_id if row else None,
            rcpt_domain=row.rcpt_domain if row else None, detail=detail))
        key = result.inserted_primary_key
        assert key is not None  # an INSERT of one row always has its key
        return int(key[0])

    def audit_rows(self, limit: int = 100, queue_id: Optional[str] = None,
                   action: Optional[str] = None, domains: Optional[tuple[str, ...]] = None,
                   before_id: Optional[int] = None) -> list[dict[str, Any]]:
        """Audit rows, newest first, as plain dicts (``at`` in epoch
        seconds)."""
        a = self.tables.audit
        query = select(a).order_by(a.c.id.desc()).limit(max(0, limit))
        if queue_id is not None:
            query = query.where(a.c.queue_id == queue_id)
        if action is not None:
            query = query.where(a.c.action == action)
        if domains is not None:
            query = query.where(a.c.rcpt_domain.in_([d.lower() for d in domains]))
        if before_id is not None:
            query = query.where(a.c.id < before_id)
        with self._read() as conn:
            out = []
            for row in conn.execute(query):
                item = dict(row._mapping)
                item["at"] = _epoch(item["at"])
                out.append(item)
        return out

    # -- retention -------------------------------------------------------------

    def purge(self, now: float, retention_days: int, retention_domains: dict[str, int],
              batch: int) -> int:
        """Delete rows older than their domain's retention (0: keep),
        never those on legal hold, ``batch`` rows per transaction, with
        the raw data no row uses any more; then (files) message files no
        row names.  Returns the rows purged."""
        m = self.tables.messages
        domains = {d.lower(): days for d, days in retention_domains.items()}
        groups: list[tuple[ColumnElement[bool], int]] = [
            (m.c.rcpt_domain == d, days) for d, days in sorted(domains.items()) if days > 0]
        if retention_days > 0:
            others: ColumnElement[bool] = (not_(m.c.rcpt_domain.in_(sorted(domains))) if domains
                                           else true())
            groups.append((others, retention_days))
        total = 0
        for which, days in groups:
            cutoff = _utc(now - days * 86400.0)
            for _ in range(1_000_000):  # bounded: each pass deletes what it found
                removed: list[str] = []
                with self._write() as conn:
                    query: Select[Any] = (select(m.c.id, m.c.queue_id, m.c.raw_key)
                                          .where(which, m.c.received < cutoff,
                                                 m.c.legal_hold == false())
                                          .order_by(m.c.received).limit(max(1, batch)))
                    if self._mysql:
                        query = query.with_for_update()
                    rows = list(conn.execute(query))
                    if not rows:
                        break
                    conn.execute(delete(m).where(m.c.id.in_([row.id for row in rows]),
                                                 m.c.legal_hold == false()))
                    removed = self._drop_unused_raw(conn, rows, live_only=False)
                    self._audit(conn, "mppproxy", "purge", "purge", None,
                                f"{len(rows)} rows received before {cutoff.isoformat()}Z "
                                f"({days} days)")
                    total += len(rows)
                self._remove_files(removed)
                if len(rows) < batch:
                    break
        if self.files:
            self.sweep_files(now)
        return total

    def sweep_files(self, now: float) -> int:
        """Remove message files no raw row names, older than ORPHAN_AGE
        (a batch whose transaction failed; a crash between write and
        commit); and stale temporary files.  Returns the files removed."""
        if not os.path.isdir(self.raw_dir):
            return 0
        r = self.tables.raw
        removed = 0
        for entry in sorted(os.scandir(self.raw_dir), key=lambda e: e.name):
            if not entry.is_dir() or len(entry.name) != 2:
                continue
            old: dict[str, str] = {}
            for item in os.scandir(entry.path):
                try:
                    if now - item.stat().st_mtime < ORPHAN_AGE:
                        continue
                except FileNotFoundError:
                    continue
                if item.name.endswith(".tmp"):
                    _unlink(item.path)
                    removed += 1
                elif item.name.endswith(".z"):
                    old[item.name[:-2]] = item.path
            for chunk in _chunks(sorted(old), IN_CHUNK):
                with self._read() as conn:
                    known = set(conn.execute(select(r.c.raw_key)
                                             .where(r.c.raw_key.in_(chunk))).scalars())
                for key in chunk:
                    if key not in known:
                        _unlink(old[key])
                        removed += 1
        return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _mysql_errno(error: DBAPIError) -> Optional[int]:
    args = getattr(error.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _glob(pattern: str) -> str:
    """A LIKE pattern (escape ``\\``) for a ``*`` glob."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def _address_match(column: Any, value: str, single: bool) -> ColumnElement[bool]:
    """An address condition: exact, ``@domain``, or a ``*`` glob.  The
    recipients column holds a ", "-joined list: the condition must match
    one of its items (``ann@x`` does not find ``joann@x``)."""
    if "*" in value:
        item = _glob(value)
    elif value.startswith("@"):
        item = f"%{_glob(value)}"
    else:
        item = ""
    if single:
        found: ColumnElement[bool] = (column == value if not item
                                      else column.like(item, escape="\\"))
        return found
    if not item:
        item = _glob(value)
        first: ColumnElement[bool] = column == value
    else:
        first = column.like(item, escape="\\")
    return or_(first, column.like(f"{item}, %", escape="\\"),
               column.like(f"%, {item}", escape="\\"),
               column.like(f"%, {item}, %", escape="\\"))


def _utc(epoch: float) -> datetime:
    """Epoch seconds as the naive UTC datetime the columns hold."""
    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None)


def _epoch(value: Optional[datetime]) -> Optional[float]:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc).timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


def _stored(row: Row[Any]) -> StoredRow:
    received = _epoch(row.received)
    assert received is not None
    return StoredRow(
        id=int(row.id), node=row.node, queue_id=row.queue_id, rcpt_domain=row.rcpt_domain,
        received=received, sender=row.sender,
        recipients=tuple(r for r in row.recipients.split(", ") if r) if row.recipients else (),
        subject=row.subject, verdict=row.verdict, disposition=row.disposition,
        score=float(row.score), reason=row.reason, client_ip=row.client_ip, helo=row.helo,
        size=int(row.size), status=row.status, legal_hold=bool(row.legal_hold),
        released_at=_epoch(row.released_at), raw_key=row.raw_key)
