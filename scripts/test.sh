#!/usr/bin/env bash
# Runs the test suite in .venv (set up on first use), on 2 cores with pytest-xdist.
# Extra arguments are passed on to pytest after the defaults, e.g. `bash scripts/test.sh -k cli`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"

status=0
"$ROOT/.venv/bin/python" -m pytest -n 2 --dist loadfile "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
