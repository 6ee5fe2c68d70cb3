# Sourced by scripts/test and scripts/demo: a project-local virtualenv with ztmw installed (editable),
# every dependency at the version constraints.txt pins (the set CI tested; `scripts/lock` moves it forward).
# ZTMW_VENV names another virtualenv; ZTMW_CONSTRAINTS="" installs the newest releases instead (scripts/test --latest).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ZTMW_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="${ZTMW_CONSTRAINTS-$ROOT/constraints.txt}"
PIN=()
if [ -n "$CONSTRAINTS" ]; then PIN=(-c "$CONSTRAINTS"); fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.ztmw-installed-$1"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] \
   || [ "$ROOT/tests/sample_plugin/pyproject.toml" -nt "$STAMP" ] \
   || { [ -n "$CONSTRAINTS" ] && [ "$CONSTRAINTS" -nt "$STAMP" ]; }; then
  "$VENV/bin/python" -m pip install --quiet --upgrade "${PIN[@]}" pip
  "$VENV/bin/python" -m pip install --quiet "${PIN[@]}" -e "$ROOT[$1]"
  if [ "$1" = "test" ]; then "$VENV/bin/python" -m pip install --quiet "${PIN[@]}" -e "$ROOT/tests/sample_plugin"; fi
  touch "$STAMP"
fi
