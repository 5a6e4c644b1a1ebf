"""`dspark bench settings`: the cluster's tokens/s under each value of one of its settings.

    dspark bench settings [--setting torch_threads|...|weights|kv_layout] [--values 2,1] [--draft none]
                          [--concurrency 1,4,16] [--rounds 2] [--max-tokens N] [--requests N]
                          [--compile/--no-compile] [--verify-policy adaptive|fixed] [--json FILE]

One local cluster per value of a ``ClusterConfig`` field with an integer value (for example
``torch_threads``: the threads of every verifier rank and draft worker; ``local_draft_below``:
the requests a verifier drafts in its own process) or of ``weights`` (``dense,q4``: the verifier's
layer matrices dequantized or as the GGUF file's 4-bit blocks) or ``kv_layout``, called with the openai client over HTTP,
closed loop, greedy, bf16, ``dspark serve``'s verification (adaptive; ``--verify-policy fixed``:
whole blocks).  With ``--draft none`` (the default) the cluster has no draft worker and the
verifier is its only compute process.  With a drafter, each level runs speculative and
plain requests on the same cluster.

The host's speed drifts, so the clusters alternate: every round starts one cluster per value, in
turn, never two at once, and the order reverses each round; each ratio is taken within a round
and then averaged.  Per-user tokens/s = mean over requests of output tokens / latency; aggregate
= all output tokens / wall time of the level (``bench cluster``'s closed loop).  The defaults
compare two and one torch threads for a verifier alone and take about 8 minutes on a shared
2-core host.  Writes bench/results/settings.json.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import click

from bench.common import run_isolated, table, write_json


# Text-valued settings this command takes: ones whose values ``ClusterConfig.from_args`` checks.
TEXT_SETTINGS = ("weights", "kv_layout")


def _config(draft: str, compile_step: bool, setting: str, value: int | str, verify_policy: str = "adaptive") -> dict:
    from dspark.cluster.config import ClusterConfig

    base = ClusterConfig(draft=draft, draft_workers=0 if draft == "none" else 1, tp=1, dtype="bf16", compile=compile_step,
                         verify_policy=verify_policy)
    return dataclasses.asdict(ClusterConfig.from_args({**dataclasses.asdict(base), setting: value}))


def summarize(levels: list[int], values: list[int], rounds: list[dict], modes: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """Per mode, level and value: per-user and aggregate tok/s of every round, and the mean of
    the per-round ratios to the first value."""
    results: dict = {}
    rows = []
    first = str(values[0])
    for mode in modes:
        for lv in map(str, levels):
            for v in map(str, values):
                per_user = [r[v][mode][lv]["per_user_tokens_per_s"] for r in rounds]
                agg = [r[v][mode][lv]["aggregate_tokens_per_s"] for r in rounds]
                cell = {
                    "per_user_tokens_per_s": per_user, "aggregate_tokens_per_s": agg,
                    "per_user_vs_first": statistics.mean(
                        u / r[first][mode][lv]["per_user_tokens_per_s"] for u, r in zip(per_user, rounds)),
                    "aggregate_vs_first": statistics.mean(
                        a / r[first][mode][lv]["aggregate_tokens_per_s"] for a, r in zip(agg, rounds)),
                }
                results.setdefault(mode, {}).setdefault(lv, {})[v] = cell
                rows.append({"mode": mode, "conc": lv, "value": v,
                             "per_user_tok_s": " / ".join(f"{x:.1f}" for x in per_user),
                             "aggregate_tok_s": " / ".join(f"{x:.1f}" for x in agg),
                             f"per_user_vs_{first}": cell["per_user_vs_first"],
                             f"aggregate_vs_{first}": cell["aggregate_vs_first"]})
    return results, rows


def _integers(raw: str) -> list[int]:
    try:
        return [int(x) for x in raw.split(",")]
    except ValueError:
        raise click.UsageError(f"expected integers separated by commas, not {raw!r}") from None


@click.command()
@click.option("--setting", default="torch_threads", show_default=True,
              help="a ClusterConfig field with an integer value (e.g. torch_threads, local_draft_below), or "
                   f"one of {', '.join(TEXT_SETTINGS)}")
@click.option("--values", default="2,1", show_default=True, help="one cluster each; ratios are to the first")
@click.option("--draft", default="none", show_default=True, help="drafter kind (none: a verifier alone)")
@click.option("--concurrency", default="1,4,16", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="clusters per value, alternating")
@click.option("--max-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--requests", "min_requests", type=click.IntRange(min=1), default=8, show_default=True,
              help="requests per level at least (a level c sends max(N, c))")
@click.option("--compile/--no-compile", "compile_step", default=True, show_default=True,
              help="the compiled step (the `dspark serve` default)")
@click.option("--verify-policy", type=click.Choice(["fixed", "adaptive"]), default="adaptive", show_default=True)
@click.option("--json", "json_path", default=None, help="output (default bench/results/settings.json)")
def main(setting, values, draft, concurrency, rounds, max_tokens, min_requests, compile_step, verify_policy, json_path):
    """Tokens/s through the cluster under each value of one setting, clusters alternating."""
    from bench.cluster import _texts
    from dspark.cluster.config import ClusterConfig

    t_begin = time.perf_counter()
    levels = _integers(concurrency)
    if min(levels) < 1:
        raise click.UsageError("--concurrency takes positive integers")
    fields = {f.name: f for f in dataclasses.fields(ClusterConfig)}
    if setting in TEXT_SETTINGS:
        vals = [v for v in values.split(",") if v]
    elif setting in fields and fields[setting].type in ("int", int):
        vals = _integers(values)
    else:
        raise click.UsageError(f"--setting must name an integer ClusterConfig field or one of "
                               f"{', '.join(TEXT_SETTINGS)}, not {setting!r}")
    try:
        cfgs = {v: _config(draft, compile_step, setting, v, verify_policy) for v in vals}
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    modes = ("plain",) if draft == "none" else ("spec", "plain")
    texts = _texts(max(max(levels), min_requests))
    click.echo(f"{setting} in {vals}, drafter {draft}, {verify_policy} verification, levels {levels}, {rounds} round(s), {max_tokens} new tokens, "
               f"{'compiled' if compile_step else 'eager'}, {os.cpu_count()} cores", err=True)
    out_rounds: list[dict] = []
    for k in range(rounds):
        res: dict = {}
        for v in (vals if k % 2 == 0 else vals[::-1]):
            t0 = time.perf_counter()
            kw = {"cfg": cfgs[v], "levels": levels, "texts": texts, "max_tokens": max_tokens,
                  "min_requests": min_requests, "modes": modes}
            res[str(v)] = run_isolated("bench.cluster", "through_cluster", kw, 1, timeout=3600)
            figures = ", ".join(f"{m} c={lv} {res[str(v)][m][str(lv)]['per_user_tokens_per_s']:.1f}"
                                for m in modes for lv in levels)
            click.echo(f"  round {k + 1}, {setting}={v}: {figures} tok/s per user ({time.perf_counter() - t0:.0f} s)",
                       err=True)
        out_rounds.append(res)
    results, rows = summarize(levels, vals, out_rounds, modes)
    first = str(vals[0])
    click.echo(table(rows, ["mode", "conc", "value", "per_user_tok_s", "aggregate_tok_s",
                            f"per_user_vs_{first}", f"aggregate_vs_{first}"]))
    out = write_json(json_path, "settings.json", {
        "setting": setting, "values": vals, "draft": draft, "verify_policy": verify_policy, "levels": levels, "rounds": rounds,
        "max_tokens": max_tokens, "min_requests": min_requests, "compile": compile_step, "results": results,
        "raw": out_rounds, "minutes": round((time.perf_counter() - t_begin) / 60, 1), "cpus": os.cpu_count(),
    })
    click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    main()
