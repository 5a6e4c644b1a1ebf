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
half of the target), ngram (prompt lookup) and hybrid (per request and step, the ngram block or
the head's, whichever is expected to be accepted further); dspark-bf16 and hybrid-bf16 (named
only) hold the head's matrices in bf16 instead of the default int8.  Writes bench/results/drafters.json
and a PNG.

Draft vocabulary: ``--draft-vocabs 4096,8192,0`` adds ``dspark-v<N>`` rows (the shipped head
drafting over the first N ids of its id map; 0 = the full vocabulary), and ``--timing`` times
one drafted block per batch size and N in one process, side by side with a plain decode step:

    dspark bench drafters --timing --draft-vocabs 4096,8192,16384,32768,0 --timing-batches 1,8,64
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
    # The draft layers over the drafted positions only, not the whole trained block.
    "dspark-short": ("dspark", (("short_block", 1),)),
    "layerskip": ("layerskip", ()),
    "ngram": ("ngram", ()),
    "hybrid": ("hybrid", ()),
    # The head's matrices packed in bf16 instead of the serving default, int8 (dspark/models/int8_weights.py).
    "dspark-bf16": ("dspark", (("weights", "float"),)),
    "hybrid-bf16": ("hybrid", (("weights", "float"),)),
}


def vocab_variants(sizes: list[int]) -> dict:
    """``dspark-v<N>`` entries for DRAFTERS (N = 0: the full vocabulary, named dspark-full)."""
    return {("dspark-full" if n == 0 else f"dspark-v{n}"): ("dspark", (("draft_vocab", n),)) for n in sizes}


def draft_timing(prompts: list[list[int]], sizes: list[int], batches: list[int], block: int, dtype: str = "bf16",
                 context: int = 256, reps: int = 20, decode_tokens: int = 64, short_too: bool = False) -> dict:
    """Milliseconds per drafted block (one ``propose`` for the whole batch) for each N and batch.

    Every request has ``context`` observed tokens (held-out prompts, cycled and cut); greedy rows
    draft with K = 1, temperature-1 rows with the default top-8 proposal.  Median of ``reps``
    calls after 3 warm-up calls (and the minimum), the cases interleaved so that load from other
    processes falls on all alike.  Also times a plain decode step at batch 1, so a block can be
    read as a share of one decode step.  ``short_too``: also each N with ``short_block=1`` (the
    draft layers over the ``block`` positions only, not the whole trained block), labelled ``N/short``.
    """
    import statistics

    import torch

    from dspark.models.dspark_head import default_head_path, load_head
    from dspark.models.loader import DEFAULT_MODEL_NAME, load_model
    from dspark.train.features import target_features
    from dspark.workers.drafters.dspark import DSparkDrafter
    from dspark.workers.request import SamplingParams, Sequence

    loaded = load_model(None, dtype=dtype, progress=False)
    model, path = loaded.model, default_head_path(DEFAULT_MODEL_NAME)
    flat = [t for p in prompts for t in p]
    ctx_ids = [(flat * (1 + context * max(batches) // max(1, len(flat))))[i * 7 : i * 7 + context] for i in range(max(batches))]
    heads = {}
    for n in sizes:
        try:
            heads[n] = load_head(path, model, draft_vocab=n)
        except ValueError as exc:  # e.g. the full vocabulary for a head trained over N ids
            click.echo(f"draft_vocab {n}: skipped ({exc})")
    if not heads:
        raise click.UsageError("--timing: none of the --draft-vocabs sizes fits the head")
    feature_layers = next(iter(heads.values())).cfg.feature_layers
    feats = [f for i in range(0, len(ctx_ids), 8) for f, _ in target_features(model, ctx_ids[i : i + 8], feature_layers)]
    out: dict = {"context": context, "block": block, "dtype": dtype, "threads": torch.get_num_threads(),
                 "ms_per_block": {}, "ms_per_block_min": {}}
    cases = []  # (N label, "B=..,T=..", drafter, seqs)
    for n, head in heads.items():
        head.pack_for_inference(weights="int8")  # as the serving drafter does by default (make_dspark_drafter)
        variants = (False, True) if short_too else (False,)
        for B, temp, short in ((B, t, sh) for B in batches for t in (0.0, 1.0) for sh in variants):
            drafter = DSparkDrafter(head, n_slots=B, max_seq=context + block + 8, short_block=short)
            seqs = []
            for i in range(B):
                s = Sequence(request_id=f"r{i}", prompt_ids=list(ctx_ids[i]), generator=torch.Generator(),
                             params=SamplingParams(max_tokens=64, temperature=temp, seed=i))
                s.output_ids = [ctx_ids[i][-1]]
                s.num_cached = context
                drafter.observe(s, s.prompt_ids, feats[i])
                seqs.append(s)
            label = ("full" if n == 0 else str(n)) + ("/short" if short else "")
            cases.append((label, f"B={B},T={temp:g}", drafter, seqs))
    # Interleaved: every repetition times every case once, so load from other processes hits all alike.
    times: dict = {(c[0], c[1]): [] for c in cases}
    for r in range(reps + 3):
        for label, key, drafter, seqs in cases:
            t0 = time.perf_counter()
            drafter.propose(seqs, block)
            if r >= 3:
                times[(label, key)].append(time.perf_counter() - t0)
    for (label, key), ts in times.items():
        out["ms_per_block"].setdefault(label, {})[key] = round(1000 * statistics.median(ts), 2)
        out["ms_per_block_min"].setdefault(label, {})[key] = round(1000 * min(ts), 2)
    for label, row in out["ms_per_block"].items():
        click.echo(f"draft_vocab {label:>6s} (median ms): " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
    del cases, heads
    for compiled in (False, True):  # the step `dspark generate` runs by default, and the one `dspark serve` runs
        built = _engine("none", (), block, dtype, 1, max(map(len, prompts)) + decode_tokens + 8, compile=compiled)
        try:
            from dspark.workers.request import SamplingParams as SP

            eng = built.engine
            eng.generate([prompts[0]], SP(max_tokens=8))

            def timed(n: int) -> float:
                t0 = time.perf_counter()
                eng.generate([prompts[0]], SP(max_tokens=n, ignore_eos=True))
                return time.perf_counter() - t0

            # Decode steps only: the difference between a long and a one-token request (same prefill).
            per_tok = statistics.median((timed(decode_tokens) - timed(1)) / (decode_tokens - 1) for _ in range(3))
        finally:
            built.close()
        key = "plain_ms_per_decode_step_b1" + ("_compiled" if compiled else "")
        out[key] = round(1000 * per_tok, 2)
        click.echo(f"plain decoding{', compiled' if compiled else ''}, batch 1: {out[key]:.2f} ms per decode step")
    # The share is taken of the faster of the two steps (the stricter reading).
    step = min(out["plain_ms_per_decode_step_b1"], out["plain_ms_per_decode_step_b1_compiled"])
    for label, row in out["ms_per_block"].items():
        shares = {k: f"{v / step:.0%}" for k, v in row.items() if k.startswith("B=1,")}
        click.echo(f"draft_vocab {label:>6s}: one block at batch 1 as a share of a {step:.1f} ms decode step: {shares}")
    return out


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


def _engine(kind: str, opts: tuple, block: int, dtype: str, n_slots: int, max_seq: int, extra: tuple = (),
            compile: bool = False):
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig

    spec = EngineSpec(dtype=dtype, draft=kind, block_len=block,
                      runner=RunnerConfig(n_slots=n_slots, max_seq=max_seq, compile=compile),
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
    import torch

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
        if kind == "dspark":
            # Share of the target's output tokens inside the drafted vocabulary (at T=0: its greedy tokens).
            ids = eng.drafter.draft_ids
            out_ids = torch.tensor([t for s in seqs for t in s.output_ids], dtype=torch.long)
            inside = torch.isin(out_ids, ids.cpu()) if ids is not None else torch.ones_like(out_ids, dtype=torch.bool)
            row["draft_vocab"] = 0 if ids is None else int(ids.numel())
            row["coverage"] = round(float(inside.float().mean()), 4)
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
            from dspark.workers.budget_policy import AdaptiveBudget, profile_step_costs
            from dspark.workers.scheduling import VerifyPolicy

            policy = VerifyPolicy(max_block_len=block, budget_mode="algorithm1")
            eng.budget = AdaptiveBudget(profile_step_costs(eng.runner), policy)
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


def speed_side_by_side(names: list[str], prompts: list[list[int]], temperature: float, block: int,
                       max_tokens: int) -> dict:
    """Like :func:`speed_run` for plain decoding and every drafter in ``names`` at once, interleaved.

    All engines are built first; each prompt then runs on every engine in turn (the order rotates
    per prompt), so a change in load from other processes falls on all of them alike.  Returns
    {"plain": {...}, name: {..., "speedup": x}}.
    """
    from dspark.workers.request import SamplingParams

    max_seq = max(map(len, prompts)) + max_tokens + block + 8
    labels = ["plain"] + list(names)
    built = {}
    try:
        for label in labels:
            kind, opts = DRAFTERS[label] if label != "plain" else ("none", ())
            built[label] = _engine(kind, opts, block, "bf16", 1, max_seq)
            built[label].engine.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=temperature, seed=1))
        n = {label: 0 for label in labels}
        dt = {label: 0.0 for label in labels}
        for i, p in enumerate(prompts):
            for label in labels[i % len(labels):] + labels[: i % len(labels)]:
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=2000 + i)
                t0 = time.perf_counter()
                (seq,) = built[label].engine.generate([p], params)
                dt[label] += time.perf_counter() - t0
                n[label] += len(seq.output_ids)
        out = {label: {"tokens": n[label], "seconds": round(dt[label], 2), "tokens_per_s": round(n[label] / dt[label], 2)}
               for label in labels}
        for label in names:
            out[label]["speedup"] = round(out[label]["tokens_per_s"] / out["plain"]["tokens_per_s"], 2)
        return out
    finally:
        for b in built.values():
            b.close()


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
@click.option("--drafters", default=None, help=f"comma-separated, from {', '.join(DRAFTERS)} (default: all, or "
              "none when --draft-vocabs is given)")
@click.option("--draft-vocabs", default="", help="comma-separated N: add dspark drafting over the first N ids of the "
              "head's id map (0 = full vocabulary)")
@click.option("--timing", is_flag=True, help="time one drafted block per N and batch size (see --timing-batches)")
@click.option("--timing-batches", default="1,8,64", show_default=True)
@click.option("--timing-threads", type=int, default=2, show_default=True, help="torch threads for --timing")
@click.option("--timing-short", is_flag=True, help="--timing: also with the draft layers over the drafted positions "
              "only (short_block=1), for a --block shorter than the trained one")
@click.option("--interleave", is_flag=True, help="speed: all engines built at once, prompts run on each in turn "
              "(fairer on a shared host; no adaptive variant)")
@click.option("--temperatures", default="0,1", show_default=True)
@click.option("--block", type=int, default=7, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True, help="dtype of the acceptance runs")
@click.option("--concurrency", type=int, default=8, show_default=True, help="batch of the acceptance runs")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads (1 is fastest on a shared host)")
def main(prompts_file, json_out, plot_out, max_prompts, max_tokens, speed_prompts, drafters, draft_vocabs, timing,
         timing_batches, timing_threads, timing_short, interleave, temperatures, block, dtype, concurrency, threads):
    """Acceptance, calibration and speedup of the drafters on held-out prompts."""
    import torch

    from dspark.models.dspark_head import default_head_path
    from dspark.models.loader import DEFAULT_MODEL_NAME, load_model

    torch.set_num_threads(threads)
    sizes = [int(n) for n in draft_vocabs.split(",") if n.strip()]
    DRAFTERS.update(vocab_variants(sizes))
    if drafters is None:
        drafters = "" if sizes else ",".join(d for d in DRAFTERS if not d.startswith("dspark-v") and d != "dspark-full"
                                             and not d.endswith(("-bf16", "-short")))
    names = [d.strip() for d in drafters.split(",") if d.strip()] + list(vocab_variants(sizes))
    unknown = set(names) - set(DRAFTERS)
    if unknown:
        raise click.BadParameter(f"unknown drafters {sorted(unknown)}; choose from {', '.join(DRAFTERS)}")
    head_meta = json.loads(default_head_path(DEFAULT_MODEL_NAME).with_suffix(".json").read_text())
    tok = load_model(None, dtype="fp32", progress=False).tokenizer
    prompts, where = _prompt_ids(tok, prompts_file, head_meta, max_prompts)
    temps = [float(t) for t in temperatures.split(",")]
    results: dict = {}
    speed: dict = {}
    timing_out = None
    if timing:
        torch.set_num_threads(timing_threads)
        timing_prompts = _prompt_ids(tok, prompts_file, head_meta, 8)[0]
        timing_out = draft_timing(timing_prompts, sizes or [0], [int(b) for b in timing_batches.split(",")], block,
                                  short_too=timing_short)
        torch.set_num_threads(threads)
        if max_prompts == 0:
            temps = []
    for t in temps:
        key = f"T={t:g}"
        results[key] = {}
        for name in names:
            r = acceptance_run(name, prompts, t, block, max_tokens, dtype, concurrency)
            results[key][name] = r
            extra = f"  ECE {r['ece_raw']:.3f} -> {r['ece_sts']:.3f}" if "ece_raw" in r else ""
            extra += f"  coverage {r['coverage']:.4f}" if "coverage" in r else ""
            click.echo(f"{key:6s} {name:16s} acceptance length {r['acceptance_length']:.2f}  "
                       f"per position {' '.join(f'{x:.2f}' for x in r['per_position_survival'])}{extra}")
        if speed_prompts > 0 and interleave:
            speed[key] = speed_side_by_side(names, prompts[:speed_prompts], t, block, max_tokens)
            for label, r in speed[key].items():
                click.echo(f"{key:6s} {label:16s} {r['tokens_per_s']:.2f} tokens/s  speedup {r.get('speedup', 1.0):.2f}x"
                           " (interleaved)")
        elif speed_prompts > 0:
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
        "acceptance_dtype": dtype, "concurrency": concurrency, "threads": threads, "interleaved_speed": interleave,
        "speed_prompts": speed_prompts, "acceptance": results, "speed": speed, "draft_timing": timing_out,
        "head": {"file": default_head_path(DEFAULT_MODEL_NAME).name, "training": head_meta.get("training", {}).get("steps")},
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    json_path = Path(json_out) if json_out else RESULTS / "drafters.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    png = Path(plot_out) if plot_out else RESULTS / "drafters_acceptance.png"
    if results:
        plot(results, png, block)
    click.echo(f"wrote {json_path} and {png}")


if __name__ == "__main__":
    main()
