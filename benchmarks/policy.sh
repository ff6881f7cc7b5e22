#!/usr/bin/env bash
# Policy benchmark (issue #4): the relay benchmark's proxy with a realistic
# pre-DATA policy on (mppproxy-policy: access lists, spam traps, thresholds,
# greylisting with a warm whitelist, two DNS lists from a local server) and
# off (mppproxy), side by side in one run; prints "policy on / off" per cell.
#   benchmarks/policy.sh             # 1 KiB x 20 sessions, 3 reps
#   benchmarks/policy.sh --reps 5 --conc 1,20,100
set -euo pipefail
cd "$(dirname "$0")"
exec ./run.sh --reps 3 --sizes 1024 --conc 20 --servers sink,mppproxy,mppproxy-policy "$@"
