"""``mppproxy digest send``: send the user digests now, or preview them
(issue 13).

Floor 4 (entry points): ``cli.py`` hands the ``digest`` subcommand here.
It loads the configuration as ``mppproxy quarantine`` does, opens the
archive store, reads the console's key file (``web.secret_file``: the
links it signs are the ones the console accepts) and runs
``web/digestmail.send_digests`` under a reactor of its own.

Unlike the node's daily run, ``send`` sends to every recipient with held
mail, even one who had today's digest already (an operator asked for it);
the sends are recorded all the same, so the daily run later that day
skips those recipients.  ``--dry-run`` prints each digest's envelope,
subject and text and sends nothing (its links work: they are signed, and
spent only when used).

Exit status: 0 sent (or previewed); 1 nobody has held mail in those
domains; 2 a usage or configuration error (digests off, a domain not in
``digest.domains``); 3 the store is unavailable, or some digests could
not be sent (each line says why).
"""
from __future__ import annotations

import argparse
import email
import email.policy
import sys
import time
from typing import Any, Optional, TextIO

from sqlalchemy.exc import ArgumentError, DBAPIError

from mppproxy.config.digest import digest_enabled
from mppproxy.config.schema import ProxyConfig
from mppproxy.config.web import secret_path
from mppproxy.quarantine_cli import (EXIT_NOTHING, EXIT_OK, EXIT_STORE, EXIT_USAGE, _db_reason,
                                     config_or_report)
from mppproxy.store.migrate import MigrationLockTimeout
from mppproxy.store.store import ArchiveStore, StoreError
from mppproxy.web.digestmail import Digest, RunReport
from mppproxy.web.secret import SecretFileError, load_or_create_secret


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``digest`` and its subcommand to ``mppproxy``'s subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "digest", help="user digests: send now or preview",
        description="User digests of held mail ([digest]; docs/console.md).")
    sub = parser.add_subparsers(dest="digest_command", required=True, metavar="COMMAND")
    send: argparse.ArgumentParser = sub.add_parser(
        "send", help="send the digests now (or --dry-run to preview)",
        description="Send each recipient with held mail in the digest domains a digest now.")
    send.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file")
    send.add_argument("--config-command", metavar="CMD",
                      help="command whose output is the configuration")
    send.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                      help="only this domain of digest.domains (repeatable)")
    send.add_argument("--dry-run", action="store_true",
                      help="print the digests, send nothing")
    send.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    config = config_or_report(args.config, args.config_command, err)
    if config is None:
        return EXIT_USAGE
    name = "mppproxy digest send"
    if not digest_enabled(config.digest):
        print(f"{name}: digest.domains is empty: digests are off", file=err)
        return EXIT_USAGE
    enabled = {d.lower().rstrip(".") for d in config.digest.domains}
    domains = [d.lower().rstrip(".") for d in args.domain]
    for domain in domains:
        if domain not in enabled:
            print(f"{name}: {domain!r} is not in digest.domains "
                  f"({', '.join(sorted(enabled))})", file=err)
            return EXIT_USAGE
    try:
        secret = load_or_create_secret(secret_path(config.web, config.data_dir))
    except (OSError, SecretFileError) as e:
        print(f"{name}: web.secret_file: {e}", file=err)
        return EXIT_USAGE
    try:
        store = ArchiveStore(config.store, config.data_dir)
    except ArgumentError as e:
        print(f"{name}: store.url: {e}", file=err)
        return EXIT_USAGE
    try:
        store.open()
        report = _run(config, store, secret, domains or None, args.dry_run)
    except DBAPIError as e:
        print(f"{name}: the store at {store.display_url} is unavailable: {_db_reason(e)}",
              file=err)
        return EXIT_STORE
    except (StoreError, MigrationLockTimeout) as e:
        print(f"{name}: {e}", file=err)
        return EXIT_STORE
    finally:
        try:
            store.close()
        except DBAPIError:
            pass
    return _report(report, args.dry_run, out, err)


def _run(config: ProxyConfig, store: ArchiveStore, secret: bytes,
         domains: Optional[list[str]], dry_run: bool) -> RunReport:
    from twisted.internet import task

    from mppproxy._async import as_deferred
    from mppproxy.web.digestmail import send_digests
    from mppproxy.web.digesttoken import TokenSigner

    done: list[RunReport] = []
    failure: list[BaseException] = []

    async def go(reactor: Any) -> None:
        try:
            done.append(await send_digests(config, store, reactor, TokenSigner(secret),
                                           time.time(), domains, dry_run=dry_run,
                                           skip_claimed=False))
        except BaseException as e:  # reported after the reactor stopped
            failure.append(e)

    try:
        task.react(lambda reactor: as_deferred(go(reactor)))
    except SystemExit:
        pass  # react() always exits; what happened is in done/failure
    if failure:
        raise failure[0]
    return done[0]


def _text_of(digest: Digest) -> str:
    message = email.message_from_bytes(digest.message, policy=email.policy.default)
    part = message.get_body(("plain",)) if hasattr(message, "get_body") else None
    content = part.get_content() if part is not None else ""
    return str(content)


def _report(report: RunReport, dry_run: bool, out: TextIO, err: TextIO) -> int:
    if dry_run:
        for digest in report.digests:
            print(f"To: {digest.recipient} ({digest.count} held, {len(digest.items)} listed)",
                  file=out)
            print(f"Subject: {digest.subject}", file=out)
            print("", file=out)
            print(_text_of(digest).rstrip("\n"), file=out)
            print("", file=out)
        print(f"{len(report.digests)} digest(s) would be sent", file=out)
        return EXIT_OK if report.digests else EXIT_NOTHING
    for digest in report.digests:
        print(f"sent {digest.recipient}: {digest.count} held", file=out)
    for error in report.errors:
        print(f"not sent {error}", file=err)
    print(f"{report.sent} digest(s) sent, {report.failed} not sent", file=out)
    if report.failed:
        return EXIT_STORE
    return EXIT_OK if report.sent else EXIT_NOTHING
