"""``mppproxy``: command-line tools beside the twistd plugin.

``mppproxy check-config FILE`` validates a configuration and prints each
problem as ``file: key.path: what is wrong``; the exit status is 0 when it
is valid and 1 when not, so it fits in a deploy script before a reload.

``mppproxy scan FILE`` (``-`` for standard input) scans one message with
the scanners of a configuration, as ``--mode scan`` does, and prints the
verdict (``--json`` for JSON).  The exit status says what the proxy would
do: 0 relay or tag, 1 reject or quarantine, 2 tempfail or an error (an
unreadable file, a bad configuration, an unknown policy).

``mppproxy --version`` prints the version with Python's and Twisted's.
``mppproxy show-config [FILE|--config-command CMD] [--all] [--json]``
prints the effective configuration (``config/show.py``: only what differs
from the defaults unless ``--all``; secrets masked); a configuration with
errors prints them as ``check-config`` does and exits 1.  ``mppproxy
state blacklist|greylist ...`` works on the state database (``state_cli.py``).
``mppproxy replay --config FILE [--against FILE] PATH...`` judges a mail
corpus offline and shows what a configuration would change (``replay_cli.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

from mppproxy import __version__
from mppproxy._async import as_deferred
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import check_files, load, source_name


def _check_config(args: argparse.Namespace) -> int:
    if not args.file and not args.config_command:
        print("mppproxy check-config: give a FILE or --config-command", file=sys.stderr)
        return 2
    try:
        config = load(args.file, args.config_command)
        check_files(config, source_name(args.file, args.config_command))
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print(f"{len(e.errors)} error(s); the configuration is not valid", file=sys.stderr)
        return 1
    source = source_name(args.file, args.config_command)
    print(f"{source}: OK (mode {config.mode}, {summary(config)})")
    return 0


def version_text() -> str:
    """``mppproxy X (Python Y, Twisted Z)``: what a bug report needs first."""
    import platform

    import twisted

    return (f"mppproxy {__version__} (Python {platform.python_version()}, "
            f"Twisted {twisted.__version__})")


def _show_config(args: argparse.Namespace) -> int:
    """The effective configuration (``config/show.py``); exit 0, or 1 with
    check-config's messages for a configuration with errors, 2 for usage."""
    from mppproxy.config.show import config_tree, toml_lines
    from mppproxy.quarantine_cli import load_config

    if args.file and args.config_command:
        print("mppproxy show-config: give a FILE or --config-command, not both", file=sys.stderr)
        return 2
    try:
        config = load_config(args.file, args.config_command)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print(f"{len(e.errors)} error(s); the configuration is not valid", file=sys.stderr)
        return 1
    tree = config_tree(config, all_keys=args.all)
    if args.json:
        text = json.dumps(tree, indent=2, ensure_ascii=False)
    else:
        source = source_name(args.file, args.config_command)
        what = "every key" if args.all else "keys that differ from their defaults"
        text = "\n".join([f"# {source}: {what}; secrets masked", *toml_lines(tree)])
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `| head`: the reader has what it wanted.  Python would complain
        # again when it flushes at exit, so stdout goes to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def summary(config: Any) -> str:
    """What the checked configuration would run, in the words of its own
    mode: the listeners that mode opens and where mail (or answers) go."""
    # The default first: it takes every domain the others do not name.
    policies = f"policies {', '.join(sorted(config.policies, key=lambda n: n != 'default'))}"
    if config.mode == "policy":
        return f"policy server on {_endpoints(config.policyd.listen)}, {policies}"
    if config.mode == "scan":
        service = config.scanservice
        return (f"scan service: SMTP {_endpoints(service.smtp_listen)}, "
                f"HTTP {_endpoints(service.http_listen)}, {policies}")
    if config.mode == "archive":
        node = config.archive_node
        return (f"archive node on {_endpoints(node.listen)}, edges {', '.join(node.edges)}, "
                f"store {_store_url(config)}")
    target = (f"relay to {config.backend.host}:{config.backend.port}" if config.backend
              else "local Maildir delivery")
    return f"listen {_endpoints(config.listen)}, {target}"


def _store_url(config: Any) -> str:
    """The archive store's database, without its password."""
    from mppproxy.store.store import ArchiveStore

    return ArchiveStore(config.store, config.data_dir).display_url


def _endpoints(listen: Any) -> str:
    return ", ".join(listen) if listen else "off"


def _read_message(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    with open(name, "rb") as f:
        return f.read()


def _scan(args: argparse.Namespace) -> int:
    from mppproxy.scanservice.core import EXIT_CODES, ScanRequest, UnknownPolicy

    try:
        config = load(args.config, None)
        check_files(config, source_name(args.config))
    except ConfigError as e:
        print("mppproxy scan: the configuration has errors:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    try:
        if args.file != "-" and os.path.getsize(args.file) > config.limits.max_message_size:
            print(f"mppproxy scan: {args.file} is larger than limits.max_message_size "
                  f"({config.limits.max_message_size})", file=sys.stderr)
            return 2
        data = _read_message(args.file)
    except OSError as e:
        print(f"mppproxy scan: cannot read {args.file}: {e.strerror or e}", file=sys.stderr)
        return 2
    if not data:
        print(f"mppproxy scan: {args.file} is empty", file=sys.stderr)
        return 2
    if len(data) > config.limits.max_message_size:
        print(f"mppproxy scan: {args.file} is larger than limits.max_message_size "
              f"({len(data)} > {config.limits.max_message_size})", file=sys.stderr)
        return 2
    request = ScanRequest.of_bytes(
        data, client_ip=args.client_ip, helo=args.helo, sender=args.sender,
        recipients=tuple(args.rcpt), policy=args.policy, smtputf8=args.smtputf8)
    status = [2]

    async def run(reactor: Any) -> None:
        from mppproxy.scanservice.core import ScanRuntime

        runtime = ScanRuntime(config, reactor)
        try:
            outcome = await runtime.scan(request)
        except UnknownPolicy as e:
            print(f"mppproxy scan: {e}", file=sys.stderr)
            return
        if args.json:
            print(json.dumps(outcome.as_json(), indent=2, sort_keys=True))
        else:
            print(outcome.as_text())
        status[0] = EXIT_CODES.get(outcome.action, 2)

    from twisted.internet import task

    try:
        task.react(lambda reactor: as_deferred(run(reactor)))
    except SystemExit as e:
        # react() always exits; a failure inside run() was printed by it.
        if e.code not in (0, None):
            return 2
    return status[0]


def _db(args: argparse.Namespace) -> int:
    """``mppproxy db upgrade|current --config FILE``: the archive store's
    schema (mppproxy/store/migrate.py).  Exit status: 0 done, 1 the
    database failed (named by its URL, without password or traceback),
    2 a usage or configuration error."""
    from sqlalchemy.exc import SQLAlchemyError

    from mppproxy.store.migrate import MigrationLockTimeout, head
    from mppproxy.store.store import ArchiveStore, StoreError

    try:
        config = load(args.config, None)
    except ConfigError as e:
        print(f"mppproxy db {args.db_command}: the configuration has errors:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    store = ArchiveStore(config.store, config.data_dir)
    where = f"the archive store at {store.display_url} ([store] url)"
    try:
        if args.db_command == "upgrade":
            before, after = store.upgrade_schema()
            if before == after:
                print(f"{where}: already at revision {after} (newest)")
            else:
                print(f"{where}: upgraded from revision {before or 'none (empty)'} to {after}")
        else:
            found = store.schema_revision()
            newest = head()
            state = ("newest" if found == newest
                     else f"behind {newest}: run 'mppproxy db upgrade --config FILE'")
            print(f"{where}: revision {found or 'none (empty)'} ({state})")
    except (SQLAlchemyError, StoreError, MigrationLockTimeout, OSError) as e:
        said = str(getattr(e, "orig", None) or e).strip()
        reason = said.splitlines()[0] if said else type(e).__name__
        if store.url.password:
            reason = reason.replace(str(store.url.password), "***")
        print(f"mppproxy db {args.db_command}: {where}: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mppproxy", description="mppproxy tools")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", nargs="?", help="TOML configuration file")
    check.add_argument("--config-command", help="command whose output is the configuration")
    check.set_defaults(func=_check_config)
    show = sub.add_parser("show-config", help="print the effective configuration, secrets masked")
    show.add_argument("file", nargs="?", help="TOML configuration file (default: built-in defaults)")
    show.add_argument("--config-command", help="command whose output is the configuration")
    show.add_argument("--all", action="store_true", help="every key, defaults filled in")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show_config)
    scan = sub.add_parser("scan", help="scan one message and print the verdict")
    scan.add_argument("file", help="the message (RFC 5322), or - for standard input")
    scan.add_argument("--config", "-c", help="TOML configuration file (default: built-in defaults)")
    scan.add_argument("--policy", default="", help="policy to scan with (default: by the first --rcpt's domain)")
    scan.add_argument("--json", action="store_true", help="print the verdict as JSON")
    scan.add_argument("--sender", default="", help="envelope sender")
    scan.add_argument("--rcpt", action="append", default=[], help="envelope recipient (repeatable)")
    scan.add_argument("--client-ip", default="", help="client address the message came from")
    scan.add_argument("--helo", default="", help="the client's HELO name")
    scan.add_argument("--smtputf8", action="store_true", help="the message came with SMTPUTF8")
    scan.set_defaults(func=_scan)
    db = sub.add_parser("db", help="the archive store's database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, text in (("upgrade", "bring the schema to the newest revision"),
                       ("current", "print the schema's revision")):
        db_command = db_sub.add_parser(name, help=text)
        db_command.add_argument("--config", "-c", required=True, help="TOML configuration file")
        db_command.set_defaults(func=_db)
    from mppproxy.quarantine_cli import add_parser as add_quarantine_parser
    add_quarantine_parser(sub)  # list, show, delete, hold, export (quarantine_cli.py)
    from mppproxy.accounts_cli import add_parser as add_admin_parser
    add_admin_parser(sub)  # the web console's accounts (accounts_cli.py)
    from mppproxy.digest_cli import add_parser as add_digest_parser
    add_digest_parser(sub)  # user digests: send now or preview (digest_cli.py)
    from mppproxy.state_cli import add_parser as add_state_parser
    add_state_parser(sub)  # blacklist and greylist list|add|remove|whitelist (state_cli.py)
    from mppproxy.trace_cli import add_parser as add_trace_parser
    add_trace_parser(sub)  # a message's path through the logs and the archive (trace_cli.py)
    from mppproxy.replay_cli import add_parser as add_replay_parser
    add_replay_parser(sub)  # judge a mail corpus offline against a configuration (replay_cli.py)
    from mppproxy.restart_cli import add_parser as add_restart_parser
    add_restart_parser(sub)  # restart or upgrade without downtime, SIGUSR2 (restart_cli.py)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
