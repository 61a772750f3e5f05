#!/usr/bin/env bash
# The main job: correctness self-check of every op against PyTorch, the benchmark grid's tiny shapes (eager,
# torch.compile and lossops interleaved, medians, a verdict per cell), and a short mixed-precision training run.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m lossops.selfcheck
python -m bench --grid --quick "$@"
if [ -f examples/train_amp.py ]; then
  python examples/train_amp.py --steps 60 --hidden 32 --samples 2000 --batch-size 64 --threads 1
fi
