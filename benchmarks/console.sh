#!/usr/bin/env bash
# Web console benchmark (issue 13): 1,000,000 stored items on MariaDB (archive_queries.py's
# generator and bulk load, tables of their own), the real console (WebConsole) in a process
# of its own, and over HTTP with a logged-in session: p50/p95/p99 over 200 requests each
# for the list (a domain admin's, the superadmin's), a search (sender, subject, dates) and
# a message page, and 20 release round trips (the POST of Release until the message is at
# a loopback SMTP sink). Targets: p99 under 200 ms for pages, a release under 2 s.
#   benchmarks/console.sh                   # 1,000,000 rows
#   benchmarks/console.sh --rows 100000     # a quick look (any console_bench.py option)
# Loopback only; the bench<random>_archive_* tables are dropped at the end.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-../.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
if ! "$PYTHON" -c 'import pymysql, sqlalchemy, twisted' 2>/dev/null; then
  echo "$0: $PYTHON lacks the project's dependencies (use the venv: PYTHON=.venv/bin/python)" >&2
  exit 2
fi
if ! "$PYTHON" - <<'PY' 2>/dev/null
import socket; socket.create_connection(("127.0.0.1", 3306), timeout=2).close()
PY
then
  bash ../scripts/services/start-mariadb.sh >/dev/null
fi
exec "$PYTHON" console_bench.py "$@"
