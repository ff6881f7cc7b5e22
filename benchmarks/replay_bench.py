"""Replay throughput (issue 14): ``mppproxy replay`` over the scan corpus
(results/scan-corpus: 200 messages, ham, GTUBE and EICAR, 2-50 KiB),
in messages per second, per profile:

* ``no-engines``: policy engine (access, blacklist with the scratch store)
  and the post-DATA MIME and attachment checks, no engine of [scanners];
* ``clamd``: the same with the live clamd (``--clamd tcp:HOST:PORT``).

The replay runs in this process, on the reactor, through
``replay_cli.replay`` (the command's own coroutine), so the interpreter's
start-up (~1 s of imports) is not counted; the corpus directory is given
``--repeat`` times so each rep judges 200 x repeat messages.  DNS off
(``--no-dns``): the corpus has no DNS to check and a resolver's answers
would measure the network.  Prints a Markdown table; ``--json FILE`` keeps
the figures.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mppproxy._async import as_deferred  # noqa: E402
from mppproxy.config.load import load  # noqa: E402
from mppproxy.replay_cli import add_parser, replay  # noqa: E402

BASE = """
relay_domains = ["example.net"]
[smtp]
hostname = "mppproxy.bench.test"
[policies.default.scoring]
tag = 5.0
reject = 0.0
[policies.default.scan]
enabled = true
virus_action = "quarantine"
"""
CLAMD = """
[scanners.clamd]
address = "{address}"
max_connections = 4
[policies.default.scan.engines.clamd]
"""


def parse_replay_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mppproxy")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["replay", *argv])


async def one_rep(reactor: Any, config_path: str, corpus: str, repeat: int,
                  workdir: str) -> dict[str, Any]:
    report = os.path.join(workdir, "report.json")
    args = parse_replay_args(["--config", config_path, "--no-dns", "--sender", "",
                              "--rcpt", "user0@example.net", "--client", "203.0.113.9",
                              "--helo", "bench.sender.test", "--json", report,
                              *([corpus] * repeat)])
    config = load(config_path)
    sink = io.StringIO()
    with open(report, "w", encoding="utf-8") as f:
        started = time.perf_counter()
        status = await replay(reactor, args, config, None, f, sink, sink)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - started
    with open(report, encoding="utf-8") as f:
        totals = json.load(f)["totals"]
    return {"status": status, "seconds": elapsed, "messages": totals["messages"],
            "rate": totals["messages"] / elapsed, "dispositions": totals["dispositions"],
            "errors": totals["errors"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(REPO / "benchmarks/results/scan-corpus"))
    ap.add_argument("--clamd", default="", help="clamd address (tcp:127.0.0.1:3310); '' skips")
    ap.add_argument("--repeat", type=int, default=5, help="corpus passes per rep")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    opts = ap.parse_args()
    profiles = {"no-engines": BASE}
    if opts.clamd:
        profiles["clamd"] = BASE + CLAMD.format(address=opts.clamd)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in profiles}

    from twisted.internet import task

    async def run(reactor: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="replay-bench-") as workdir:
            for rep in range(opts.reps):
                for name, text in profiles.items():
                    path = os.path.join(workdir, f"{name}.toml")
                    Path(path).write_text(text)
                    r = await one_rep(reactor, path, opts.corpus, opts.repeat, workdir)
                    results[name].append(r)
                    print(f"rep {rep + 1} {name}: {r['messages']} msgs in {r['seconds']:.2f} s "
                          f"= {r['rate']:.0f} msg/s {r['dispositions']}", file=sys.stderr)

    try:
        task.react(lambda reactor: as_deferred(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return 1
    print("| profile | messages/rep | msg/s (median) | msg/s (min-max) | dispositions |")
    print("| --- | --- | --- | --- | --- |")
    for name, reps in results.items():
        rates = [r["rate"] for r in reps]
        print(f"| {name} | {reps[0]['messages']} | {statistics.median(rates):.0f} | "
              f"{min(rates):.0f}-{max(rates):.0f} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(reps[0]['dispositions'].items()))} |")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2, sort_keys=True))
    bad = [r for reps in results.values() for r in reps if r["errors"] or r["status"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
