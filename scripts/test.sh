#!/usr/bin/env bash
# scripts/test.sh [tox args...]: run the test suite through tox (see tox.ini).
#   scripts/test.sh                          # everything
#   scripts/test.sh -- tests/realmta -x      # arguments after -- go to pytest
# Installs tox if it is missing: with pip where pip may install, otherwise (Debian's
# "externally managed" python3, PEP 668) into a venv under .tox/ (git-ignored).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
PY=${PYTHON:-python3}
BOOT=.tox/.bootstrap-venv

if command -v tox >/dev/null 2>&1 && tox --version >/dev/null 2>&1; then
    exec tox "$@"
fi
if [ -x "$BOOT/bin/tox" ]; then
    exec "$BOOT/bin/tox" "$@"
fi
if "$PY" -m tox --version >/dev/null 2>&1; then
    exec "$PY" -m tox "$@"
fi

externally_managed=$("$PY" - <<'PY'
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
print(int(sys.prefix == sys.base_prefix and os.path.exists(marker)))
PY
)
if [ "$externally_managed" = 0 ]; then
    echo "tox not found: pip install tox" >&2
    "$PY" -m pip install --quiet tox
    exec "$PY" -m tox "$@"
fi

echo "tox not found and $PY is externally managed: installing tox into $BOOT" >&2
mkdir -p .tox
"$PY" -m venv "$BOOT" || {
    echo "could not create a venv; on Debian: apt-get install python3-venv" >&2
    exit 1
}
"$BOOT/bin/python" -m pip install --quiet --disable-pip-version-check tox
exec "$BOOT/bin/tox" "$@"
