#!/usr/bin/env bash
# The wheel a user would install: `pip wheel --no-build-isolation . -w dist/` in the dev venv, then installed
# into a fresh venv that has nothing but torch, where `python -m lossops.selfcheck` must pass (run from outside
# the clone, so the installed package is the one imported).
set -euo pipefail
. "$(dirname "$0")/env.sh"
ROOT="$(pwd)"
DIST="$ROOT/dist"
CLEAN="${LOSSOPS_WHEEL_VENV:-$ROOT/build/wheel-venv}"
rm -rf "$DIST" "$CLEAN"
MAX_JOBS="${MAX_JOBS:-2}" pip wheel -q --no-build-isolation --no-deps . -w "$DIST"
wheel=$(ls "$DIST"/lossops-*.whl)
python -m venv "$CLEAN"
"$CLEAN/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$CLEAN/bin/pip" install -q --disable-pip-version-check --no-deps "$wheel"
(cd / && "$CLEAN/bin/python" -c "import lossops, sys; assert lossops.__file__.startswith('$CLEAN'), lossops.__file__" \
  && "$CLEAN/bin/python" -m lossops.selfcheck)
echo "wheel: $(basename "$wheel") installs into a torch-only venv and passes the self-check"
