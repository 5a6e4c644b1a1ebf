"""The DeepSeek-V4 section of the GPU check (``bench/gpu_check.sh``; ``report["deepseek_v4"]``).

1. A random V4 folder written by ``dspark make-model`` (the command users run; ``small`` preset
   on CUDA, ``tiny`` without it, or ``DSPARK_CHECK_V4_PRESET``).
2. Logits on the device vs the CPU fp32 logits of the same script of steps (two requests: a
   prefill each, then decode tokens beside verify blocks partly rolled back, crossing CSA / HCA
   windows): fp32 with TF32 off within 1e-3 of the largest logit; bf16 by the median row (expert
   choices of score-routed layers flip on a few rows in bf16, as on CPU) within 3e-2.
3. An NCCL group of ``torch.cuda.device_count()`` ranks (or the largest size below it that the
   configuration divides) equal to one rank at 1e-4.  Skipped, with the reason, without CUDA or
   with one GPU: NCCL cannot put two ranks on one GPU.  The same comparison runs over gloo on
   CPU (:func:`group_vs_one_rank`), which is how the test checks it.
4. Decode tokens/s at batch 1 and 8, ours (eager: V4 does not compile) vs transformers'
   ``generate`` on the same folder and device (:mod:`bench.engine`'s measurements), bf16.

Everything runs on CPU too (``device="cpu"``: the logits compare CPU with CPU, the group is
skipped), which is how ``tests/bench/test_gpu_check_v4.py`` exercises it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FP32_TOL, BF16_MEDIAN_TOL, GROUP_TOL = 1e-3, 3e-2, 1e-4


def write_folder(dest: Path, preset: str, seed: int = 0) -> Path:
    """``dspark make-model`` in a subprocess (the command line as a user runs it)."""
    out = dest / f"v4_{preset}"
    cmd = [sys.executable, "-m", "dspark.cli", "make-model", "--out", str(out), "--preset", preset,
           "--seed", str(seed), "--dtype", "fp32"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"make-model failed: {proc.stderr.strip()[-500:]}")
    return out


def script(vocab: int, n_steps: int = 12, seed: int = 3):
    """Steps of two requests: prefills of 37 and 20 tokens, then per step one decode token for
    slot 0 and a 4-token verify block for slot 1 of which a pseudo-random 1..4 are kept."""
    from dspark.workers.runner import StepInput

    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(0, min(vocab, 256), (n,), generator=gen).tolist()

    steps, lens = [StepInput(rand(57), [0, 1], [0, 0], [37, 20])], [37, 20]
    for _ in range(n_steps):
        steps.append(StepInput(rand(5), [0, 1], list(lens), [1, 4]))
        lens = [lens[0] + 1, lens[1] + int(torch.randint(1, 5, (1,), generator=gen))]
    return steps


def run_script(runner, steps) -> torch.Tensor:
    """Every step's logits, concatenated, on the CPU: [rows, vocab] fp32."""
    with torch.inference_mode():
        return torch.cat([runner.forward(s).logits.float().cpu() for s in steps])


def row_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per row: largest absolute difference over the row's largest reference logit."""
    return (got - want).abs().max(-1).values / want.abs().max(-1).values


def logits_part(folder: Path, device: str, steps, ref: torch.Tensor) -> tuple[dict, bool]:
    from dspark.models.loader import load_model
    from dspark.workers.runner import LocalRunner, RunnerConfig

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out, ok = {}, True
    for dtype in ("fp32", "bf16"):
        model = load_model(folder, dtype=dtype, device=device).model
        got = run_script(LocalRunner(model, RunnerConfig(2, 256)), steps)
        err, agree = row_errors(got, ref), float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        entry = {"max_rel_err": float(err.max()), "median_rel_err": float(err.median()), "top1_agreement": agree}
        if dtype == "fp32":
            entry["tolerance_max"] = FP32_TOL
            ok &= entry["max_rel_err"] <= FP32_TOL
        else:
            entry["tolerance_median"] = BF16_MEDIAN_TOL
            ok &= entry["median_rel_err"] <= BF16_MEDIAN_TOL
        out[dtype] = entry
        del model
    return out, ok


def group_size(cfg, n_gpus: int) -> int:
    """The largest group size <= n_gpus that the configuration divides (1 if none above 1)."""
    from dspark.models.deepseek_v4_tp import check_group_size

    for w in range(n_gpus, 1, -1):
        try:
            check_group_size(cfg, w)
            return w
        except ValueError:
            continue
    return 1


def group_part(folder: Path, device: str, steps) -> tuple[dict | str, bool]:
    """The NCCL group over the GPUs present, or the reason it is skipped."""
    if not device.startswith("cuda"):
        return "skipped: no CUDA device (NCCL needs GPUs; the gloo groups are CPU tests)", True
    n = torch.cuda.device_count()
    if n < 2:
        return f"skipped: {n} GPU visible; NCCL cannot put two ranks on one GPU", True
    from dspark.models.deepseek_v4_config import deepseek_v4_config_from_hf

    world = group_size(deepseek_v4_config_from_hf(json.loads((folder / "config.json").read_text())), n)
    if world < 2:
        return f"skipped: no group size in 2..{n} divides this configuration", True
    out, ok = group_vs_one_rank(folder, device, world, steps)
    return dict(out, gpus=n), ok


def group_vs_one_rank(folder: Path, device: str, world: int, steps) -> tuple[dict, bool]:
    """A group of ``world`` ranks (NCCL on CUDA, one GPU each; gloo on CPU) against one rank, fp32."""
    from dspark.models.loader import load_model
    from dspark.workers.runner import LocalRunner, RunnerConfig, TPGroup, TPSpec

    one = load_model(folder, dtype="fp32", device="cuda:0" if device.startswith("cuda") else device)
    want = run_script(LocalRunner(one.model, RunnerConfig(2, 256)), steps)
    del one
    cuda = device.startswith("cuda")
    group = TPGroup(TPSpec(model_path=str(folder), dtype="fp32", device="cuda" if cuda else device, world_size=world,
                           runner=RunnerConfig(2, 256), threads_per_rank=0 if cuda else 1))  # fmt: skip
    try:
        got = run_script(group.driver, steps)
    finally:
        group.close()
    err = float(row_errors(got, want).max())
    return {"world_size": world, "max_rel_err": err, "tolerance": GROUP_TOL}, err <= GROUP_TOL


def timing_part(folder: Path, device: str, batches: tuple[int, ...], new_tokens: int) -> list[dict]:
    """Decode tokens/s, bf16, ours (eager) beside transformers' generate, per batch size."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.engine import hf, ours

    rows = []
    for b in batches:
        kw = dict(dtype="bf16", batch=b, new_tokens=new_tokens, model=str(folder), device=device)
        mine = ours(**kw)
        row = {"batch": b, "ours_tok_s": mine["tokens_per_s"], "ours_step_ms": mine["decode_step_ms"]}
        try:
            ref = hf(**kw)["tokens_per_s"]
            row.update(hf_tok_s=ref, ours_over_hf=row["ours_tok_s"] / ref)
        except Exception as exc:  # the reference is optional; our row stands on its own
            row["hf_tok_s"] = f"error: {exc!r}"
        rows.append(row)
    return rows


def v4_section(report: dict, device: str, preset: str | None = None, batches: tuple[int, ...] = (1, 8),
               new_tokens: int | None = None, workdir: str | None = None) -> bool:  # fmt: skip
    """Run the V4 checks on ``device`` into ``report["deepseek_v4"]``; True when all passed.
    Defaults from the environment: ``DSPARK_CHECK_V4_PRESET`` (small on CUDA, tiny without),
    ``DSPARK_CHECK_V4_NEW_TOKENS`` (64)."""
    from dspark.models.loader import load_model
    from dspark.workers.runner import LocalRunner, RunnerConfig

    preset = preset or os.environ.get("DSPARK_CHECK_V4_PRESET") or ("small" if device.startswith("cuda") else "tiny")
    new_tokens = new_tokens or int(os.environ.get("DSPARK_CHECK_V4_NEW_TOKENS", "64"))
    sec: dict = {"device": device, "preset": preset, "new_tokens": new_tokens}
    report["deepseek_v4"] = sec
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = write_folder(Path(tmp), preset)
        cpu = load_model(folder, dtype="fp32", device="cpu").model
        steps = script(cpu.cfg.vocab_size)
        ref = run_script(LocalRunner(cpu, RunnerConfig(2, 256)), steps)
        sec["reference_rows"] = ref.shape[0]
        del cpu
        ok = True
        for name, part in (("logits", lambda: logits_part(folder, device, steps, ref)),
                           ("nccl_group", lambda: group_part(folder, device, steps))):  # fmt: skip
            try:
                sec[name], passed = part()
            except Exception as exc:  # report and go on with the other parts
                sec[name], passed = f"error: {exc!r}", False
            sec[f"{name}_passed"] = passed
            ok &= passed
        try:
            sec["decode"] = timing_part(folder, device, batches, new_tokens)
        except Exception as exc:
            sec["decode"] = f"error: {exc!r}"
    return ok
