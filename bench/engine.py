"""`dspark bench engine`: plain decoding tokens/s, our engine (eager and compiled) vs Hugging Face
transformers.

Same model file, same dtype, same prompts, greedy, a fixed number of new tokens; batch 1, 8 and
32; each configuration in its own process (clean peak memory).  Also reports the step time over
its floor (the bytes of weights one decode step must read, divided by the memory bandwidth of a
large tensor copy measured in the same run), and at batch 1 the time of an 8-token verification
step over a 1-token decode step at the same context.  Every process runs with the OpenMP wait
policy of the command (a bounded spin, dspark/omp.py), which alone is as fast as libgomp's
default that a transformers user gets.
"""

from __future__ import annotations

import os
import time

import click

from bench.common import chat_prompts, load_hf, peak_rss_mb, run_isolated, table, write_json


SAMPLED = {"temperature": 1.0, "top_p": 0.95}  # --sampled: what chat clients commonly send


def ours(dtype: str, batch: int, new_tokens: int, compile: bool = False, sampled: bool = False,
         kv_layout: str = "slot") -> dict:
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    cfg = RunnerConfig(n_slots=max(batch, 1), max_seq=1024, compile=compile, kv_layout=kv_layout)
    built = build_engine(EngineSpec(dtype=dtype, runner=cfg), progress=False)
    eng = built.engine
    prompts = chat_prompts(built.loaded.tokenizer, batch)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, **(SAMPLED if sampled else {}))
    eng.generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    seqs = [eng.add_request(p, params) for p in prompts]
    steps, t_first = 0, None
    while eng.has_work:
        eng.step()
        steps += 1
        if t_first is None and all(s.output_ids for s in seqs):
            t_first = time.perf_counter()  # every prompt prefilled: decoding starts
    t_end = time.perf_counter()
    n = sum(len(s.output_ids) for s in seqs)
    decode_steps = max(1, steps - 1)
    out = {
        "tokens_per_s": n / (t_end - t0),
        "decode_step_ms": 1000 * (t_end - t_first) / decode_steps,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": n,
        "compile_s": eng.runner.compile_s,
    }
    if batch == 1 and not sampled:
        out["verify8_over_decode1"] = verify_over_decode(eng.runner, len(prompts[0]) + new_tokens)
    return out


def verify_over_decode(runner, context: int, k: int = 8, reps: int = 30) -> float:
    """Time of one k-token verification step over one 1-token decode step, batch 1, at the
    same context length (medians of interleaved repetitions)."""
    import statistics

    from dspark.workers.runner import StepInput

    runner.forward(StepInput(list(range(100, 100 + context)), [0], [0], [context], logits_rows=[]))
    times: dict[int, list[float]] = {1: [], k: []}
    for _ in range(reps):
        for q in (1, k):
            t0 = time.perf_counter()
            runner.forward(StepInput(list(range(7, 7 + q)), [0], [context], [q]))
            times[q].append(time.perf_counter() - t0)
    return statistics.median(times[k]) / statistics.median(times[1])


def hf(dtype: str, batch: int, new_tokens: int, sampled: bool = False) -> dict:
    import torch

    from dspark.models.loader import load_model

    tok = load_model(dtype="fp32", progress=False).tokenizer
    model = load_hf(dtype)
    prompts = chat_prompts(tok, batch)
    width = max(len(p) for p in prompts)
    pad = tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=False, pad_token_id=pad, attention_mask=mask)
    if sampled:
        kw.update(do_sample=True, top_k=0, **SAMPLED)  # top_k=0: transformers' default top-k 50 off, as ours
    with torch.inference_mode():
        model.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, **dict(kw, attention_mask=mask[:1]))
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        dt = time.perf_counter() - t0
    n = (out.shape[1] - width) * batch
    return {"tokens_per_s": n / dt, "peak_rss_mb": peak_rss_mb(), "tokens": n}


def sampling_cost(batch: int, reps: int = 10) -> dict:
    """Milliseconds to turn a step's logits into tokens at T = 1, top-p 0.95, batch ``batch``:
    the nucleus by a full sort of every row with ``Tensor.exponential_`` noise (how sampling ran
    before) vs the candidate cut with float64-uniform noise (now); real logits of the default
    model on chat prompts, medians of interleaved repetitions."""
    import statistics

    import torch

    from dspark.kernels.sampling import _top_k_top_p_by_sort, apply_top_k_top_p, exponential_row
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    from dspark.train.features import target_features

    built = build_engine(EngineSpec(runner=RunnerConfig(n_slots=batch, max_seq=512)), progress=False)
    model = built.loaded.model
    seqs = built.engine.generate(chat_prompts(built.loaded.tokenizer, batch),
                                 SamplingParams(max_tokens=24, temperature=1.0, seed=0))
    # The next-token logits after 24 sampled tokens, one row per request.
    finals = [h[-1:] for _, h in target_features(model, [s.prompt_ids + s.output_ids for s in seqs], (0,))]
    with torch.inference_mode():
        logits = model.lm_head(torch.cat(finals).to(model.dtype)).float()  # [batch, V]
    built.close()
    top_k = torch.zeros(batch, dtype=torch.long)
    top_p = torch.full((batch,), SAMPLED["top_p"])
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    V = logits.shape[-1]

    def before():
        out = _top_k_top_p_by_sort(logits, top_k, top_p, False, True)
        noise = torch.empty(batch, V)
        for i, g in enumerate(gens):
            noise[i].exponential_(generator=g)
        return out, noise

    def now():
        out = apply_top_k_top_p(logits, top_k, top_p)
        noise = torch.empty(batch, V)
        for i, g in enumerate(gens):
            exponential_row(noise[i], g)
        return out, noise

    times = {"before": [], "now": []}
    for r in range(reps + 2):
        for name, f in (("before", before), ("now", now)):
            t0 = time.perf_counter()
            f()
            if r >= 2:
                times[name].append(1000 * (time.perf_counter() - t0))
    a, b = before()[0], now()[0]
    return {"batch": batch, "before_ms": statistics.median(times["before"]), "now_ms": statistics.median(times["now"]),
            # Rows whose nucleus differs: only where the mass before an entry equals top-p to
            # float32 rounding (the two paths add the same terms in another order).
            "rows_differing": int((torch.isinf(a) != torch.isinf(b)).any(-1).sum()),
            "nucleus_sizes": torch.isfinite(b).sum(-1).tolist()}


def bandwidth_and_weights(dtype: str) -> dict:
    """Bytes of weights a decode step reads, and copy bandwidth (GB/s, read + write)."""
    import torch

    from dspark.models.loader import load_model

    lm = load_model(dtype=dtype, progress=False)
    m = lm.model
    per = torch.tensor([], dtype=m.dtype).element_size()
    # Every linear weight plus the LM head once (the embedding lookup reads one row).
    linear = sum(p.numel() for n, p in m.named_parameters() if "layers." in n and p.dim() == 2)
    head = m.args.vocab_size * m.args.dim
    weight_bytes = (linear + head) * per
    src = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() / (time.perf_counter() - t0) / 1e9)
    return {"weight_bytes": weight_bytes, "copy_gb_s": best, "floor_ms": 1000 * weight_bytes / (best * 1e9)}


@click.command()
@click.option("--batches", default="1,8,32", show_default=True)
@click.option("--dtypes", default="bf16,fp32", show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--skip-hf", is_flag=True, help="only our engine")
@click.option("--json", "json_path", default=None, help="where to write the results")
@click.option("--compile/--no-compile", "compile", default=True, show_default=True,
              help="also measure our compiled step (the serving default) beside eager")
@click.option("--sampled", is_flag=True, help="sample at T = 1, top-p 0.95 (both systems) instead of greedy, and "
              "time the sampling itself (sort + exponential_ noise before vs the candidate cut now)")
@click.option("--kv-layout", "kv_layout", type=click.Choice(["slot", "paged"]), default="slot", show_default=True,
              help="our target's KV cache layout")
def main(batches, dtypes, new_tokens, threads, skip_hf, json_path, compile, sampled, kv_layout):
    """Decode tokens/s: our engine (eager and compiled) vs Hugging Face transformers."""
    rows = []
    sampling_rows = []
    if sampled:
        for b in (int(x) for x in batches.split(",")):
            sampling_rows.append(run_isolated("bench.engine", "sampling_cost", {"batch": b}, threads))
        click.echo(table(sampling_rows, ["batch", "before_ms", "now_ms", "rows_differing"]))
    for dtype in dtypes.split(","):
        floor = run_isolated("bench.engine", "bandwidth_and_weights", {"dtype": dtype}, threads)
        for b in (int(x) for x in batches.split(",")):
            kw = {"dtype": dtype, "batch": b, "new_tokens": new_tokens, "sampled": sampled}
            e = run_isolated("bench.engine", "ours", dict(kw, kv_layout=kv_layout), threads)
            c = run_isolated("bench.engine", "ours", dict(kw, compile=True, kv_layout=kv_layout), threads) if compile else None
            h = None if skip_hf else run_isolated("bench.engine", "hf", kw, threads)
            best = c or e
            row = {
                "dtype": dtype, "batch": b, "kv_layout": kv_layout,
                "eager_tok_s": e["tokens_per_s"], "compiled_tok_s": c["tokens_per_s"] if c else None,
                "hf_tok_s": h["tokens_per_s"] if h else None,
                "speedup": best["tokens_per_s"] / h["tokens_per_s"] if h else None,
                "step_ms": best["decode_step_ms"], "floor_ms": floor["floor_ms"],
                "step_over_floor": best["decode_step_ms"] / floor["floor_ms"],
                "verify8_over_decode1": best.get("verify8_over_decode1"),
                "compile_s": c["compile_s"] if c else None,
                "ours_peak_mb": best["peak_rss_mb"], "eager_peak_mb": e["peak_rss_mb"],
                "hf_peak_mb": h["peak_rss_mb"] if h else None,
            }
            rows.append(row)
            click.echo(table([row], list(row)), err=True)
        rows_floor = floor
    cols = ["dtype", "batch", "kv_layout", "eager_tok_s", "compiled_tok_s", "hf_tok_s", "speedup", "step_ms", "floor_ms",
            "step_over_floor", "verify8_over_decode1", "compile_s", "ours_peak_mb", "eager_peak_mb", "hf_peak_mb"]
    click.echo(table(rows, cols))
    wait = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = write_json(json_path, "engine.json", {"threads": threads, "new_tokens": new_tokens, "rows": rows,
                                                "sampled": SAMPLED if sampled else None, "sampling_cost": sampling_rows,
                                                "copy_gb_s": rows_floor["copy_gb_s"], "openmp_wait": wait})
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
