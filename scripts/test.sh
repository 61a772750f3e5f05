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
# The sanitizer build compiles while the suite runs, at the lowest priority: it takes the CPU time the test
# workers leave (process start-ups, the last tests), and finishes after the suite at full speed. It runs in a
# session of its own (so that its compilers can be killed together), and Linux schedules each session's group
# (autogroup) fairly against the others whatever its processes' nice values: the group itself is given nice 19,
# or the build would take half of the CPU from the suite.
sanitize_build=
if [ "$sanitize" = 1 ] && [ -x .ci/sanitize.sh ]; then
  mkdir -p build
  setsid bash -c '(echo 19 >/proc/self/autogroup) 2>/dev/null; exec nice -n 19 bash .ci/sanitize.sh --build-only' \
    >build/sanitize-build.out 2>&1 &
  sanitize_build=$!
  trap 'kill -- -"$sanitize_build" 2>/dev/null || true' EXIT  # its own process group: the compilers go too
fi
# One worker per core (LOSSOPS_TEST_WORKERS=0 runs in this process): the tests are mostly small and single-threaded.
# tests/conftest.py orders them longest first (tests/durations.json) and has xdist hand them out two at a time.
workers="${LOSSOPS_TEST_WORKERS:-auto}"
if [ "$workers" = 0 ]; then
  python -m pytest -q tests "${args[@]}"
else
  python -m pytest -q -n "$workers" tests "${args[@]}"
fi
if [ -n "$sanitize_build" ]; then
  wait "$sanitize_build" || { cat build/sanitize-build.out; exit 1; }
  trap - EXIT
  cat build/sanitize-build.out
  bash .ci/sanitize.sh --no-build
fi
