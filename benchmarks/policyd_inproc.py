"""The policy server's own Python cost per request, without sockets.

Postfix requests (the stream of policyd_bench.py) go through the real
``PolicyProtocol``, engine and SQLite state database of the benchmark's
configuration, on a StringTransport.  A first pass puts every triplet in
the database (greylisted: waiting); the timed passes replay the same
requests, which the caches then answer without the database: what is left
is the protocol, the engine, the checks, the reply templates and the log
line, the part of each request that runs on the reactor thread.

    python3 benchmarks/policyd_inproc.py              # us per request, best of 5 passes
    python3 benchmarks/policyd_inproc.py --profile    # cProfile of one pass, top functions
    python3 benchmarks/policyd_inproc.py --profile-first   # ... of the first (database) pass

Run from the repository.  For comparing two versions on one machine.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402

import policyd_bench  # noqa: E402
from mppproxy.config.load import load  # noqa: E402
from mppproxy.match import TrustedNetworks  # noqa: E402
from mppproxy.gctune import tune_for_server  # noqa: E402
from mppproxy.logsetup import BatchedTextLogObserver  # noqa: E402
from mppproxy.policy.runtime import PolicyRuntime, make_database  # noqa: E402
from mppproxy.policyd.protocol import PolicyServerFactory  # noqa: E402


def config(workdir: str):
    path = os.path.join(workdir, "policyd.toml")
    with open(path, "w") as f:
        f.write(policyd_bench.MPP_CONFIG.format(
            data=os.path.join(workdir, "data"), port=10040, bad=policyd_bench.BAD_SENDER_DOMAIN,
            trap=policyd_bench.TRAP, grey="true", delay=policyd_bench.GREY_DELAY, workers=1))
    return load(path)


async def main(args: argparse.Namespace) -> None:
    workdir = tempfile.mkdtemp(prefix="policyd-inproc-")
    cfg = config(workdir)
    # twistd's text log as the server writes it, to nowhere.
    sink = open(os.devnull, "w")
    globalLogBeginner.beginLoggingTo([BatchedTextLogObserver(sink, reactor)],
                                     redirectStandardIO=False, discardBuffer=True)
    database = make_database(cfg, reactor)
    await database.start()
    runtime = PolicyRuntime(cfg, reactor, "policy.test", database=database)
    factory = PolicyServerFactory(cfg.policyd, lambda: runtime.engine, reactor,
                                  trusted=TrustedNetworks(cfg.trusted_networks),
                                  skip_trusted=cfg.policy.skip_trusted)
    # Connections enough that none has policyd.max_pending requests waiting
    # in the first pass (a paused connection would hold the rest unread).
    connections = []
    for _ in range(max(1, args.requests // 32)):
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(transport)
        connections.append((proto, transport))
    # The collector as the server sets it once running (mppproxy/gctune.py).
    tune_for_server()
    passes = 0

    def feed() -> list:
        # The same triplets each pass (seed 0), as new messages (a new
        # Postfix instance each): none waits for another's record.
        stream = policyd_bench.make_stream(args.requests, 0, f"p{passes}")
        return [(connections[i % len(connections)][0], r) for i, r in enumerate(stream)]

    def answered() -> int:
        return sum(t.value().count(b"\n\n") for _, t in connections)

    # The reactor thread's CPU for a whole pass, answers that came back
    # from the database included (the first pass; later ones wait for nothing).
    reactor_cpu = [0.0]

    async def one_pass() -> float:
        nonlocal passes
        for _, t in connections:
            t.clear()
        requests = feed()
        passes += 1
        cpu = time.thread_time()
        start = time.perf_counter()
        for proto, request in requests:
            proto.dataReceived(request)
        spent = time.perf_counter() - start
        # Anything that waited for the database finishes before the next pass.
        while answered() < len(requests):
            await task.deferLater(reactor, 0.002, lambda: None)
        reactor_cpu[0] = time.thread_time() - cpu
        return spent

    profiler = cProfile.Profile()
    if args.profile_first:
        profiler.enable()
    first = await one_pass()
    if args.profile_first:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    print(f"first pass (database): {first / args.requests * 1e6:.1f} us/request on the reactor "
          f"thread until each waits, {reactor_cpu[0] / args.requests * 1e6:.1f} us of its CPU "
          f"with the answers (the database's own work runs in its threads)")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await one_pass()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    else:
        best = min([await one_pass() for _ in range(5)])
        print(f"cached passes: {best / args.requests * 1e6:.1f} us/request (best of 5)")
    print(f"answers of the last pass: {answered()}, e.g. {connections[0][1].value()[:70]!r}")
    for proto, _ in connections:
        proto.transport.loseConnection()
    await runtime.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--profile", action="store_true", help="cProfile a cached pass")
    ap.add_argument("--sort", default="tottime", help="cProfile order (tottime, cumtime)")
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--profile-first", action="store_true",
                    help="cProfile the first pass (requests that go to the database)")
    a = ap.parse_args()
    task.react(lambda _: defer.Deferred.fromCoroutine(main(a)))
