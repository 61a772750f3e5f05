#!/usr/bin/env bash
# Memory safety of the C++ kernels: builds csrc/ with ASan + UBSan (SANITIZE=1) into a directory of its own and runs
# the C++-backend tests against that build. One kernel library per vector width: the one this CPU serves calls with
# (AVX-512 or AVX2: the code users run, 16- or 8-lane vectors and their tails), which the tests run on, and beside
# AVX-512 the baseline (8-lane emulated vectors, for the tests that force it). Beside AVX2 the baseline would repeat
# its vector width, and an AVX2 library beside AVX-512 the baseline's: the code that indexes memory is the same, and
# each sanitized library takes minutes to compile. The tests that force a build not made here are not collected
# (tests/_cases.py: isa_available).
# Exits non-zero on any sanitizer report (or test failure).
#
# The in-place modules (lossops/_C*.so, lossops/_kernels_*.so) are never touched: the sanitized package is assembled under
# $LOSSOPS_SANITIZE_DIR (default build/sanitize) and put first on the path. The tests run with
# -k "$LOSSOPS_SANITIZE_K" (default: the parametrisations on the C++ backend) over the files chosen below;
# extra arguments go to pytest. --build-only builds and stops; --no-build tests the build already there
# (scripts/test.sh builds while the main suite runs, at the lowest priority, then tests).
set -euo pipefail
build=1
run_tests=1
case "${1:-}" in
  --build-only) run_tests=0; shift ;;
  --no-build) build=0; shift ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${LOSSOPS_SANITIZE_DIR:-$ROOT/build/sanitize}"
PKG="$OUT/pkg"
LOG="$OUT/pytest.log"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi

best="$(python -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")"
case "$best" in avx512) isas="default,avx512" ;; avx2) isas=avx2 ;; *) best=default; isas=default ;; esac
if [ "$build" = 1 ]; then
  echo "sanitize: building csrc/ with ASan+UBSan ($isas) into $OUT"
  mkdir -p "$OUT"
  (cd "$ROOT" && SANITIZE=1 LOSSOPS_ISAS="$isas" MAX_JOBS="${MAX_JOBS:-2}" \
    python setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp" >"$OUT/build.log" 2>&1) || {
    cat "$OUT/build.log"; echo "sanitize: build failed"; exit 1; }
  echo "sanitize: built"
fi
[ "$run_tests" = 1 ] || exit 0

python - "$ROOT" "$OUT/lib" "$PKG" <<'EOF'
import pathlib, shutil, sys
root, lib, pkg = map(pathlib.Path, sys.argv[1:])
skip = shutil.ignore_patterns("*.so", "__pycache__", ".build-stamp")
shutil.rmtree(pkg, ignore_errors=True)
shutil.copytree(root / "lossops", pkg / "lossops", ignore=skip)
shutil.copytree(root / "triton_kernels", pkg / "lossops" / "triton_kernels", ignore=skip)
for module in [*(lib / "lossops").glob("_C*.so"), *(lib / "lossops").glob("_kernels_*.so")]:
    shutil.copy2(module, pkg / "lossops")
EOF

LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD
# Python's and torch's own allocations are not ours to chase (detect_leaks=0); the first report aborts.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:print_summary=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export LOSSOPS_CPU_CAPABILITY="$best"
# tests/conftest.py: gradchecks in fast mode (their repeated calls find nothing new here)
export LOSSOPS_SANITIZED=1
# The sanitized package first; the repository after it for the test helpers' own imports (bench, examples).
export PYTHONPATH="$PKG:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The tests must exercise the sanitized module, not the in-place one.
(cd "$PKG" && python -c "
import lossops, lossops._cpp as c
m = c.module()
assert lossops.__file__.startswith('$PKG') and m.__file__.startswith('$PKG'), (lossops.__file__, m.__file__)
print('sanitize: testing', m.__file__, '(', m.capability(), ')')
")

# What the sanitizers can find is in the C++ kernels and the host module: the test files that drive them directly.
# Left out: those that reach the same kernels through other layers (torch.compile, DTensor, the benchmark, the
# examples, transformers' Trainer), those with no C++ code under them (Triton, the GPU route, the build and
# backend settings, the monitor), and test_large.py (~4 GB under ASan's allocator for no new code path).
mapfile -t files < <(cd "$ROOT" && ls tests/test_*.py | grep -v -E \
  'test_(large|compile|dtensor|bench|examples|transformers_integration|monitor|build|backend|gpu_route|cuda|triton_[a-z]+)\.py$')
status=0
(cd "$PKG" && python -m pytest -q -n "${LOSSOPS_TEST_WORKERS:-auto}" -p no:cacheprovider --rootdir "$ROOT" "${files[@]/#/$ROOT/}" \
  -k "${LOSSOPS_SANITIZE_K:-cpp}" "$@") 2>&1 \
  | tee "$LOG" || status=$?
# halt_on_error aborts the process that hit a report; a report inside a subprocess shows only in the log.
if grep -q -E "ERROR: AddressSanitizer|runtime error:|SUMMARY: UndefinedBehaviorSanitizer" "$LOG"; then
  echo "sanitize: sanitizer report found (see $LOG)"
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitize: tests failed under the sanitizers (exit $status, log $LOG)"
  exit "$status"
fi
echo "sanitize: no sanitizer reports"
