#!/usr/bin/env bash
# Creates .venv in the repo root and installs the project with its test extras into it.
# Idempotent: a stamp file keyed on pyproject.toml and this script makes re-runs instant.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
HASH="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
STAMP="$VENV/.installed-$HASH"

if [[ -x "$PY" && -f "$STAMP" ]]; then
    exit 0
fi

# pip -q, without Python warnings (setuptools on editable installs) and without the ones this
# machine's pip config gives for local index folders it lacks.
pip_install() {
    local log status=0
    log="$(mktemp)"
    PYTHONWARNINGS=ignore "$PY" -m pip install -q "$@" 2>"$log" || status=$?
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
    rm -f "$log"
    return "$status"
}

echo "setting up .venv (first run takes a few minutes)"
if [[ ! -x "$PY" ]]; then
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
rm -f "$VENV"/.installed-*
# torch first, pinned: these builds lie on this machine's local disk (any other torch would
# download gigabytes); the project's own install then finds torch already satisfied.
pip_install torch==2.14.1 torchvision==0.29.1
pip_install -e '.[test]'
touch "$STAMP"
