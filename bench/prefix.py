"""`dspark bench prefix`: time to first token with and without a cached shared prefix.

Each trial builds a system prompt of about 1,000 tokens from a different slice of the benchmark
prompts, then sends two requests with that system prompt and different questions, one after the
other, to one in-process engine: the first computes the prefix, the second reuses it (the
retained slot, or the cached blocks with ``--kv-layout paged``).  A third request, to an engine
with prefix reuse off, gives the cold time again in the same run.  Greedy, 8 new tokens; TTFT
is measured from ``add_request`` to the first token.
"""

from __future__ import annotations

import statistics
import time

import click

from bench.common import table, write_json


def _ttft(engine, ids: list[int]) -> tuple[float, int]:
    from dspark.workers.request import SamplingParams

    t0 = time.perf_counter()
    seq = engine.add_request(ids, SamplingParams(max_tokens=8))
    first = None
    while engine.has_work:
        for o in engine.step():
            if first is None and o.new_token_ids:
                first = time.perf_counter() - t0
    return first, seq.num_reused


@click.command()
@click.option("--trials", type=int, default=5, show_default=True)
@click.option("--prefix-tokens", type=int, default=1000, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--json", "json_path", default=None, help="where to write the results")
@click.option("--kv-layout", "kv_layout", type=click.Choice(["slot", "paged"]), default="slot", show_default=True,
              help="the target's KV cache (paged: reuse by block)")
def main(trials, prefix_tokens, dtype, threads, json_path, kv_layout):
    """TTFT of a request whose 1k-token system prompt is cached, over the same request cold."""
    import torch

    from dspark.datasets import load_prompts
    from dspark.workers.engine import EngineConfig
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig, deterministic_default

    torch.set_num_threads(threads)
    runner = RunnerConfig(n_slots=4, max_seq=2048, kv_layout=kv_layout, deterministic=deterministic_default(dtype, "cpu"))
    warm = build_engine(EngineSpec(dtype=dtype, runner=runner), progress=False)
    cold = build_engine(EngineSpec(dtype=dtype, runner=runner), progress=False)
    cold.engine.prefix.enabled = False
    tok = warm.loaded.tokenizer
    texts = [p.text for p in load_prompts("all")]
    rows = []
    for t in range(trials):
        body = tok.encode(" ".join(texts[40 * t : 40 * t + 60]))[:prefix_tokens]
        system = tok.decode(body)

        def chat(q: str) -> list[int]:
            return tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])

        first, _ = _ttft(warm.engine, chat("Which topic comes first?"))
        again, reused = _ttft(warm.engine, chat("Which topic comes last?"))
        off, _ = _ttft(cold.engine, chat("Which topic comes last?"))
        rows.append({"trial": t, "prompt_tokens": len(chat("Which topic comes last?")), "reused_tokens": reused,
                     "ttft_first_ms": 1000 * first, "ttft_reused_ms": 1000 * again, "ttft_reuse_off_ms": 1000 * off,
                     "reused_over_first": again / first})
        click.echo(table(rows[-1:], list(rows[-1])), err=True)
    summary = {"median_reused_over_first": statistics.median(r["reused_over_first"] for r in rows),
               "median_reused_over_off": statistics.median(r["ttft_reused_ms"] / r["ttft_reuse_off_ms"] for r in rows)}
    click.echo(table(rows, list(rows[0])))
    click.echo(f"median TTFT reused / first: {summary['median_reused_over_first']:.3f}x; "
               f"reused / reuse off: {summary['median_reused_over_off']:.3f}x")
    out = write_json(json_path, "prefix.json", {"dtype": dtype, "threads": threads, "kv_layout": kv_layout, "rows": rows,
                                                **summary})
    click.echo(f"wrote {out}")
    warm.close()
    cold.close()


if __name__ == "__main__":
    main()
