#!/usr/bin/env bash
# One prepared GPU check: CUDA logits vs CPU fp32, speculative identity on CUDA, Triton kernels
# on CUDA, NCCL TP (when >= 3 GPUs), CUDA graphs (logits vs CPU fp32, greedy identity), decode
# tokens/s with and without CUDA graphs, and the DeepSeek-V4 section (a random
# `dspark make-model` folder: logits vs CPU, NCCL group over the GPUs present, decode vs
# transformers). Run from the repository root on a CUDA machine; results go to $OUT (or
# bench/results) as gpu_check.json. Without CUDA the CUDA checks are skipped (said in the report)
# and the V4 section runs on CPU with the tiny preset.
# Optional section (bench/table1.py): with DSPARK_QWEN3_8B and DSPARK_QWEN3_8B_DSPARK naming local
# folders of Qwen3-8B and DeepSeek's dspark_qwen3_8b_block7, the drafter's acceptance length on
# GSM8K / MT-Bench / MBPP+ prompts (files named by DSPARK_GSM8K_PROMPTS, DSPARK_MT_BENCH_PROMPTS,
# DSPARK_MBPP_PROMPTS) goes into the same report beside the paper's Table 1.
set -euo pipefail
cd "$(dirname "$0")/.."
export DSPARK_OMP_WAIT=spin  # one process owns the host (dspark/omp.py)
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then PY=python3; fi
"$PY" -c "import dspark, torch" 
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
status=0
"$PY" bench/gpu_check.py "$DEST/gpu_check.json" || status=$?
if [ -n "${DSPARK_QWEN3_8B:-}" ] && [ -n "${DSPARK_QWEN3_8B_DSPARK:-}" ]; then
  "$PY" bench/table1.py --model "$DSPARK_QWEN3_8B" --head "$DSPARK_QWEN3_8B_DSPARK" \
    --report "$DEST/gpu_check.json" || status=$?
else
  echo "Table 1 section skipped: set DSPARK_QWEN3_8B and DSPARK_QWEN3_8B_DSPARK to local folders" >&2
fi
exit "$status"
