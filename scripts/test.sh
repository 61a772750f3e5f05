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
# Lint first: it takes a second and names the line.
ruff check "$ROOT"
# One worker per core (LOSSOPS_TEST_WORKERS=0 runs in this process): the tests are mostly small and single-threaded.
workers="${LOSSOPS_TEST_WORKERS:-auto}"
if [ "$workers" = 0 ]; then
  python -m pytest -q tests "${args[@]}"
else
  python -m pytest -q -n "$workers" tests "${args[@]}"
fi
if [ "$sanitize" = 1 ] && [ -x .ci/sanitize.sh ]; then
  bash .ci/sanitize.sh
fi
