"""``mppproxy trace REF|--sender|--rcpt|--since``: a message's path through
the node, from its log files and its archive store (issue 16, "Logs an
operator can use").

Top floor (a command beside ``quarantine_cli``).  The JSON log
(``logging.json_file``, one event per line: ``logsetup.json_event_line``)
is the source: every transaction has one event (``mpp_event =
"transaction"``, ``txlog.py``) with its reference id (``queue_id``, the
``(ref ...)`` of every reply), its session, client, envelope, disposition
and what decided it.  A trace finds the matching transactions, then every
other event of the same transaction or session (the connection refused or
greylisted earlier, the scanner that timed out, the archive copy and its
release, which log ``queue_id`` or ``ref``), and prints them in time order;
then what the archive store holds for that reference id (held, released,
deleted, with its audit rows), where this node has a store.

Files: ``--log FILE`` (repeatable; a rotated ``.gz`` is read too), else the
configuration's ``logging.json_file`` with its rotated siblings
(``events.json.1``, ``events.json.2.gz`` ..., oldest first).  A text log
(twistd's ``--logfile``) given with ``--log`` is searched for the reference
id, the sender or the recipient as plain text, line by line.

Reading is two passes over the files (first the transactions that match,
then their related events), so memory stays bounded by what is printed,
not by the size of the logs.

Exit status: 0 something found, 1 nothing matched, 2 usage or
configuration error (with the key named), 3 the store could not be read
(the log part is printed all the same).
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Optional


EXIT_FOUND, EXIT_NOTHING, EXIT_USAGE, EXIT_STORE = 0, 1, 2, 3
# Transactions printed at most (the newest), unless --limit says otherwise.
DEFAULT_LIMIT = 20
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ROTATED = re.compile(r"^\.(\d+)(\.gz)?$")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("trace", help="a message's path through the node's logs and archive",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("ref", nargs="?", help="the reference id (the (ref ...) of a reply)")
    p.add_argument("--sender", help="envelope sender (any case; <> for bounces)")
    p.add_argument("--rcpt", help="a recipient of the transaction")
    p.add_argument("--since", help="from this time: ISO 8601 (2026-12-07T10:00, UTC unless "
                                   "it says otherwise) or ago (30m, 2h, 1d)")
    p.add_argument("--until", help="up to this time (same forms)")
    p.add_argument("--log", action="append", default=[], metavar="FILE",
                   help="a log file to read (repeatable); default: logging.json_file and its "
                        "rotated files")
    p.add_argument("--config", dest="config_file", help="the configuration file")
    p.add_argument("--config-command", help="a command printing the configuration")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"transactions shown at most, the newest (default {DEFAULT_LIMIT})")
    p.add_argument("--json", action="store_true", help="one JSON object per transaction")
    p.set_defaults(func=run)


@dataclass
class Query:
    ref: Optional[str] = None
    sender: Optional[str] = None
    rcpt: Optional[str] = None
    since: Optional[float] = None
    until: Optional[float] = None

    def matches(self, event: dict[str, Any]) -> bool:
        """Whether a transaction event is one the query asks for."""
        if self.ref is not None and event.get("queue_id") != self.ref:
            return False
        if self.sender is not None:
            sender = str(event.get("sender") or "")
            wanted = "" if self.sender == "<>" else self.sender
            if sender.lower() != wanted.lower():
                return False
        if self.rcpt is not None:
            rcpts = [str(r).lower() for r in (event.get("recipients") or [])]
            rcpts += [str(r).lower() for r in (event.get("refused_recipients") or [])]
            if self.rcpt.lower() not in rcpts:
                return False
        when = event_time(event)
        if self.since is not None and (when is None or when < self.since):
            return False
        if self.until is not None and (when is None or when > self.until):
            return False
        return True

    def text_needles(self) -> list[str]:
        return [n for n in (self.ref, self.sender, self.rcpt) if n]


@dataclass
class Traced:
    """One transaction and what the logs and the store say about it."""

    event: dict[str, Any]
    related: list[dict[str, Any]] = field(default_factory=list)
    store_rows: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return str(self.event.get("queue_id"))


def parse_when(text: str, now: Optional[float] = None) -> float:
    """``--since``/``--until``: ISO 8601 (UTC unless it has an offset) or a
    span ago (``30m``, ``2h``, ``1d``); ValueError naming the form."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither a time (2026-12-07T10:00) nor a span ago "
                         "(30m, 2h, 1d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def event_time(event: dict[str, Any]) -> Optional[float]:
    value = event.get("time")
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def log_files(configured: str) -> list[str]:
    """``configured`` and its rotated siblings, oldest first (``.N`` with the
    highest N first), the live file last."""
    directory = os.path.dirname(configured) or "."
    base = os.path.basename(configured)
    rotated: list[tuple[int, str]] = []
    try:
        names = os.listdir(directory)
    except OSError:
        names = []
    for name in names:
        if name.startswith(base) and name != base:
            m = _ROTATED.match(name[len(base):])
            if m:
                rotated.append((int(m.group(1)), os.path.join(directory, name)))
    out = [path for _, path in sorted(rotated, reverse=True)]
    if os.path.exists(configured):
        out.append(configured)
    return out


def _open(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def is_json_log(path: str) -> bool:
    """Whether the file's first non-empty line is a JSON object."""
    with _open(path) as f:
        for _, line in zip(range(50), f):
            line = line.strip()
            if line:
                return line.startswith("{")
    return True  # empty: nothing to read either way


def events(paths: list[str]) -> Iterator[dict[str, Any]]:
    """The JSON events of ``paths`` in file order; a line that is not JSON
    (a half-written last line, a foreign line) is skipped."""
    for path in paths:
        with _open(path) as f:
            for line in f:
                if not line.startswith("{"):
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event


def trace_logs(paths: list[str], query: Query, limit: int) -> list[Traced]:
    """The matching transactions (the newest ``limit``) with their related
    events, from the JSON logs ``paths``."""
    found: list[dict[str, Any]] = []
    for event in events(paths):
        if event.get("mpp_event") == "transaction" and query.matches(event):
            found.append(event)
    found = found[-limit:] if limit > 0 else found
    traced = [Traced(e) for e in found]
    by_ref = {t.ref: t for t in traced}
    by_session: dict[str, list[Traced]] = {}
    for t in traced:
        session = t.event.get("session_id")
        if session:
            by_session.setdefault(str(session), []).append(t)
    if not traced:
        return []
    for event in events(paths):
        if event.get("mpp_event") == "transaction" and event.get("queue_id") in by_ref:
            continue
        owners: list[Traced] = []
        for key in ("queue_id", "ref"):
            owner = by_ref.get(str(event.get(key)))
            if owner is not None:
                owners.append(owner)
        if not owners:
            owners = by_session.get(str(event.get("session_id")), [])
        for owner in owners:
            owner.related.append(event)
    for t in traced:
        t.related.sort(key=lambda e: event_time(e) or 0.0)
    return traced


def trace_text(paths: list[str], query: Query) -> list[str]:
    """Lines of text logs naming the reference id, sender or recipient."""
    needles = query.text_needles()
    out = []
    for path in paths:
        with _open(path) as f:
            for line in f:
                if any(n in line for n in needles):
                    out.append(f"{path}: {line.rstrip()}")
    return out


def add_store(traced: list[Traced], config: Any) -> Optional[str]:
    """Fill in each transaction's store rows and audit; the error text when
    the store cannot be read, None otherwise (or when there is none here)."""
    from mppproxy.quarantine_cli import missing_sqlite
    from mppproxy.store.store import ArchiveStore, Search

    store = ArchiveStore(config.store, config.data_dir)
    if missing_sqlite(store) is not None:
        return None  # no store on this node: nothing was held or copied here
    try:
        store.open()
        try:
            for t in traced:
                rows = store.search(Search(ref=t.ref, status=None, limit=100))
                t.store_rows = [r.to_json() for r in rows]
                t.audit = list(store.audit_rows(limit=100, queue_id=t.ref))
        finally:
            store.close()
    except Exception as e:  # the database's own words, one line; never a traceback
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return None


def _line(event: dict[str, Any]) -> str:
    when = str(event.get("time") or "?")
    return f"  {when} {str(event.get('level') or '-'):5} {event.get('text') or ''}"


def render(t: Traced) -> list[str]:
    e = t.event
    rcpts = ", ".join(f"<{r}>" for r in (e.get("recipients") or []))
    out = [f"{e.get('time')} ref {t.ref}: {e.get('action')} <{e.get('sender')}> to {rcpts or '-'}",
           f"  client {e.get('client')} helo {e.get('helo')} tls {e.get('tls')}; decided by "
           f"{e.get('deciding_check') or e.get('decided_by') or '-'}; score {e.get('score')}; "
           f"reply {e.get('reply_text')}"]
    for check in e.get("checks") or []:
        out.append(f"  check {check.get('check')}: score {check.get('score')} "
                   f"{'; '.join(check.get('reasons') or [])}".rstrip())
    for related in t.related:
        out.append(_line(related))
    out.append(_line(e))
    for row in t.store_rows:
        out.append(f"  archive: row {row.get('id')} for {row.get('rcpt_domain')}: "
                   f"{row.get('status')}, verdict {row.get('verdict')}, "
                   f"{'legal hold, ' if row.get('legal_hold') else ''}"
                   f"released {row.get('released_at') or '-'}")
    for audit in t.audit:
        at = datetime.datetime.fromtimestamp(float(audit.get("at") or 0), datetime.timezone.utc)
        out.append(f"  audit {at.isoformat(timespec='seconds')}: {audit.get('action')} by "
                   f"{audit.get('actor')} ({audit.get('origin')}) {audit.get('detail') or ''}"
                   .rstrip())
    return out


def run(args: argparse.Namespace) -> int:
    from mppproxy.quarantine_cli import config_or_report

    if not (args.ref or args.sender or args.rcpt or args.since):
        print("mppproxy trace: give a reference id, --sender, --rcpt or --since", file=sys.stderr)
        return EXIT_USAGE
    try:
        query = Query(args.ref, args.sender, args.rcpt,
                      parse_when(args.since) if args.since else None,
                      parse_when(args.until) if args.until else None)
    except ValueError as e:
        print(f"mppproxy trace: {e}", file=sys.stderr)
        return EXIT_USAGE
    config = None
    if args.config_file or args.config_command or not args.log:
        config = config_or_report(args.config_file, args.config_command, sys.stderr)
        if config is None:
            return EXIT_USAGE
    paths = list(args.log)
    if not paths:
        assert config is not None
        if not config.logging.json_file:
            print("mppproxy trace: logging.json_file is not set in the configuration and no "
                  "--log was given: there is no JSON log to read", file=sys.stderr)
            return EXIT_USAGE
        paths = log_files(config.logging.json_file)
    for path in paths:
        if not os.path.exists(path):
            print(f"mppproxy trace: {path}: no such file", file=sys.stderr)
            return EXIT_USAGE
    json_paths = [p for p in paths if is_json_log(p)]
    text_paths = [p for p in paths if p not in json_paths]
    traced = trace_logs(json_paths, query, args.limit)
    store_error = add_store(traced, config) if traced and config is not None else None
    text_lines = trace_text(text_paths, query) if text_paths else []
    try:
        if args.json:
            for t in traced:
                print(json.dumps({"transaction": t.event, "related": t.related,
                                  "archive": t.store_rows, "audit": t.audit},
                                 ensure_ascii=False, default=str))
        else:
            for t in traced:
                print("\n".join(render(t)))
            for line in text_lines:
                print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if store_error is not None:
        print(f"mppproxy trace: the archive store could not be read: {store_error}",
              file=sys.stderr)
        return EXIT_STORE
    return EXIT_FOUND if traced or text_lines else EXIT_NOTHING
