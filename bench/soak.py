"""`dspark bench soak`: many streaming clients for minutes against the full local cluster.

N clients (default 200) on loopback each loop streaming chat requests with a short
``max_tokens`` for ``--duration`` seconds, against a LocalCluster (Ray Serve, Redis, draft
workers) as a user would start it.  What a soak must show:

* zero errors and zero lost requests: every request that was sent got a final chunk with a
  ``finish_reason`` (and its usage), none an error event, a non-200 status or a broken stream;
* latency under sustained load at the client: time to first token, and inter-token latency
  (the gap between two content chunks of a stream; with speculative decoding a chunk often
  carries several tokens, so time per output token is reported too);
* memory: resident set size of every cluster process (Ray, Serve replicas, draft workers,
  Redis) after warm-up, sampled through the run, and after it; growth means a leak.

After the duration, clients stop starting requests and the ones in flight finish (bounded by
``--drain-timeout``); a request still unfinished then counts as lost.  Results go to
bench/results/soak.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import click

from bench.common import table, write_json


@dataclass
class Tally:
    """What the clients saw, merged over all of them."""

    started: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    finish_reasons: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{kind}: {detail[:300]}")


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


async def one_request(client, body: dict, tally: Tally, read_timeout_s: float) -> None:
    """Stream one chat completion; account it as completed, an error or lost."""
    import httpx

    tally.started += 1
    t0 = time.perf_counter()
    first = last = None
    finish = usage = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 timeout=httpx.Timeout(30.0, read=read_timeout_s)) as r:
            if r.status_code != 200:
                await r.aread()
                tally.error(f"http_{r.status_code}", r.text)
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    tally.error("error_event", json.dumps(ev["error"]))
                    return
                if ev.get("usage"):
                    usage = ev["usage"]
                for ch in ev.get("choices", ()):
                    if ch.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            tally.ttft.append(now - t0)
                        else:
                            tally.itl.append(now - last)
                        last = now
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
    except asyncio.CancelledError:
        tally.lost += 1  # still running when the drain timeout hit
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the soak
        tally.error(type(exc).__name__, str(exc))
        return
    if finish is None or usage is None:
        tally.lost += 1
        tally.error("no_final_chunk", f"finish={finish} usage={usage}")
        return
    tally.completed += 1
    tally.finish_reasons[finish] = tally.finish_reasons.get(finish, 0) + 1
    n = usage["completion_tokens"]
    tally.tokens += n
    if first is not None and n > 1:
        tally.tpot.append((last - first) / (n - 1))


async def client_loop(client, prompts: list[str], max_tokens: int, stop_at: float, tally: Tally, seed: int,
                      read_timeout_s: float) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        body = {"messages": [{"role": "user", "content": rng.choice(prompts)}], "max_tokens": max_tokens,
                "temperature": rng.choice([0.0, 0.7]), "stream": True, "stream_options": {"include_usage": True}}
        await one_request(client, body, tally, read_timeout_s)


async def run_clients(base_url: str, api_key: str | None, prompts: list[str], clients: int, duration_s: float,
                      max_tokens: int, drain_timeout_s: float, tally: Tally | None = None) -> tuple[Tally, float]:
    import httpx

    tally = tally if tally is not None else Tally()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits) as client:
        stop_at = time.monotonic() + duration_s
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client_loop(client, prompts, max_tokens, stop_at, tally, seed=i,
                                                 read_timeout_s=duration_s + drain_timeout_s))
                 for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=duration_s + drain_timeout_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                tally.error("client_crash", repr(t.exception()))
        return tally, time.perf_counter() - t0


# ---------------------------------------------------------------------------- memory
def cluster_processes():
    """Every process started by this one (Ray's GCS, raylet, workers, replicas, Redis)."""
    import psutil

    return psutil.Process(os.getpid()).children(recursive=True)


def role_of(p) -> str:
    """A short name for a cluster process: the Serve replica's deployment, redis, or Ray's own."""
    title = " ".join(p.cmdline()) or p.name()
    if "ServeReplica:" in title:
        return title.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]  # Router, Verifier, ...
    if "ServeController" in title or "ProxyActor" in title:
        return "serve-system"
    if "redis-server" in title:
        return "redis"
    return "ray-system"


def rss_by_role() -> dict[str, float]:
    """RSS in MiB of the cluster processes, summed by role."""
    import psutil

    out: dict[str, float] = {}
    for p in cluster_processes():
        try:
            role = role_of(p)
            out[role] = out.get(role, 0.0) + p.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return {k: round(v, 1) for k, v in sorted(out.items())}


def rss_mb() -> tuple[float, int]:
    """(total RSS of the cluster processes in MiB, how many processes)."""
    import psutil

    total, n = 0, 0
    for p in cluster_processes():
        try:
            total += p.memory_info().rss
            n += 1
        except psutil.Error:
            pass
    return total / 2**20, n


class RssSampler:
    def __init__(self, period_s: float = 5.0) -> None:
        self.samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
        self.period_s = period_s
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append((round(time.monotonic() - self._t0, 1), round(rss_mb()[0], 1)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def scrape_metrics(base_url: str) -> dict[str, float]:
    """The router's /metrics, as {name|labels: value} (model_name dropped)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = get(base_url + "/metrics")
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[s.name + labels] = s.value
    return out


# ---------------------------------------------------------------------------- command
@click.command()
@click.option("--clients", type=int, default=200, show_default=True, help="concurrent streaming clients")
@click.option("--duration", "duration_s", type=float, default=120.0, show_default=True, help="seconds of load")
@click.option("--max-tokens", type=int, default=16, show_default=True, help="max_tokens of every request")
@click.option("--draft", default="auto", show_default=True, help="drafter (auto: the cluster's default, hybrid if a head ships, else ngram)")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--n-slots", type=int, default=64, show_default=True, help="verifier KV slots (more clients queue)")
@click.option("--max-seq", type=int, default=512, show_default=True)
@click.option("--block", "block_len", type=int, default=4, show_default=True)
@click.option("--draft-workers", type=int, default=1, show_default=True)
@click.option("--policy", type=click.Choice(["fixed", "adaptive"]), default="fixed", show_default=True)
@click.option("--drain-timeout", "drain_timeout_s", type=float, default=300.0, show_default=True,
              help="after the duration, how long requests in flight may take to finish")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="repeat the load this many times on the same cluster (memory growth per round shows leaks)")
@click.option("--out", default=None, help="JSON path (default bench/results/soak.json)")
def main(clients, duration_s, max_tokens, draft, dtype, n_slots, max_seq, block_len, draft_workers, policy,
         drain_timeout_s, rounds, out):
    """Many streaming clients for minutes: errors, lost requests, latency, memory."""
    from dspark.cluster.commands import _default_draft
    from dspark.cluster.config import ClusterConfig
    from dspark.cluster.local import LocalCluster
    from dspark.datasets import load_prompts

    draft = _default_draft() if draft == "auto" else draft
    cfg = ClusterConfig(dtype=dtype, tp=1, draft=draft, draft_workers=draft_workers, block_len=block_len,
                        n_slots=n_slots, max_seq=max_seq, verify_policy=policy, block_timeout_s=30.0)
    prompts = [p.text for p in load_prompts("all", limit=64)]
    api_key = os.environ.get(cfg.api_key_env) or None
    click.echo(f"soak: {clients} clients x {duration_s:.0f}s, max_tokens={max_tokens}, {dtype}, draft={draft}, "
               f"n_slots={n_slots}", err=True)
    t_start = time.perf_counter()
    cluster = LocalCluster(cfg, http_port=0).start(timeout_s=900)
    startup_s = time.perf_counter() - t_start
    try:
        # Warm-up: a few requests through every path before measuring memory.
        warm, _ = asyncio.run(run_clients(cluster.base_url, api_key, prompts, min(clients, 8), 5.0, max_tokens, 120))
        rss_before, n_procs = rss_mb()
        roles_before = rss_by_role()
        metrics_before = scrape_metrics(cluster.base_url)
        sampler = RssSampler()
        tally, wall_s, rounds_out = Tally(), 0.0, []
        for r in range(rounds):
            before = (tally.completed, sum(tally.errors.values()), tally.lost)
            _, secs = asyncio.run(run_clients(cluster.base_url, api_key, prompts, clients, duration_s, max_tokens,
                                              drain_timeout_s, tally))
            wall_s += secs
            rounds_out.append({"round": r + 1, "wall_s": round(secs, 1), "completed": tally.completed - before[0],
                               "errors": sum(tally.errors.values()) - before[1], "lost": tally.lost - before[2],
                               "rss_mb": round(rss_mb()[0], 1), "rss_by_role": rss_by_role()})
            click.echo(f"round {r + 1}: {rounds_out[-1]}", err=True)
        sampler.stop()
        rss_after, n_procs_after = rss_mb()
        roles_after = rss_by_role()
        metrics_after = scrape_metrics(cluster.base_url)
        health = json.loads(get(cluster.base_url + "/health"))
    finally:
        cluster.stop()

    def d(name: str) -> float:
        return metrics_after.get(name, 0.0) - metrics_before.get(name, 0.0)

    def ms(x):
        return None if x is None else round(1000 * x, 1)

    drafts = d("dspark:spec_decode_num_drafts_total")
    result = {
        "config": {"clients": clients, "duration_s": duration_s, "rounds": rounds, "max_tokens": max_tokens, "dtype": dtype,
                   "draft": draft, "n_slots": n_slots, "max_seq": max_seq, "block_len": block_len,
                   "draft_workers": draft_workers, "policy": policy, "cpu_count": os.cpu_count()},
        "startup_s": round(startup_s, 1),
        "wall_s": round(wall_s, 1),
        "requests_started": tally.started,
        "requests_completed": tally.completed,
        "errors": sum(tally.errors.values()),
        "errors_by_kind": tally.errors,
        "error_samples": tally.error_samples,
        "lost_requests": tally.lost,
        "finish_reasons": tally.finish_reasons,
        "output_tokens": tally.tokens,
        "output_tokens_per_s": round(tally.tokens / wall_s, 1) if wall_s else None,
        "requests_per_s": round(tally.completed / wall_s, 2) if wall_s else None,
        "ttft_ms": {"p50": ms(percentile(tally.ttft, 50)), "p99": ms(percentile(tally.ttft, 99)),
                    "mean": ms(statistics.fmean(tally.ttft)) if tally.ttft else None},
        "itl_ms": {"p50": ms(percentile(tally.itl, 50)), "p99": ms(percentile(tally.itl, 99)),
                   "mean": ms(statistics.fmean(tally.itl)) if tally.itl else None},
        "tpot_ms": {"p50": ms(percentile(tally.tpot, 50)), "p99": ms(percentile(tally.tpot, 99))},
        "rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1),
                   "peak": round(max([rss_before, rss_after] + [v for _, v in sampler.samples]), 1),
                   "growth": round(rss_after - rss_before, 1), "processes": [n_procs, n_procs_after],
                   "by_role_before": roles_before, "by_role_after": roles_after,
                   # Leak indicator: growth over the second half of the run, once every slot was used.
                   "growth_second_half": round(sampler.samples[-1][1] - sampler.samples[len(sampler.samples) // 2][1], 1)
                   if len(sampler.samples) >= 2 else None,
                   "samples": sampler.samples},
        "server": {
            "requests_succeeded": d("dspark:request_success_total|finished_reason=length")
            + d("dspark:request_success_total|finished_reason=stop"),
            "request_failures": d("dspark:request_failure_total"),
            "mean_acceptance_length": round(1 + d("dspark:spec_decode_num_accepted_tokens_total") / drafts, 3)
            if drafts else 1.0,
            "verification_budget": metrics_after.get("dspark:verification_budget"),
            "redis_connected": metrics_after.get("dspark:redis_connected"),
            "verifier_finished_requests": health.get("verifier", {}).get("finished_requests"),
        },
        "rounds": rounds_out,
        "warmup": {"completed": warm.completed, "errors": sum(warm.errors.values())},
    }
    path = write_json(out, "soak.json", result)
    rows = [{"clients": clients, "s": round(wall_s), "requests": tally.completed, "errors": result["errors"],
             "lost": tally.lost, "tok/s": result["output_tokens_per_s"], "TTFT p50": result["ttft_ms"]["p50"],
             "TTFT p99": result["ttft_ms"]["p99"], "ITL p50": result["itl_ms"]["p50"], "ITL p99": result["itl_ms"]["p99"],
             "RSS MB before": result["rss_mb"]["before"], "after": result["rss_mb"]["after"]}]
    click.echo(table(rows, list(rows[0])))
    click.echo(f"wrote {path}", err=True)
    if result["errors"] or tally.lost:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
