"""Does ``mppproxy.logsetup.Logger`` (our override of ``emit``) pay for itself?

Twisted's ``Logger.emit`` checks the level with ``level not in
LogLevel.iterconstants()``; ours with a set lookup.  This measures both in one
run, interleaved (A, B, A, B ...), on the same event shape as the transaction
and policy-decision log lines, with an observer that does nothing, so only the
emit path is timed.  It prints the ns per event of each, their ratio, and the
share of a policy-server request (``--request-us``, from policyd_inproc.py)
the difference is.

    python3 benchmarks/logger_emit.py [--events 200000] [--rounds 7]

Run from the repository.  Issue #11: the override stays only if this shows it pays.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.logger import Logger as TwistedLogger  # noqa: E402

from mppproxy.logsetup import Logger as OurLogger  # noqa: E402


def _null_observer(event: dict) -> None:
    return None


def _time_one(logger: object, events: int) -> float:
    """Seconds for ``events`` info events shaped like a policy decision."""
    info = logger.info  # type: ignore[attr-defined]
    start = time.perf_counter()
    for i in range(events):
        info("policy {policy} {action} {client}", policy="default", action="DUNNO",
             client="192.0.2.1", queue_id="ABC", session_id=i, checks=(), score=0.0)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--request-us", type=float, default=58.3,
                    help="reactor CPU per policy request, us (policyd_inproc.py)")
    args = ap.parse_args()
    theirs = TwistedLogger(namespace="bench", observer=_null_observer)
    ours = OurLogger(namespace="bench", observer=_null_observer)
    best = {"twisted": float("inf"), "mppproxy": float("inf")}
    for _ in range(args.rounds):
        best["twisted"] = min(best["twisted"], _time_one(theirs, args.events))
        best["mppproxy"] = min(best["mppproxy"], _time_one(ours, args.events))
    ns = {k: v / args.events * 1e9 for k, v in best.items()}
    saved_us = (ns["twisted"] - ns["mppproxy"]) / 1000
    print(f"twisted Logger.emit : {ns['twisted']:8.0f} ns/event (best of {args.rounds})")
    print(f"mppproxy Logger.emit: {ns['mppproxy']:8.0f} ns/event")
    print(f"ratio twisted/ours  : {ns['twisted'] / ns['mppproxy']:.2f}x")
    print(f"saved per event     : {saved_us:.3f} us = {100 * saved_us / args.request_us:.1f} % "
          f"of a {args.request_us} us policy request (one decision line each)")


if __name__ == "__main__":
    main()
