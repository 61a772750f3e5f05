#!/usr/bin/env bash
# Sourced by the README commands: creates/activates the venv, installs torch (CPU wheel) if no torch is
# present, installs the dev requirements (setuptools and wheel among them: Python 3.12+ venvs have none) and
# builds lossops in place (editable install).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOSSOPS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  pip install -q torch==2.13.0
fi
pip install -q -r "$ROOT/requirements-dev.txt"
# Rebuild only when a C++ source or the build script is newer than the built modules.
stamp="$ROOT/lossops/.build-stamp"
if [ ! -f "$stamp" ] || [ -n "$(find "$ROOT/csrc" "$ROOT/setup.py" "$ROOT/pyproject.toml" -newer "$stamp" 2>/dev/null | head -1)" ] \
   || ! python -c "import lossops._C" >/dev/null 2>&1; then
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" pip install -q --no-build-isolation -e .)
  touch "$stamp"
fi
cd "$ROOT"
