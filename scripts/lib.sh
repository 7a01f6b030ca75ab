# Sourced by the demo scripts: sets up .venv, moves to the repo root, defines PY and `section`.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
START=$SECONDS

section() { printf '\n=== %s ===\n' "$*"; }
