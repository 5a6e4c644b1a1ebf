"""`dspark bench load`: verification depth under load, through the real cluster.

Closed loop: C clients each send streaming requests back to back for a fixed time, at
C = 1, 4, 16, 64.  Open loop: Poisson arrivals at a sweep of rates.  Configurations, each a fresh
cluster (same model, drafter, dtype and slots, and by default the step `dspark serve` runs:
compiled, with row-invariant kernels in bf16 on CPU): fixed verification depth 2, 4 and 7, adaptive
(confidence-scheduled with the global scheduler), and plain decoding (requests with
``speculative: false`` on the depth-7 cluster).  Reported per level: per-user tokens/s (mean over
requests of output tokens / request time), aggregate tokens/s, p50/p99 inter-token latency,
verified draft tokens per verification step, acceptance length.

The configurations run one after another, so a host whose speed drifts during the sweep (a
shared machine) would favour whichever ran in a fast spell: ``--rounds 2`` (the default) runs
them a second time in reverse order and reports each figure as the mean of the two, which
cancels a drift that is steady over the sweep; ``round_rows`` in the JSON keeps each round.

``--interleave`` compares them on one cluster instead, in alternating slices: at each level,
``--rounds`` slices of ``--seconds`` per configuration, the configurations' order rotating from
one slice to the next.  The fixed depths and plain decoding are pinned policies (``dspark policy
pin``: whole blocks of that depth, speculation gate off), adaptive is the scheduler's own policy
with the pin lifted; each slice starts once the verifier has adopted its policy.  Drift then
falls on every configuration alike, minutes apart no longer.  Differences from separate
clusters: every configuration's drafter drafts at most the deepest depth's block (the verifier
asks for the pinned depth only), and the adaptive budget's cost table and speculation gate keep
what they learnt across slices, as a long-running cluster's would.  ``--warmup-rounds`` runs that
many rounds at each level before the measured ones: adaptive learns each new load's rates, a
pinned depth has nothing to learn, and the warm-up rounds' own verdict, printed apart, is what
that learning cost.  Each verdict line also gives the interval over which adaptive's ratios move
when the measured rounds are resampled (``round_spread``): with slices that swing by 10% on a
shared host, it says whether a shortfall is larger than the noise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time

import click

from bench.common import RESULTS, table, write_json

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash table is in three sentences.",
    "Write a function to check whether a list is sorted.",
    "Give three tips for writing clear emails.",
    "Write a function that counts the vowels in a string.",
    "Summarize the water cycle in two sentences.",
]


async def _one(client, url: str, prompt: str, max_tokens: int, speculative: bool) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "speculative": speculative}
    t0 = time.perf_counter()
    stamps, spec, n_tokens, finish = [], {}, 0, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"].get("message")}
            for c in chunk.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
                finish = c.get("finish_reason") or finish
            if chunk.get("usage"):
                n_tokens = chunk["usage"]["completion_tokens"]
            spec = chunk.get("spec_decode") or spec
    t1 = time.perf_counter()
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"tokens": n_tokens, "seconds": t1 - t0, "ttft": (stamps[0] - t0) if stamps else None, "itl": itl,
            "finish": finish, "spec": spec}


def _summarise(results: list[dict], wall: float, window: tuple[float, float] | None = None) -> dict:
    """The level's figures; ``window``: (tokens generated, seconds) while the clients were sending
    (see ``closed_loop``), for the steady aggregate."""
    ok = [r for r in results if "error" not in r and r.get("finish")]
    errors = len(results) - len(ok)
    itl = sorted(x for r in ok for x in r["itl"])
    pct = lambda q: itl[min(len(itl) - 1, int(q * len(itl)))] if itl else None  # noqa: E731
    # Time to first token: a wave of prompts arriving at once is prefilled in chunks that share
    # steps with the requests already decoding, and what those steps cost shows here.
    ttft = sorted(r["ttft"] for r in ok if r.get("ttft") is not None)
    drafts = sum(r["spec"].get("num_drafts", 0) for r in ok)
    dtoks = sum(r["spec"].get("num_draft_tokens", 0) for r in ok)
    acc = sum(r["spec"].get("num_accepted_tokens", 0) for r in ok)
    return {
        "requests": len(ok), "errors": errors,
        "per_user_tok_s": sum(r["tokens"] / r["seconds"] for r in ok) / max(1, len(ok)),
        "aggregate_tok_s": sum(r["tokens"] for r in ok) / wall,
        "window_tok_s": window[0] / window[1] if window and window[1] > 0 else None,
        "itl_p50_ms": 1000 * pct(0.5) if itl else None, "itl_p99_ms": 1000 * pct(0.99) if itl else None,
        "ttft_p50_ms": 1000 * ttft[len(ttft) // 2] if ttft else None,
        "verified_per_step": dtoks / drafts if drafts else 0.0,
        "acceptance_length": 1 + acc / drafts if drafts else 1.0,
    }


async def _generated(client, base: str) -> tuple[float, float]:
    """The router's ``dspark:generation_tokens`` counter (tokens counted as they stream) and the
    time it was read (the reply's: the router reads its verifier's gauges before its counters)."""
    text = (await client.get(base + "/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dspark:generation_tokens_total{")), time.perf_counter()


async def closed_loop(base: str, concurrency: int, seconds: float, max_tokens: int, speculative: bool,
                      raw: bool = False) -> dict:  # fmt: skip
    """The level's summary, or with ``raw`` its requests' results, wall seconds and window.

    Two aggregates: the requests' tokens over the wall time, which includes the drain (the
    clients stop sending after ``seconds`` and wait for what is in flight, with fewer and fewer
    requests running), and the tokens the router streamed while the clients were sending over
    those ``seconds`` (``window``), the steady state of the load.  The drain's share of the first
    depends on where the requests in flight stand when sending stops: at sixteen requests,
    cohorts that start together and end together near the stop time add a full batch of work
    after it, cohorts spread out add a tail of a few requests."""
    import httpx

    url = base + "/v1/chat/completions"
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        first = await _generated(client, base)
        stop_at = time.perf_counter() + seconds

        async def user(i: int) -> None:
            k = i
            while time.perf_counter() < stop_at:
                results.append(await _one(client, url, PROMPTS[k % len(PROMPTS)], max_tokens, speculative))
                k += concurrency

        async def at_stop() -> tuple[float, float]:
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            return await _generated(client, base)

        t0 = time.perf_counter()
        *_, last = await asyncio.gather(*(user(i) for i in range(concurrency)), at_stop())
        wall = time.perf_counter() - t0
    window = (last[0] - first[0], last[1] - first[1])
    return {"results": results, "wall": wall, "window": window} if raw else _summarise(results, wall, window)


async def open_loop(base: str, rate: float, seconds: float, max_tokens: int, speculative: bool, seed: int = 0) -> dict:
    import httpx

    url = base + "/v1/chat/completions"
    rng = random.Random(seed)
    tasks = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=512)) as client:
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < seconds:
            tasks.append(asyncio.create_task(_one(client, url, PROMPTS[k % len(PROMPTS)], max_tokens, speculative)))
            k += 1
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return _summarise(list(results), wall)


def _gate_counts(base: str) -> tuple[float, float, float, dict[str, dict[str, float]]]:
    """(speculative steps, plain steps, draft depth, the gate's averages) from the router's
    /metrics (verifier gauges)."""
    return gate_figures(_metrics(base))


def _metrics(base: str) -> str:
    """The router's /metrics exposition."""
    import httpx

    return httpx.get(base + "/metrics", timeout=30).text


def gate_figures(text: str) -> tuple[float, float, float, dict[str, dict[str, float]]]:
    """The gate's figures in a /metrics exposition: (speculative steps, plain steps, draft
    depth, tokens per second by batch-size range and arm).

        >>> gate_figures('dspark:plain_steps{model_name="m"} 9.0\\n'
        ...              'dspark:spec_gate_tokens_per_second{model_name="m",batch="4-7",arm="plain"} 60.5\\n')
        (0.0, 9.0, 0.0, {'4-7': {'plain': 60.5}})
    """
    from prometheus_client.parser import text_string_to_metric_families

    got: dict[str, float] = {}
    rates: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            name = sample.name.removeprefix("dspark:")
            if name in ("speculative_steps", "plain_steps", "draft_depth"):
                got[name] = sample.value
            elif name == "spec_gate_tokens_per_second":
                rates.setdefault(sample.labels["batch"], {})[sample.labels["arm"]] = sample.value
    return got.get("speculative_steps", 0.0), got.get("plain_steps", 0.0), got.get("draft_depth", 0.0), rates


def spec_share(spec_steps: float, plain_steps: float) -> float | None:
    """The share of a stretch's steps that speculated (None when it ran none).

        >>> spec_share(3.0, 97.0), spec_share(0.0, 0.0)
        (0.03, None)
    """
    steps = spec_steps + plain_steps
    return spec_steps / steps if steps else None


def step_costs_ms(text: str) -> dict[str, float]:
    """The adaptive budget's step time by token count in a /metrics exposition, in ms: what
    decides how deep a lone request verifies.

        >>> step_costs_ms('dspark:verify_step_seconds{model_name="m",tokens="8"} 0.0325\\n')
        {'8': 32.5}
    """
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["tokens"]: round(1e3 * s.value, 3) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "dspark:verify_step_seconds"}


def _gated(base: str, run) -> dict:
    """``run()``'s summary plus the share of the level's steps the speculation gate let
    speculate and the draft depth at its end (adaptive runs; fixed depths always speculate)."""
    s0, p0, _, _ = _gate_counts(base)
    out = run()
    s1, p1, depth, _ = _gate_counts(base)
    return {**out, "spec_step_share": spec_share(s1 - s0, p1 - p0), "draft_depth": depth}


# ------------------------------------------------------------------ interleaved on one cluster


def _pins(depths: list[int]) -> dict[str, tuple[object, bool]]:
    """Configuration -> (the policy pinned for it, None for the scheduler's own; whether its requests speculate)."""
    from dspark.workers.scheduling import VerifyPolicy

    fixed = lambda d: VerifyPolicy(max_block_len=d, budget_mode="fixed", speculation_gate=False)  # noqa: E731
    out: dict[str, tuple[object, bool]] = {f"fixed{d}": (fixed(d), True) for d in depths}
    out["plain"] = (fixed(max(depths)), False)  # as before: plain requests on the deepest fixed depth
    out["adaptive"] = (None, True)
    return out


async def _apply_pin(base: str, redis_url: str, prefix: str, pin, timeout_s: float = 30.0) -> None:
    """Pin ``pin`` (None: lift the pin) and return once every verifier runs the policy the
    scheduler published for it afterwards (its version, as the router's /metrics reports it)."""
    import httpx

    from dspark.cluster.policy_command import pin_and_wait
    from dspark.cluster.redis_state import RedisState, StateConfig

    async with RedisState(StateConfig(url=redis_url, prefix=prefix)) as state:
        want = max((await pin_and_wait(state, pin, timeout_s)).values(), default=0)
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=30) as client:
        while True:  # the verifiers poll their policy version every 0.25 s
            text = (await client.get(base + "/metrics")).text
            seen = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("dspark:policy_version{")]  # fmt: skip
            if seen and min(seen) >= want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the verifiers did not adopt policy version {want} within {timeout_s:g} s")
            await asyncio.sleep(0.05)


def interleaved(cluster, names: list[str], pins: dict, levels: list[int], seconds: float, slices: int,
                max_tokens: int, warmup: int = 0) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(rows, slice rows): each configuration's figures per level over its ``slices`` slices on
    ``cluster``, the order of the configurations rotating by one from slice to slice.

    ``warmup``: rounds of slices run at each level before the measured ones, left out of the
    rows (their slice rows carry ``"warmup": True``).  Adaptive verification learns each load's
    costs and rates when the load changes; a pinned depth has nothing to learn.  A round of
    warm-up leaves that learning out of the steady-state figures, and ``verdict`` on the
    warm-up rows alone (``warmup_rows``) says what it cost."""
    base, url, prefix = cluster.base_url, cluster.redis_url, cluster.cfg.redis_prefix
    rows, slice_rows = [], []
    for conc in levels:
        got: dict[str, dict] = {n: {"results": [], "wall": 0.0, "spec": 0.0, "plain": 0.0, "depth": None,
                                    "window": (0.0, 0.0)} for n in names}  # fmt: skip
        for k in range(warmup + slices):
            for name in names[k % len(names):] + names[: k % len(names)]:
                pin, spec = pins[name]
                asyncio.run(_apply_pin(base, url, prefix, pin))
                s0, p0, _, _ = _gate_counts(base)
                out = asyncio.run(closed_loop(base, conc, seconds, max_tokens, spec, raw=True))
                text = _metrics(base)
                s1, p1, depth, rates = gate_figures(text)
                slice_rows.append({"config": name, "loop": "closed", "level": conc, "slice": k + 1,
                                   **({"warmup": True} if k < warmup else {}), "wall_s": out["wall"],
                                   **_summarise(out["results"], out["wall"], out["window"])})  # fmt: skip
                click.echo(table([slice_rows[-1]], list(slice_rows[-1])), err=True)
                if pin is None:  # in the JSON, not the table: what the gate and the budget decided by after the slice
                    slice_rows[-1]["gate_rates"] = rates
                    slice_rows[-1]["step_costs_ms"] = step_costs_ms(text)
                    # How a level's share of speculative steps came about, slice by slice (one
                    # sweep's gate speculated in 15% of the steps at sixteen requests, the next in 4%).
                    slice_rows[-1]["spec_step_share"] = spec_share(s1 - s0, p1 - p0)
                if k < warmup:
                    continue
                g = got[name]
                g["results"] += out["results"]
                g["wall"] += out["wall"]
                g["window"] = (g["window"][0] + out["window"][0], g["window"][1] + out["window"][1])
                g["spec"], g["plain"] = g["spec"] + s1 - s0, g["plain"] + p1 - p0
                g["depth"] = depth if pin is None else None  # the adaptive budget's depth at the slice's end
                g["gate_rates"] = rates if pin is None else None  # the gate's averages, likewise
        for name in names:
            g = got[name]
            rows.append({"config": name, "loop": "closed", "level": conc,
                         **_summarise(g["results"], g["wall"], g["window"]),
                         "spec_step_share": spec_share(g["spec"], g["plain"]),
                         "draft_depth": g["depth"], "rounds": slices,
                         **({"gate_rates": g["gate_rates"]} if g.get("gate_rates") is not None else {})})  # fmt: skip
    asyncio.run(_apply_pin(base, url, prefix, None))
    return rows, slice_rows


def _cluster_cfg(depth: int, adaptive: bool, draft: str, slots: int, dtype: str, compile_step: bool = False,
                 deterministic: bool = False):  # fmt: skip
    from dspark.cluster.config import ClusterConfig

    return ClusterConfig(dtype=dtype, draft=draft, draft_workers=1, block_len=depth, n_slots=slots, max_seq=1024,
                         verify_policy="adaptive" if adaptive else "fixed", scheduler_interval_s=0.25,
                         compile=compile_step, deterministic=deterministic)


@click.command()
@click.option("--levels", default="1,4,16,64", show_default=True, help="closed-loop concurrencies")
@click.option("--rates", default="0.5,1,2", show_default=True, help="open-loop arrival rates, requests/s ('' to skip)")
@click.option("--seconds", type=float, default=20.0, show_default=True, help="duration per level")
@click.option("--max-tokens", type=int, default=48, show_default=True)
@click.option("--depths", default="2,4,7", show_default=True, help="fixed verification depths")
@click.option("--draft", default=None, help="drafter kind (default: the cluster's: hybrid if a head ships, else ngram)")
@click.option("--slots", type=int, default=64, show_default=True)
@click.option("--dtype", default="bf16", show_default=True)
@click.option("--compile/--no-compile", "compile_step", default=True, show_default=True,
              help="the verifier's step through torch.compile (as `dspark serve` runs it)")
@click.option("--deterministic/--no-deterministic", default=None,
              help="row-invariant verifier kernels (default: what `dspark serve` picks, on for bf16 on CPU)")
@click.option("--rounds", type=click.IntRange(1, 16), default=2, show_default=True,
              help="passes over the configurations, every other one in reverse order (cancels a host "
                   "that speeds up or slows down during the sweep); figures are the rounds' means")
@click.option("--interleave", is_flag=True,
              help="every configuration on one cluster, in alternating slices (pinned policies; closed loop "
                   "only): --rounds slices of --seconds per configuration and level")
@click.option("--warmup-rounds", type=click.IntRange(0, 4), default=0, show_default=True,
              help="with --interleave: rounds of slices run at each level before the measured ones and "
                   "reported apart (what adapting to the new load cost)")
@click.option("--json", "json_path", default=None)
@click.option("--plot", "plot_path", default=None, help="PNG of the per-user vs aggregate frontier")
def main(levels, rates, seconds, max_tokens, depths, draft, slots, dtype, compile_step, deterministic, rounds,
         interleave, warmup_rounds, json_path, plot_path):  # fmt: skip
    """Plain vs fixed depths vs adaptive verification across load levels, through the cluster."""
    from dspark.cluster.commands import _default_draft
    from dspark.cluster.local import LocalCluster
    from dspark.workers.runner import deterministic_default

    draft = draft or _default_draft()
    if deterministic is None:
        deterministic = deterministic_default(dtype, "cpu")
    click.echo(f"drafter {draft}, {dtype}, compiled step: {compile_step}, deterministic: {deterministic}", err=True)
    levels_l = [int(x) for x in levels.split(",") if x]
    rates_l = [float(x) for x in rates.split(",") if x]
    configs = [(f"fixed{d}", int(d), False) for d in depths.split(",")] + [("adaptive", max(int(d) for d in depths.split(",")), True)]
    raw = []
    if interleave:
        if rates_l:
            raise click.UsageError("--interleave compares closed-loop levels only: pass --rates ''")
        depths_l = [int(d) for d in depths.split(",")]
        pins = _pins(depths_l)
        names = ["plain"] + [f"fixed{d}" for d in depths_l] + ["adaptive"]
        cfg = _cluster_cfg(max(depths_l), True, draft, slots, dtype, compile_step, deterministic)
        click.echo(f"== one cluster, {len(names)} configurations interleaved, {rounds} slices of {seconds:g} s each",
                   err=True)  # fmt: skip
        with LocalCluster(cfg, http_port=0) as c:
            asyncio.run(closed_loop(c.base_url, 1, 3.0, 8, True))  # warm-up
            rows, raw = interleaved(c, names, pins, levels_l, seconds, rounds, max_tokens, warmup_rounds)
    for rnd in range(0 if interleave else rounds):
        for name, depth, adaptive in configs if rnd % 2 == 0 else configs[::-1]:
            click.echo(f"== round {rnd + 1}, {name}: starting cluster", err=True)
            cfg = _cluster_cfg(depth, adaptive, draft, slots, dtype, compile_step, deterministic)
            with LocalCluster(cfg, http_port=0) as c:
                asyncio.run(closed_loop(c.base_url, 1, 3.0, 8, True))  # warm-up
                deepest = depth == max(int(d) for d in depths.split(",")) and not adaptive
                for label, spec in [(name, True)] + ([("plain", False)] if deepest else []):
                    for conc in levels_l:
                        s = _gated(c.base_url,
                                   lambda: asyncio.run(closed_loop(c.base_url, conc, seconds, max_tokens, spec)))
                        raw.append({"config": label, "loop": "closed", "level": conc, "round": rnd + 1, **s})
                        click.echo(table([raw[-1]], list(raw[-1])), err=True)
                    if adaptive or label == "plain":
                        for rate in rates_l:
                            s = asyncio.run(open_loop(c.base_url, rate, seconds, max_tokens, spec))
                            raw.append({"config": label, "loop": "open", "level": rate, "round": rnd + 1, **s})
                            click.echo(table([raw[-1]], list(raw[-1])), err=True)
    if not interleave:
        rows = combine_rounds(raw)
    cols = ["config", "loop", "level", "requests", "errors", "per_user_tok_s", "aggregate_tok_s", "window_tok_s",
            "itl_p50_ms",
            "itl_p99_ms", "ttft_p50_ms", "verified_per_step", "acceptance_length", "spec_step_share", "draft_depth"]
    click.echo(table(rows, cols))
    lines = verdict(rows, levels_l, raw if interleave else None)
    if interleave and warmup_rounds:
        lines += [f"warm-up ({warmup_rounds} round{'s' if warmup_rounds > 1 else ''} at each level, not in the "
                  f"figures above): " + line for line in verdict(warmup_rows(raw), levels_l)]
    for line in lines:
        click.echo(line)
    out = write_json(json_path, "load.json", {"draft": draft, "dtype": dtype, "compile": compile_step,
                                              "deterministic": deterministic, "seconds": seconds,
                                              "max_tokens": max_tokens, "rounds": rounds,
                                              "warmup_rounds": warmup_rounds if interleave else 0,
                                              "interleave": interleave, "rows": rows,
                                              "round_rows": raw, "verdict": lines})
    click.echo(f"wrote {out}")
    _plot(rows, plot_path or str(RESULTS / "load.png"))


def combine_rounds(raw: list[dict]) -> list[dict]:
    """One row per (config, loop, level): requests and errors summed over the rounds, every other
    figure their mean (None where a round has none), ``rounds`` the count.  Order of first sight.

    >>> combine_rounds([{"config": "plain", "loop": "closed", "level": 1, "round": 1, "requests": 3,
    ...                  "errors": 0, "aggregate_tok_s": 10.0},
    ...                 {"config": "plain", "loop": "closed", "level": 1, "round": 2, "requests": 5,
    ...                  "errors": 1, "aggregate_tok_s": 14.0}])
    [{'config': 'plain', 'loop': 'closed', 'level': 1, 'requests': 8, 'errors': 1, 'aggregate_tok_s': 12.0, 'rounds': 2}]
    """
    keyed: dict[tuple, list[dict]] = {}
    for r in raw:
        keyed.setdefault((r["config"], r["loop"], r["level"]), []).append(r)
    out = []
    for (config, loop, level), group in keyed.items():
        row: dict = {"config": config, "loop": loop, "level": level}
        for field in group[0]:
            if field in row or field == "round":
                continue
            values = [g.get(field) for g in group if g.get(field) is not None]
            if field in ("requests", "errors"):
                row[field] = sum(values)
            elif values and all(isinstance(v, (int, float)) for v in values):
                row[field] = sum(values) / len(values)
            else:
                row[field] = values[0] if values else None
        row["rounds"] = len(group)
        out.append(row)
    return out


def verdict(rows: list[dict], levels: list[int], slice_rows: list[dict] | None = None) -> list[str]:
    """Adaptive against the best of plain decoding and the fixed depths at each closed-loop level,
    in aggregate and per user (each against its own best); with ``slice_rows`` (interleaved
    slices), how far each ratio moves when the rounds are resampled (``round_spread``)."""
    out = []
    closed = [r for r in rows if r["loop"] == "closed"]
    for lvl in levels:
        at = {r["config"]: r for r in closed if r["level"] == lvl}
        others = {k: v for k, v in at.items() if k.startswith("fixed") or k == "plain"}
        if "adaptive" not in at or not others:
            continue
        a = at["adaptive"]
        best_agg = max(others, key=lambda k: others[k]["aggregate_tok_s"])
        best_user = max(others, key=lambda k: others[k]["per_user_tok_s"])
        ratio = a["aggregate_tok_s"] / max(1e-9, others[best_agg]["aggregate_tok_s"])
        user_ratio = a["per_user_tok_s"] / max(1e-9, others[best_user]["per_user_tok_s"])
        plain = at.get("plain")
        vs_plain = a["aggregate_tok_s"] / plain["aggregate_tok_s"] if plain else float("nan")
        line = (f"concurrency {lvl}: adaptive aggregate = {ratio:.2f}x the best of the others ({best_agg}), "
                f"per user = {user_ratio:.2f}x ({best_user}), aggregate vs plain = {vs_plain:.2f}x")
        windowed = {k: v for k, v in others.items() if v.get("window_tok_s")}
        if a.get("window_tok_s") and windowed:
            best_win = max(windowed, key=lambda k: windowed[k]["window_tok_s"])
            line += (f", aggregate while sending = {a['window_tok_s'] / windowed[best_win]['window_tok_s']:.2f}x "
                     f"({best_win})")
        spreads = [(label, round_spread(slice_rows or [], lvl, field))
                   for label, field in (("aggregate", "aggregate_tok_s"), ("per user", "per_user_tok_s"))]
        if all(sp is not None for _, sp in spreads):
            line += "; rounds resampled, 90% of draws: " + ", ".join(
                f"{label} {lo:.2f}x-{hi:.2f}x" for label, (lo, hi) in spreads)
        out.append(line)
    return out


def warmup_rows(slice_rows: list[dict]) -> list[dict]:
    """The warm-up slices (``interleaved``'s ``warmup``) combined per configuration and level, as
    ``combine_rounds`` combines rounds: what ``verdict`` reads for the cost of adapting."""
    keep = [{k: v for k, v in r.items() if k not in ("slice", "warmup", "gate_rates")}
            for r in slice_rows if r.get("warmup")]
    return combine_rounds(keep)


def round_spread(slice_rows: list[dict], level: int, field: str, draws: int = 2000,
                 seed: int = 0) -> tuple[float, float] | None:  # fmt: skip
    """The 5th and 95th percentiles of adaptive's ``field`` over the best of the others' when the
    measured rounds at ``level`` are resampled with replacement (a round: one slice of every
    configuration, run back to back), the best picked again in each draw; None with fewer than
    three rounds.  Each configuration's figure in a draw pools its slices as the rows do: the
    aggregate weighted by each slice's wall time, per user by its requests (slices without those
    weigh alike).  A host whose speed swings by 10% from one slice to the next moves a six-round
    figure by a few percent, and the best of four noisy figures reads high: the interval says
    whether a shortfall is larger than that.

        >>> rows = [{"config": c, "level": 1, "slice": k, "aggregate_tok_s": v}
        ...         for k in range(1, 5) for c, v in (("plain", 10.0), ("adaptive", 9.0 + k % 2))]
        >>> round_spread(rows, 1, "aggregate_tok_s")
        (0.9, 1.0)
    """
    weight_of = {"aggregate_tok_s": "wall_s", "per_user_tok_s": "requests"}.get(field)
    per: dict[int, dict[str, tuple[float, float]]] = {}
    for r in slice_rows:
        if r["level"] == level and not r.get("warmup") and r.get(field) is not None:
            w = float(r.get(weight_of, 1.0) if weight_of else 1.0)
            per.setdefault(r["slice"], {})[r["config"]] = (r[field] * w, w)
    rounds = [v for v in per.values() if "adaptive" in v and len(v) > 1]
    if len(rounds) < 3:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(draws):
        pick = [rng.choice(rounds) for _ in rounds]
        pooled = {c: sum(p[c][0] for p in pick) / max(1e-9, sum(p[c][1] for p in pick))
                  for c in pick[0] if all(c in p for p in pick)}
        best = max((v for c, v in pooled.items() if c != "adaptive"), default=None)
        if best is None:  # no other configuration ran in every round drawn
            continue
        ratios.append(pooled["adaptive"] / max(best, 1e-9))
    if not ratios:
        return None
    ratios.sort()
    return ratios[int(0.05 * (len(ratios) - 1))], ratios[int(0.95 * (len(ratios) - 1))]


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for cfg in sorted({r["config"] for r in rows}):
        pts = sorted(((r["aggregate_tok_s"], r["per_user_tok_s"], r["level"]) for r in rows
                      if r["config"] == cfg and r["loop"] == "closed"), key=lambda p: p[2])
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cfg)
        for x, y, lvl in pts:
            ax.annotate(str(lvl), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("aggregate tokens/s")
    ax.set_ylabel("per-user tokens/s")
    ax.set_title("Per-user vs aggregate throughput (labels: concurrency)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
