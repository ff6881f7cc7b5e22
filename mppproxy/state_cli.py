"""``mppproxy state``: the auto-blacklist and the greylist of the state
database, for an administrator (issue 16, "Administrator's CLI").

Floor 4 (entry points): ``cli.py`` hands the ``state`` subcommand here;
this module reads the configuration (``--config FILE`` or
``--config-command CMD``; neither: the built-in defaults with ``$MPP_HOME``
as the data directory, as ``twistd -n mppproxy`` runs), opens the database
of its ``[database]`` section (SQLite under ``data_dir``, or MariaDB) and
calls ``db/stateadmin.py``, blocking, on the main thread.

Subcommands::

    state blacklist list   [--client ADDR|NET] [--limit N] [--json]
    state blacklist add    NETWORK [--reason TEXT] [--for DURATION]
    state blacklist remove NETWORK... | --client ADDR|NET --all | --all  [--dry-run]
    state greylist list    [--client] [--sender] [--recipient] [--whitelist] [--limit] [--json]
    state greylist remove  ID... | filters --all | --all  [--dry-run]
    state greylist remove  --whitelist NETWORK... | --client ADDR|NET --all | --all

Removal by key (a NETWORK, a triplet ID) takes those rows; removal by a
filter takes what it matches only with ``--all`` (without it, the matches
are listed and the command exits 2); ``--all`` alone takes every row.
    state greylist whitelist CLIENT...

The running proxies see a change within ``database.cache_seconds`` (their
caches, ``db/blacklist.py`` and ``db/greylist.py``); every change says so.

Exit status, for scripts:

    0  done: rows listed or changed
    1  nothing matched (nothing listed, nothing to remove)
    2  usage error: a bad option, address or duration; a configuration
       with errors; a filter matching several rows without --all
    3  the state database is unavailable (down, unreachable, a SQLite file
       that does not exist for a command that only reads); the message
       names it without its password, never a traceback
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, Sequence

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from mppproxy.config.schema import ProxyConfig
from mppproxy.db.stateadmin import (BlacklistRow, StateAdmin, TripletRow, WhitelistRow, covering,
                                    key_for, missing_sqlite_file, open_state_admin, state_url)
from mppproxy.quarantine_cli import config_or_report, login_name, positive_int

EXIT_OK, EXIT_NONE, EXIT_USAGE, EXIT_DATABASE = 0, 1, 2, 3
EXIT_HELP = """exit status: 0 done, 1 nothing matched, 2 usage or configuration error,
3 the state database is unavailable"""
# An administrator's blacklist entry lasts this long unless --for says.
DEFAULT_BLACKLIST_FOR = "1d"
# Leading hex digits of a greylist key that select a triplet (list shows 12).
MIN_ID_PREFIX = 8
SHOWN_ID = 12

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_HEX = re.compile(r"^[0-9a-f]+$")


class UsageError(Exception):
    """The command cannot run as given (exit 2); the text says why."""


class Context:
    """What a subcommand works with: the configuration, the database, the
    time of the command, where its output goes."""

    def __init__(self, config: ProxyConfig, admin: StateAdmin, url: URL, now: float):
        self.config = config
        self.admin = admin
        self.url = url
        self.now = now
        self.out = sys.stdout
        self.err = sys.stderr

    @property
    def within(self) -> str:
        """When the running proxies see a change."""
        seconds = self.config.database.cache_seconds
        return f"takes effect within {_seconds(seconds)} (database.cache_seconds)"


Handler = Callable[[Context, argparse.Namespace], int]


# -- the parser ----------------------------------------------------------------

def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``state`` and its subcommands to ``mppproxy``'s subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "state", help="the auto-blacklist and the greylist of the state database",
        description="List and change the auto-blacklist and the greylist in the state "
                    "database ([database]); running proxies see a change within "
                    "database.cache_seconds (docs/operations.md).",
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    tables = parser.add_subparsers(dest="state_table", required=True, metavar="TABLE")

    black = tables.add_parser("blacklist", help="the auto-blacklist of client networks")
    bsub = black.add_subparsers(dest="state_command", required=True, metavar="COMMAND")
    p = _sub(bsub, "list", "list unexpired entries, latest expiry first", _blacklist_list)
    p.add_argument("--client", metavar="ADDR|NET", help="entries whose network contains it")
    _limit(p)
    p = _sub(bsub, "add", "list a client address or network", _blacklist_add)
    p.add_argument("network", metavar="NETWORK", help="an address (192.0.2.7) or a network "
                   "(192.0.2.0/24, 2001:db8::/64)")
    p.add_argument("--reason", default=None, help="why (default: 'manual, by LOGIN')")
    p.add_argument("--for", dest="duration", default=DEFAULT_BLACKLIST_FOR, metavar="DURATION",
                   help=f"how long: 90s, 30m, 12h, 7d, 2w (default {DEFAULT_BLACKLIST_FOR})")
    p = _sub(bsub, "remove", "remove entries", _blacklist_remove)
    p.add_argument("networks", nargs="*", metavar="NETWORK", help="entries, as list shows them")
    p.add_argument("--client", metavar="ADDR|NET", help="the entries whose network contains it")
    _bulk(p)

    grey = tables.add_parser("greylist", help="greylist triplets and the auto-whitelist")
    gsub = grey.add_subparsers(dest="state_command", required=True, metavar="COMMAND")
    p = _sub(gsub, "list", "list unexpired triplets (or auto-whitelisted networks)",
             _greylist_list)
    _triplet_filters(p)
    p.add_argument("--whitelist", action="store_true",
                   help="list the auto-whitelisted client networks instead")
    _limit(p)
    p = _sub(gsub, "remove", "remove triplets (or auto-whitelisted networks)", _greylist_remove)
    p.add_argument("ids", nargs="*", metavar="ID",
                   help=f"triplet ids as list shows them (at least {MIN_ID_PREFIX} hex digits); "
                        "with --whitelist: networks")
    _triplet_filters(p)
    p.add_argument("--whitelist", action="store_true",
                   help="remove auto-whitelisted networks (NETWORK... or --client)")
    _bulk(p)
    p = _sub(gsub, "whitelist", "let a client network skip greylisting (the auto-whitelist)",
             _greylist_whitelist)
    p.add_argument("clients", nargs="+", metavar="CLIENT",
                   help="an address or network of the client (keyed at the policies' "
                        "greylisting.ipv4_prefix / ipv6_prefix)")
    return parser


def _sub(sub: Any, name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help, epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file")
    group.add_argument("--config-command", metavar="CMD",
                       help="command whose output is the configuration")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    # The tables' prefix (StateDatabase's table_prefix): tests sharing one
    # MariaDB give each run its own tables.  Not for operators: the proxy
    # always uses "mpp_".
    parser.add_argument("--table-prefix", default="mpp_", help=argparse.SUPPRESS)
    parser.set_defaults(func=partial(run, handler))
    return parser


def _limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="at most N rows (default: all)")


def _bulk(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true",
                        help="remove every match of the filter (every row without one)")
    parser.add_argument("--dry-run", "-n", action="store_true",
                        help="list what would be removed, remove nothing")


def _triplet_filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters (all given must match)")
    group.add_argument("--client", metavar="ADDR|NET",
                       help="triplets whose client network contains it")
    group.add_argument("--sender", help="envelope sender: an address, @domain, or <>")
    group.add_argument("--recipient", "--rcpt", dest="recipient",
                       help="envelope recipient: an address or @domain")


# -- running a subcommand ---------------------------------------------------------

def run(handler: Handler, args: argparse.Namespace) -> int:
    """Load the configuration, open the database, run ``handler``; every
    failure becomes a message and an exit status, never a traceback."""
    name = f"mppproxy state {args.state_table} {args.state_command}"
    err = sys.stderr
    if args.config and args.config_command:
        print(f"{name}: give --config or --config-command, not both", file=err)
        return EXIT_USAGE
    config = config_or_report(args.config, args.config_command, err)
    if config is None:
        return EXIT_USAGE
    url = state_url(config.database, config.data_dir)
    shown = url.render_as_string(hide_password=True)
    where = f"the state database {shown} ([database] url)"
    reads = args.state_command == "list" or getattr(args, "dry_run", False)
    missing = missing_sqlite_file(url)
    if missing is not None and reads:
        print(f"{name}: {where}: {missing} does not exist (a proxy with this configuration "
              f"creates it at its start; is --config right?)", file=err)
        return EXIT_DATABASE
    try:
        with open_state_admin(config.database, config.data_dir, args.table_prefix) as admin:
            if not reads:
                admin.create_tables()
            return handler(Context(config, admin, url, time.time()), args)
    except UsageError as e:
        print(f"{name}: {e}", file=err)
        return EXIT_USAGE
    except (SQLAlchemyError, OSError) as e:
        print(f"{name}: {where}: {_db_reason(e, url)}", file=err)
        return EXIT_DATABASE


def _db_reason(error: BaseException, url: URL) -> str:
    """The driver's own words, one line, without the password."""
    if isinstance(error, DBAPIError) and error.orig is not None:
        text = str(error.orig)
    elif isinstance(error, OSError):
        text = error.strerror or str(error)
    else:
        text = str(error).split("\n(Background on this error")[0]
    text = " ".join(text.split())[:300] or type(error).__name__
    if url.password:
        text = text.replace(str(url.password), "***")
    return text


def _network(text: str, what: str = "address or network") -> str:
    try:
        covering(text)
    except ValueError:
        raise UsageError(f"{text!r} is not an IP {what}") from None
    return text


def _duration(text: str) -> float:
    m = _DURATION.match(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--for {text!r}: give a duration such as 90s, 30m, 12h, 7d or 2w")
    return float(m.group(1)) * _UNITS[m.group(2)]


# -- output --------------------------------------------------------------------

def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(seconds: float) -> str:
    """A duration as a person reads it: 45 s, 30 min, 12 h, 7 d."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds:g} s"


def _json(ctx: Context, data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False), file=ctx.out)


def _table(ctx: Context, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in [header, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])]
        print("  ".join([*cells, line[-1]]), file=ctx.out)


def _blacklist_json(row: BlacklistRow) -> dict[str, Any]:
    return {**asdict(row), "created_utc": _utc(row.created), "expires_utc": _utc(row.expires)}


def _triplet_json(row: TripletRow) -> dict[str, Any]:
    return {**asdict(row), "first_seen_utc": _utc(row.first_seen),
            "last_seen_utc": _utc(row.last_seen), "expires_utc": _utc(row.expires)}


def _whitelist_json(row: WhitelistRow) -> dict[str, Any]:
    return {**asdict(row), "last_seen_utc": _utc(row.last_seen), "expires_utc": _utc(row.expires)}


def _nothing(ctx: Context, what: str) -> int:
    print(f"no {what}", file=ctx.err)
    return EXIT_NONE


# -- blacklist -----------------------------------------------------------------

def _show_blacklist(ctx: Context, rows: Sequence[BlacklistRow], as_json: bool) -> None:
    if as_json:
        _json(ctx, [_blacklist_json(r) for r in rows])
        return
    _table(ctx, ("NETWORK", "EXPIRES (UTC)", "REASON"),
           [(r.network, _utc(r.expires), r.reason) for r in rows])


def _blacklist_list(ctx: Context, args: argparse.Namespace) -> int:
    client = _network(args.client) if args.client else None
    rows = ctx.admin.blacklist(ctx.now, client=client, limit=args.limit)
    if not rows:
        if args.json:
            _json(ctx, [])
        return _nothing(ctx, "blacklist entry" + (f" contains {args.client}" if client else ""))
    _show_blacklist(ctx, rows, args.json)
    return EXIT_OK


def _blacklist_add(ctx: Context, args: argparse.Namespace) -> int:
    network = _network(args.network)
    seconds = _duration(args.duration)
    reason = args.reason if args.reason is not None else f"manual, by {login_name()}"
    row, old = ctx.admin.add_blacklist(network, seconds, reason, ctx.now)
    if args.json:
        _json(ctx, {"added": _blacklist_json(row),
                    "replaced": None if old is None else _blacklist_json(old),
                    "takes_effect_within": ctx.config.database.cache_seconds})
        return EXIT_OK
    replaced = (f" (replacing an entry until {_utc(old.expires)}: {old.reason})"
                if old is not None else "")
    print(f"blacklisted {row.network} until {_utc(row.expires)} ({_seconds(seconds)}): "
          f"{row.reason}{replaced}; {ctx.within}", file=ctx.out)
    return EXIT_OK


def _blacklist_remove(ctx: Context, args: argparse.Namespace) -> int:
    if args.networks and args.client:
        raise UsageError("give NETWORKs or --client, not both")
    if args.networks:
        wanted = []
        for text in args.networks:
            _network(text, "network")
            wanted.append(covering(text)[-1])  # as stored (normalised)
        rows = _exact_blacklist(ctx, wanted)
    else:
        client = _network(args.client) if args.client else None
        if client is None and not args.all:
            raise UsageError("give the NETWORKs to remove, or --client ADDR|NET, or --all "
                             "to remove every entry")
        rows = ctx.admin.blacklist(ctx.now, client=client)
        if rows and not args.all:
            _show_blacklist(ctx, rows, False)
            raise UsageError(f"--client {args.client} matches {len(rows)} entr"
                             f"{'y' if len(rows) == 1 else 'ies'} (above): add --all to remove "
                             "what a filter matches, or name the NETWORKs")
    if not rows:
        return _nothing(ctx, "matching blacklist entry")
    if args.dry_run:
        _show_blacklist(ctx, rows, args.json)
        return EXIT_OK
    removed = ctx.admin.remove_blacklist([r.network for r in rows])
    if args.json:
        _json(ctx, {"removed": [_blacklist_json(r) for r in rows], "count": removed,
                    "takes_effect_within": ctx.config.database.cache_seconds})
        return EXIT_OK if removed else EXIT_NONE
    for r in rows:
        print(f"removed {r.network} ({r.reason})", file=ctx.out)
    print(f"{removed} blacklist entr{'y' if removed == 1 else 'ies'} removed; {ctx.within}",
          file=ctx.out)
    return EXIT_OK if removed else EXIT_NONE


def _exact_blacklist(ctx: Context, networks: list[str]) -> list[BlacklistRow]:
    """The unexpired entries of exactly these networks."""
    rows: list[BlacklistRow] = []
    for network in dict.fromkeys(networks):
        rows += [r for r in ctx.admin.blacklist(ctx.now, client=network) if r.network == network]
    return rows


# -- greylist ------------------------------------------------------------------

def _show_triplets(ctx: Context, rows: Sequence[TripletRow], as_json: bool) -> None:
    if as_json:
        _json(ctx, [_triplet_json(r) for r in rows])
        return
    _table(ctx, ("ID", "CLIENT", "STATE", "FIRST SEEN (UTC)", "EXPIRES (UTC)",
                 "SENDER -> RECIPIENT"),
           [(r.id[:SHOWN_ID], r.client_net, "passed" if r.passed else "waiting",
             _utc(r.first_seen), _utc(r.expires), f"<{r.sender}> -> <{r.recipient}>")
            for r in rows])


def _show_whitelist(ctx: Context, rows: Sequence[WhitelistRow], as_json: bool) -> None:
    if as_json:
        _json(ctx, [_whitelist_json(r) for r in rows])
        return
    _table(ctx, ("NETWORK", "LAST USED (UTC)", "EXPIRES (UTC)"),
           [(r.client_net, _utc(r.last_seen), _utc(r.expires)) for r in rows])


def _filters_given(args: argparse.Namespace) -> bool:
    return bool(args.client or args.sender is not None or args.recipient)


def _greylist_list(ctx: Context, args: argparse.Namespace) -> int:
    client = _network(args.client) if args.client else None
    if args.whitelist:
        if args.sender is not None or args.recipient:
            raise UsageError("--whitelist lists client networks: only --client filters them")
        wrows = ctx.admin.whitelist(ctx.now, client=client, limit=args.limit)
        if not wrows:
            if args.json:
                _json(ctx, [])
            return _nothing(ctx, "auto-whitelisted network matched")
        _show_whitelist(ctx, wrows, args.json)
        return EXIT_OK
    rows = ctx.admin.triplets(ctx.now, client=client, sender=args.sender,
                              recipient=args.recipient, limit=args.limit)
    if not rows:
        if args.json:
            _json(ctx, [])
        return _nothing(ctx, "greylist triplet matched")
    _show_triplets(ctx, rows, args.json)
    return EXIT_OK


def _greylist_remove(ctx: Context, args: argparse.Namespace) -> int:
    if args.whitelist:
        return _whitelist_remove(ctx, args)
    ids = [i.strip().lower() for i in args.ids]
    for i in ids:
        if len(i) < MIN_ID_PREFIX or not _HEX.match(i):
            raise UsageError(f"{i!r} is not a triplet id (at least {MIN_ID_PREFIX} hex digits, "
                             "as list shows them)")
    if not ids and not _filters_given(args) and not args.all:
        raise UsageError("give triplet IDs, or filters (--client --sender --recipient) with "
                         "--all, or --all alone to remove every triplet")
    client = _network(args.client) if args.client else None
    rows = ctx.admin.triplets(ctx.now, client=client, sender=args.sender,
                              recipient=args.recipient, ids=ids or None)
    if ids:
        for i in ids:
            hits = [r for r in rows if r.id.startswith(i)]
            if len(hits) > 1 and not args.all:
                _show_triplets(ctx, hits, False)
                raise UsageError(f"id {i} matches {len(hits)} triplets (above): give more of it")
    elif rows and not args.all:
        _show_triplets(ctx, rows, False)
        raise UsageError(f"the filters match {len(rows)} triplet(s) (above): add --all to remove "
                         "what a filter matches, or give their IDs")
    if not rows:
        return _nothing(ctx, "greylist triplet matched")
    if args.dry_run:
        _show_triplets(ctx, rows, args.json)
        return EXIT_OK
    removed = ctx.admin.remove_triplets([r.id for r in rows])
    if args.json:
        _json(ctx, {"removed": [_triplet_json(r) for r in rows], "count": removed,
                    "takes_effect_within": ctx.config.database.cache_seconds})
        return EXIT_OK if removed else EXIT_NONE
    for r in rows:
        print(f"removed {r.id[:SHOWN_ID]} {r.client_net} <{r.sender}> -> <{r.recipient}>",
              file=ctx.out)
    print(f"{removed} triplet(s) removed: their next attempt is greylisted as a first one; "
          f"{ctx.within}", file=ctx.out)
    return EXIT_OK if removed else EXIT_NONE


def _whitelist_remove(ctx: Context, args: argparse.Namespace) -> int:
    if args.sender is not None or args.recipient:
        raise UsageError("--whitelist removes client networks: give NETWORKs or --client")
    if args.ids and args.client:
        raise UsageError("give NETWORKs or --client, not both")
    if args.ids:
        wanted = {covering(_network(t, "network"))[-1] for t in args.ids}
        rows = [r for r in ctx.admin.whitelist(ctx.now) if r.client_net in wanted]
    else:
        if not args.client and not args.all:
            raise UsageError("give the NETWORKs to remove, or --client ADDR|NET, or --all")
        client = _network(args.client) if args.client else None
        rows = ctx.admin.whitelist(ctx.now, client=client)
        if rows and not args.all:
            _show_whitelist(ctx, rows, False)
            raise UsageError(f"--client {args.client} matches {len(rows)} network(s) (above): "
                             "add --all to remove what a filter matches, or name the NETWORKs")
    if not rows:
        return _nothing(ctx, "auto-whitelisted network matched")
    if args.dry_run:
        _show_whitelist(ctx, rows, args.json)
        return EXIT_OK
    removed = ctx.admin.remove_whitelisted([r.client_net for r in rows])
    if args.json:
        _json(ctx, {"removed": [_whitelist_json(r) for r in rows], "count": removed,
                    "takes_effect_within": ctx.config.database.cache_seconds})
        return EXIT_OK if removed else EXIT_NONE
    for r in rows:
        print(f"removed {r.client_net} from the auto-whitelist", file=ctx.out)
    print(f"{removed} network(s) removed; {ctx.within}", file=ctx.out)
    return EXIT_OK if removed else EXIT_NONE


def _greylist_whitelist(ctx: Context, args: argparse.Namespace) -> int:
    """Whitelist each CLIENT at the prefixes of the policies that read the
    auto-whitelist (greylisting enabled, auto_whitelist_after > 0), for the
    longest of their lifetimes."""
    policies = ctx.config.policies
    readers = {name: p.greylisting for name, p in policies.items()
               if p.greylisting.enabled and p.greylisting.auto_whitelist_after > 0}
    settings = readers or {"default": policies["default"].greylisting}
    if not readers:
        print("warning: no policy reads the auto-whitelist (greylisting.enabled with "
              "greylisting.auto_whitelist_after > 0): the entry has no effect until one does",
              file=ctx.err)
    networks: dict[str, float] = {}
    for text in args.clients:
        _network(text)
        for name, g in settings.items():
            try:
                key = key_for(text, g.ipv4_prefix, g.ipv6_prefix)
            except ValueError as e:
                raise UsageError(f"policies.{name}.greylisting: {e}") from None
            networks[key] = max(networks.get(key, 0.0), g.lifetime)
    rows = ctx.admin.whitelist_networks(networks, ctx.now)
    if args.json:
        _json(ctx, {"whitelisted": [_whitelist_json(r) for r in rows],
                    "takes_effect_within": ctx.config.database.cache_seconds})
        return EXIT_OK
    for r in rows:
        print(f"whitelisted {r.client_net}: skips greylisting until {_seconds(r.expires - r.last_seen)} "
              f"after its last use (greylisting.lifetime; now until {_utc(r.expires)})",
              file=ctx.out)
    print(ctx.within, file=ctx.out)
    return EXIT_OK
