#!/usr/bin/env bash
# The wheel a user would install: `pip wheel --no-build-isolation . -w dist/` in the dev venv, then installed
# into a fresh venv that has nothing but torch, where `python -m lossops.selfcheck` must pass (run from outside
# the clone, so the installed package is the one imported).
#   --prepare-venv   only make that torch-only venv (CI runs this beside the test command: it is one core's
#                    unpacking while the other builds); a later run without it finds the venv ready.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLEAN="${LOSSOPS_WHEEL_VENV:-$ROOT/build/wheel-venv}"
READY="$CLEAN/.torch-only"
make_torch_venv() {
  rm -rf "$CLEAN"
  "${PYTHON:-python3}" -m venv "$CLEAN"
  "$CLEAN/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  touch "$READY"
}
if [ "${1:-}" = "--prepare-venv" ]; then
  make_torch_venv
  exit 0
fi
. "$ROOT/scripts/env.sh"
DIST="$ROOT/dist"
rm -rf "$DIST"
MAX_JOBS="${MAX_JOBS:-2}" pip wheel -q --no-build-isolation --no-deps . -w "$DIST"
wheel=$(ls "$DIST"/lossops-*.whl)
[ -f "$READY" ] || make_torch_venv
"$CLEAN/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel"
(cd / && "$CLEAN/bin/python" -c "import lossops, sys; assert lossops.__file__.startswith('$CLEAN'), lossops.__file__" \
  && "$CLEAN/bin/python" -m lossops.selfcheck)
echo "wheel: $(basename "$wheel") installs into a torch-only venv and passes the self-check"
