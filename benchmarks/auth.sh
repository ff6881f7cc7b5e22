#!/usr/bin/env bash
# DKIM/DMARC on vs off in one run (issue 14), at run.sh --quick's size and
# concurrency (1 KiB body, 20 sessions, 3 reps): benchmarks/auth_bench.py.
#   benchmarks/auth.sh                 # 3000 messages per run
#   benchmarks/auth.sh --reps 5 --count 5000
# Loopback only (127.0.0.1:2626, 2627, 2637, 2638, DNS 2654); every process it
# starts is stopped by process group.  Output: the table, and results/auth-<time>.md.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-../.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export PATH=$PATH:/usr/sbin
mkdir -p results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
"$PYTHON" auth_bench.py "$@" | tee "results/auth-$stamp.md"
