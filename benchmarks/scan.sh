#!/usr/bin/env bash
# Scanning benchmark (issue #5): mppproxy in the slot of the shared scan
# anchors (../shared/bench/scan beside the checkout: amavisd-new, spampd, the engines alone),
# with the anchors' own clamd (+ spamd) and smtp-sink, in one run.
#   benchmarks/scan.sh --profile clamd-only --reps 2   # sink, amavis, mppproxy, eng-clamd (~2 min)
#   benchmarks/scan.sh --quick                         # clamd+spamd, first 60 msgs (~12 min)
#   benchmarks/scan.sh                                 # clamd+spamd, 200 msgs x 1,5,20 (~40 min)
#   benchmarks/scan.sh --profile relay-only --reps 2   # mppproxy: MIME + attachment checks, no engines
#   benchmarks/scan.sh --profile clamd-only --mpp-workers 1   # one mppproxy process (default: 2)
# Other options go to the anchors' scanbench.py (--conc, --count, --anchors,
# --reps, --workers, --warmup).  mppproxy is configured from
# benchmarks/scan-mppproxy.toml.in (see its header for what differs from
# the defaults, and why).  Nothing is written under the shared directory:
# daemons' dirs and logs are in results/scan-run/, the corpus in
# results/scan-corpus/, the tables in results/scan-<profile>-<time>.*.
# Loopback only (ports of the anchors: 2610-2623, clamd 33100, spamd 7830;
# SCAN_CLAMD_PORT / SCAN_SPAMD_PORT move the engines); every process is
# stopped by pid / process group at the end (scanbench.py does it).
set -euo pipefail
cd "$(dirname "$0")"
HERE=$PWD
REPO=$(cd .. && pwd)
ANCHORS=${MPP_SCAN_ANCHORS:-$REPO/../shared/bench/scan}
PYTHON=${PYTHON:-python3}
export PATH=$PATH:/usr/sbin:/sbin

[ -f "$ANCHORS/scanbench.py" ] || { echo "$0: no $ANCHORS/scanbench.py (set MPP_SCAN_ANCHORS)" >&2; exit 1; }
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "$0: needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
"$PYTHON" -c 'import twisted' 2>/dev/null \
  || { echo "$0: $PYTHON has no Twisted; mppproxy cannot start (pip install -e ..)" >&2; exit 1; }

# what the anchors need (as their run-scan-anchors.sh installs it)
need=()
command -v smtp-sink >/dev/null || need+=(postfix)
command -v spamd >/dev/null || need+=(spamd)
command -v spamc >/dev/null || need+=(spamc)
command -v spamassassin >/dev/null || need+=(spamassassin)
command -v clamd >/dev/null || need+=(clamav-daemon)
command -v amavisd >/dev/null || need+=(amavisd-new)
command -v spampd >/dev/null || need+=(spampd)
if ((${#need[@]})); then
  [ -x /usr/sbin/policy-rc.d ] || echo "warning: no /usr/sbin/policy-rc.d: the packages may start their own daemons" >&2
  echo "installing ${need[*]} ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  APT=(apt-get -o DPkg::Lock::Timeout=900)
  "${APT[@]}" install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    "${APT[@]}" update -qq
    "${APT[@]}" install -y -q --no-install-recommends "${need[@]}" >/dev/null
  }
fi

# --mpp-workers N (ours, not scanbench.py's): mppproxy's `workers` (the
# template's: 2)
mpp_workers=
args=()
while (($#)); do
  case "$1" in
    --mpp-workers) mpp_workers=$2; shift 2 ;;
    --mpp-workers=*) mpp_workers=${1#--mpp-workers=}; shift ;;
    --quick) args+=(--count 60); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
profile=clamd+spamd
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --profile) profile=${args[i+1]:-} ;;
    --profile=*) profile=${args[i]#--profile=} ;;
  esac
done

mkdir -p results
RUN=$HERE/results/scan-run
export SCAN_RUN_DIR=$RUN
mkdir -p "$RUN"
# a fresh data dir (quarantine, state database) for every run
rm -rf "$RUN/mppproxy-data" "$RUN/mppproxy.log"
"$PYTHON" "$ANCHORS/gen_corpus.py" --count 200 --seed 1 --out "$HERE/results/scan-corpus" >&2

# the slot: twistd of this interpreter, the repo on PYTHONPATH (no install)
twistd=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")/twistd
if [ ! -x "$twistd" ]; then
  twistd=$RUN/twistd
  printf '#!/bin/sh\nexec %q -c "import sys; from twisted.scripts.twistd import run; sys.argv[0] = \\"twistd\\"; sys.exit(run())" "$@"\n' \
    "$("$PYTHON" -c 'import sys; print(sys.executable)')" > "$twistd"
  chmod +x "$twistd"
fi
export MPP_TWISTD=$twistd
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
tmpl=$RUN/mppproxy-$profile.toml.in
case "$profile" in
  clamd+spamd) cp scan-mppproxy.toml.in "$tmpl"; export MPP_CONFIG=$tmpl ;;
  clamd-only) grep -v '#@spamd' scan-mppproxy.toml.in > "$tmpl"; export MPP_CONFIG_CLAMD_ONLY=$tmpl ;;
  relay-only) grep -v '#@spamd\|#@clamd' scan-mppproxy.toml.in > "$tmpl"; export MPP_CONFIG_RELAY_ONLY=$tmpl ;;
  *) echo "$0: unknown profile $profile" >&2; exit 1 ;;
esac
if [ -n "$mpp_workers" ]; then
  sed -i "s/^workers = .*/workers = $mpp_workers/" "$tmpl"
fi

stamp=$profile-$(date -u +%Y%m%dT%H%M%SZ)
out=results/scan-$stamp
start=$(date +%s)
"$PYTHON" "$ANCHORS/scanbench.py" --corpus "$HERE/results/scan-corpus" \
  "${args[@]}" --json "$out.json" > "$out.md" 2> >(tee "$out.log" >&2) &
bench=$!
trap 'kill -TERM $bench 2>/dev/null || true' INT TERM
"$PYTHON" scan_extra.py mem --root "$bench" --run "$RUN" --out "$out.mem.json" &
sampler=$!
rc=0
wait $bench || rc=$?
wait $sampler 2>/dev/null || true
trap - INT TERM
cat "$out.md"
if [ $rc -ne 0 ] || [ ! -s "$out.json" ]; then
  echo "$0: scanbench.py failed (rc $rc); see $out.log and $RUN/*.log" >&2
  exit 1
fi
"$PYTHON" scan_extra.py report --json "$out.json" --mem "$out.mem.json" \
  --log "$RUN/mppproxy.log" --config "$RUN/mppproxy.conf" --quarantine "$RUN/mppproxy-data/quarantine" \
  --count "transactions relayed" ': relay \(' \
  --count "transactions tagged (spam)" ': tag \(' \
  --count "transactions quarantined (virus)" ': quarantine \(' \
  --count "transactions refused" ': reject \(' \
  --count "transactions tempfailed" ': tempfail \(' \
  | tee -a "$out.md"
echo "(run took $(( $(date +%s) - start )) s; tables: $out.md, raw: $out.json, progress: $out.log, daemon logs: $RUN/)"
