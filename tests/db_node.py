"""A second proxy node for the shared-state tests: its own process, its own
``StateDatabase`` on the same database, real time, no cache.

    python tests/db_node.py URL DATA_DIR PREFIX COMMAND [ARGS...]

Commands (each prints one JSON line):
  greylist NET SENDER RECIPIENT DELAY   -> {"wait": null | seconds}
  add NETWORK SECONDS REASON            -> {"added": NETWORK}
  lookup IP                             -> {"entry": null | [network, reason, expires]}
  stress N                              -> {"done": N}  (N rounds of greylist checks and
                                           blacklist adds on shared keys, for write races)
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from mppproxy.db import StateDatabase  # noqa: E402
from mppproxy.config.database import DatabaseConfig  # noqa: E402
from mppproxy.config.policy import GreylistConfig  # noqa: E402


async def main(reactor, url: str, data_dir: str, prefix: str, command: str, *args: str) -> None:
    db = StateDatabase(DatabaseConfig(url=url, cache_seconds=0, pool_max=4), data_dir, reactor,
                       table_prefix=prefix)
    if not await db.start():
        raise SystemExit("database not ready")
    try:
        if command == "greylist":
            net, sender, rcpt, delay = args
            settings = GreylistConfig(enabled=True, delay=float(delay), auto_whitelist_after=0)
            out = {"wait": await db.greylist.check(net, sender, rcpt, settings)}
        elif command == "add":
            network, seconds, reason = args
            await db.blacklist.add(network, float(seconds), reason)
            out = {"added": network}
        elif command == "lookup":
            entry = await db.blacklist.lookup(args[0])
            out = {"entry": None if entry is None else [entry.network, entry.reason, entry.expires]}
        elif command == "stress":
            rounds = int(args[0])
            settings = GreylistConfig(enabled=True, delay=0, auto_whitelist_after=2)
            for i in range(rounds):
                await defer.gatherResults([
                    defer.Deferred.fromCoroutine(db.greylist.check(
                        "198.51.100.0/24", f"s{i % 5}@example.org", f"r{j}@example.com", settings))
                    for j in range(3)
                ] + [
                    defer.Deferred.fromCoroutine(db.blacklist.add(
                        f"203.0.113.{i % 7}/32", 60 + i, f"stress {os.getpid()}")),
                ], consumeErrors=True)
            out = {"done": rounds}
        else:
            raise SystemExit(f"unknown command {command!r}")
        print(json.dumps(out), flush=True)
    finally:
        await db.stop()


if __name__ == "__main__":
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # The store's log lines (why the database is not ready) reach the test's message.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    task.react(lambda reactor, argv: defer.Deferred.fromCoroutine(main(reactor, *argv)),
               [sys.argv[1:]])
