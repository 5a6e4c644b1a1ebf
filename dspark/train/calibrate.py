"""Sequential temperature scaling (STS) of the confidence head (paper, section 3.2.1).

The scheduler needs calibrated *prefix survival* probabilities a_k = prod_{i<=k} c_i, not just a
good ranking.  STS fits one temperature per block position, left to right: at position k it picks,
by a 1-D grid search, the T_k minimising the expected calibration error (ECE) of
a_k = a_{k-1} * sigmoid(z_k / T_k), with the earlier positions' temperatures already fixed.
Temperature scaling preserves each position's ranking.

Labels come from real speculative decoding on held-out prompts: the drafter records each block's
raw confidence logits and how many drafts verification accepted (``BlockTrace``).  Greedy and
sampled requests get separate temperatures, since acceptance differs between the two.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

__all__ = ["ece", "trace_arrays", "survival", "fit_sts", "calibration_report", "collect_traces", "calibrate_head"]


def ece(pred: torch.Tensor, label: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width bins: sum_b |mean pred - mean label| * n_b / N.

    pred, label: [N] in [0, 1] (labels may be soft).

    Example:
        >>> round(ece(torch.tensor([0.9, 0.9]), torch.tensor([1.0, 0.0])), 3)
        0.4
    """
    pred, label = pred.double().flatten(), label.double().flatten()
    if pred.numel() == 0:
        return 0.0
    bins = (pred * n_bins).long().clamp(0, n_bins - 1)
    n = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(pred))
    sp = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, pred)
    sl = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, label)
    return float((sp - sl).abs().sum() / pred.numel())


def _ece_columns(pred: torch.Tensor, label: torch.Tensor, n_bins: int) -> torch.Tensor:
    """ECE of every column of pred [N, T] against label [N] at once -> [T]."""
    N, T = pred.shape
    bins = (pred * n_bins).long().clamp(0, n_bins - 1) + n_bins * torch.arange(T)  # [N, T] bucket ids
    flat = bins.flatten()
    sp = torch.zeros(T * n_bins, dtype=torch.float64).index_add_(0, flat, pred.flatten())
    sl = torch.zeros(T * n_bins, dtype=torch.float64).index_add_(0, flat, label.double().unsqueeze(1).expand(N, T).flatten())
    return (sp - sl).abs().view(T, n_bins).sum(1) / N


def trace_arrays(traces, block_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z [N, G], survived [N, G] float, known [N, G] bool) from block traces.

    survived[n, k] = 1 when drafts 0..k were all accepted.  A label is known when position k was
    verifiable, or when an earlier rejection already decided it (then it is 0).
    """
    rows = [t for t in traces if t.num_accepted >= 0 and t.num_verifiable > 0]
    G = block_len
    z = torch.zeros(len(rows), G)
    surv = torch.zeros(len(rows), G)
    known = torch.zeros(len(rows), G, dtype=torch.bool)
    for i, t in enumerate(rows):
        n = min(G, len(t.conf_logits))
        z[i, :n] = torch.tensor(t.conf_logits[:n])
        surv[i, : t.num_accepted] = 1.0
        rejected = t.num_accepted < t.num_verifiable
        known[i, :n] = True if rejected else (torch.arange(n) < t.num_verifiable)
    return z, surv, known


def survival(z: torch.Tensor, temps: list[float] | torch.Tensor) -> torch.Tensor:
    """a_k = prod_{i<=k} sigmoid(z_i / T_i).  z: [N, G] -> [N, G]."""
    t = torch.as_tensor(temps, dtype=z.dtype)[: z.shape[1]]
    return torch.sigmoid(z / t).cumprod(dim=1)


def fit_sts(z: torch.Tensor, survived: torch.Tensor, known: torch.Tensor, grid: torch.Tensor | None = None,
            n_bins: int = 15) -> list[float]:
    """Per-position temperatures, fitted left to right by grid search on the ECE of a_k."""
    grid = grid if grid is not None else torch.logspace(math.log10(0.2), math.log10(20.0), 161)
    G = z.shape[1]
    temps: list[float] = []
    prev = torch.ones(z.shape[0], dtype=torch.float64)
    for k in range(G):
        m = known[:, k]
        if int(m.sum()) == 0:
            temps.append(temps[-1] if temps else 1.0)
            continue
        a = prev[m].unsqueeze(1) * torch.sigmoid(z[m, k].double().unsqueeze(1) / grid.double())  # [n, T]
        errs = _ece_columns(a, survived[m, k], n_bins)  # [T]
        best_t = float(grid[int(errs.argmin())])  # the first minimum: ties go to the smallest T
        temps.append(best_t)
        prev = prev * torch.sigmoid(z[:, k].double() / best_t)
    return temps


def calibration_report(z: torch.Tensor, survived: torch.Tensor, known: torch.Tensor, temps: list[float],
                       n_bins: int = 15) -> dict:
    """ECE of the cumulative survival, raw (T = 1) and calibrated, pooled over positions and per position."""
    out: dict = {"blocks": int(z.shape[0])}
    for name, t in (("raw", [1.0] * z.shape[1]), ("sts", temps)):
        a = survival(z.double(), t)
        out[f"ece_{name}"] = ece(a[known], survived[known], n_bins)
        out[f"ece_{name}_per_pos"] = [ece(a[known[:, k], k], survived[known[:, k], k], n_bins) for k in range(z.shape[1])]
        out[f"mean_pred_{name}"] = [float(a[known[:, k], k].mean()) if known[:, k].any() else 0.0 for k in range(z.shape[1])]
    out["empirical_survival"] = [float(survived[known[:, k], k].mean()) if known[:, k].any() else 0.0 for k in range(z.shape[1])]
    return out


def collect_traces(head_path: str | Path, prompt_ids: list[list[int]], temperature: float, block_len: int,
                   max_tokens: int = 128, model: str | None = None, dtype: str = "bf16", concurrency: int = 8,
                   seed: int = 0, device: str = "cpu"):
    """Run speculative decoding with the raw (uncalibrated) head and return its block traces."""
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    longest = max(len(p) for p in prompt_ids)
    spec = EngineSpec(
        model=model, dtype=dtype, device=device, draft="dspark", block_len=block_len,
        runner=RunnerConfig(n_slots=concurrency, max_seq=longest + max_tokens + block_len + 8),
        draft_options=(("head", str(head_path)), ("calibrated", 0), ("trace", 1)),
    )
    built = build_engine(spec, progress=False)
    try:
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i) for i in range(len(prompt_ids))]
        built.engine.generate(prompt_ids, params)
        return list(built.engine.drafter.traces)
    finally:
        built.close()


def calibrate_head(head_path: str | Path, prompt_ids: list[list[int]], block_len: int, max_tokens: int = 128,
                   model: str | None = None, dtype: str = "bf16", device: str = "cpu") -> dict:
    """Fit STS for greedy and sampled (T = 1) decoding and store the temperatures in the head's JSON."""
    head_path = Path(head_path).with_suffix(".safetensors")
    sts, report = {}, {}
    for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
        traces = collect_traces(head_path, prompt_ids, temp, block_len, max_tokens, model, dtype, device=device)
        z, surv, known = trace_arrays(traces, block_len)
        temps = fit_sts(z, surv, known)
        sts[mode] = temps
        report[mode] = {"temperatures": temps, **calibration_report(z, surv, known, temps)}
    meta_path = head_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["config"]["sts"] = sts
    meta["calibration"] = {"prompts": len(prompt_ids), "max_tokens": max_tokens, "block_len": block_len, "dtype": dtype, **report}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return report
