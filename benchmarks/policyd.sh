#!/usr/bin/env bash
# Policy-server benchmark: mppproxy --mode policy next to Debian's postgrey, 40 connections.
#   benchmarks/policyd.sh                       # 20000 requests x 2 reps per server (~1.5 min):
#                                               # postgrey, mppproxy-grey, mppproxy; workers = cores
#   benchmarks/policyd.sh --mpp-workers 1       # mppproxy as one process
#   benchmarks/policyd.sh --requests 5000 --reps 1 --servers postgrey,mppproxy
# Installs postgrey if missing (the image's policy-rc.d keeps apt from starting it).
# Loopback only; every process it starts is stopped by pid.  Output: the table on
# stdout, and results/policyd-<time>.{md,json,log}.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! command -v postgrey >/dev/null && [ ! -x /usr/sbin/postgrey ]; then
  echo "installing postgrey ..." >&2
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -q postgrey >/dev/null
fi
mkdir -p results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
"$PYTHON" policyd_bench.py "$@" --json "results/policyd-$stamp.json" \
  2> >(tee "results/policyd-$stamp.log" >&2) | tee "results/policyd-$stamp.md"
