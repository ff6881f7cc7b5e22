"""``mppproxy quarantine``: list, show, release, forward, delete, hold and
export what the archive store keeps (issue 12, "Operations on the store").

Floor 4 (entry points): ``cli.py`` hands the ``quarantine`` subcommand here;
this module reads the configuration, opens the store (``mppproxy/store/``)
and calls it directly: a command-line process has no reactor, so the
store's blocking calls run on the main thread.  Nothing here decides what a
row means; the store's ``Search`` does the selecting and its ``delete`` and
``set_hold`` the changing (each writing its own audit rows).

Subcommands (``mppproxy quarantine COMMAND --help`` for each)::

    list    the newest matching rows, one line each (--json: an array)
    show    every field and the stored state of the selected rows; --raw adds
            the message (alone, as stored, without --json)
    release re-scan the selected held rows and deliver each once through its
            route (mppproxy/release.py); --stuck [MINUTES] first puts back to
            held the selected rows left in "releasing" by a release that died
            (claimed more than MINUTES ago, default 30), warning that each may
            already have been delivered, and releases those
    forward a copy of the selected rows to other addresses
    delete  mark the selected rows deleted (rows on legal hold are kept)
    hold    put the selected rows on legal hold (--off lifts it)
    export  the selected messages as an mbox (mboxrd) or a zip of .eml files
            with a manifest.json

Every subcommand takes ``--config FILE`` or ``--config-command CMD`` (as
``check-config``; without either, the built-in defaults with ``$MPP_HOME``
as the data directory, as ``twistd -n mppproxy`` runs), the same filters
(``--domain --since --until --sender --rcpt --subject --reason --ref
--status``, row ids as arguments), ``--limit`` and ``--json``.  Bulk actions
refuse to touch every row unless a filter or ``--all`` is given, and
``--dry-run`` lists what they would change.

Exit status, for scripts:

    0  done: rows were listed, shown, exported or changed
    1  nothing matched (or nothing needed changing); not an error
    2  usage error: bad option or date, a configuration with errors, a bulk
       action without a filter, an output file that cannot be written
    3  the store is unavailable: database down, schema not current, SQLite
       file missing (the message names the store, never its password)
    4  release/forward: some selected rows could not be done (refused by the
       re-scan, deferred, refused by the route); each line says why.
       release exits 0 when every row was delivered, 1 when there was
       nothing to do (nothing held, every row taken by someone else; with
       --stuck, no stuck row)

Adding a subcommand (``release`` and ``forward`` come this way): one
function ``(Context, argparse.Namespace) -> int`` and one ``_add_*``
function that calls ``subcommand()`` (which adds the config, filter and
output options) and its own arguments; list it in ``SUBCOMMANDS``.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import pwd
import re
import shutil
import socket
import sys
import tempfile
import time
import unicodedata
import zipfile
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from functools import partial
from typing import IO, Any, Callable, Iterator, Optional, Sequence, TextIO

from sqlalchemy.exc import ArgumentError, DBAPIError

from mppproxy.config.errors import ConfigError
from mppproxy.config.load import load
from mppproxy.config.schema import ProxyConfig
from mppproxy.store.migrate import MigrationLockTimeout
from mppproxy.store.store import (ArchiveStore, RawMissing, Search, StoredRow, StoreError,
                                  StuckRelease)

EXIT_OK = 0
EXIT_NOTHING = 1
EXIT_USAGE = 2
EXIT_STORE = 3
# release/forward: some selected rows could not be done (each line says why).
EXIT_PARTIAL = 4

EXIT_HELP = """\
exit status:
  0  done: rows listed, shown, exported or changed
  1  nothing matched (or nothing needed changing)
  2  usage error: bad option or date, configuration errors, a bulk action
     without a filter or --all, an output file that cannot be written
  3  the store is unavailable (database down, schema not current)
  4  release/forward: some rows could not be done (refused by the re-scan,
     deferred, refused by the route); each line says why
"""

# The row statuses of the store (store_api: held | releasing | released |
# deleted); "all" selects every one, deleted rows included.
STATUSES = ("held", "releasing", "released", "deleted")
# Rows fetched per query when a command walks a whole selection (export,
# dry runs): keyset pages (Search.before_id), so memory stays flat however
# many rows match.
PAGE = 500
# The data directory twistd uses when neither the configuration nor
# --data-dir names one (mppproxy/tap.py MPP_HOME_ENV).
MPP_HOME_ENV = "MPP_HOME"
DEFAULT_DATA_DIR = "./mppproxy-data"
# Seconds between progress bar redraws (a terminal is slow to scroll).
PROGRESS_INTERVAL = 0.1
# release --stuck: minutes after its claim that a row still in "releasing"
# is taken for the leftover of a release that died.  A live release is a
# connection and a handful of SMTP steps of at most release.py's
# ROUTE_TIMEOUT (60 s) each, and a re-scan bounded by the engines'
# timeouts: far less than this.
STUCK_MINUTES = 30.0

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


class UsageError(Exception):
    """The command cannot run as given (exit 2); the text says why."""


# -- who and from where -------------------------------------------------------


def login_name() -> str:
    """The person at the keyboard: the sudo caller before the target user."""
    for key in ("SUDO_USER", "USER", "LOGNAME"):
        name = os.environ.get(key)
        if name:
            return name
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def origin() -> str:
    """Where an action came from, for the audit: ``cli:<user>@<host>``
    (the login, whatever ``--actor`` claims)."""
    return f"cli:{login_name()}@{socket.gethostname()}"


# -- dates --------------------------------------------------------------------


def parse_when(text: str, now: float, end_of_day: bool = False) -> float:
    """Epoch seconds (UTC) of an ISO 8601 date or date-time, or of a time
    relative to ``now`` (``90m``, ``2h``, ``7d``, ``1w``: that long ago).

    A date-time without a zone is UTC.  A date alone is its midnight, or
    with ``end_of_day`` (``--until 2024-05-01``) the next midnight, so the
    whole day is included."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value.lower())
    if relative:
        return now - float(relative[1]) * _UNITS[relative[2]]
    if value.lower() == "now":
        return now
    try:
        day = date.fromisoformat(value)
    except ValueError:
        pass
    else:
        start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        return (start + timedelta(days=1 if end_of_day else 0)).timestamp()
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{text!r} is not a date (2024-05-01, 2024-05-01T13:00, "
                         f"2024-05-01T13:00+02:00) nor a time ago (30m, 2h, 7d)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def utc_text(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# -- the shared options -------------------------------------------------------


@dataclass
class Context:
    """What every subcommand gets: the opened store and who acts."""

    config: ProxyConfig
    store: ArchiveStore
    actor: str
    origin: str
    out: TextIO
    err: TextIO


Handler = Callable[[Context, argparse.Namespace], int]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``quarantine`` and its subcommands to ``mppproxy``'s subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "quarantine", help="list, show, delete, hold or export quarantined and archived mail",
        description="Work on the archive store: the quarantined and archived "
                    "copies (docs/quarantine.md).",
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="quarantine_command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def subcommand(sub: Any, name: str, help: str, handler: Handler,
               limit: Optional[int] = None) -> argparse.ArgumentParser:
    """One subcommand's parser with the options every subcommand shares;
    ``limit``: the default ``--limit`` (None: every matching row)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help, epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    config = parser.add_argument_group("configuration")
    config.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file")
    config.add_argument("--config-command", metavar="CMD",
                        help="command whose output is the configuration")
    config.add_argument("--actor", default=None,
                        help="who acts, for the audit (default: your login name)")
    add_filters(parser, limit)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=partial(run, handler))
    return parser


def add_filters(parser: argparse.ArgumentParser, limit: Optional[int]) -> None:
    """The filters; all given ones must match (AND)."""
    group = parser.add_argument_group(
        "filters", "dates: ISO 8601 (2024-05-01, 2024-05-01T13:00, +02:00; UTC without "
                   "a zone) or a time ago (30m, 2h, 7d, 1w)")
    group.add_argument("ids", nargs="*", type=int, metavar="ID", help="row ids (as list shows)")
    group.add_argument("--domain", help="recipient domain")
    group.add_argument("--since", metavar="WHEN", help="received at or after")
    group.add_argument("--until", metavar="WHEN",
                       help="received before (a date alone: up to the end of that day)")
    group.add_argument("--sender", help="envelope sender: an address, @domain, or * globs")
    group.add_argument("--rcpt", help="envelope recipient")
    group.add_argument("--subject", help="text in the subject (any case)")
    group.add_argument("--reason", help="a verdict (reject, hold...) or text in the reasons")
    group.add_argument("--ref", help="reference id (queue id) of a message")
    group.add_argument("--status", metavar="S[,S]",
                       help=f"{', '.join(STATUSES)} or all (default: all but deleted)")
    group.add_argument("--limit", type=positive_int, default=limit, metavar="N",
                       help=f"at most N rows (default: {limit or 'all'})")


def add_bulk_options(parser: argparse.ArgumentParser) -> None:
    """``--all`` and ``--dry-run`` for a command that changes rows."""
    parser.add_argument("--all", action="store_true",
                        help="act on every row when no filter is given")
    parser.add_argument("--dry-run", "-n", action="store_true",
                        help="list what would change, change nothing")


def positive_int(text: str) -> int:
    """argparse type of the commands' counts and limits (a whole number >= 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


FILTERS = ("ids", "domain", "since", "until", "sender", "rcpt", "subject", "reason", "ref")


def has_filter(args: argparse.Namespace) -> bool:
    """Whether anything narrows the selection (--status and --limit do not:
    "every held row" is still everything)."""
    return any(getattr(args, name) for name in FILTERS)


def require_selection(args: argparse.Namespace, verb: str) -> None:
    """A bulk action on every row must be asked for by name (``--all``)."""
    if not has_filter(args) and not getattr(args, "all", False):
        raise UsageError(f"{verb} needs at least one filter (an ID, --domain, --since, "
                         f"--sender, --ref...) or --all to act on every row")


def search_from(args: argparse.Namespace, now: Optional[float] = None) -> Search:
    """The store's Search for the command line's filters (limit: one page
    or ``--limit``, whichever is smaller; walks page on with before_id)."""
    now = time.time() if now is None else now
    fields: dict[str, Any] = {}
    for name in ("domain", "sender", "rcpt", "subject", "reason", "ref"):
        value = getattr(args, name)
        if value is not None:
            if not value.strip():
                raise UsageError(f"--{name} is empty")
            fields[name] = value.strip().lower() if name == "domain" else value
    for name in ("since", "until"):
        value = getattr(args, name)
        if value is not None:
            try:
                fields[name] = parse_when(value, now, end_of_day=name == "until")
            except UsageError as e:
                raise UsageError(f"--{name}: {e}") from None
    if "since" in fields and "until" in fields and fields["since"] >= fields["until"]:
        raise UsageError("--since is not before --until: nothing can match")
    if args.ids:
        fields["ids"] = tuple(args.ids)
    if args.status:
        fields["status"] = parse_status(args.status)
    fields["limit"] = min(args.limit or PAGE, PAGE)
    return Search(**fields)


def parse_status(text: str) -> Optional[tuple[str, ...]]:
    """``held,released`` -> ("held", "released"); ``all`` -> None (any)."""
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    if names == ("all",):
        return None
    wrong = [n for n in names if n not in STATUSES]
    if wrong or not names:
        raise UsageError(f"--status: {', '.join(wrong) or 'empty'}: not one of "
                         f"{', '.join(STATUSES)}, all")
    return names


def iter_rows(store: ArchiveStore, search: Search, limit: Optional[int]) -> Iterator[StoredRow]:
    """Every row of ``search`` (newest first), at most ``limit``, fetched a
    page at a time by keyset (``before_id``), never all at once."""
    done = 0
    page = replace(search, limit=min(search.limit, limit) if limit else search.limit)
    while True:
        rows = store.search(page)
        for row in rows:
            yield row
            done += 1
            if limit is not None and done >= limit:
                return
        if len(rows) < page.limit:
            return
        page = replace(page, before_id=rows[-1].id)


# -- running a subcommand -------------------------------------------------------


def run(handler: Handler, args: argparse.Namespace) -> int:
    """Load the configuration, open the store, run ``handler``; every
    failure becomes a message and an exit status, never a traceback."""
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        if isinstance(stream, io.TextIOWrapper):
            # A terminal or pipe that is not UTF-8 (PYTHONIOENCODING=ascii,
            # a latin-1 locale) gets "?" for what it cannot show, not a
            # traceback half-way through a list.
            stream.reconfigure(errors="replace")
    name = f"mppproxy quarantine {args.quarantine_command}"
    config = config_or_report(args.config, args.config_command, err)
    if config is None:
        return EXIT_USAGE
    try:
        search_from(args)  # bad filters are found before the store is opened
        store = ArchiveStore(config.store, config.data_dir)
    except UsageError as e:
        print(f"{name}: {e}", file=err)
        return EXIT_USAGE
    except ArgumentError as e:
        print(f"{name}: store.url: {e}", file=err)
        return EXIT_USAGE
    missing = missing_sqlite(store)
    if missing:
        print(f"{name}: the store {missing} does not exist (is data_dir right? "
              f"the archive node creates it)", file=err)
        return EXIT_STORE
    try:
        store.open()
        context = Context(config, store, args.actor or login_name(), origin(), out, err)
        return handler(context, args)
    except UsageError as e:
        print(f"{name}: {e}", file=err)
        return EXIT_USAGE
    except DBAPIError as e:
        print(f"{name}: the store at {store.display_url} is unavailable: {_db_reason(e)}",
              file=err)
        return EXIT_STORE
    except (StoreError, MigrationLockTimeout) as e:
        # SchemaNotCurrent names the store and what to run.
        print(f"{name}: {e}", file=err)
        return EXIT_STORE
    except BrokenPipeError:
        # `... | head`: the reader has what it wanted.
        _quiet_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=err)
        return 130  # 128 + SIGINT, as a shell reports it
    finally:
        try:
            store.close()
        except DBAPIError:
            pass  # closing a pool whose server went away: nothing left to do


def load_config(path: Optional[str], command: Optional[str]) -> ProxyConfig:
    """The configuration as ``twistd`` would run it: ``$MPP_HOME`` is the
    data directory when the configuration leaves the default."""
    config = load(path, command)
    home = os.environ.get(MPP_HOME_ENV)
    if home and config.data_dir == DEFAULT_DATA_DIR:
        config = replace(config, data_dir=home)
    return config


def config_or_report(path: Optional[str], command: Optional[str],
                     err: TextIO) -> Optional[ProxyConfig]:
    """``load_config``, or None once each problem (the key named) and
    their count are on ``err``: what every command does with a bad
    configuration before it exits 2 (check-config says the same)."""
    try:
        return load_config(path, command)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=err)
        print(f"{len(e.errors)} error(s); the configuration is not valid", file=err)
        return None


def missing_sqlite(store: ArchiveStore) -> Optional[str]:
    """The path of a SQLite store that does not exist: a command that
    reads must not create an empty store and answer "nothing matched"."""
    url = store.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    path = str(url.database)
    return None if os.path.exists(path) else os.path.abspath(path)


def _db_reason(error: DBAPIError) -> str:
    """The driver's own words (PyMySQL: "(2003, "Can't connect to MySQL
    server on '127.0.0.1' ([Errno 111] Connection refused)")"), one line;
    SQLAlchemy's text would repeat the statement and a link."""
    text = str(error.orig) if error.orig is not None else str(error)
    return " ".join(text.split())[:300] or type(error).__name__


def _quiet_stdout() -> None:
    # Python flushes stdout at exit and would report the broken pipe again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# -- output helpers -------------------------------------------------------------


def clean(text: str) -> str:
    """Text safe for one terminal line: controls, format characters (bidi
    overrides) and line breaks become ``?``, so a hostile subject can
    neither move the cursor nor break the table."""
    return "".join("?" if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") else c
                   for c in text)


def width(text: str) -> int:
    """Terminal columns: East Asian wide characters take two, combining
    marks none."""
    total = 0
    for c in text:
        if unicodedata.combining(c):
            continue
        total += 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
    return total


def cut(text: str, columns: Optional[int]) -> str:
    """``text`` in at most ``columns`` terminal columns, ``...`` marking a cut."""
    if columns is None or width(text) <= columns:
        return text
    if columns <= 3:
        return "." * max(columns, 0)
    out, used = [], 0
    for c in text:
        w = 0 if unicodedata.combining(c) else (2 if unicodedata.east_asian_width(c) in ("W", "F") else 1)
        if used + w > columns - 3:
            break
        out.append(c)
        used += w
    return "".join(out) + "..."


def pad(text: str, columns: int) -> str:
    return text + " " * max(columns - width(text), 0)


def terminal_columns(stream: IO[Any]) -> Optional[int]:
    """The width to fit lines into: $COLUMNS, else the terminal's; None
    when writing to a file or pipe (nothing is cut there)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        if stream.isatty():
            return shutil.get_terminal_size((100, 24)).columns
    except (AttributeError, ValueError, OSError):
        pass
    return None


def _styled(text: str, stream: IO[Any]) -> str:
    """Bold on a terminal that takes colours; plain text anywhere else."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb":
        return f"\x1b[1m{text}\x1b[0m"
    return text


def row_json(row: StoredRow) -> dict[str, Any]:
    """Every field of a row (times as epoch seconds and ISO 8601 UTC)."""
    return row.to_json()


def write_json_array(out: TextIO, items: Iterator[dict[str, Any]], indent: str = "") -> int:
    """A JSON array written item by item (nothing kept); returns the count."""
    count = 0
    out.write("[")
    for item in items:
        out.write(",\n" if count else "\n")
        out.write(indent + "  " + json.dumps(item, sort_keys=True))
        count += 1
    out.write(f"\n{indent}]" if count else "]")
    return count


LIST_COLUMNS = ("ID", "RECEIVED (UTC)", "REF", "DOMAIN", "SENDER", "VERDICT/SCORE",
                "STATUS", "SUBJECT")
# Columns no wider than this (the subject takes what is left of the line).
_CAPS = {"REF": 24, "DOMAIN": 32, "SENDER": 40}


def list_cells(row: StoredRow) -> list[str]:
    status = row.status + ("+hold" if row.legal_hold else "")
    return [str(row.id), utc_text(row.received), clean(row.queue_id), clean(row.rcpt_domain),
            clean(row.sender or "<>"), f"{clean(row.verdict)}/{row.score:g}", status,
            clean(row.subject)]


def write_table(out: TextIO, rows: Sequence[StoredRow], columns: Optional[int]) -> None:
    """Aligned columns; the subject is cut to what the line has left."""
    cells = [list_cells(row) for row in rows]
    widths = []
    for i, title in enumerate(LIST_COLUMNS[:-1]):
        widest = max([width(title)] + [width(c[i]) for c in cells])
        widths.append(min(widest, _CAPS.get(title, widest)))
    used = sum(widths) + 2 * len(widths)
    rest = None if columns is None else max(columns - used, 10)
    header = "  ".join(pad(t, w) for t, w in zip(LIST_COLUMNS, widths)) + "  " + LIST_COLUMNS[-1]
    out.write(_styled(header, out) + "\n")
    for c in cells:
        line = "  ".join(pad(cut(v, w), w) for v, w in zip(c, widths))
        out.write(line + "  " + cut(c[-1], rest) + "\n")


# -- list ---------------------------------------------------------------------


def _list(ctx: Context, args: argparse.Namespace) -> int:
    search = search_from(args)
    rows = list(iter_rows(ctx.store, search, args.limit))
    if args.json:
        write_json_array(ctx.out, (row_json(r) for r in rows))
        ctx.out.write("\n")
    elif rows:
        write_table(ctx.out, rows, terminal_columns(ctx.out))
        if args.limit is not None and len(rows) >= args.limit:
            print(f"(the newest {len(rows)}; more may match: --limit or narrower filters)",
                  file=ctx.err)
    else:
        print("nothing matched", file=ctx.err)
    return EXIT_OK if rows else EXIT_NOTHING


def _add_list(sub: Any) -> None:
    subcommand(sub, "list", "list the newest matching rows", _list, limit=50)


# -- show ---------------------------------------------------------------------


def _show(ctx: Context, args: argparse.Namespace) -> int:
    if not has_filter(args):
        raise UsageError("show needs an ID or a filter (--ref, --domain...)")
    rows = list(iter_rows(ctx.store, search_from(args), args.limit))
    if not rows:
        print("nothing matched", file=ctx.err)
        return EXIT_NOTHING
    if args.raw and not args.json and len(rows) != 1:
        raise UsageError(f"--raw without --json shows one message; {len(rows)} rows matched "
                         f"(ids {', '.join(str(r.id) for r in rows[:20])}): give one ID")
    if args.raw:
        for row in rows:
            ctx.store.audit(ctx.actor, ctx.origin, "view", row, "raw message shown (cli show --raw)")
    if args.raw and not args.json:
        try:
            message = ctx.store.raw(rows[0])
        except RawMissing as e:
            print(f"{e}", file=ctx.err)
            return EXIT_NOTHING
        ctx.out.flush()
        sys.stdout.buffer.write(message)
        sys.stdout.buffer.flush()
        return EXIT_OK
    if args.json:
        write_json_array(ctx.out, (_show_json(ctx.store, row, args.raw) for row in rows))
        ctx.out.write("\n")
        return EXIT_OK
    for n, row in enumerate(rows):
        if n:
            ctx.out.write("\n")
        _show_text(ctx.out, row, ctx.store.state(row))
    return EXIT_OK


def _show_json(store: ArchiveStore, row: StoredRow, raw: bool) -> dict[str, Any]:
    data = row_json(row)
    data["state"] = store.state(row)
    if raw:
        try:
            message = store.raw(row)
        except RawMissing as e:
            # A deleted row's message is gone; the row itself still shows.
            data.update(raw=None, raw_base64=None, raw_missing=str(e))
            return data
        # Exact bytes in raw_base64; raw is for reading (8-bit bytes that
        # are not UTF-8 shown as U+FFFD).
        data["raw_base64"] = base64.b64encode(message).decode("ascii")
        data["raw"] = message.decode("utf-8", "replace")
    return data


def _show_text(out: TextIO, row: StoredRow, state: dict[str, Any]) -> None:
    hold = "  (legal hold)" if row.legal_hold else ""
    released = f" at {utc_text(row.released_at)} UTC" if row.released_at else ""
    fields = [
        ("id", str(row.id)), ("reference", row.queue_id), ("node", row.node),
        ("received", f"{utc_text(row.received)} UTC"), ("domain", row.rcpt_domain),
        ("sender", row.sender or "<>"), ("recipients", ", ".join(row.recipients)),
        ("subject", row.subject), ("verdict", f"{row.verdict} (score {row.score:g})"),
        ("disposition", row.disposition), ("reason", row.reason),
        ("client", f"{row.client_ip} (HELO {row.helo or '-'})"), ("size", f"{row.size} bytes"),
        ("status", f"{row.status}{released}{hold}"),
    ]
    for label, value in fields:
        out.write(f"{label + ':':<13}{clean(value)}\n")
    out.write("state:\n")
    for line in json.dumps(state, indent=2, sort_keys=True).splitlines():
        out.write(f"  {line}\n")


def _add_show(sub: Any) -> None:
    parser = subcommand(sub, "show", "every field and the stored state of the selected rows",
                        _show, limit=50)
    parser.add_argument("--raw", action="store_true",
                        help="the message: alone as stored (one row), or raw/raw_base64 with --json")


# -- delete and hold ----------------------------------------------------------


def _delete(ctx: Context, args: argparse.Namespace) -> int:
    require_selection(args, "delete")
    search = search_from(args)
    if args.dry_run:
        return _preview(ctx, args, search, "delete",
                        lambda row: not row.legal_hold and row.status != "deleted",
                        "on legal hold (kept) or deleted before")
    changed = _bulk(ctx, args, search, lambda s: ctx.store.delete(s, ctx.actor, ctx.origin))
    return _report(ctx, args, "delete", "deleted", changed)


def _hold(ctx: Context, args: argparse.Namespace) -> int:
    require_selection(args, "hold --off" if args.off else "hold")
    on = not args.off
    search = search_from(args)
    verb = "hold-off" if args.off else "hold"
    if args.dry_run:
        return _preview(ctx, args, search, verb, lambda row: row.legal_hold != on,
                        "already " + ("on" if on else "off") + " legal hold")
    changed = _bulk(ctx, args, search,
                    lambda s: ctx.store.set_hold(s, on, ctx.actor, ctx.origin))
    return _report(ctx, args, verb, "put on legal hold" if on else "taken off legal hold", changed)


def _bulk(ctx: Context, args: argparse.Namespace, search: Search,
          act: Callable[[Search], int]) -> int:
    """Apply ``act`` to the selection: to the ids of the first ``--limit``
    rows when a limit is given, else to the whole search at once."""
    if args.limit is None:
        return act(replace(search, limit=0, before_id=None))
    total = 0
    batch: list[int] = []
    for row in iter_rows(ctx.store, search, args.limit):
        batch.append(row.id)
    for start in range(0, len(batch), PAGE):
        ids = tuple(batch[start:start + PAGE])
        total += act(replace(search, ids=ids, limit=len(ids), before_id=None))
    return total


def _report(ctx: Context, args: argparse.Namespace, action: str, done: str, changed: int) -> int:
    if args.json:
        ctx.out.write(json.dumps({"action": action, "changed": changed}) + "\n")
    else:
        print(f"{changed} row(s) {done}", file=ctx.out)
    return EXIT_OK if changed else EXIT_NOTHING


def _preview(ctx: Context, args: argparse.Namespace, search: Search, action: str,
             would: Callable[[StoredRow], bool], unchanged: str) -> int:
    """``--dry-run``: the rows ``action`` would change, streamed."""
    counts = {"change": 0, "same": 0}

    def changing() -> Iterator[StoredRow]:
        for row in iter_rows(ctx.store, search, args.limit):
            if would(row):
                counts["change"] += 1
                yield row
            else:
                counts["same"] += 1

    if args.json:
        ctx.out.write(f'{{"action": {json.dumps(action)}, "dry_run": true, "rows": ')
        write_json_array(ctx.out, (row_json(r) for r in changing()))
        ctx.out.write(f', "changed": {counts["change"]}, "unchanged": {counts["same"]}}}\n')
    else:
        columns = terminal_columns(ctx.out)
        page: list[StoredRow] = []
        for row in changing():
            page.append(row)
            if len(page) == PAGE:
                write_table(ctx.out, page, columns)
                page = []
        if page:
            write_table(ctx.out, page, columns)
        print(f"dry run: {action} would change {counts['change']} row(s); "
              f"{counts['same']} {unchanged}", file=ctx.out)
    return EXIT_OK if counts["change"] else EXIT_NOTHING


def _add_delete(sub: Any) -> None:
    parser = subcommand(sub, "delete", "mark the selected rows deleted (legal holds are kept)",
                        _delete)
    add_bulk_options(parser)


def _add_hold(sub: Any) -> None:
    parser = subcommand(sub, "hold", "put the selected rows on legal hold (exempt from "
                        "retention and delete)", _hold)
    parser.add_argument("--off", action="store_true", help="lift the legal hold instead")
    add_bulk_options(parser)


# -- export -------------------------------------------------------------------


class Progress:
    """``rows done / total`` on one ``\\r`` line of stderr, when stderr is a
    terminal; silent otherwise (a log or a cron mail wants no bar)."""

    def __init__(self, total: int, stream: TextIO, label: str = "exported") -> None:
        self.total = total
        self.stream = stream
        self.label = label
        try:
            self.on = stream.isatty()
        except (AttributeError, ValueError):
            self.on = False
        self.last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        share = done / self.total if self.total else 1.0
        bar = "#" * int(share * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {done}/{self.total} ({share:.0%})")
        self.stream.flush()

    def finish(self, done: int) -> None:
        if self.on:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()


def mbox_from_line(row: StoredRow) -> bytes:
    """The ``From `` separator (RFC 4155): the envelope sender without
    spaces (``MAILER-DAEMON`` for ``<>``), then the asctime of receipt, UTC."""
    sender = re.sub(r"\s", "_", row.sender) or "MAILER-DAEMON"
    stamp = time.asctime(time.gmtime(row.received))
    return f"From {sender} {stamp}\n".encode("utf-8", "replace")


_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)


def mboxrd_body(message: bytes) -> bytes:
    """The message in mboxrd form: LF line ends, every line that starts
    with ``From `` after any number of ``>`` gets one more ``>`` (so a
    reader takes one away and has the message back exactly), and one empty
    line after it, before the next ``From `` line."""
    text = message.replace(b"\r\n", b"\n")
    text = _FROM_LINE.sub(rb">\1", text)
    if not text.endswith(b"\n"):
        text += b"\n"
    return text + b"\n"


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def eml_name(row: StoredRow, taken: set[str]) -> str:
    """``<ref>-<domain>.eml``, with only safe characters; ``-<id>`` added
    when two rows would share it (the same reference from two nodes)."""
    base = _UNSAFE_NAME.sub("_", f"{row.queue_id}-{row.rcpt_domain}").strip("._") or str(row.id)
    name = f"{base}.eml"
    if name in taken:
        name = f"{base}-{row.id}.eml"
    taken.add(name)
    return name


@dataclass
class _Output:
    """The export's destination: a temporary file beside ``path``, renamed
    onto it only when everything is written (a reader never sees half an
    export), or standard output for ``-``."""

    path: str
    stream: IO[bytes]
    temp: Optional[str]

    @classmethod
    def open(cls, path: str) -> "_Output":
        if path == "-":
            return cls(path, sys.stdout.buffer, None)
        directory = os.path.dirname(os.path.abspath(path))
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                        dir=directory)
        except OSError as e:
            raise UsageError(f"cannot write in {directory}: {e.strerror or e}") from None
        return cls(path, os.fdopen(fd, "wb"), temp)

    def commit(self) -> None:
        self.stream.flush()
        if self.temp is None:
            return
        os.fsync(self.stream.fileno())
        self.stream.close()
        os.replace(self.temp, self.path)
        self.temp = None

    def abandon(self) -> None:
        if self.temp is not None:
            self.stream.close()
            try:
                os.unlink(self.temp)
            except FileNotFoundError:
                pass
            self.temp = None


def _export(ctx: Context, args: argparse.Namespace) -> int:
    if args.format == "zip" and args.output == "-":
        raise UsageError("a zip needs a file (--output FILE); '-' is for mbox")
    if args.output != "-" and os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} is a directory")
    search = search_from(args)
    total = ctx.store.count(search)
    if args.limit is not None:
        total = min(total, args.limit)
    if total == 0:
        print("nothing matched; nothing written", file=ctx.err)
        return EXIT_NOTHING
    progress = Progress(total, ctx.err)
    missing: list[str] = []

    def messages() -> Iterator[tuple[StoredRow, bytes]]:
        for seen, row in enumerate(iter_rows(ctx.store, search, args.limit), 1):
            try:
                yield row, ctx.store.raw(row)
            except RawMissing as e:
                missing.append(str(e))  # a deleted row's message: said at the end
            progress.update(seen)

    output = _Output.open(args.output)
    try:
        write = write_mbox if args.format == "mbox" else write_zip
        done = write(messages(), output.stream)
        if done:
            output.commit()  # nothing written: no file (the finally removes it)
    except OSError as e:
        raise UsageError(f"cannot write {args.output}: {e.strerror or e}") from None
    finally:
        output.abandon()
    progress.finish(done + len(missing))
    for problem in missing[:10]:
        print(f"skipped: {problem}", file=ctx.err)
    if len(missing) > 10:
        print(f"skipped: {len(missing) - 10} more without their message", file=ctx.err)
    where = "standard output" if args.output == "-" else os.path.abspath(args.output)
    ctx.store.audit(ctx.actor, ctx.origin, "export", None,
                    f"{done} message(s) as {args.format} to {where}; "
                    f"selection: {describe_filters(args)}")
    if args.output != "-":
        print(f"{done} message(s) written to {args.output}", file=ctx.err)
    return EXIT_OK if done else EXIT_NOTHING


def describe_filters(args: argparse.Namespace) -> str:
    """The command line's selection, for the audit row."""
    parts = [f"--{name} {getattr(args, name)!r}" for name in FILTERS[1:] + ("status", "limit")
             if getattr(args, name) is not None]
    if args.ids:
        parts.insert(0, "ids " + ",".join(str(i) for i in args.ids))
    return " ".join(parts) or "(none)"


def write_mbox(messages: Iterator[tuple[StoredRow, bytes]], stream: IO[bytes]) -> int:
    """mboxrd (RFC 4155): a ``From `` line, the quoted message, an empty line."""
    done = 0
    for row, message in messages:
        stream.write(mbox_from_line(row))
        stream.write(mboxrd_body(message))
        done += 1
    return done


def write_zip(messages: Iterator[tuple[StoredRow, bytes]], stream: IO[bytes]) -> int:
    """The messages as ``.eml`` files (bytes as stored, CRLF), then
    ``manifest.json``: {"count", "exported_at", "rows": [each row's fields
    and its "file"]}.  The manifest's rows wait in a temporary file, not in
    memory."""
    done = 0
    taken: set[str] = set()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as manifest, \
            zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for row, message in messages:
            name = eml_name(row, taken)
            info = zipfile.ZipInfo(name, date_time=_zip_time(row.received))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, message)
            entry = row_json(row)
            entry["file"] = name
            manifest.write((",\n" if done else "\n") + "    " + json.dumps(entry, sort_keys=True))
            done += 1
        manifest.seek(0)
        with archive.open("manifest.json", "w") as target:
            writer = io.TextIOWrapper(target, encoding="utf-8")
            writer.write(f'{{\n  "count": {done},\n  "exported_at": '
                         f'{json.dumps(datetime.now(timezone.utc).isoformat())},\n  "rows": [')
            shutil.copyfileobj(manifest, writer)
            writer.write("\n  ]\n}\n" if done else "]\n}\n")
            writer.flush()
            writer.detach()
    return done


def _zip_time(epoch: float) -> tuple[int, int, int, int, int, int]:
    # Zip stores local-less DOS times from 1980 on; UTC here.
    t = time.gmtime(max(epoch, 315532800.0))
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def _add_export(sub: Any) -> None:
    parser = subcommand(sub, "export", "write the selected messages to an mbox or a zip", _export)
    parser.add_argument("--format", choices=("mbox", "zip"), default="mbox",
                        help="mbox (mboxrd, RFC 4155) or zip (<ref>-<domain>.eml files "
                             "and manifest.json); default mbox")
    parser.add_argument("--output", "-o", required=True, metavar="FILE",
                        help="where to write; - for standard output (mbox only)")


# -- release and forward ---------------------------------------------------------


def _release(ctx: Context, args: argparse.Namespace) -> int:
    """Release the selected held rows (mppproxy/release.py says how: claim,
    re-scan, re-inject through the route, mark, audit); with ``--stuck``,
    the selected rows a dead release left in releasing (``_release_stuck``)."""
    require_selection(args, "release --stuck" if args.stuck is not None else "release")
    search = search_from(args)
    if args.stuck is not None:
        return _release_stuck(ctx, args, search)
    if not args.status:
        search = replace(search, status=("held",))
    rows = list(iter_rows(ctx.store, search, args.limit))
    if not rows:
        if not args.status:
            _hint_stuck(ctx, ctx.store.count(replace(search, status=("releasing",))))
        return _no_rows(ctx, args, "release")
    if args.dry_run:
        return _release_preview(ctx, args, rows)
    results = _release_rows(ctx, args, rows)
    code = _release_report(ctx, args, results)
    _hint_busy(ctx, results)
    return code


def _release_rows(ctx: Context, args: argparse.Namespace,
                  rows: Sequence[StoredRow]) -> list[Any]:
    """Release ``rows`` one after the other; --allow-sender after."""
    rescan = False if args.no_rescan else (True if args.rescan else None)
    results = _with_releaser(ctx, rescan, lambda releaser: [releaser.release(r) for r in rows])
    if args.allow_sender:
        _allow_senders(ctx, rows, results)
    return results


def _release_stuck(ctx: Context, args: argparse.Namespace, search: Search) -> int:
    """``release --stuck``: the selected rows in releasing whose claim is
    older than ``--stuck`` minutes (their releasing process died: SIGKILL,
    power cut, a laptop closed) go back to held (``reset_stuck_releases``,
    one line and one audit row each, with the warning that the message may
    already have been delivered), then are released as any held row.  Only
    those: held rows the filters also match are not released by --stuck."""
    if args.status:
        raise UsageError("--stuck selects rows in releasing; --status does not go with it")
    older = args.stuck * 60.0
    search = replace(search, status=("releasing",))
    # Newest first, like every selection here (--limit keeps the newest).
    stuck = sorted(ctx.store.stuck_releases(search, older),
                   key=lambda s: (s.row.received, s.row.id), reverse=True)
    if args.limit is not None:
        stuck = stuck[:args.limit]
    if not stuck:
        return _no_stuck(ctx, args, search)
    if args.dry_run:
        return _stuck_preview(ctx, args, stuck)
    ids = [s.row.id for s in stuck]
    reset: list[StoredRow] = []
    for start in range(0, len(ids), PAGE):
        chunk = tuple(ids[start:start + PAGE])
        reset += ctx.store.reset_stuck_releases(
            replace(search, ids=chunk, limit=len(chunk), before_id=None), older,
            ctx.actor, ctx.origin)
    found = {s.row.id: s for s in stuck}
    order = {row_id: n for n, row_id in enumerate(ids)}
    reset.sort(key=lambda row: order[row.id])
    if not args.json:
        for row in reset:
            print(f"{row.id} {clean(row.queue_id)} {clean(row.rcpt_domain)}: reset to held: "
                  f"{clean(found[row.id].detail())}", file=ctx.out)
    if not reset:
        # Between the look and the reset another administrator reset them
        # (or their release finished after all).
        return _no_stuck(ctx, args, search)
    results = _release_rows(ctx, args, reset)
    return _release_report(ctx, args, results,
                           reset=[_stuck_json(found[row.id]) for row in reset])


def _stuck_json(stuck: StuckRelease) -> dict[str, Any]:
    row = stuck.row
    return {"id": row.id, "ref": row.queue_id, "domain": row.rcpt_domain,
            "claimed_at": stuck.claimed_at, "claimed_by": stuck.claimed_by,
            "claimed_from": stuck.claimed_from, "detail": stuck.detail()}


def _no_stuck(ctx: Context, args: argparse.Namespace, search: Search) -> int:
    """Nothing to reset: say so, and whether rows in releasing were left
    alone because their release may still be running."""
    young = ctx.store.count(search)
    if args.json:
        ctx.out.write(json.dumps({"action": "release", "stuck_minutes": args.stuck,
                                  "reset": [], "results": []}) + "\n")
    else:
        print(f"no stuck release matches (a row in releasing claimed more than "
              f"{args.stuck:g} minutes ago): nothing to reset", file=ctx.out)
    if young:
        print(f"{young} matching row(s) in releasing were claimed less than {args.stuck:g} "
              f"minutes ago: their release may still be running; left alone", file=ctx.err)
    return EXIT_NOTHING


def _stuck_preview(ctx: Context, args: argparse.Namespace,
                   stuck: Sequence[StuckRelease]) -> int:
    if args.json:
        ctx.out.write(json.dumps({"action": "release", "dry_run": True,
                                  "stuck_minutes": args.stuck,
                                  "reset": [_stuck_json(s) for s in stuck],
                                  "rows": [row_json(s.row) for s in stuck]}) + "\n")
        return EXIT_OK
    write_table(ctx.out, [s.row for s in stuck], terminal_columns(ctx.out))
    for s in stuck:
        print(f"{s.row.id} {clean(s.row.queue_id)} {clean(s.row.rcpt_domain)}: would reset "
              f"to held: {clean(s.detail())}", file=ctx.out)
    print(f"dry run: release --stuck would reset {len(stuck)} row(s) to held and release "
          f"them", file=ctx.out)
    return EXIT_OK


def _hint_stuck(ctx: Context, releasing: int) -> None:
    if releasing:
        print(f"{releasing} matching row(s) are in releasing (another release has them; "
              f"if it died, 'release --stuck' puts them back to held and releases them "
              f"once their claim is {STUCK_MINUTES:g} minutes old)", file=ctx.err)


def _hint_busy(ctx: Context, results: Sequence[Any]) -> None:
    """A row reported busy because it is in releasing: say how to get it
    out if the release that has it died."""
    from mppproxy.release import Outcome

    releasing = 0
    for result in results:
        if result.outcome is Outcome.BUSY:
            row = ctx.store.get(result.row_id)
            releasing += row is not None and row.status == "releasing"
    _hint_stuck(ctx, releasing)


def _forward(ctx: Context, args: argparse.Namespace) -> int:
    """A copy of each selected row to --to (any status but deleted)."""
    require_selection(args, "forward")
    rows = list(iter_rows(ctx.store, search_from(args), args.limit))
    if not rows:
        return _no_rows(ctx, args, "forward")
    to = tuple(args.to)
    results = _with_releaser(ctx, False, lambda releaser: [releaser.forward(r, to) for r in rows])
    return _release_report(ctx, args, results)


def _with_releaser(ctx: Context, rescan: Optional[bool],
                   work: Callable[[Any], list[Any]]) -> list[Any]:
    """Run ``work(releaser)`` (a list of coroutines, run one after the
    other: one route connection at a time) under a reactor; the results."""
    from twisted.internet import task

    from mppproxy._async import as_deferred
    from mppproxy.archive.keys import node_keys
    from mppproxy.release import Releaser

    keys = node_keys(ctx.config)
    results: list[Any] = []
    failure: list[BaseException] = []

    async def run(reactor: Any) -> None:
        releaser = Releaser(ctx.config, ctx.store, reactor, keys, ctx.actor, ctx.origin,
                            rescan=rescan)
        try:
            for step in work(releaser):
                results.append(await step)
        except BaseException as e:  # reported after the reactor stopped
            failure.append(e)
        finally:
            releaser.close()

    try:
        task.react(lambda reactor: as_deferred(run(reactor)))
    except SystemExit:
        pass  # react() always exits; what happened is in results/failure
    if failure:
        raise failure[0]
    return results


def _allow_senders(ctx: Context, rows: Sequence[StoredRow], results: Sequence[Any]) -> None:
    """"Release and allow this sender": the sender of each released row
    goes on the allow list of the row's recipient domain (db/allowlist.py,
    shared by every edge through the state database)."""
    from mppproxy.db.allowlist import open_allow_list
    from mppproxy.release import Outcome

    released = [row for row, result in zip(rows, results) if result.outcome is Outcome.RELEASED]
    if not released:
        return
    with open_allow_list(ctx.config.database, ctx.config.data_dir) as allow:
        for row in released:
            if not row.sender:
                continue  # the null sender: "<>" would allow every bounce
            new = allow.allow(row.rcpt_domain, row.sender, ctx.actor,
                              f"released {row.queue_id} ({ctx.origin})")
            ctx.store.audit(ctx.actor, ctx.origin, "allow-sender", row,
                            f"{row.sender} allowed for {row.rcpt_domain}"
                            + ("" if new else " (already allowed)"))


def _no_rows(ctx: Context, args: argparse.Namespace, action: str) -> int:
    if args.json:
        ctx.out.write(json.dumps({"action": action, "results": []}) + "\n")
    else:
        print(f"no row matches: nothing to {action}", file=ctx.out)
    return EXIT_NOTHING


def _release_preview(ctx: Context, args: argparse.Namespace, rows: Sequence[StoredRow]) -> int:
    if args.json:
        ctx.out.write(json.dumps({"action": "release", "dry_run": True,
                                  "rows": [row_json(r) for r in rows]}) + "\n")
    else:
        write_table(ctx.out, rows, terminal_columns(ctx.out))
        print(f"dry run: release would try {len(rows)} row(s)", file=ctx.out)
    return EXIT_OK


def _release_report(ctx: Context, args: argparse.Namespace, results: Sequence[Any],
                    reset: Optional[list[dict[str, Any]]] = None) -> int:
    """One line (or JSON object) per row; the exit status: 0 every row
    done, 1 none was held any more (another administrator was first),
    4 some could not be done (refused by the re-scan, deferred, failed).
    ``reset``: the rows ``--stuck`` put back to held (JSON "reset")."""
    from mppproxy.release import Outcome

    if args.json:
        document: dict[str, Any] = {"results": [r.to_json() for r in results]}
        if reset is not None:
            document = {"stuck_minutes": args.stuck, "reset": reset, **document}
        ctx.out.write(json.dumps(document) + "\n")
    else:
        for r in results:
            print(f"{r.row_id} {r.ref} {r.domain}: {r.outcome}: {clean(r.detail)}", file=ctx.out)
    done = (Outcome.RELEASED, Outcome.FORWARDED)
    if all(r.outcome in done for r in results):
        return EXIT_OK
    if all(r.outcome is Outcome.BUSY for r in results):
        return EXIT_NOTHING
    return EXIT_PARTIAL


def _add_release(sub: Any) -> None:
    parser = subcommand(sub, "release", "re-scan the selected held messages and deliver each "
                        "once to its recipients of that domain ([release] routes)", _release)
    rescan = parser.add_mutually_exclusive_group()
    rescan.add_argument("--no-rescan", action="store_true",
                        help="do not scan again before delivering (default: [release] rescan)")
    rescan.add_argument("--rescan", action="store_true",
                        help="scan again even where [release] says not to")
    parser.add_argument("--allow-sender", action="store_true",
                        help="also put each released message's sender on its recipient "
                             "domain's allow list (all edges, within database.cache_seconds)")
    parser.add_argument("--stuck", nargs="?", const=STUCK_MINUTES, type=_minutes,
                        metavar="MINUTES",
                        help="release instead the selected rows left in releasing by a "
                             "release that died (claimed more than MINUTES ago, default "
                             f"{STUCK_MINUTES:g}): each goes back to held first, with a "
                             "warning and an audit row (it may already have been delivered); "
                             "row ids go before --stuck")
    add_bulk_options(parser)


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number of minutes above 0")
    return value


def _add_forward(sub: Any) -> None:
    parser = subcommand(sub, "forward", "send a copy of the selected messages to other "
                        "addresses (the rows stay as they are)", _forward)
    parser.add_argument("--to", action="append", required=True, metavar="ADDRESS",
                        help="recipient of the copy (repeatable)")
    parser.add_argument("--all", action="store_true",
                        help="act on every row when no filter is given")


# The subcommands, in the order --help lists them.
SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (
    _add_list, _add_show, _add_release, _add_forward, _add_delete, _add_hold, _add_export,
)
