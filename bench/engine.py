"""`dspark bench engine`: plain decoding tokens/s, our engine (eager and compiled) vs Hugging Face
transformers.

Same model, same dtype, same prompts, greedy, a fixed number of new tokens; batch 1, 8 and
32; each configuration in its own process (clean peak memory).  Also reports the step time over
its floor (the bytes of weights one decode step must read, divided by the memory bandwidth of a
large tensor copy measured in the same run), and at batch 1 the time of an 8-token verification
step over a 1-token decode step at the same context.  Every process runs with the OpenMP wait
policy of the command (a bounded spin, dspark/omp.py), which alone is as fast as libgomp's
default that a transformers user gets.

``--model <folder>``: any Hugging Face folder our loader reads (a DeepSeek-V4 one included,
e.g. from ``dspark make-model --preset small``) instead of the default GGUF file; transformers
loads the same folder with ``from_pretrained``.  The prompts are then the same texts cut to
``FOLDER_PROMPT_TOKENS`` tokens each, so that a batch needs no padding (transformers' V4
compressors would pool pad tokens into their windows).  A family that cannot compile (V4) is
measured eager only.  For a mixture of experts the floor counts the routed experts' share a
token reads (top-k of n) at batch 1.
"""

from __future__ import annotations

import os
import time

import click

from bench.common import chat_prompts, load_hf, peak_rss_mb, run_isolated, table, write_json


SAMPLED = {"temperature": 1.0, "top_p": 0.95}  # --sampled: what chat clients commonly send
FOLDER_PROMPT_TOKENS = 32  # --model: every prompt cut to this length (no padding in a batch)


def prompts_for(tokenizer, batch: int, model: str | None) -> list[list[int]]:
    """The default model's chat prompts; for a folder, the same texts as equal-length token runs."""
    if model is None:
        return chat_prompts(tokenizer, batch)
    from dspark.datasets import load_prompts

    out = [tokenizer.encode(p.text)[:FOLDER_PROMPT_TOKENS] for p in load_prompts("all")[: 4 * batch]]
    out = [p for p in out if len(p) == FOLDER_PROMPT_TOKENS][:batch]
    if len(out) < batch:
        raise ValueError(f"fewer than {batch} prompts of {FOLDER_PROMPT_TOKENS} tokens")
    return out


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(dtype: str, batch: int, new_tokens: int, compile: bool = False, sampled: bool = False,
         kv_layout: str = "slot", model: str | None = None, device: str = "cpu", weights: str = "dense") -> dict:  # fmt: skip
    from dspark.kernels.short_attention import cache_kernel
    from dspark.models.q4 import Q4Linear
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    cfg = RunnerConfig(n_slots=max(batch, 1), max_seq=1024, compile=compile, kv_layout=kv_layout)
    built = build_engine(EngineSpec(model=model, dtype=dtype, device=device, runner=cfg, weights=weights),
                         progress=False)
    eng = built.engine
    prompts = prompts_for(built.loaded.tokenizer, batch, model)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, **(SAMPLED if sampled else {}))
    eng.generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    seqs = [eng.add_request(p, params) for p in prompts]
    steps, t_first = 0, None
    while eng.has_work:
        eng.step()
        steps += 1
        if t_first is None and all(s.output_ids for s in seqs):
            _sync(device)
            t_first = time.perf_counter()  # every prompt prefilled: decoding starts
    _sync(device)
    t_end = time.perf_counter()
    n = sum(len(s.output_ids) for s in seqs)
    decode_steps = max(1, steps - 1)
    out = {
        "tokens_per_s": n / (t_end - t0),
        "decode_step_ms": 1000 * (t_end - t_first) / decode_steps,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": n,
        "compile_s": eng.runner.compile_s,
        # Which kernels multiplied the 4-bit layers (none: dense weights).
        "q4_kernels": sorted({m.kernel for m in eng.runner.model.modules() if isinstance(m, Q4Linear)}),
        "attention": "kernel" if cache_kernel(eng.runner.cache) else "torch",
    }
    if batch == 1 and not sampled:
        out["verify8_over_decode1"] = verify_over_decode(eng.runner, len(prompts[0]) + new_tokens, device=device)
    built.close()
    return out


def verify_over_decode(runner, context: int, k: int = 8, reps: int = 30, device: str = "cpu") -> float:
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
            _sync(device)
            times[q].append(time.perf_counter() - t0)
    return statistics.median(times[k]) / statistics.median(times[1])


def hf(dtype: str, batch: int, new_tokens: int, sampled: bool = False, model: str | None = None,
       device: str = "cpu") -> dict:  # fmt: skip
    import torch

    from dspark.models.loader import load_tokenizer

    tok = load_tokenizer(model)[0]
    ref = load_hf(dtype, model).to(device)
    prompts = prompts_for(tok, batch, model)
    width = max(len(p) for p in prompts)
    pad = tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kw = dict(do_sample=False, pad_token_id=pad, attention_mask=mask)
    if sampled:
        kw.update(do_sample=True, top_k=0, **SAMPLED)  # top_k=0: transformers' default top-k 50 off, as ours
    with torch.inference_mode():
        ref.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, **dict(kw, attention_mask=mask[:1]))
        _sync(device)
        t0 = time.perf_counter()
        out = ref.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        _sync(device)
        dt = time.perf_counter() - t0
    n = (out.shape[1] - width) * batch
    return {"tokens_per_s": n / dt, "peak_rss_mb": peak_rss_mb(), "tokens": n}


def cpu_runtime(new_tokens: int, threads: int) -> dict:
    """The number a CPU user compares with: llama.cpp (through its Python binding) decoding the
    same GGUF file, as stored, at batch 1: the same first prompt, greedy, ``new_tokens`` tokens
    whatever they are, ``threads`` threads.  Timed as ``ours``: from the prompt to the last token."""
    from llama_cpp import Llama

    from dspark.models.loader import default_model_path, load_tokenizer

    prompt = prompts_for(load_tokenizer(None)[0], 1, None)[0]
    llm = Llama(model_path=str(default_model_path()), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def run(n: int) -> tuple[int, float, float, float]:
        llm.reset()  # no prefix of the last run's cache is reused: the prompt is evaluated each time
        count, t_first, t0 = 0, 0.0, time.perf_counter()
        for _ in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if count == 1:
                t_first = time.perf_counter()
            if count == n:
                break
        return count, t0, t_first, time.perf_counter()

    run(8)  # warm-up
    n, t0, t_first, t_end = run(new_tokens)
    return {"tokens_per_s": n / (t_end - t0), "decode_step_ms": 1000 * (t_end - t_first) / max(1, n - 1),
            "peak_rss_mb": peak_rss_mb(), "tokens": n}


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


def bandwidth_and_weights(dtype: str, model: str | None = None, weights: str = "dense") -> dict:
    """Bytes of weights a batch-1 decode step reads, copy bandwidth (GB/s, read + write) and read
    bandwidth (GB/s, what streaming the weights through a product can reach at best).  With
    ``weights`` q4 the layers' bytes (and an 8-bit head's) are their packed codes and block scales."""
    import torch

    from dspark.models.deepseek_v4 import DeepseekV4Transformer
    from dspark.models.loader import load_model
    from dspark.models.q4 import Q4Linear, Q8Head

    lm = load_model(model, dtype=dtype, progress=False, weights=weights)
    m = lm.model
    per = torch.tensor([], dtype=m.dtype).element_size()
    # Every linear weight plus the LM head once (the embedding lookup reads one row).
    linear = sum(p.numel() for n, p in m.named_parameters() if "layers." in n and p.dim() == 2)
    linear += sum((q.packed.numel() * q.packed.element_size() + q.scales_zeros.numel() * per) / per
                  for q in m.modules() if isinstance(q, Q4Linear))
    if isinstance(m, DeepseekV4Transformer):  # stacked routed experts [E, ., .]: a token reads top-k of E
        share = m.cfg.num_experts_per_tok / m.cfg.n_routed_experts
        linear += share * sum(p.numel() for n, p in m.named_parameters() if p.dim() == 3)
    head = m.args.vocab_size * m.args.dim
    if isinstance(m.output, Q8Head):  # the file's 8-bit blocks: codes and scales
        head = m.output.packed.numel() / per
    weight_bytes = int((linear + head) * per)
    src = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = read = 0.0
    words = src.view(torch.int16)  # a max reads every byte and writes nothing: the read rate alone
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        words.amax()
        read = max(read, src.numel() / (time.perf_counter() - t0) / 1e9)
    return {"weight_bytes": weight_bytes, "copy_gb_s": best, "floor_ms": 1000 * weight_bytes / (best * 1e9),
            "read_gb_s": read, "read_floor_ms": 1000 * weight_bytes / (read * 1e9)}


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
@click.option("--model", "model", default=None,
              help="a Hugging Face folder our loader reads (e.g. from dspark make-model --preset small); "
                   "default: the GGUF model")
@click.option("--plot", "plot_path", default=None,
              help="PNG of decode tokens/s by batch: transformers and ours per weight format (compiled where measured)")
@click.option("--weights", "weights_list", default="dense", show_default=True,
              help="our layer matrices, comma-separated to compare: dense (dequantized to the dtype) and/or q4 (the "
                   "GGUF file's 4-bit blocks as stored; q4:amx / q4:int4 name the kernel that multiplies them, "
                   "default the process's choice); transformers runs dequantized, once per batch")
@click.option("--attention", "attention_list", default="default", show_default=True,
              help="the attention of our short queries, comma-separated to compare: kernel (ours, "
                   "dspark/kernels/short_attention.cpp), torch (SDPA), or default (the process's choice)")
@click.option("--cpu-runtime", "with_cpu_runtime", is_flag=True,
              help="at batch 1 also run llama.cpp on the same GGUF file (`make cpu-runtime` installs it)")
def main(batches, dtypes, new_tokens, threads, skip_hf, json_path, compile, sampled, kv_layout, model, weights_list,
         plot_path, attention_list, with_cpu_runtime):
    """Decode tokens/s: our engine (eager and compiled) vs Hugging Face transformers."""
    from dspark.kernels.short_attention import CHOICES, ENV
    from dspark.models.loader import family_of

    attentions = [a for a in attention_list.split(",") if a]
    if not attentions or any(a not in (*CHOICES, "default") for a in attentions):
        raise click.BadParameter(f"comma-separated {' / '.join(CHOICES)} / default, not {attention_list!r}",
                                 param_hint="--attention")
    if "kernel" in attentions:
        from dspark.kernels.native import short_attention_usable

        if not short_attention_usable():
            raise click.BadParameter("kernel: the attention kernel needs a CPU with AVX-512 and a C++ compiler",
                                     param_hint="--attention")

    if with_cpu_runtime:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise click.ClickException("--cpu-runtime needs llama.cpp's Python binding: `make cpu-runtime` builds it")
        if model is not None or sampled:
            raise click.ClickException("--cpu-runtime compares greedy decoding of the default GGUF model only")
        if 1 not in (int(x) for x in batches.split(",")):
            raise click.ClickException("--cpu-runtime runs at batch 1: add 1 to --batches")
    formats = [w for w in weights_list.split(",") if w]
    try:
        runs = {w: weights_run(w) for w in formats}
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--weights") from e
    if not formats:
        raise click.BadParameter(f"no weight format in {weights_list!r}", param_hint="--weights")

    if model is not None:
        if not os.path.isdir(model):
            raise click.ClickException(f"--model {model} is not a folder")
        model = os.path.abspath(model)
        family = family_of(model)
        if family is not None and not family.compiles and compile:
            click.echo(f"{model}: its family runs eager only (no --compile); compiled column left empty", err=True)
            compile = False
        if sampled:
            raise click.ClickException("--sampled is measured on the default model only, not with --model")
    rows = []
    sampling_rows = []
    cpu = None  # --cpu-runtime: llama.cpp's batch-1 run
    if sampled:
        for b in (int(x) for x in batches.split(",")):
            sampling_rows.append(run_isolated("bench.engine", "sampling_cost", {"batch": b}, threads))
        click.echo(table(sampling_rows, ["batch", "before_ms", "now_ms", "rows_differing"]))
    for dtype in dtypes.split(","):
        floors = {w: run_isolated("bench.engine", "bandwidth_and_weights", {"dtype": dtype, "model": model,
                                                                             "weights": runs[w][0]}, threads,
                                  env=runs[w][1])
                  for w in formats}
        for b in (int(x) for x in batches.split(",")):
            kw = {"dtype": dtype, "batch": b, "new_tokens": new_tokens, "sampled": sampled, "model": model}
            h = None if skip_hf else run_isolated("bench.engine", "hf", kw, threads)
            if with_cpu_runtime and b == 1 and cpu is None:  # once: it does not depend on our dtype
                cpu = run_isolated("bench.engine", "cpu_runtime", {"new_tokens": new_tokens, "threads": threads},
                                   threads)
            for weights, attention in ((w, a) for w in formats for a in attentions):
                floor = floors[weights]
                fmt, env = runs[weights]
                if attention != "default":
                    env = dict(env, **{ENV: attention})
                e = run_isolated("bench.engine", "ours", dict(kw, kv_layout=kv_layout, weights=fmt), threads, env=env)
                c = run_isolated("bench.engine", "ours", dict(kw, compile=True, kv_layout=kv_layout, weights=fmt),
                                 threads, env=env) if compile else None
                best = c or e
                row = {
                    "dtype": dtype, "batch": b, "kv_layout": kv_layout, "weights": weights, "attention": best["attention"],
                    "eager_tok_s": e["tokens_per_s"], "compiled_tok_s": c["tokens_per_s"] if c else None,
                    "hf_tok_s": h["tokens_per_s"] if h else None,
                    "speedup": best["tokens_per_s"] / h["tokens_per_s"] if h else None,
                    "step_ms": best["decode_step_ms"], "floor_ms": floor["floor_ms"],
                    "step_over_floor": best["decode_step_ms"] / floor["floor_ms"],
                    "read_floor_ms": floor["read_floor_ms"],
                    "verify8_over_decode1": best.get("verify8_over_decode1"),
                    "compile_s": c["compile_s"] if c else None, "q4_kernels": ",".join(best["q4_kernels"]),
                    "ours_peak_mb": best["peak_rss_mb"], "eager_peak_mb": e["peak_rss_mb"],
                    "hf_peak_mb": h["peak_rss_mb"] if h else None,
                }
                if cpu and b == 1:
                    row.update(cpu_runtime_tok_s=cpu["tokens_per_s"], cpu_runtime_step_ms=cpu["decode_step_ms"],
                               ours_over_cpu_runtime=best["tokens_per_s"] / cpu["tokens_per_s"])
                rows.append(row)
                click.echo(table([row], list(row)), err=True)
        rows_floor = floor
    cols = ["dtype", "batch", "kv_layout", "weights", "attention", "eager_tok_s", "compiled_tok_s", "hf_tok_s", "speedup", "step_ms", "floor_ms",
            "step_over_floor", "read_floor_ms", "verify8_over_decode1", "compile_s", "ours_peak_mb", "eager_peak_mb", "hf_peak_mb"]
    if with_cpu_runtime:
        cols += ["cpu_runtime_tok_s", "cpu_runtime_step_ms", "ours_over_cpu_runtime"]
    click.echo(table(rows, cols))
    wait = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = write_json(json_path, "engine.json", {"model": model, "threads": threads, "new_tokens": new_tokens,
                                                "rows": rows,
                                                "sampled": SAMPLED if sampled else None, "sampling_cost": sampling_rows,
                                                "copy_gb_s": rows_floor["copy_gb_s"], "read_gb_s": rows_floor["read_gb_s"],
                                                "openmp_wait": wait})
    click.echo(f"wrote {out}")
    if plot_path:
        plot(rows, plot_path)
        click.echo(f"wrote {plot_path}")


def weights_run(value: str) -> tuple[str, dict[str, str]]:
    """A ``--weights`` value -> (the weight format, environment for its processes): ``dense``,
    ``q4``, or ``q4:KERNEL`` (``dspark.models.q4.KERNELS``), which sets the 4-bit kernel.

    Example:
        >>> weights_run("q4:int4")
        ('q4', {'DSPARK_Q4_KERNEL': 'int4'})
    """
    from dspark.models.loader import WEIGHT_FORMATS
    from dspark.models.q4 import KERNEL_ENV, KERNELS

    fmt, _, kernel = value.partition(":")
    if fmt not in WEIGHT_FORMATS or (kernel and (fmt != "q4" or kernel not in KERNELS)):
        choices = [*WEIGHT_FORMATS, *(f"q4:{k}" for k in KERNELS)]
        raise ValueError(f"comma-separated {' / '.join(choices)}, not {value!r}")
    return fmt, ({KERNEL_ENV: kernel} if kernel else {})


def plot(rows: list[dict], path: str) -> None:
    """Grouped bars per dtype and batch: transformers, then ours per weight format (and llama.cpp
    where it ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dtype"], r["batch"]) for r in rows}, key=lambda g: (g[0], g[1]))
    formats = list(dict.fromkeys((r["weights"], r.get("attention", "default")) for r in rows))
    series = [("transformers", lambda g: next((r["hf_tok_s"] for r in rows if (r["dtype"], r["batch"]) == g), None))]
    for w, a in formats:
        label = f"ours, {w}" + (f", {a} attention" if len({f[1] for f in formats}) > 1 else "")
        series.append((label, lambda g, w=w, a=a: next(
            (r["compiled_tok_s"] or r["eager_tok_s"] for r in rows
             if (r["dtype"], r["batch"]) == g and r["weights"] == w and r.get("attention", "default") == a), None)))
    if any(r.get("cpu_runtime_tok_s") for r in rows):  # --cpu-runtime: llama.cpp at batch 1
        series.append(("llama.cpp, same GGUF file", lambda g: next(
            (r["cpu_runtime_tok_s"] for r in rows if (r["dtype"], r["batch"]) == g and r.get("cpu_runtime_tok_s")),
            None)))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (label, value) in enumerate(series):
        xs = [k + i * width for k, g in enumerate(groups) if value(g)]
        ys = [value(g) for g in groups if value(g)]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([k + width * (len(series) - 1) / 2 for k in range(len(groups))],
                  [f"batch {b}" + (f" ({d})" if len({g[0] for g in groups}) > 1 else "") for d, b in groups])
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Plain decoding, one process, greedy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
