"""The proxy's own CPU per scanned message, stage by stage, without sockets.

Runs the per-message scan path of the edge (``edge.handler.EdgeSession._scan``)
over a corpus directory of .eml files: the MIME parse, the scan engine with
the scanners of benchmarks/scan-mppproxy.toml.in in its relay-only profile
(MIME check, attachment rules; header rules with --header-rules), the
verdict and the X-MPP-Scan result headers.  The scanners come from the
product's own loader and scan factory (``config.load`` ->
``scan.factory.build``), as ``scan.runtime.ScanStage`` builds them.

    python3 benchmarks/scan_inproc.py /tmp/corpus            # ms/msg per stage
    python3 benchmarks/scan_inproc.py /tmp/corpus --header-rules
    python3 benchmarks/scan_inproc.py /tmp/corpus --profile  # cProfile of the whole path

The corpus: python3 /work/shared/bench/scan/gen_corpus.py --count 200
--seed 1 --out /tmp/corpus.  Each message gets CRLF line ends and a
Received: field on top, as the scanners see it after DATA.

Stages (best of --rounds rounds, each stage timed on its own, on messages
parsed afresh for it):
  parse       MimeCheckScanner.parse: the bounded MIME parse
  mime, attachments, headers
              each scanner's scan() on the parsed message, alone
  engine      ScanEngine.scan: all the scanners as the edge runs them
              (includes the scanner stages above, plus the engine's own work)
  verdict     decide(), result_headers() and the header lines they add
  total       parse + engine + verdict: the edge's path

Run from the repository (it puts the repository first on sys.path).  The
numbers are for comparing two versions on the same machine, not absolute.
"""
from __future__ import annotations

import argparse
import cProfile
import glob
import os
import pstats
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.testing import MemoryReactorClock  # noqa: E402

from mppproxy.config.load import load  # noqa: E402
from mppproxy.message import format_header  # noqa: E402
from mppproxy.results import TransactionRecord  # noqa: E402
from mppproxy.scan import factory  # noqa: E402
from mppproxy.scan.base import ScanInput  # noqa: E402
from mppproxy.verdict import decide, result_headers  # noqa: E402

RECEIVED = (b"Received: from loadgen.test ([127.0.0.1])\r\n"
            b"\tby mppproxy.bench.test (mppproxy) with ESMTP id 4Xb2kQ9zZ1\r\n"
            b"\tfor <user0@example.net>; Mon, 06 May 2024 08:00:01 +0000\r\n")

# A few header rules of the kind sites write (--header-rules).
HEADER_RULES = [
    {"header": "Subject", "pattern": r"\bviagra\b|\blottery\b", "action": "score:2"},
    {"header": "From", "pattern": r"@(?:[a-z0-9-]+\.)*example\.org$", "action": "score:1"},
    {"header": "X-Mailer", "pattern": r"bulk", "action": "score:1"},
    {"kind": "charset", "pattern": r"^(?:gb2312|big5|koi8-r)$", "action": "score:1"},
]


def config_text(profile_file: str, run_dir: str) -> str:
    """The benchmark template in its relay-only profile: no clamd, no spamd
    (the lines scan.sh strips), placeholders filled."""
    lines = []
    with open(profile_file) as f:
        for line in f:
            if "#@clamd" in line or "#@spamd" in line:
                continue
            lines.append(line.replace("@RUN_DIR@", run_dir).replace("@SINK_PORT@", "2526"))
    return "".join(lines)


def build_scanning(header_rules: bool, run_dir: str) -> tuple[Any, Any, Any]:
    """(scanning of the default policy, its scoring, reactor) from the product's loader."""
    path = os.path.join(run_dir, "scan-mppproxy.toml")
    with open(path, "w") as f:
        f.write(config_text(os.path.join(HERE, "scan-mppproxy.toml.in"), run_dir))
    overrides = {}
    if header_rules:
        overrides = {"policies": {"default": {"scan": {"headers": {"rules": HEADER_RULES}}}}}
    config = load(path, None, overrides)
    reactor = MemoryReactorClock()
    policy = config.policies["default"]
    scanning = factory.build(policy.scan, reactor, factory.build_engines(config, reactor))
    assert scanning is not None, "the benchmark profile scans"
    return scanning, policy.scoring, reactor


def read_corpus(directory: str) -> list[bytes]:
    files = sorted(glob.glob(os.path.join(directory, "*.eml")))
    if not files:
        raise SystemExit(f"no .eml files in {directory}")
    out = []
    for name in files:
        with open(name, "rb") as f:
            data = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        out.append(RECEIVED + data)
    return out


def result(coro: Any) -> Any:
    """The result of a coroutine that finishes without waiting (relay-only
    scanners never wait on I/O)."""
    out: list[Any] = []
    Deferred.fromCoroutine(coro).addBoth(out.append)
    if not out:
        raise RuntimeError("the coroutine waited: not a relay-only scanner?")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def scan_input(data: bytes) -> ScanInput:
    return ScanInput(chunks=lambda: (data,), size=len(data), client_ip="192.0.2.7",
                     helo="loadgen.test", sender="sender0@example.com",
                     recipients=("user0@example.net",), queue_id="4Xb2kQ9zZ1", policy="default")


class Path:
    """The edge's per-message scan path, one stage callable at a time."""

    def __init__(self, scanning: Any, scoring: Any):
        self.scanning = scanning
        self.scoring = scoring

    def parse(self, inp: ScanInput) -> ScanInput:
        return replace(inp, parsed=result(self.scanning.mime.parse(inp)))

    def engine(self, inp: ScanInput) -> tuple[TransactionRecord, Any]:
        record = TransactionRecord(policy="default")
        return record, result(self.scanning.engine.scan(inp, record))

    def verdict(self, record: TransactionRecord, report: Any) -> bytes:
        config = self.scanning.config
        verdict = decide(record, self.scoring, report, config.virus_action, config.discard_score)
        headers = verdict.headers + result_headers(verdict, report)
        return b"".join(format_header(name, value) for name, value in headers)

    def whole(self, data: bytes) -> bytes:
        inp = self.parse(scan_input(data))
        record, report = self.engine(inp)
        return self.verdict(record, report)


def time_stage(items: list[Any], run: Callable[[Any], Any]) -> tuple[float, list[Any]]:
    """Seconds to run ``run`` on each item, and the results."""
    out = []
    start = time.perf_counter()
    for item in items:
        out.append(run(item))
    return time.perf_counter() - start, out


def measure(path: Path, corpus: list[bytes], rounds: int) -> dict[str, float]:
    """Seconds per stage over the corpus, best of ``rounds``.  Each stage
    after the parse gets messages parsed afresh for it: the parsed message
    keeps what the scanners read from it, as it does for the one message it
    is in the edge, so a stage must not profit from another's reading."""
    inputs = [scan_input(data) for data in corpus]
    scanners = [scanner for scanner, _ in path.scanning.engine.slots]
    best: dict[str, float] = {}

    def note(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    for _ in range(rounds):
        seconds, _parsed = time_stage(inputs, path.parse)
        note("parse", seconds)
        for scanner in scanners:
            fresh = [path.parse(inp) for inp in inputs]
            note(scanner.name, time_stage(fresh, lambda inp, s=scanner: result(s.scan(inp)))[0])
        fresh = [path.parse(inp) for inp in inputs]
        seconds, engined = time_stage(fresh, path.engine)
        note("engine", seconds)
        note("verdict", time_stage(engined, lambda e: path.verdict(*e))[0])
        note("whole path", time_stage(corpus, path.whole)[0])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="?", default="/tmp/corpus", help="directory of .eml files")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--header-rules", action="store_true",
                    help="add a few header rules (the profile has none: the headers scanner is off)")
    ap.add_argument("--profile", action="store_true", help="cProfile of the whole path instead")
    a = ap.parse_args()
    corpus = read_corpus(a.corpus)
    with tempfile.TemporaryDirectory(prefix="scan-inproc-") as run_dir:
        scanning, scoring, _ = build_scanning(a.header_rules, run_dir)
        path = Path(scanning, scoring)
        for data in corpus:  # warm up: imports, regex caches
            path.whole(data)
        if a.profile:
            prof = cProfile.Profile()
            prof.runcall(lambda: [path.whole(data) for data in corpus])
            pstats.Stats(prof).sort_stats("tottime").print_stats(40)
            return
        best = measure(path, corpus, a.rounds)
    n = len(corpus)
    size = sum(map(len, corpus)) / n / 1024
    names = [s.name for s, _ in scanning.engine.slots]
    print(f"{n} messages, {size:.1f} KiB average; scanners: {', '.join(names)}")
    for name, seconds in best.items():
        inner = "  (in engine)" if name in names else ""
        print(f"  {name:12s} {seconds / n * 1000:7.3f} ms/msg{inner}")
    total = best["parse"] + best["engine"] + best["verdict"]
    print(f"  {'total':12s} {total / n * 1000:7.3f} ms/msg  (parse + engine + verdict)")


if __name__ == "__main__":
    main()
