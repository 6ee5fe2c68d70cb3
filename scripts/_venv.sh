# Sourced by scripts/test and scripts/demo: a project-local virtualenv with ztmw installed (editable).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ZTMW_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.ztmw-installed-$1"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] \
   || [ "$ROOT/tests/sample_plugin/pyproject.toml" -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$1]"
  if [ "$1" = "test" ]; then "$VENV/bin/python" -m pip install --quiet -e "$ROOT/tests/sample_plugin"; fi
  touch "$STAMP"
fi
