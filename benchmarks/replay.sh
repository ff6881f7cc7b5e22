#!/usr/bin/env bash
# Replay throughput (issue 14): `mppproxy replay` over the scan corpus, in
# messages/s, without engines and with a live clamd (replay_bench.py says
# what each profile runs and what is timed).
#   benchmarks/replay.sh                 # 3 reps x 5 passes of the 200-message corpus
#   benchmarks/replay.sh --reps 1 --repeat 2
# The corpus is results/scan-corpus (made by the anchors' gen_corpus.py as
# scan.sh makes it, seed 1, when missing).  clamd comes from
# scripts/services/start-clamd.sh (local signatures only, 127.0.0.1:$CLAMD_PORT,
# default 3310) and is stopped again at the end when this script started it.
# Tables in results/replay-<time>.{md,json}.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$PWD
REPO=$(cd .. && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
ANCHORS=${MPP_SCAN_ANCHORS:-$REPO/../shared/bench/scan}
CORPUS=$HERE/results/scan-corpus
CLAMD_PORT=${CLAMD_PORT:-3310}
export CLAMD_PORT

mkdir -p results
if [ ! -f "$CORPUS/manifest.json" ]; then
  [ -f "$ANCHORS/gen_corpus.py" ] || { echo "$0: no corpus and no $ANCHORS/gen_corpus.py" >&2; exit 1; }
  "$PYTHON" "$ANCHORS/gen_corpus.py" --count 200 --seed 1 --out "$CORPUS" >&2
fi

clamd_ping() {
  "$PYTHON" - "$CLAMD_PORT" <<'PY' 2>/dev/null
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
    s.sendall(b"zPING\0"); sys.exit(0 if s.recv(64).startswith(b"PONG") else 1)
except OSError:
    sys.exit(1)
PY
}
started_clamd=
clamd=
if clamd_ping; then
  clamd="tcp:127.0.0.1:$CLAMD_PORT"
elif bash "$REPO/scripts/services/start-clamd.sh" >&2; then
  started_clamd=1
  clamd="tcp:127.0.0.1:$CLAMD_PORT"
else
  echo "$0: clamd could not be started; measuring without engines only" >&2
fi
stop_clamd() { [ -z "$started_clamd" ] || bash "$REPO/scripts/services/start-clamd.sh" stop >&2 || true; }
trap stop_clamd EXIT

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=results/replay-$stamp
"$PYTHON" replay_bench.py --corpus "$CORPUS" --clamd "$clamd" --json "$out.json" "$@" | tee "$out.md"
echo "(tables: $out.md, raw: $out.json)"
