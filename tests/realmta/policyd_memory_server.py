"""Test helper: ``PolicyServerService`` (what ``twistd mppproxy --mode policy``
runs) with the in-memory greylist and blacklist stores of
``tests/fakes_policy.py`` instead of the SQL database, so a real Postfix can
be greylisted before the SQL stores exist.

Usage: python policyd_memory_server.py CONFIG.toml   (SIGTERM stops it)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import reactor  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402

from fakes_policy import MemoryDatabase  # noqa: E402
from mppproxy.config.load import load  # noqa: E402
from mppproxy.policyd.service import PolicyServerService  # noqa: E402


def main() -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    config = load(sys.argv[1])
    service = PolicyServerService(config, reactor, database=MemoryDatabase(reactor))
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
