"""``mppproxy admin``: the web console's accounts on the command line
(issue 13): ``add``, ``passwd``, ``list``, ``remove``, and their API
tokens: ``token add|list|revoke`` (``store/tokens.py``; ``add`` prints the
token on standard output, once, and what it is on standard error).

Floor 4 (entry points): ``cli.py`` hands the ``admin`` subcommand here.
It loads the configuration as ``mppproxy quarantine`` does, opens the
archive store (where the accounts live: ``mppproxy/store/accounts.py``)
and calls it directly; a command-line process has no reactor.

Passwords are read from the terminal (``getpass``: not echoed, not in
the shell's history or the process list), or with ``--password-stdin``
from the first line of standard input, for scripts.  Each change is
audited in the store with the login name as actor and
``cli:<user>@<host>`` as origin.

Exit status: 0 done; 1 nothing to do (``remove`` of an account that does
not exist, ``list`` with no account); 2 a usage or configuration error,
or a refused value (name taken, bad domain, short password); 3 the store
is unavailable.
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Optional, TextIO

from sqlalchemy.exc import ArgumentError, DBAPIError

from mppproxy.quarantine_cli import (EXIT_NOTHING, EXIT_OK, EXIT_STORE, EXIT_USAGE, _db_reason,
                                     config_or_report, login_name, origin)
from mppproxy.store.accounts import AccountError, Accounts, WebAdmin
from mppproxy.store.migrate import MigrationLockTimeout
from mppproxy.store.store import ArchiveStore, StoreError
from mppproxy.store.tokens import Tokens


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``admin`` and its subcommands to ``mppproxy``'s subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "admin", help="the web console's accounts: add, passwd, list, remove",
        description="The web console's accounts, kept in the archive store "
                    "(docs/console.md).")
    sub = parser.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    add = _sub(sub, "add", "add an account (a domain administrator, or --superadmin)")
    add.add_argument("name", help="account name (letters, digits, . _ @ + -)")
    add.add_argument("--superadmin", action="store_true", help="sees and acts on every domain")
    add.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                     help="a domain the account administers (repeatable)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    passwd = _sub(sub, "passwd", "set an account's password (its sessions end)")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    passwd.add_argument("--temporary", action="store_true",
                        help="the account must choose a new one at its next login")
    listing = _sub(sub, "list", "list the accounts")
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    remove = _sub(sub, "remove", "remove an account (its sessions end)")
    remove.add_argument("name")
    token = sub.add_parser("token", help="API tokens: add, list, revoke",
                           description="Bearer tokens for the console's JSON API "
                                       "(/api/v1/, docs/console.md).")
    tokens = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    token_add = _sub(tokens, "add", "make a token for an account (printed once)")
    token_add.add_argument("name", help="the account the token acts as")
    token_add.add_argument("--label", default="api", help="what the token is for (audited)")
    token_add.add_argument("--expires", type=float, metavar="DAYS",
                           help="days the token is valid (default: no end)")
    token_list = _sub(tokens, "list", "list the tokens (never the tokens themselves)")
    token_list.add_argument("name", nargs="?", help="only this account's")
    token_list.add_argument("--json", action="store_true", help="print one JSON array")
    token_revoke = _sub(tokens, "revoke", "revoke a token (by the id 'list' shows)")
    token_revoke.add_argument("id", type=int)
    return parser


def _sub(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--config-command", metavar="CMD",
                        help="command whose output is the configuration")
    parser.set_defaults(func=run)
    return parser


def read_password(args: argparse.Namespace, stdin: TextIO, err: TextIO) -> str:
    """The new password: stdin's first line, or asked twice on the terminal."""
    if args.password_stdin:
        return stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    second = getpass.getpass("again: ")
    if first != second:
        raise AccountError("the two passwords differ")
    return first


def run(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    name = f"mppproxy admin {args.admin_command}"
    if args.admin_command == "token":
        name += f" {args.token_command}"
    config = config_or_report(args.config, args.config_command, err)
    if config is None:
        return EXIT_USAGE
    try:
        # The store is made if missing (auto_upgrade): the accounts may be
        # set up before the node first starts.
        store = ArchiveStore(replace(config.store), config.data_dir)
    except ArgumentError as e:
        print(f"{name}: store.url: {e}", file=err)
        return EXIT_USAGE
    try:
        store.open()
        return _command(Accounts(store), args, out, err)
    except AccountError as e:
        print(f"{name}: {e}", file=err)
        return EXIT_USAGE
    except DBAPIError as e:
        print(f"{name}: the store at {store.display_url} is unavailable: {_db_reason(e)}",
              file=err)
        return EXIT_STORE
    except (StoreError, MigrationLockTimeout) as e:
        print(f"{name}: {e}", file=err)
        return EXIT_STORE
    except (KeyboardInterrupt, EOFError):
        print(f"\n{name}: interrupted", file=err)
        return 130
    finally:
        try:
            store.close()
        except DBAPIError:
            pass


def _command(accounts: Accounts, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    actor, where = login_name(), origin()
    command = args.admin_command
    if command == "token":
        return _token_command(Tokens(accounts.store), args, actor, where, out, err)
    if command == "list":
        admins = accounts.list()
        if args.json:
            out.write(json.dumps([a.to_json() for a in admins], sort_keys=True) + "\n")
        else:
            for admin in admins:
                out.write(_line(admin) + "\n")
            if not admins:
                print("no account (the node makes the superadmin 'admin' at its first start)",
                      file=err)
        return EXIT_OK if admins else EXIT_NOTHING
    if command == "remove":
        if accounts.remove(args.name, actor, where):
            print(f"account {args.name.strip().lower()} removed", file=out)
            return EXIT_OK
        print(f"no account named {args.name!r}", file=err)
        return EXIT_NOTHING
    password = read_password(args, sys.stdin, err)
    if command == "add":
        admin = accounts.add(args.name, password, args.superadmin, args.domain, actor, where)
        print(f"account {admin.name} added: {_scope(admin)}", file=out)
        return EXIT_OK
    accounts.set_password(args.name, password, actor, where, must_change=args.temporary)
    print(f"password of {args.name.strip().lower()} set"
          + (" (to be changed at the next login)" if args.temporary else ""), file=out)
    return EXIT_OK


def _token_command(tokens: Tokens, args: argparse.Namespace, actor: str, where: str,
                   out: TextIO, err: TextIO) -> int:
    """``admin token add|list|revoke``."""
    command = args.token_command
    if command == "add":
        made, token = tokens.add_for(args.name, args.label, args.expires, actor, where)
        print(f"token {made.id} ({made.label}) for {args.name.strip().lower()}, "
              f"expires {_when(made.expires) if made.expires else 'never'}; it is shown "
              "this once:", file=err)
        print(token, file=out)
        return EXIT_OK
    if command == "revoke":
        if tokens.revoke(args.id, actor, where):
            print(f"token {args.id} revoked", file=out)
            return EXIT_OK
        print(f"no token {args.id}", file=err)
        return EXIT_NOTHING
    names = {a.id: a.name for a in tokens.accounts.list()}
    admin_id = None
    if args.name:
        admin = tokens.accounts.by_name(args.name)
        if admin is None:
            print(f"no account named {args.name!r}", file=err)
            return EXIT_NOTHING
        admin_id = admin.id
    found = tokens.list(admin_id)
    if args.json:
        out.write(json.dumps([dict(t.to_json(), admin=names.get(t.admin_id, ""))
                              for t in found], sort_keys=True) + "\n")
    else:
        for t in found:
            out.write(f"{t.id}  {names.get(t.admin_id, '?')}  {t.label}  {t.prefix}...  "
                      f"made {_when(t.created)}  expires "
                      f"{_when(t.expires) if t.expires else 'never'}  last used "
                      f"{_when(t.last_used)}\n")
        if not found:
            print("no token", file=err)
    return EXIT_OK if found else EXIT_NOTHING


def _scope(admin: WebAdmin) -> str:
    return "superadmin (every domain)" if admin.superadmin else ", ".join(admin.domains)


def _when(epoch: Optional[float]) -> str:
    if epoch is None:
        return "never"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _line(admin: WebAdmin) -> str:
    flags = [f for f, on in (("disabled", admin.disabled),
                             ("must change password", admin.must_change)) if on]
    return (f"{admin.name}  {_scope(admin)}  last login {_when(admin.last_login)}"
            + (f"  ({', '.join(flags)})" if flags else ""))
