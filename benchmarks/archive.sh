#!/usr/bin/env bash
# Archive benchmark (issue 12), three parts measured side by side in one run:
#   1. copies/s from the edge's durable queue to stored rows on the archive node,
#      for 4 KiB and 256 KiB messages on SQLite and MariaDB, beside the raw rate of
#      bulk INSERTs of the same rows into the same database (archive_bench.py);
#   2. the edge's relay rate with [archive] copy = "all" vs without
#      (relay_bench.py: servers mppproxy and mppproxy-copyall against smtp-sink);
#   3. the three hot queries of the quarantine list on 1,000,000 generated rows
#      (archive_queries.py): p50/p95/p99 on SQLite and MariaDB.
#   benchmarks/archive.sh            # all three (MariaDB from scripts/services/start-mariadb.sh)
#   benchmarks/archive.sh --quick    # fewer copies, 100,000 rows
# Loopback only; MariaDB's archive_* tables of the test database are emptied.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
quick=0
[ "${1:-}" = "--quick" ] && quick=1
if ! "$PYTHON" -c 'import pymysql, sqlalchemy' 2>/dev/null; then
  echo "$0: $PYTHON lacks the project's dependencies (use the venv: PYTHON=.venv/bin/python)" >&2
  exit 2
fi
if ! "$PYTHON" - <<'PY' 2>/dev/null
import socket; socket.create_connection(("127.0.0.1", 3306), timeout=2).close()
PY
then
  bash ../scripts/services/start-mariadb.sh >/dev/null
fi
echo "## 1. Edge queue -> archive node -> stored rows, beside raw bulk INSERTs"
# --quick too: the default counts (8000 at 4 KiB, 300 at 256 KiB); fewer
# 4 KiB copies measured a run's start-up more than its rate.
"$PYTHON" archive_bench.py
echo
echo "## 2. Relay rate with copy-all on (mppproxy-copyall) vs off (mppproxy)"
if [ $quick = 1 ]; then
  PYTHON="$PYTHON" ./run.sh --reps 2 --sizes 4096 --conc 20 --servers mppproxy,mppproxy-copyall
else
  PYTHON="$PYTHON" ./run.sh --reps 3 --sizes 4096,65536 --conc 20 --servers mppproxy,mppproxy-copyall
fi
echo
echo "## 3. Quarantine list queries"
if [ $quick = 1 ]; then
  "$PYTHON" archive_queries.py --rows 100000
else
  "$PYTHON" archive_queries.py
fi
