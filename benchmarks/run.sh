#!/usr/bin/env bash
# Relay benchmark: mppproxy vs the direct smtp-sink (and peers with --peers).
#   benchmarks/run.sh                 # full matrix: 3 sizes x 3 sessions, 3 reps, --scale 0.3
#   benchmarks/run.sh --quick         # 1 KiB x 20 sessions only, 3 reps
#   benchmarks/run.sh --peers         # full matrix plus Haraka and the Twisted relay probe
#   benchmarks/run.sh --reps 5 --sizes 65536 --conc 20 --servers sink,mppproxy
# Any other options go to relay_bench.py (see --help).  Loopback only
# (127.0.0.1:2625-2650); every process it starts is stopped by pid.
# Output: the table on stdout, and results/relay-<time>.{md,json,log}.
# Policy server (mppproxy --mode policy vs postgrey): benchmarks/policyd.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# smtp-source / smtp-sink come with Debian's postfix package
if ! command -v smtp-source >/dev/null || ! command -v smtp-sink >/dev/null; then
  export PATH=$PATH:/usr/sbin
fi
if ! command -v smtp-source >/dev/null; then
  echo "installing postfix (for smtp-source/smtp-sink) ..." >&2
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 \
    install -y -q postfix >/dev/null
  # the package may start a Postfix daemon on :25; the benchmark never uses
  # it (smtp-sink is the backend), so stop it if it was started
  if command -v postfix >/dev/null && postfix status >/dev/null 2>&1; then
    postfix stop || true
  fi
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "$0: needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
"$PYTHON" -c 'import twisted' 2>/dev/null \
  || echo "$0: note: $PYTHON has no Twisted; mppproxy cannot start (pip install -e ..)" >&2
if [[ " $* " == *" --peers "* ]] && ! command -v npm >/dev/null; then
  echo "$0: note: no npm; Haraka needs Node.js >= 20 with npm (skipped)" >&2
fi

args=("$@")
if [ "${1:-}" = "--quick" ]; then
  args=(--reps 3 --sizes 1024 --conc 20 "${@:2}")
elif [ $# -eq 0 ] || [ "$*" = "--peers" ]; then
  # ~0.3 of the anchors' counts keeps the full matrix to a few minutes
  args=(--reps 3 --scale 0.3 "$@")
fi
mkdir -p results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
"$PYTHON" relay_bench.py "${args[@]}" --json "results/relay-$stamp.json" \
  2> >(tee "results/relay-$stamp.log" >&2) | tee "results/relay-$stamp.md"
echo "(raw runs: results/relay-$stamp.json, progress: results/relay-$stamp.log)"
