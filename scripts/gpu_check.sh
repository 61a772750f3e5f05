#!/usr/bin/env bash
# The GPU check, one script for a lent GPU machine (torch and Triton preinstalled, no network; ~8 minutes on an
# H100): builds lossops in place, then
#   1. tests/test_cuda.py: every op against torch on CUDA (fp32, bf16; values and gradients), the out-of-range
#      target error (immediate mode, and the default device-side assertion), CUDA-graph capture and replay of every
#      op's forward+backward, torch.compile(mode="reduce-overhead") of a training step, sync-debug mode "error";
#   2. tests/test_gpu_route.py: host reads / host-built tensors on the route (interpreter-free parts run anyway);
#   3. bench.gpu_bandwidth: LLM-vocabulary CE (incl. bf16 16384x131072) and the fused linear CE, eager / compile /
#      lossops / Liger-Kernel (when installed), as % of the card's measured copy bandwidth;
#   4. python -m bench --grid --device cuda: the grid's shapes, eager / compile / lossops (/ Liger), capped in time.
# Everything is written under bench/results/gpu_check_<card>_<time>/ (logs and tables).
#   bash scripts/gpu_check.sh           on a CUDA machine
#   bash scripts/gpu_check.sh --cpu     anywhere: the same steps with the CUDA parts skipped (tests skip, the
#                                       benchmarks run tiny CPU shapes), to check the script end to end
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
mode=gpu
[ "${1:-}" = "--cpu" ] && mode=cpu
if [ "$mode" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY (bash scripts/gpu_check.sh --cpu checks everything else)"; exit 2
fi
card="$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tr -c 'A-Za-z0-9\n' '-')"
OUT="$ROOT/bench/results/gpu_check_${card}_$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
status=0
step() {  # step NAME TIMEOUT_SECONDS COMMAND...: runs it, logs it, records a failure without stopping
  local name="$1" limit="$2"; shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
}
if [ "$mode" = gpu ] || ! "$PY" -c "import lossops._C" 2>/dev/null; then
  step build 600 env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
"$PY" -c "import lossops; print(lossops.show_config())" | tee "$OUT/config.txt"
if [ "$mode" = gpu ]; then
  "$PY" -c "import torch; print(torch.cuda.get_device_properties(0))" >>"$OUT/config.txt"
  step test_cuda 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
  step test_gpu_route 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_route.py
  step gpu_bandwidth 240 "$PY" -m bench.gpu_bandwidth --out "$OUT"
  step grid 150 "$PY" -m bench --grid --device cuda --repeats 5 --out "$OUT"
else
  step test_cuda 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
  step test_gpu_route 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_route.py
  step gpu_route_host 300 "$PY" -m bench.gpu_route_host --repeats 50
  step gpu_bandwidth 300 "$PY" -m bench.gpu_bandwidth --cpu --repeats 3 --out "$OUT"
fi
echo "gpu_check: results in $OUT (exit $status)"
exit "$status"
