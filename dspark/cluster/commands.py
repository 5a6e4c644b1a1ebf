"""`dspark serve` and `dspark demo`."""

from __future__ import annotations

import signal
import threading
import time

import click

from dspark.cluster.config import ClusterConfig
from dspark.workers.drafters import registry


def _default_draft() -> str:
    """The hybrid drafter (the DSpark head or prompt lookup, per request and step) when a head
    ships for the default model, else prompt lookup alone.  Hybrid leads both of its parts on
    every prompt category measured (docs/BENCHMARKS.md)."""
    try:
        from dspark.models.dspark_head import default_head_path
        from dspark.models.loader import DEFAULT_MODEL_NAME

        return "hybrid" if default_head_path(DEFAULT_MODEL_NAME).exists() else "ngram"
    except Exception:
        return "ngram"


def cluster_options(f):
    opts = [
        click.option("--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)"),
        click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True),
        click.option("--weights", type=click.Choice(["dense", "q4"]), default="dense", show_default=True,
                     help="the verifier's layer matrices dequantized to --dtype, or a GGUF file's 4-bit blocks "
                          "multiplied as stored (CPU, one rank; fastest at small batches)"),
        click.option("--device", default="cpu", show_default=True),
        click.option("--tp", type=int, default=1, show_default=True, help="tensor-parallel ranks per verifier group"),
        click.option("--draft-workers", type=int, default=1, show_default=True),
        click.option("--draft", type=click.Choice(registry.choices()), default=None,
                     help="drafter kind (default: hybrid when a head ships, else ngram)"),
        click.option("--block", "block_len", type=int, default=7, show_default=True),
        click.option("--draft-option", "draft_options", multiple=True, metavar="KEY=VALUE",
                     help="drafter setting, repeatable (e.g. head=PATH: docs/MODELS.md)"),
        click.option("--verify-policy", type=click.Choice(["fixed", "adaptive"]), default="adaptive", show_default=True,
                     help="adaptive: the global scheduler and per-step measurements decide how much of each block "
                          "to verify, and whether to draft at all; fixed: verify every block whole"),
        click.option("--redis-url", default=None, help="existing Redis (default: start a local redis-server)"),
        click.option("--slots", "n_slots", type=int, default=32, show_default=True, help="concurrent requests per verifier"),
        click.option("--scheduler-interval", "scheduler_interval_s", type=float, default=0.5, show_default=True,
                     help="global scheduler period, seconds (adaptive policy)"),
        click.option("--target-user-tps", "target_tokens_per_s_per_user", type=float, default=0.0, show_default=True,
                     help="per-user tokens/s the scheduler protects (0: none)"),
        click.option("--deterministic/--no-deterministic", default=None,
                     help="row-invariant verifier kernels: greedy speculative output equals plain decoding in bf16 too "
                          "(default: on for bf16 on CPU)"),
        click.option("--compile/--no-compile", "compile", default=None,
                     help="the verifier's step through torch.compile (compiled once, cached on disk for later starts; "
                          "default: on, except for DeepSeek-V4 folders, which run eager)"),
        click.option("--kv-layout", "kv_layout", type=click.Choice(["slot", "paged"]), default="slot", show_default=True,
                     help="the verifier's KV cache: one region per request, or blocks from a pool (memory follows the "
                          "tokens held)"),
        click.option("--torch-threads", "torch_threads", type=click.IntRange(min=0), default=0, show_default=True,
                     help="torch threads of each compute process (verifier ranks, draft workers); 0: this host's "
                          "cores but one divided among them (the core left serves the router and the event loops)"),
        click.option("--local-draft-below", "local_draft_below", type=click.IntRange(min=0), default=1,
                     show_default=True,
                     help="a verifier drafts in its own process the requests that arrive while it drafts for fewer than "
                          "this many (one request waits less for its blocks there); 0: always on the draft workers"),
        click.option("--cuda-graphs/--no-cuda-graphs", "cuda_graphs", default=None,
                     help="replay the verifier's decode and verification steps from CUDA graphs, captured at "
                          "start-up (default: on with CUDA for Llama-family models on the slot layout, one rank, "
                          "not deterministic)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def make_config(model, dtype, device, tp, draft_workers, draft, block_len, verify_policy, n_slots,
                draft_options=(), **extra) -> ClusterConfig:
    """The cluster configuration of these options.  Drafter options and the head they name are
    checked here, so a typo is a one-line error before Ray starts rather than a failed deployment."""
    if extra.get("deterministic", False) is None:
        from dspark.workers.runner import deterministic_default

        extra["deterministic"] = deterministic_default(dtype, device, model)
    if "compile" in extra:
        from dspark.workers.runner import compile_default

        if extra["compile"] is None:
            extra["compile"] = compile_default(model)
        elif extra["compile"] and not compile_default(model):
            raise click.UsageError("--compile is not supported for DeepSeek-V4 models (they run eager); "
                                   "drop it or pass --no-compile")
    if extra.get("cuda_graphs", False) is None:
        from dspark.workers.runner import cuda_graphs_default

        extra["cuda_graphs"] = cuda_graphs_default(device, model, extra.get("kv_layout", "slot"),
                                                   bool(extra.get("deterministic")), tp)
    draft = draft or _default_draft()
    from dspark.kernels.short_attention import attention_refusal

    if refusal := attention_refusal():
        raise click.UsageError(refusal)
    from dspark.models.int8_weights import int8_refusal

    if refusal := int8_refusal():  # a bad $DSPARK_INT8_KERNEL (the drafter's products)
        raise click.UsageError(refusal)
    if extra.get("weights") == "q4":  # the file's own header says whether its blocks can be served
        from dspark.models.loader import parse_dtype, q4_refusal

        refusal = q4_refusal(model, parse_dtype(dtype))
        if refusal:
            raise click.UsageError(refusal)
    try:
        options = dict(registry.assignments(draft_options))
        cfg = ClusterConfig.from_args(dict(
            model=model, dtype=dtype, device=device, tp=tp, draft=draft, draft_workers=draft_workers,
            block_len=block_len, verify_policy=verify_policy, n_slots=n_slots, draft_options=options, **extra,
        ))
        if draft != "none" and options.get("head"):  # the head's own config, read without the target
            registry.feature_layers(draft, options, "")
    except FileNotFoundError as e:
        raise click.UsageError(f"drafter option head={options['head']}: no such file ({e.filename})") from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return cfg


def serve_config(host, grpc_port, internal_host, port=None, redis_url=None, **kw) -> ClusterConfig:
    """The cluster configuration `dspark serve` runs with these options (``port`` and
    ``redis_url`` belong to the local cluster, not to the application)."""
    return make_config(grpc_port=grpc_port, bind_host=host, internal_host=internal_host, **kw)


@click.command()
@cluster_options
@click.option("--host", default="127.0.0.1", show_default=True, help="public bind address (HTTP and gRPC API)")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=50051, show_default=True, help="GenerationService port (0: off)")
@click.option("--internal-host", default="127.0.0.1", show_default=True,
              help="bind address of the draft workers' internal port, independent of --host ('auto': node IP)")
def serve(host, port, grpc_port, internal_host, redis_url, **kw):
    """Start Ray, Redis (unless --redis-url) and the DSpark app; serve until interrupted."""
    from dspark.cluster.local import LocalCluster

    cfg = serve_config(host=host, grpc_port=grpc_port, internal_host=internal_host, **kw)
    cluster = LocalCluster(cfg, host=host, http_port=port, redis_url=redis_url)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"starting DSpark ({cfg.draft} drafter, TP={cfg.tp}, {cfg.draft_workers} draft workers)...", err=True)
    try:
        cluster.start(stop_on_failure=False)
    except (RuntimeError, TimeoutError) as e:  # e.g. a drafter checkpoint the target cannot use
        # The reason first: Serve may take a minute to tear down the roles that did start.
        click.echo(f"Error: {e}", err=True)
        click.echo("stopping what started...", err=True)
        cluster.stop()
        raise SystemExit(1) from None
    click.echo(f"serving OpenAI API at {cluster.base_url}/v1" + (f", gRPC at {host}:{grpc_port}" if grpc_port else ""), err=True)
    try:
        stop.wait()
    finally:
        click.echo("shutting down (in-flight requests finish first)...", err=True)
        cluster.stop()


DEMO_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences why the sky is blue.",
    "List five fruits and one fact about each.",
    "Write a function to find the shared elements from two lists.",
]


@click.command()
@cluster_options
@click.option("--max-tokens", type=int, default=96, show_default=True)
@click.option("--port", type=int, default=0, help="HTTP port (0: a free one)")
def demo(max_tokens, port, redis_url, **kw):
    """Start the cluster, send a few prompts through the openai client, print a table, stop."""
    from openai import OpenAI

    from dspark.cluster.local import LocalCluster

    cfg = make_config(**kw)
    click.echo(f"starting the local DSpark cluster ({cfg.draft} drafter, {cfg.draft_workers} draft worker(s))...", err=True)
    with LocalCluster(cfg, http_port=port, redis_url=redis_url) as cluster:
        client = OpenAI(base_url=cluster.base_url + "/v1", api_key="demo")
        model = client.models.list().data[0].id
        rows = []
        for prompt in DEMO_PROMPTS:
            res = {}
            for mode, spec in (("plain", False), ("spec", True)):
                t0 = time.perf_counter()
                r = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0, extra_body={"speculative": spec},
                )
                dt = time.perf_counter() - t0
                res[mode] = (r, r.usage.completion_tokens / dt)
            r, tps = res["spec"]
            sd = (r.model_extra or {}).get("spec_decode") or {}
            same = r.choices[0].message.content == res["plain"][0].choices[0].message.content
            rows.append((prompt[:44], r.usage.completion_tokens, tps, sd.get("mean_acceptance_length", 1.0),
                         tps / res["plain"][1], "yes" if same else "NO"))
            click.echo(f"\n> {prompt}\n{r.choices[0].message.content.strip()}\n", err=True)
        head = f"{'prompt':46}{'tokens':>7}{'tok/s':>8}{'accept len':>11}{'speedup':>9}{'same text':>11}"
        click.echo(head)
        click.echo("-" * len(head))
        for p, n, tps, acc, sp, same in rows:
            click.echo(f"{p:46}{n:>7}{tps:>8.1f}{acc:>11.2f}{sp:>8.2f}x{same:>11}")
        click.echo(f"\nspeedup = tokens/s of speculative vs plain decoding through the same cluster "
                   f"({cfg.dtype}, greedy, {cfg.draft} drafter, block {cfg.block_len}).")
        if cfg.dtype != "fp32" and any(r[-1] == "NO" for r in rows):
            click.echo("Texts can differ in bf16 without --deterministic: a verification pass multiplies several tokens at "
                       "once, which rounds differently from one-token decoding. In fp32 (--dtype fp32) they are token-identical.")
