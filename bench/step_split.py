"""Where one request's step goes, in process: forward pass, drafting and the rest, speculative
(the cluster's drafter and adaptive verification with the gate) and plain, one after the other.

    .venv/bin/python -m bench.step_split --threads 1 --repeats 2

The engine is built as ``bench cluster`` builds its in-process one (``ClusterConfig``'s
defaults: bf16, the default drafter, adaptive with the gate), compiled.  The first prompts of the
interleaved WizardLM / MBPP+ set are answered one at a time, greedy, up to ``--max-tokens``.
Prints per mode tokens/s, tokens a step and milliseconds a step: whole, in the forward pass, in
drafting (the engine's ``_draft``), and the rest (planning, budget, acceptance, the drafter
hearing the tokens, the loop).  Run it in a fresh process per comparison; the OpenMP wait
policy is the environment's (``GOMP_SPINCOUNT=10000``, the in-process benchmarks' spin, unless
set otherwise).
"""

from __future__ import annotations

import argparse
import functools
import os
import time


def _timed(obj, name: str, totals: dict, key: str) -> None:
    """Wrap ``obj.name`` so its wall seconds add up in ``totals[key]``."""
    f = getattr(obj, name)

    @functools.wraps(f)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0

    setattr(obj, name, wrapper)


def run(mode: str, prompts_text: list[str], max_tokens: int) -> dict:
    from bench.cluster import _config, in_process_engine
    from dspark.workers.request import SamplingParams

    built = in_process_engine(_config("hybrid", None, True, "adaptive"), mode == "spec")
    try:
        eng, tok = built.engine, built.loaded.tokenizer
        prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in prompts_text]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        eng.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
        eng.generate(prompts[:1], params)
        totals: dict[str, float] = {}
        _timed(eng.runner, "forward", totals, "forward")
        _timed(eng, "_draft", totals, "draft")
        steps0, tokens, t0 = eng.num_steps, 0, time.perf_counter()
        for p in prompts:
            tokens += len(eng.generate([p], params)[0].output_ids)
        wall, steps = time.perf_counter() - t0, eng.num_steps - steps0
        ms = {k: 1000 * v / steps for k, v in totals.items()}
        ms["rest"] = 1000 * wall / steps - ms.get("forward", 0.0) - ms.get("draft", 0.0)
        return {"tokens_per_s": tokens / wall, "tokens_per_step": tokens / steps, "step_ms": 1000 * wall / steps, **ms}
    finally:
        built.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the cluster's verifier gets 1 on 2 cores)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="speculative then plain, this many times")
    args = ap.parse_args()
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # before torch loads its OpenMP runtime
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from dspark.datasets import load_prompts

    torch.set_num_threads(args.threads)
    texts = [p.text for p in load_prompts("all", limit=args.prompts)]
    for _ in range(args.repeats):
        for mode in ("spec", "plain"):
            r = run(mode, texts, args.max_tokens)
            split = "  ".join(f"{k} {r[k]:.2f}" for k in ("forward", "draft", "rest") if k in r)
            print(f"{mode:5s} {r['tokens_per_s']:6.1f} tok/s  {r['tokens_per_step']:.2f} tok/step  "
                  f"{r['step_ms']:.2f} ms/step ({split})", flush=True)


if __name__ == "__main__":
    main()
