"""`dspark bench engine --model <folder>` on a tiny random DeepSeek-V4 folder (this CPU): ours and
transformers each in their own process, side by side, eager only (V4 does not compile); a path
that is not a folder is a one-line error.  No speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark.models.deepseek_v4_random import write_random_folder

pytest.importorskip("transformers.models.deepseek_v4")

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dspark.cli", "bench", "engine", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_engine_bench_on_a_v4_folder(tmp_path):
    folder = write_random_folder(tmp_path / "v4", "tiny", seed=1, dtype=torch.float32)
    out = tmp_path / "engine.json"
    proc = bench("--model", str(folder), "--batches", "1,2", "--dtypes", "fp32", "--new-tokens", "4",
                 "--threads", "1", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs eager only" in proc.stderr
    data = json.loads(out.read_text())
    assert data["model"] == str(folder) and [r["batch"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert row["eager_tok_s"] > 0 and row["hf_tok_s"] > 0 and row["compiled_tok_s"] is None, row
        assert row["floor_ms"] > 0 and row["speedup"] == row["eager_tok_s"] / row["hf_tok_s"]


def test_a_model_that_is_not_a_folder_is_a_one_line_error(tmp_path):
    proc = bench("--model", str(tmp_path / "missing"), "--skip-hf")
    assert proc.returncode == 1 and proc.stderr.strip() == f"Error: --model {tmp_path / 'missing'} is not a folder"


def test_weights_name_the_4bit_kernel_of_their_processes(tmp_path):
    """`--weights q4:int4` runs its processes with torch's kernel (the row says which kernel
    multiplied the layers); a value that names no format or kernel is a one-line error."""
    import doctest

    from bench import engine

    assert doctest.testmod(engine).failed == 0
    assert engine.weights_run("dense") == ("dense", {}) and engine.weights_run("q4") == ("q4", {})
    for bad in ("q8", "dense:int4", "q4:gpu"):
        with pytest.raises(ValueError, match="q4:int4"):
            engine.weights_run(bad)
    proc = bench("--weights", "q4:gpu", "--skip-hf")
    assert proc.returncode == 2 and "q4:amx / q4:int4" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "engine.json"
    proc = bench("--weights", "q4:int4", "--dtypes", "bf16", "--batches", "2", "--new-tokens", "4", "--threads", "1",
                 "--skip-hf", "--no-compile", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["weights"] == "q4:int4" and row["q4_kernels"] == "int4" and row["eager_tok_s"] > 0


def test_attention_names_the_attention_of_their_processes(tmp_path):
    """`--attention torch,kernel` runs ours once per attention (the rows say which ran); a bad
    value is a one-line error."""
    from dspark.kernels.native import short_attention_usable

    proc = bench("--attention", "flash", "--skip-hf")
    assert proc.returncode == 2 and "kernel / torch / default" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "engine.json"
    proc = bench("--attention", "torch,kernel" if short_attention_usable() else "torch", "--dtypes", "bf16",
                 "--batches", "1", "--new-tokens", "4", "--threads", "1", "--skip-hf", "--no-compile", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["attention"] for r in rows] == (["torch", "kernel"] if short_attention_usable() else ["torch"])


def test_cpu_runtime_runs_llama_cpp_beside_ours_or_says_how_to_install_it(tmp_path):
    """`--cpu-runtime` adds llama.cpp on the same GGUF file to the batch-1 row where its binding
    is installed (`make cpu-runtime`), and is a one-line error naming that target where not."""
    import importlib.util

    installed = importlib.util.find_spec("llama_cpp") is not None
    for args, message in ((("--model", str(tmp_path)), "compares greedy decoding of the default GGUF model only"),
                          (("--batches", "8"), "runs at batch 1: add 1 to --batches")):
        proc = bench("--cpu-runtime", *args, "--skip-hf")
        expected = message if installed else "needs llama.cpp's Python binding: `make cpu-runtime` builds it"
        assert proc.returncode == 1 and proc.stderr.strip() == f"Error: --cpu-runtime {expected}", proc.stderr
    out = tmp_path / "engine.json"
    proc = bench("--cpu-runtime", "--weights", "q4", "--dtypes", "bf16", "--batches", "1", "--new-tokens", "4",
                 "--threads", "1", "--skip-hf", "--no-compile", "--json", str(out))  # fmt: skip
    if not installed:
        assert proc.returncode == 1 and proc.stderr.strip() == (
            "Error: --cpu-runtime needs llama.cpp's Python binding: `make cpu-runtime` builds it")
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["cpu_runtime_tok_s"] > 0 and row["cpu_runtime_step_ms"] > 0
    assert row["ours_over_cpu_runtime"] == row["eager_tok_s"] / row["cpu_runtime_tok_s"]
