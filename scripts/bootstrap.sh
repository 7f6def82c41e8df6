#!/usr/bin/env bash
# Makes .venv (once) and installs the project into it, editable, with the
# test extras; reinstalls only when setup.cfg or pyproject.toml changed.
# Sourced by scripts/demo and scripts/test; prints what it does.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HPC_VENV:-$REPO_ROOT/.venv}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "bootstrap: need Python 3.10 or newer as \$PYTHON (or python3)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv >/dev/null
            "$PYTHON" -m venv "$VENV"
        else
            echo "bootstrap: '$PYTHON -m venv' failed; install your distribution's python3-venv" >&2
            exit 1
        fi
    fi
fi
stamp="$VENV/.hpc-installed-$(cat "$REPO_ROOT/setup.cfg" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "bootstrap: installing hpc-job-controller and its test tools into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO_ROOT[test]"
    rm -f "$VENV"/.hpc-installed-*
    touch "$stamp"
fi
