"""``mppproxy replay``: judge a mail corpus offline with a configuration
and show which messages it would treat differently (issue 14; how to use
it: docs/replay.md).

    mppproxy replay --config new.toml [--against old.toml] PATH...

PATH: Maildirs, mboxes, folders of ``.eml`` files, single files
(``replay/corpus.py``).  Each message's envelope comes from its X-MPP
state, its trace fields or the command line (``replay/envelope.py``); the
whole pre-DATA and post-DATA decision runs offline (``replay/judge.py``)
under ``--config`` and is compared with ``--against``'s, or without it
with the judgement the message's state recorded.

Output: on standard output the messages whose disposition changes (every
message with ``--all``), each with its old and new disposition, what
decided the new one and both scores, then the totals by transition; a
progress bar on standard error when it is a terminal; ``--json FILE`` a
report with one object per message.

Exit status:
  0  every message was judged
  1  some messages could not be judged (each is in the table and the
     report with why: unreadable, not a message, no envelope)
  2  a usage or configuration error: nothing was judged
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, Optional, TextIO

from mppproxy._async import as_deferred
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import check_files, load, source_name
from mppproxy.config.schema import ProxyConfig

if TYPE_CHECKING:
    from mppproxy.replay.corpus import CorpusMessage
    from mppproxy.replay.envelope import Given
    from mppproxy.replay.judge import Judge
    from mppproxy.replay.report import Row

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(sub: Any) -> None:
    """``replay`` among ``mppproxy``'s subcommands (cli.py)."""
    p = sub.add_parser("replay", help="judge a mail corpus offline and show what a configuration "
                                      "would change")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="Maildir, mbox, folder of .eml files, or a message file")
    p.add_argument("--config", "-c", required=True, help="the configuration to judge with (new)")
    p.add_argument("--against", metavar="OLD",
                   help="compare with this configuration (default: the judgement recorded "
                        "in each message's X-MPP state)")
    p.add_argument("--sender", help="envelope sender where the message gives none ('' for <>)")
    p.add_argument("--rcpt", action="append", default=[],
                   help="envelope recipient where the message gives none (repeatable)")
    p.add_argument("--client", help="client address where the message gives none")
    p.add_argument("--helo", help="the client's HELO where the message gives none")
    p.add_argument("--override-envelope", action="store_true",
                   help="--sender/--rcpt/--client/--helo win over what the message says")
    p.add_argument("--no-dns", action="store_true",
                   help="no DNS: DNS lists, SPF, DKIM and DMARC are off in both configurations")
    p.add_argument("--recorded", action="store_true",
                   help="engines answer with the results recorded in the message's X-MPP "
                        "state (live where none was recorded)")
    p.add_argument("--shared-state", action="store_true",
                   help="keep the scratch blacklist and rate counters from message to message "
                        "(default: each message is judged alone)")
    p.add_argument("--json", metavar="FILE", help="write a JSON report, one object per message "
                                                  "('-' for standard output)")
    p.add_argument("--all", action="store_true", help="list every message, not only the changed")
    p.set_defaults(func=run)


def _load(path: str, what: str, err: IO[str]) -> Optional[ProxyConfig]:
    try:
        config = load(path, None)
        check_files(config, source_name(path))
    except ConfigError as e:
        print(f"mppproxy replay: {what} {path} has errors:", file=err)
        for line in e.errors:
            print(f"  {line}", file=err)
        return None
    return config


def run(args: argparse.Namespace) -> int:
    from twisted.internet import task

    from mppproxy.replay import corpus

    err = sys.stderr
    config = _load(args.config, "--config", err)
    if config is None:
        return EXIT_USAGE
    against = None
    if args.against:
        against = _load(args.against, "--against", err)
        if against is None:
            return EXIT_USAGE
    try:
        corpus.sources(args.paths)
    except (corpus.CorpusError, OSError) as e:
        print(f"mppproxy replay: {e}", file=err)
        return EXIT_USAGE
    report_file: Optional[IO[str]] = None
    if args.json:
        try:
            report_file = (sys.stdout if args.json == "-"
                           else open(args.json, "w", encoding="utf-8"))
        except OSError as e:
            print(f"mppproxy replay: cannot write {args.json}: {e.strerror or e}", file=err)
            return EXIT_USAGE
    status = [EXIT_USAGE]

    async def main(reactor: Any) -> None:
        status[0] = await replay(reactor, args, config, against, report_file,
                                 sys.stdout if args.json != "-" else err, err)

    try:
        task.react(lambda reactor: as_deferred(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            # react() printed the failure; nothing more useful to add.
            status[0] = EXIT_USAGE
    finally:
        if report_file is not None and report_file is not sys.stdout:
            report_file.close()
    return status[0]


async def replay(reactor: Any, args: argparse.Namespace, config: ProxyConfig,
                 against: Optional[ProxyConfig], report_file: Optional[IO[str]],
                 out: TextIO, err: TextIO) -> int:
    """The replay itself, on a running reactor; returns the exit status."""
    from twisted.internet.threads import deferToThread

    from mppproxy.match import TrustedNetworks
    from mppproxy.quarantine_cli import Progress
    from mppproxy.replay import corpus
    from mppproxy.replay.envelope import EnvelopeMissing, Given
    from mppproxy.replay.judge import Judge, Options
    from mppproxy.replay.report import JsonReport, Row, Totals, write_table, write_totals

    options = Options(dns=not args.no_dns, recorded=args.recorded, shared_state=args.shared_state)
    given = Given(sender=args.sender, recipients=tuple(args.rcpt), client=args.client,
                  helo=args.helo, force=args.override_envelope)
    new = Judge(config, reactor, options, weights=against)
    old = Judge(against, reactor, options, weights=against) if against is not None else None
    trusted = TrustedNetworks(config.trusted_networks)
    limit = max(config.limits.max_message_size,
                against.limits.max_message_size if against is not None else 0)
    progress = Progress(0, err, "replayed")
    if progress.on:
        # Counting reads every mbox once more: only for the bar.
        progress.total = await deferToThread(corpus.count, args.paths)
    report = None
    if report_file is not None:
        report = JsonReport(report_file, {
            "config": os.path.abspath(args.config),
            "against": os.path.abspath(args.against) if args.against else None,
            "options": {"dns": options.dns, "recorded": options.recorded,
                        "shared_state": options.shared_state,
                        "paths": list(args.paths)}})
    totals = Totals()
    shown: list[Row] = []
    messages: Iterator[corpus.CorpusMessage] = corpus.messages(args.paths, limit)
    try:
        while True:
            # Disk reads in the thread pool: the reactor keeps serving the
            # engines' and DNS sockets of the message before.
            item = await deferToThread(next, messages, None)
            if item is None:
                break
            row = Row(item.path)
            try:
                await _judge_one(row, item, new, old, given, trusted)
            except EnvelopeMissing as e:
                row.error = str(e)
            except Exception as e:  # one message must never end the replay
                row.error = f"internal error: {type(e).__name__}: {e}"
            totals.add(row)
            if report is not None:
                report.add(row)
            if args.all or row.changed or row.error or row.new is None:
                shown.append(row)
            progress.update(totals.messages)
    finally:
        await new.stop()
        if old is not None:
            await old.stop()
    progress.finish(totals.messages)
    if report is not None:
        report.close(totals)
    write_table(shown, out, every=True)
    write_totals(totals, out, against is not None)
    return EXIT_SOME_FAILED if totals.errors else EXIT_OK


async def _judge_one(row: "Row", item: "CorpusMessage", new: "Judge", old: "Optional[Judge]",
                     given: "Given", trusted: Callable[[str], bool]) -> None:
    """Fill ``row`` for the corpus message ``item``."""
    from mppproxy.replay.envelope import read_envelope

    if item.error:
        row.error = item.error
        return
    if item.data is None:
        # Over every configuration's size bound: refused by both, unread.
        row.new = new.too_large(item.size)
        if old is not None:
            row.old, row.old_source = old.too_large(item.size), "against"
        return
    if not item.data.strip():
        row.error = "not a message: the file is empty"
        return
    envelope, past = read_envelope(item.data, given, trusted)
    row.envelope = envelope
    row.new = await new.judge(item.data, envelope, past)
    if old is not None:
        row.old, row.old_source = await old.judge(item.data, envelope, past), "against"
    elif past is not None:
        row.old, row.old_source = past, past.source
