#!/usr/bin/env bash
# scripts/test.sh [tox args...]: run the test suite through tox (see tox.ini).
#   scripts/test.sh                          # everything
#   scripts/test.sh -- tests/realmta -x      # arguments after -- go to pytest
# Installs tox if it is missing: with pip where pip may install, otherwise (Debian's
# "externally managed" python3, PEP 668) into a venv under .tox/ (git-ignored).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
PY=${PYTHON:-python3}

# tox's py311/py312/py313 environments look for python3.X on PATH, where pyenv's
# shims may answer "command not found": links to pyenv's interpreters
# (~/.pyenv/versions/3.X.Y) go in a directory of their own, first on PATH, so
# `python3` itself stays what it was.
LINKS=.tox/.interpreters
mkdir -p "$LINKS"
# tox makes .tox private (0700) when it creates it; made here first, it stays
# readable, so the --uid test (tests/test_shutdown_twistd.py) can run twistd
# as nobody with the test environment's packages.
chmod 755 .tox
for v in 3.11 3.12 3.13; do
    for py in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v"; do
        if [ -x "$py" ]; then ln -sfn "$py" "$LINKS/python$v"; break; fi
    done
done
PATH=$PWD/$LINKS:$PATH
export PATH
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
