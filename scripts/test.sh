#!/usr/bin/env bash
# The test command: builds everything on a fresh clone, runs the whole pytest suite, then the C++-backend
# tests again under AddressSanitizer + UndefinedBehaviorSanitizer (skip that part with --no-sanitize).
set -euo pipefail
. "$(dirname "$0")/env.sh"
sanitize=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-sanitize" ]; then sanitize=0; else args+=("$a"); fi
done
python -m pytest -q tests "${args[@]}"
if [ "$sanitize" = 1 ] && [ -x .ci/sanitize.sh ]; then
  bash .ci/sanitize.sh
fi
