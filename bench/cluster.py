"""`dspark bench cluster`: per-user and aggregate tokens/s through the full cluster vs in-process.

    dspark bench cluster [--concurrency 1,8,32] [--max-tokens N] [--requests N] [--repeats N]
                         [--draft KIND] [--block N] [--verify-policy adaptive|fixed] [--json FILE]

Three systems, same model, dtype (bf16), drafter, block length and engine settings (KV slots,
longest request, chunked-prefill budget: ``ClusterConfig``'s defaults), greedy:

* cluster, speculative: ``LocalCluster`` (Ray Serve router + verifier group, tp 1, 1 draft worker
  reached over gRPC, Redis), called with the openai client over HTTP;
* cluster, plain: the same cluster with ``extra_body={"speculative": False}`` (what the HTTP and
  Serve layers cost without the drafter);
* in-process, speculative and plain: ``build_engine`` in one process, no HTTP, no gRPC.

The drafter is the cluster's default: hybrid (the DSpark head or prompt lookup, per request and
step) when a head ships for the default model, else ngram (prompt lookup).  Verification is
``dspark serve``'s default, adaptive (the global scheduler's policy and the speculation gate;
in process, the budget's default policy and the gate), or ``--verify-policy fixed`` (whole blocks,
every step: the figure before this option existed).  The in-process
engine gets the torch threads the cluster gives its verifier.

Load: at concurrency c, c users each send a request, wait for its answer and send the next (a
closed loop), until ``max(--requests, c)`` requests are done; prompts are the first ones of the
interleaved WizardLM / MBPP+ set.  Per-user tokens/s = mean over requests of output tokens /
request latency (the client's wall time, prefill included); aggregate = all output tokens /
wall time of the level.  Requests stop at end-of-turn or after ``--max-tokens``.

Target: disaggregation costs at most 10% of per-user tokens/s at concurrency 1 against
in-process speculative decoding.  The host's speed drifts (shared cores), so runs alternate:
in-process, cluster, in-process, cluster, in-process (``--repeats 2``), never two at once, each
in its own process (the cluster's Ray, Serve and Redis end with theirs).  Each cluster run is
compared with the mean of the in-process runs just before and after it, and the ratios are
averaged.  During every cluster level the CPU time of each process is sampled from /proc and
reported as cores in use per role (verifier, draft worker, router, Serve proxy and controller,
Ray system processes, Redis, the benchmark's own HTTP clients, others): where the time goes.
Defaults take about 15 minutes on a shared 2-core CPU host.  Writes bench/results/cluster.json.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import time

import click

from bench.common import run_isolated, table, write_json


def _config(draft: str, block: int | None, compile_step: bool = False, verify_policy: str = "fixed",
            weights: str = "dense") -> dict:
    from dspark.cluster.config import ClusterConfig

    kw = {"draft": draft, "draft_workers": 1, "tp": 1, "dtype": "bf16", "compile": compile_step,
          "verify_policy": verify_policy, "weights": weights}
    if block is not None:
        kw["block_len"] = block
    return dataclasses.asdict(ClusterConfig(**kw))


def _texts(n: int) -> list[str]:
    from dspark.datasets import load_prompts

    return [p.text for p in load_prompts("all", limit=n)]


def _level_summary(recs: list[dict], wall: float) -> dict:
    drafts = sum(r["drafts"] for r in recs)
    acc = sum(r["accepted"] for r in recs)
    tokens = sum(r["tokens"] for r in recs)
    return {
        "requests": len(recs),
        "per_user_tokens_per_s": sum(r["tokens"] / r["seconds"] for r in recs) / len(recs),
        "aggregate_tokens_per_s": tokens / wall,
        "mean_latency_s": sum(r["seconds"] for r in recs) / len(recs),
        "acceptance_length": 1.0 + acc / drafts if drafts else None,
        "output_tokens": tokens,
        "wall_s": wall,
    }


# -------------------------------------------------------------------------------------------
# In-process (run in a fresh process)
# -------------------------------------------------------------------------------------------
def in_process_engine(cfg: dict, speculative: bool):
    """The cluster's engine settings (``_config``'s dict), built in this process: ``BuiltEngine``."""
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig

    spec = EngineSpec(model=cfg["model"], dtype=cfg["dtype"], weights=cfg["weights"], device=cfg["device"], tp=cfg["tp"],
                      draft=cfg["draft"] if speculative else "none", block_len=cfg["block_len"],
                      runner=RunnerConfig(n_slots=cfg["n_slots"], max_seq=cfg["max_seq"], compile=cfg["compile"],
                                          deterministic=cfg["deterministic"]),
                      max_prefill_tokens=cfg["max_prefill_tokens"], draft_options=tuple(cfg["draft_options"].items()),
                      verify_policy=cfg["verify_policy"], speculation_gate=cfg["speculation_gate"])
    return build_engine(spec, progress=False)


def in_process(cfg: dict, speculative: bool, levels: list[int], texts: list[str], max_tokens: int, min_requests: int) -> dict:
    """The cluster's engine settings, built in this process; closed-loop users per level."""
    from dspark.workers.request import SamplingParams

    built = in_process_engine(cfg, speculative)
    eng = built.engine
    tok = built.loaded.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    try:
        eng.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
        out = {}
        for level in levels:
            n = max(min_requests, level)
            todo = list(range(n))
            active: dict[str, tuple[object, float]] = {}
            recs = []
            steps0, busy = eng.num_steps, 0.0
            t_start = time.perf_counter()
            while todo or active:
                while todo and len(active) < level:
                    i = todo.pop(0)
                    seq = eng.add_request(prompts[i % len(prompts)], params)
                    active[seq.request_id] = (seq, time.perf_counter())
                eng.step()
                busy += eng.last_step_seconds
                now = time.perf_counter()
                for rid, (seq, t0) in list(active.items()):
                    if seq.finished:
                        del active[rid]
                        m = seq.metrics
                        recs.append({"tokens": len(seq.output_ids), "seconds": now - t0,
                                     "drafts": m.num_drafts, "accepted": m.num_accepted_tokens})
            wall = time.perf_counter() - t_start
            steps = eng.num_steps - steps0
            out[str(level)] = dict(_level_summary(recs, wall), engine_steps=steps, mean_step_ms=1000 * busy / max(1, steps))
        return out
    finally:
        built.close()


ROLES = (  # (role, substring of the process command line), first match wins
    ("verifier", "ServeReplica:dspark:Verifier"), ("draft worker", "ServeReplica:dspark:DraftWorker"),
    ("router", "ServeReplica:dspark:Router"), ("serve proxy", "ProxyActor"), ("serve controller", "ServeController"),
    ("redis", "redis-server"), ("ray system", "ray/"), ("benchmark client", "bench.cluster"),
)


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process, with its role (Linux /proc; {} elsewhere)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = next((r for r, key in ROLES if key in cmd), "other (outside the cluster)")
        out[int(pid)] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _cpu_delta(before: dict, after: dict, wall: float) -> dict:
    """Cores used per role between two snapshots (CPU seconds / wall seconds)."""
    by_role: dict[str, float] = {}
    for pid, (role, t) in after.items():
        d = t - before.get(pid, (role, 0.0))[1]
        if d > 0:
            by_role[role] = by_role.get(role, 0.0) + d
    return {r: round(v / wall, 3) for r, v in sorted(by_role.items(), key=lambda kv: -kv[1])}


# -------------------------------------------------------------------------------------------
# Through the cluster (run in a fresh process; Ray, Serve and Redis end with it)
# -------------------------------------------------------------------------------------------
def through_cluster(cfg: dict, levels: list[int], texts: list[str], max_tokens: int, min_requests: int,
                    modes: tuple[str, ...] = ("spec", "plain")) -> dict:
    """One cluster; at each level the closed loop runs once per mode (``spec``: speculative
    requests, ``plain``: ``speculative: false``), first mode alternating between levels."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI
    from ray import serve

    from dspark.cluster.config import ClusterConfig
    from dspark.cluster.local import APP_NAME, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(ClusterConfig(**cfg), http_port=0).start()
    startup = time.perf_counter() - t0
    try:
        base = cluster.base_url + "/v1"
        model = OpenAI(base_url=base, api_key="bench").models.list().data[0].id
        verifier = serve.get_deployment_handle("Verifier", app_name=APP_NAME)

        def stats() -> dict | None:
            try:
                return verifier.stats.remote().result(timeout_s=10)
            except Exception:
                return None

        def one(client, text: str, speculative: bool) -> dict:
            t = time.perf_counter()
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
                extra_body={"speculative": speculative},
            )
            dt = time.perf_counter() - t
            sd = (r.model_extra or {}).get("spec_decode") or {}
            return {"tokens": r.usage.completion_tokens, "seconds": dt,
                    "drafts": sd.get("num_drafts", 0), "accepted": sd.get("num_accepted_tokens", 0)}

        def level_run(level: int, speculative: bool) -> dict:
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            for i in range(max(min_requests, level)):
                jobs.put(i)
            recs: list[dict] = []

            def user() -> None:
                client = OpenAI(base_url=base, api_key="bench", timeout=600, max_retries=0)
                while True:  # each user takes the next request when its previous one is answered
                    try:
                        i = jobs.get_nowait()
                    except queue.Empty:
                        return
                    recs.append(one(client, texts[i % len(texts)], speculative))

            s0 = stats()
            cpu0 = _cpu_by_process()
            t_start = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                for f in [pool.submit(user) for _ in range(level)]:
                    f.result()
            wall = time.perf_counter() - t_start
            cpu1 = _cpu_by_process()
            s1 = stats()
            row = dict(_level_summary(recs, wall), cores_by_role=_cpu_delta(cpu0, cpu1, wall))
            if s0 and s1:
                row["engine_steps"] = s1["steps"] - s0["steps"]
                row["verifier_step_latency_ms_ema"] = 1000 * s1["step_latency_s"]
            return row

        warm = OpenAI(base_url=base, api_key="bench", timeout=600)
        for mode in modes:
            one(warm, texts[0], mode == "spec")
        out: dict = {**{mode: {} for mode in modes}, "startup_s": startup}
        for k, level in enumerate(levels):
            # Alternate which mode goes first so a slow phase does not always hit the same one.
            for mode in (modes if k % 2 == 0 else modes[::-1]):
                out[mode][str(level)] = level_run(level, mode == "spec")
        return out
    finally:
        cluster.stop()


@click.command()
@click.option("--concurrency", default="1,8,32", show_default=True)
@click.option("--max-tokens", type=int, default=96, show_default=True)
@click.option("--requests", "min_requests", type=int, default=8, show_default=True,
              help="requests per level at least (a level c sends max(N, c))")
@click.option("--repeats", type=int, default=2, show_default=True,
              help="cluster runs; in-process runs go before, between and after them")
@click.option("--draft", default=None, help="drafter kind (default: the cluster's: hybrid if a head ships, else ngram)")
@click.option("--block", type=int, default=None, help="block length (default: the cluster's, 7)")
@click.option("--compile/--no-compile", "compile_step", default=False, show_default=True,
              help="verifiers and in-process engines with the compiled step (the `dspark serve` default)")
@click.option("--json", "json_path", default=None, help="output (default bench/results/cluster.json)")
@click.option("--verify-policy", type=click.Choice(["fixed", "adaptive"]), default="adaptive", show_default=True,
              help="the cluster's and the in-process engines' (adaptive: `dspark serve`'s default; in process "
                   "without the global scheduler, so under the budget's default policy)")
@click.option("--weights", type=click.Choice(["dense", "q4"]), default="dense", show_default=True,
              help="the target's layer matrices: dequantized, or the GGUF file's 4-bit blocks as stored")
def main(concurrency, max_tokens, min_requests, repeats, draft, block, compile_step, verify_policy, json_path, weights):
    """Through the full cluster vs in-process speculative and plain decoding, side by side."""
    from dspark.cluster.config import ClusterConfig
    from dspark.cluster.commands import _default_draft

    t_begin = time.perf_counter()
    load_start = os.getloadavg()
    levels = [int(c) for c in concurrency.split(",")]
    cfg = _config(draft or _default_draft(), block, compile_step, verify_policy, weights)
    threads = ClusterConfig(**cfg).threads()
    texts = _texts(max(max(levels), min_requests))
    click.echo(f"drafter {cfg['draft']}, block {cfg['block_len']}, {verify_policy} verification, "
               f"{cfg['draft_workers']} draft worker, tp {cfg['tp']}, "
               f"{cfg['dtype']} ({weights} weights), {threads} torch thread(s) per compute process, {max_tokens} new tokens, "
               f"levels {levels}, {repeats} cluster run(s)", err=True)
    kw = {"cfg": cfg, "levels": levels, "texts": texts, "max_tokens": max_tokens, "min_requests": min_requests}

    def inproc(tag: str) -> dict:
        res = {"load_1m": round(os.getloadavg()[0], 2)}
        for mode in ("spec", "plain"):
            t0 = time.perf_counter()
            res[mode] = run_isolated("bench.cluster", "in_process", dict(kw, speculative=mode == "spec"), threads)
            figures = ", ".join(f"c={lv} {r['per_user_tokens_per_s']:.1f}" for lv, r in res[mode].items())
            click.echo(f"  in-process {mode:5s} ({tag}): {figures} tok/s per user  ({time.perf_counter() - t0:.0f} s)", err=True)
        return res

    # In-process, cluster, in-process, cluster, ..., in-process: never two at once, and every
    # cluster run is bracketed by in-process runs, so slow phases of the host show up as drift.
    inprocs, clusters = [], []
    click.echo("in-process 1", err=True)
    inprocs.append(inproc("1"))
    for k in range(repeats):
        click.echo(f"cluster {k + 1}", err=True)
        t0 = time.perf_counter()
        load = round(os.getloadavg()[0], 2)
        c = run_isolated("bench.cluster", "through_cluster", kw, threads, timeout=3600)
        c["load_1m"] = load
        clusters.append(c)
        figures = ", ".join(f"c={lv} {c['spec'][lv]['per_user_tokens_per_s']:.1f} / {c['plain'][lv]['per_user_tokens_per_s']:.1f}"
                            for lv in c["spec"])
        click.echo(f"  cluster spec / plain: {figures} tok/s per user  ({time.perf_counter() - t0:.0f} s, "
                   f"start-up {c['startup_s']:.0f} s)", err=True)
        click.echo(f"in-process {k + 2}", err=True)
        inprocs.append(inproc(str(k + 2)))

    results, rows = _compare(levels, inprocs, clusters)
    click.echo(table(rows, ["conc", "system", "per_user_tok_s", "aggregate_tok_s", "accept_len", "vs_in_process_spec"]))
    verdict = None
    if "1" in results:
        ratio = results["1"]["cluster_vs_in_process_spec_per_user"]
        cost = 1 - ratio
        verdict = {"disaggregation_cost_c1": cost, "per_run": [1 - r for r in results["1"]["cluster_vs_in_process_spec_per_run"]],
                   "target": 0.10, "met": cost <= 0.10}
        click.echo(f"\ndisaggregation cost at concurrency 1: {100 * cost:.1f}% of per-user tokens/s "
                   f"(per cluster run: {', '.join(f'{100 * c:.1f}%' for c in verdict['per_run'])}; "
                   f"target <= 10%: {'met' if verdict['met'] else 'NOT met'})")
        cores = clusters[-1]["spec"]["1"].get("cores_by_role")
        if cores:
            click.echo("cores in use during the last concurrency-1 speculative run: "
                       + ", ".join(f"{r} {v:.2f}" for r, v in cores.items()))
    minutes = (time.perf_counter() - t_begin) / 60
    out = write_json(json_path, "cluster.json", {
        "config": cfg, "threads": threads, "levels": levels, "max_tokens": max_tokens, "min_requests": min_requests,
        "repeats": repeats, "results": results, "target": verdict,
        "cluster_startup_s": [c["startup_s"] for c in clusters],
        "raw": {"in_process": inprocs, "cluster": clusters}, "minutes": round(minutes, 1), "cpus": os.cpu_count(),
        "load_average_1m": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
    })
    click.echo(f"wrote {out} ({minutes:.1f} min)")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _compare(levels: list[int], inprocs: list[dict], clusters: list[dict]) -> tuple[dict, list[dict]]:
    """Means over runs, and cluster / in-process ratios per cluster run against the in-process
    runs just before and after it (a bracket), averaged over runs."""
    keys = ("per_user_tokens_per_s", "aggregate_tokens_per_s")
    results, rows = {}, []
    for level in levels:
        lv = str(level)
        ip = {m: {k: _mean([r[m][lv][k] for r in inprocs]) for k in keys} for m in ("spec", "plain")}
        cl = {m: {k: _mean([c[m][lv][k] for c in clusters]) for k in keys} for m in ("spec", "plain")}
        per_run = []
        for i, c in enumerate(clusters):
            bracket = _mean([inprocs[i]["spec"][lv]["per_user_tokens_per_s"], inprocs[i + 1]["spec"][lv]["per_user_tokens_per_s"]])
            per_run.append(c["spec"][lv]["per_user_tokens_per_s"] / bracket)
        acc_c = _mean([c["spec"][lv]["acceptance_length"] or 1.0 for c in clusters])
        acc_i = _mean([r["spec"][lv]["acceptance_length"] or 1.0 for r in inprocs])
        results[lv] = {
            "cluster_spec": cl["spec"], "cluster_plain": cl["plain"], "in_process_spec": ip["spec"], "in_process_plain": ip["plain"],
            "acceptance_length": {"cluster": acc_c, "in_process": acc_i},
            "cluster_vs_in_process_spec_per_user": _mean(per_run),
            "cluster_vs_in_process_spec_per_run": per_run,
            "cluster_vs_in_process_spec_aggregate": cl["spec"]["aggregate_tokens_per_s"] / ip["spec"]["aggregate_tokens_per_s"],
            "cluster_plain_vs_in_process_plain_per_user": cl["plain"]["per_user_tokens_per_s"] / ip["plain"]["per_user_tokens_per_s"],
            "cluster_spec_vs_cluster_plain_per_user": cl["spec"]["per_user_tokens_per_s"] / cl["plain"]["per_user_tokens_per_s"],
            "in_process_spec_vs_plain_per_user": ip["spec"]["per_user_tokens_per_s"] / ip["plain"]["per_user_tokens_per_s"],
        }
        base = ip["spec"]["per_user_tokens_per_s"]
        for name, fig, acc in (("cluster spec", cl["spec"], acc_c), ("cluster plain", cl["plain"], None),
                               ("in-process spec", ip["spec"], acc_i), ("in-process plain", ip["plain"], None)):
            rows.append({"conc": level, "system": name, "per_user_tok_s": fig["per_user_tokens_per_s"],
                         "aggregate_tok_s": fig["aggregate_tokens_per_s"], "accept_len": acc,
                         "vs_in_process_spec": fig["per_user_tokens_per_s"] / base})
    return results, rows


if __name__ == "__main__":
    main()
