#!/usr/bin/env bash
# Builds lossops against another torch and runs a defined subset of the tests with it:
#   bash scripts/check_torch.sh VERSION [TRITON_VERSION]      e.g. 2.11.0 3.6.0, or 2.14.1
# A venv of its own (LOSSOPS_CHECK_VENV, default /tmp/lossops-torch-VERSION; kept, so a rerun installs nothing),
# torch==VERSION from pip (a CUDA build where no CPU wheel is local: it installs and runs on CPU), the test tools,
# and lossops built from a copy of this tree (build objects compiled against one torch must never be reused for
# another, and the in-place modules of the main venv stay as they are). The tests run from that copy against the
# installed package. PYTHON picks the interpreter (default python3.12, what the GPU machines have).
set -euo pipefail
version="${1:?usage: check_torch.sh TORCH_VERSION [TRITON_VERSION]}"
triton_version="${2:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOSSOPS_CHECK_VENV:-/tmp/lossops-torch-$version}"
PY="${PYTHON:-python3.12}"
WORK="$(mktemp -d /tmp/lossops-check-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Triton before 3.7 runs its interpreter's scalar arguments as 1-element arrays, which NumPy 2.4 no longer converts
# to Python integers (the Triton tests run under that interpreter).
numpy="numpy"
case "$triton_version" in 3.[0-6].*) numpy="numpy<2.4" ;; esac
"$VENV/bin/python" -m pip install -q "torch==$version" ${triton_version:+"triton==$triton_version"} \
  setuptools wheel pybind11 ninja pytest pytest-xdist hypothesis "$numpy" expecttest 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, triton; print('check_torch: torch', torch.__version__, 'triton', triton.__version__)"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK")
(cd "$WORK" && MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps . 2>&1 \
  | grep -v "^WARNING: Location" || true)
rm -rf "$WORK/lossops"  # the tests must import the installed package, not the copy's sources
cd "$WORK/tests"
export PYTHONPATH="$WORK"  # the benchmark helpers some tests use (bench/); lossops itself is the installed package
"$VENV/bin/python" -c "import lossops; print(lossops.show_config())"
# The subset: every family against torch on every backend, the autograd modes, the GPU route's host reads, the
# Triton kernels compiled for sm_80/sm_90 with this Triton, and the C++ eager path.
"$VENV/bin/pytest" -q -p no:cacheprovider --rootdir "$WORK/tests" test_cross_entropy.py test_bce.py test_focal.py \
  test_regression.py test_ctc.py test_linear_cross_entropy.py test_autograd_modes.py test_edge_cases.py \
  test_gpu_route.py test_cpp_eager_path.py test_triton_aot.py "${@:3}"
