"""Drafters side by side: acceptance, per-position acceptance, confidence calibration, speedup.

    dspark bench drafters [--prompts FILE] [--max-prompts N] [--max-tokens N] [--json FILE]

On held-out prompts (by default the test split of the shipped head's training config, which
training and calibration never saw), block 7, temperature 0 and 1:

* mean acceptance length (incl. the bonus token) and per-position acceptance: survival
  P(draft k accepted) and conditional P(k accepted | 1..k-1 accepted), from the engine's counters;
* for dspark: ECE of the cumulative confidence prod_{i<=k} c_i against observed prefix survival,
  raw (T = 1) and after the head's STS temperatures;
* per-user tokens/s at concurrency 1 in bf16, relative to plain decoding of the same prompts;
  dspark also with the adaptive verification budget (``dspark+adaptive``: Algorithm 1 over the
  head's confidences and the step costs profiled at start-up).

Drafters: dspark, dspark without its Markov head (same weights, bias dropped), layerskip (first
half of the target) and ngram (prompt lookup).  Writes bench/results/drafters.json and a PNG.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

RESULTS = Path(__file__).resolve().parent / "results"
DRAFTERS = {
    "dspark": ("dspark", ()),
    "dspark-nomarkov": ("dspark", (("markov", 0),)),
    "layerskip": ("layerskip", ()),
    "ngram": ("ngram", ()),
}


def _prompt_ids(tokenizer, prompts_file: str | None, head_meta: dict, limit: int) -> tuple[list[list[int]], str]:
    from dspark.datasets import load_prompts
    from dspark.train.config import TrainConfig
    from dspark.train.data import chat_ids, held_out_prompts

    if prompts_file:
        ps = load_prompts(prompts_file, limit=limit)
        where = Path(prompts_file).name
    else:
        cfg = TrainConfig.from_json(head_meta["training"]["config"])
        ps = held_out_prompts(cfg.data, "test", limit)
        where = "held-out test split of the head's training config"
    return [chat_ids(tokenizer, p.text) for p in ps], where


def _engine(kind: str, opts: tuple, block: int, dtype: str, n_slots: int, max_seq: int, extra: tuple = ()):
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig

    spec = EngineSpec(dtype=dtype, draft=kind, block_len=block, runner=RunnerConfig(n_slots=n_slots, max_seq=max_seq),
                      draft_options=tuple(opts) + tuple(extra))
    return build_engine(spec, progress=False)


def _per_position(metrics, block: int) -> tuple[list[float], list[float]]:
    acc = list(metrics.accepted_per_pos) + [0] * block
    tried = list(metrics.drafted_per_pos) + [0] * block
    surv = [acc[k] / tried[k] if tried[k] else 0.0 for k in range(block)]
    cond = []
    for k in range(block):
        reached = tried[0] if k == 0 else acc[k - 1]
        cond.append(acc[k] / reached if reached else 0.0)
    return surv, cond


def acceptance_run(name: str, prompts: list[list[int]], temperature: float, block: int, max_tokens: int,
                   dtype: str, concurrency: int) -> dict:
    from dspark.train.calibrate import calibration_report, trace_arrays
    from dspark.workers.request import SamplingParams

    kind, opts = DRAFTERS[name]
    extra = (("trace", 1),) if kind == "dspark" else ()
    max_seq = max(map(len, prompts)) + max_tokens + block + 8
    built = _engine(kind, opts, block, dtype, concurrency, max_seq, extra)
    try:
        eng = built.engine
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=1000 + i) for i in range(len(prompts))]
        t0 = time.perf_counter()
        seqs = eng.generate(prompts, params)
        dt = time.perf_counter() - t0
        m = eng.metrics
        surv, cond = _per_position(m, block)
        row = {
            "acceptance_length": round(m.mean_acceptance_length, 3),
            "per_position_survival": [round(x, 3) for x in surv],
            "per_position_conditional": [round(x, 3) for x in cond],
            "drafts": m.num_drafts, "draft_tokens": m.num_draft_tokens, "accepted_tokens": m.num_accepted_tokens,
            "output_tokens": sum(len(s.output_ids) for s in seqs), "seconds": round(dt, 1),
        }
        if kind == "dspark" and eng.drafter.traces:
            d = eng.drafter
            z, s, known = trace_arrays(d.traces, block)
            temps = d.cfg.sts_temperatures(temperature == 0, block)
            rep = calibration_report(z, s, known, temps)
            row.update({
                "ece_raw": round(rep["ece_raw"], 4), "ece_sts": round(rep["ece_sts"], 4),
                "mean_survival_pred_raw": [round(x, 3) for x in rep["mean_pred_raw"]],
                "mean_survival_pred_sts": [round(x, 3) for x in rep["mean_pred_sts"]],
                "empirical_survival": [round(x, 3) for x in rep["empirical_survival"]],
            })
        return row
    finally:
        built.close()


def speed_run(name: str | None, prompts: list[list[int]], temperature: float, block: int, max_tokens: int,
              adaptive: bool = False) -> dict:
    """Concurrency 1, bf16: prompts one after another; per-user tokens/s over the whole set.

    ``adaptive``: verify a confidence-chosen prefix of each block (Algorithm 1 on the step
    costs profiled at start-up, as the cluster's Verifier does with ``--verify-policy
    adaptive``) instead of the whole block."""
    from dspark.workers.request import SamplingParams

    kind, opts = DRAFTERS[name] if name else ("none", ())
    max_seq = max(map(len, prompts)) + max_tokens + block + 8
    built = _engine(kind, opts, block, "bf16", 1, max_seq)
    try:
        eng = built.engine
        if adaptive:
            from dspark.workers.budget_policy import AdaptiveBudget, VerifyPolicy, profile_step_costs

            eng.budget = AdaptiveBudget(profile_step_costs(eng.runner), VerifyPolicy(max_block_len=block))
        # Warm-up (first-call allocations, oneDNN kernel selection) on a short request.
        eng.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=temperature, seed=1))
        n, dt = 0, 0.0
        for i, p in enumerate(prompts):
            t0 = time.perf_counter()
            (seq,) = eng.generate([p], SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=2000 + i))
            dt += time.perf_counter() - t0
            n += len(seq.output_ids)
        return {"tokens": n, "seconds": round(dt, 2), "tokens_per_s": round(n / dt, 2)}
    finally:
        built.close()


def plot(results: dict, path: Path, block: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = list(results)
    fig, axes = plt.subplots(2, len(temps), figsize=(5.5 * len(temps), 7), squeeze=False)
    ks = list(range(1, block + 1))
    for j, t in enumerate(temps):
        for name, row in results[t].items():
            axes[0][j].plot(ks, row["per_position_survival"], marker="o", label=f"{name} (tau {row['acceptance_length']:.2f})")
            axes[1][j].plot(ks, row["per_position_conditional"], marker="o", label=name)
        axes[0][j].set_title(f"{t}: P(draft k accepted)")
        axes[1][j].set_title(f"{t}: P(k accepted | 1..k-1 accepted)")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("draft position k")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.option("--prompts", "prompts_file", default=None, help="JSONL prompts (default: the head's held-out test split)")
@click.option("--json", "json_out", default=None, help="output file (default: bench/results/drafters.json)")
@click.option("--plot", "plot_out", default=None, help="PNG (default: bench/results/drafters_acceptance.png)")
@click.option("--max-prompts", type=int, default=24, show_default=True, help="prompts for the acceptance runs")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--speed-prompts", type=int, default=4, show_default=True, help="prompts for the concurrency-1 timing (0: skip)")
@click.option("--drafters", default=",".join(DRAFTERS), show_default=True)
@click.option("--temperatures", default="0,1", show_default=True)
@click.option("--block", type=int, default=7, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True, help="dtype of the acceptance runs")
@click.option("--concurrency", type=int, default=8, show_default=True, help="batch of the acceptance runs")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads (1 is fastest on a shared host)")
def main(prompts_file, json_out, plot_out, max_prompts, max_tokens, speed_prompts, drafters, temperatures, block,
         dtype, concurrency, threads):
    """Acceptance, calibration and speedup of the drafters on held-out prompts."""
    import torch

    from dspark.models.dspark_head import default_head_path
    from dspark.models.loader import DEFAULT_MODEL_NAME, load_model

    torch.set_num_threads(threads)
    names = [d.strip() for d in drafters.split(",") if d.strip()]
    unknown = set(names) - set(DRAFTERS)
    if unknown:
        raise click.BadParameter(f"unknown drafters {sorted(unknown)}; choose from {', '.join(DRAFTERS)}")
    head_meta = json.loads(default_head_path(DEFAULT_MODEL_NAME).with_suffix(".json").read_text())
    tok = load_model(None, dtype="fp32", progress=False).tokenizer
    prompts, where = _prompt_ids(tok, prompts_file, head_meta, max_prompts)
    temps = [float(t) for t in temperatures.split(",")]
    results: dict = {}
    speed: dict = {}
    for t in temps:
        key = f"T={t:g}"
        results[key] = {}
        for name in names:
            r = acceptance_run(name, prompts, t, block, max_tokens, dtype, concurrency)
            results[key][name] = r
            extra = f"  ECE {r['ece_raw']:.3f} -> {r['ece_sts']:.3f}" if "ece_raw" in r else ""
            click.echo(f"{key:6s} {name:16s} acceptance length {r['acceptance_length']:.2f}  "
                       f"per position {' '.join(f'{x:.2f}' for x in r['per_position_survival'])}{extra}")
        if speed_prompts > 0:
            sp = prompts[:speed_prompts]
            base = speed_run(None, sp, t, block, max_tokens)
            speed[key] = {"plain": base}
            click.echo(f"{key:6s} {'plain':16s} {base['tokens_per_s']:.2f} tokens/s (concurrency 1, bf16)")
            for name in names:
                for adaptive in ((False, True) if name == "dspark" else (False,)):
                    r = speed_run(name, sp, t, block, max_tokens, adaptive=adaptive)
                    r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
                    label = name + ("+adaptive" if adaptive else "")
                    speed[key][label] = r
                    click.echo(f"{key:6s} {label:16s} {r['tokens_per_s']:.2f} tokens/s  speedup {r['speedup']:.2f}x")
    out = {
        "prompts": where, "num_prompts": len(prompts), "max_tokens": max_tokens, "block_len": block,
        "acceptance_dtype": dtype, "concurrency": concurrency, "threads": threads,
        "speed_prompts": speed_prompts, "acceptance": results, "speed": speed,
        "head": {"file": default_head_path(DEFAULT_MODEL_NAME).name, "training": head_meta.get("training", {}).get("steps")},
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    json_path = Path(json_out) if json_out else RESULTS / "drafters.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    png = Path(plot_out) if plot_out else RESULTS / "drafters_acceptance.png"
    plot(results, png, block)
    click.echo(f"wrote {json_path} and {png}")


if __name__ == "__main__":
    main()
