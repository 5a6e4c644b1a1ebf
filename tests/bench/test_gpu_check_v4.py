"""The DeepSeek-V4 section of the GPU check on this CPU, so it cannot rot unnoticed: the script as
gpu_check.sh runs it finds no CUDA, reports the CUDA checks as skipped, and runs the V4 section
on CPU (tiny ``dspark make-model`` folder, CPU vs CPU logits, the NCCL group skipped with its
reason, decode tokens/s of ours and transformers at batch 1 and 8) into the JSON report.  No
speed is asserted, only that every part ran and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark.models.deepseek_v4_config import deepseek_v4_config_from_hf
from dspark.models.deepseek_v4_random import preset_config

pytest.importorskip("transformers.models.deepseek_v4")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; on CUDA the script runs the real checks")
def test_script_without_cuda_runs_the_v4_section_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DSPARK_CHECK_V4_NEW_TOKENS="6", OMP_NUM_THREADS="1")
    env.pop("DSPARK_QWEN3_8B", None)
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda_checks"].startswith("skipped") and report["v4_check_passed"] is True
    assert report["cuda_graphs"] == report["decode"] == "skipped: no CUDA"
    v4 = report["deepseek_v4"]
    assert (v4["device"], v4["preset"], v4["new_tokens"]) == ("cpu", "tiny", 6)
    assert v4["reference_rows"] == 57 + 12 * 5
    assert v4["logits"]["fp32"]["max_rel_err"] == 0.0 and v4["logits_passed"] is True  # the same computation
    assert 0 < v4["logits"]["bf16"]["median_rel_err"] <= v4["logits"]["bf16"]["tolerance_median"]
    assert v4["nccl_group"].startswith("skipped: no CUDA") and v4["nccl_group_passed"] is True
    assert [r["batch"] for r in v4["decode"]] == [1, 8]
    for row in v4["decode"]:
        assert row["ours_tok_s"] > 0 and row["hf_tok_s"] > 0 and row["ours_over_hf"] > 0, row


def test_group_size_is_the_largest_the_configuration_divides():
    if str(ROOT) not in sys.path:  # bench/ is a folder of scripts beside the package
        sys.path.insert(0, str(ROOT))
    from bench.gpu_check_v4 import group_size

    cfg = deepseek_v4_config_from_hf(preset_config("tiny"))  # 4 heads in 2 output groups, 8 experts
    assert [group_size(cfg, n) for n in (1, 2, 3, 4, 8)] == [1, 2, 2, 4, 4]


def test_group_comparison_over_gloo(tmp_path):
    """The section's group-vs-one-rank comparison, run over gloo with 2 CPU ranks (on CUDA it
    runs over NCCL with one GPU per rank)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.gpu_check_v4 import GROUP_TOL, group_vs_one_rank, script

    from dspark.models.deepseek_v4_random import write_random_folder

    folder = write_random_folder(tmp_path / "v4", "tiny", seed=5, dtype=torch.float32)
    out, ok = group_vs_one_rank(folder, "cpu", 2, script(320, n_steps=4))
    assert ok and out["world_size"] == 2 and out["max_rel_err"] <= GROUP_TOL, out
