#!/usr/bin/env bash
# One prepared GPU check: CUDA logits vs CPU fp32, speculative identity on CUDA, Triton kernels
# on CUDA, NCCL TP (when >= 3 GPUs), and decode tokens/s. Run from the repository root on a CUDA
# machine; results go to $OUT (or bench/results) as gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export DSPARK_OMP_WAIT=spin  # one process owns the host (dspark/omp.py)
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then PY=python3; fi
"$PY" -c "import dspark, torch; assert torch.cuda.is_available(), 'no CUDA'" 
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
"$PY" bench/gpu_check.py "$DEST/gpu_check.json"
