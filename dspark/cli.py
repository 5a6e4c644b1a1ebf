"""`dspark` command line: generate | serve | demo | policy | bench | train-draft | export-draft | make-model.

Subcommands live next to what they drive and are imported only when invoked, so `dspark --help`
stays fast and a command never pays for another's heavy imports (ray, grpc, transformers).
Benchmarks are scripts under the repository's ``bench/`` folder.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from dspark.workers.drafters import registry

# name -> ("module:attribute" of a click command, one-line help shown without importing it)
COMMANDS = {
    "serve": ("dspark.cluster.commands:serve", "Start the local cluster (Ray Serve, gRPC, Redis) and serve."),
    "demo": ("dspark.cluster.commands:demo", "Start the cluster, send a few prompts, print a table, stop."),
    "train-draft": ("dspark.train.commands:train_draft", "Train a DSpark draft head by self-distillation."),
    "export-draft": ("dspark.train.export:export_draft", "Write a draft head in a published format (DeepSpec's, speculators')."),
    "make-model": ("dspark.models.commands:make_model", "Write a random-weight model folder (DeepSeek-V4) for demos."),
    "policy": ("dspark.cluster.policy_command:policy", "Pin, lift or show a running cluster's verification policy."),
}
BENCHMARKS = {
    "engine": ("bench.engine:main", "Decode tokens/s vs Hugging Face, and the bandwidth floor."),
    "spec": ("bench.spec:main", "Speculative vs plain decoding per drafter, vs HF prompt lookup."),
    "drafters": ("bench.drafters:main", "Acceptance, calibration and speedup of the drafters."),
    "cluster": ("bench.cluster:main", "Per-user and aggregate tokens/s through the full cluster."),
    "load": ("bench.load:main", "Load sweep: plain vs fixed depths vs adaptive verification."),
    "settings": ("bench.settings:main", "Cluster tokens/s under each value of one setting (e.g. torch_threads)."),
    "soak": ("bench.soak:main", "Many streaming clients for minutes: errors, latency, memory."),
    "prefix": ("bench.prefix:main", "Time to first token with a cached 1k-token system prompt vs cold."),
    "grammar": ("bench.grammar_mask:main", "Structured outputs: grammar compile, per-token mask and rollback costs."),
    "paged": ("bench.paged_attention:main", "Attention read from the slot and paged layouts (gather, FlexAttention)."),
    "shard-load": ("bench.shard_load:main", "DeepSeek-V4 per-rank loading: bytes read and peak memory vs the whole model."),
}


# OpenMP wait policy by command (dspark/omp.py): "spin" where one process owns the cores.
ROLE_WAIT = {"train-draft": "spin", "engine": "spin", "spec": "spin", "drafters": "spin", "prefix": "spin",
             "paged": "spin"}


def _wait_policy(role_default: str) -> None:
    from dspark import omp

    try:
        omp.configure(role_default)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _load(target: str) -> click.Command:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


class LazyGroup(click.Group):
    def __init__(self, *args, lazy: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            target = self.lazy[name][0]
            _wait_policy(ROLE_WAIT.get(name, "passive"))  # before the command's module loads torch
            if target.startswith("bench."):
                _add_bench_path()
            return _load(target)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, c.get_short_help_str()) for n, c in self.commands.items()]
        rows += [(n, h) for n, (_, h) in self.lazy.items()]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))


def _add_bench_path() -> None:
    root = Path(__file__).resolve().parents[1]
    if (root / "bench").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


@click.group(cls=LazyGroup, lazy=COMMANDS)
def main() -> None:
    """DSpark: distributed LLM serving with lossless speculative decoding."""


@main.group(cls=LazyGroup, lazy=BENCHMARKS)
def bench() -> None:
    """Benchmarks that print side-by-side ratios (see docs/BENCHMARKS.md)."""


def engine_options(f):
    """Options shared by every command that builds an in-process engine."""
    opts = [
        click.option("--model", "model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)"),
        click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True),
        click.option("--weights", type=click.Choice(["dense", "q4"]), default="dense", show_default=True,
                     help="layer matrices dequantized to --dtype, or a GGUF file's 4-bit blocks multiplied as stored "
                          "(CPU, one rank; fastest at small batches)"),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda"),
        click.option("--tp", type=int, default=1, show_default=True, help="tensor-parallel ranks"),
        click.option("--draft", type=click.Choice(registry.choices()), default="none", show_default=True),
        click.option("--block", "block_len", type=int, default=None,
                     help="draft block length (default: 4; 3 with --weights q4 where torch's int4 kernel "
                          "multiplies it (fp32, or a CPU without AMX): it costs a whole pass more from the fifth row "
                          "of a verification)"),
        click.option("--draft-option", "draft_options", multiple=True, metavar="KEY=VALUE", help="drafter setting, repeatable"),
        click.option("--deterministic/--no-deterministic", default=None,
                     help="row-invariant kernels: greedy speculative output equals plain decoding in bf16 too "
                          "(default: on for bf16 on CPU)"),
        click.option("--compile/--no-compile", "compile", default=False, show_default=True,
                     help="the step through torch.compile: faster steps after a start-up compile (cached on disk); "
                          "pays off for long outputs"),
        click.option("--kv-layout", "kv_layout", type=click.Choice(["slot", "paged"]), default="slot", show_default=True,
                     help="the target's KV cache: one region per request, or blocks from a pool (memory follows "
                          "the tokens held)"),
        click.option("--cuda-graphs/--no-cuda-graphs", "cuda_graphs", default=None,
                     help="decode and verification steps replayed from CUDA graphs captured at start-up "
                          "(default: on with CUDA for Llama-family models on the slot layout, one rank)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def parse_kv(items: tuple[str, ...]) -> tuple[tuple[str, object], ...]:
    try:
        return registry.assignments(items)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@main.command()
@click.argument("prompt")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--raw", is_flag=True, help="do not apply the chat template")
@engine_options
def generate(prompt, max_tokens, temperature, top_p, top_k, seed, raw, model, dtype, weights, device, tp, draft, block_len,
             draft_options, deterministic, compile, kv_layout, cuda_graphs):
    """Generate a completion for PROMPT; the text goes to stdout, statistics to stderr."""
    _wait_policy("spin")  # the in-process engine owns the cores; before torch loads
    import time

    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig, cuda_graphs_default, deterministic_default

    if deterministic is None:
        deterministic = deterministic_default(dtype, device, model)
    from dspark.kernels.short_attention import attention_refusal

    if refusal := attention_refusal():
        raise click.UsageError(refusal)
    from dspark.models.int8_weights import int8_refusal

    if refusal := int8_refusal():  # a bad $DSPARK_INT8_KERNEL (the drafter's products)
        raise click.UsageError(refusal)
    if block_len is None:
        block_len = 4
        if weights == "q4":  # torch's int4 kernel costs a whole pass more from a verification's fifth row
            from dspark.models.loader import parse_dtype
            from dspark.models.q4 import q4_kernel

            try:
                block_len = 3 if q4_kernel(parse_dtype(dtype)) == "int4" else 4
            except ValueError as e:
                raise click.UsageError(str(e)) from e
    if cuda_graphs is None:
        cuda_graphs = cuda_graphs_default(device, model, kv_layout, deterministic, tp)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    try:
        runner = RunnerConfig(n_slots=2, max_seq=max(1024, max_tokens + 1024), deterministic=deterministic,
                              compile=compile, kv_layout=kv_layout, cuda_graphs=cuda_graphs)
    except ValueError as e:  # an unknown layout, CUDA graphs where they are not served
        raise click.ClickException(str(e)) from None
    spec = EngineSpec(
        model=model, dtype=dtype, weights=weights, device=device, tp=tp, draft=draft, block_len=block_len,
        runner=runner, draft_options=parse_kv(draft_options),
    )
    try:
        built = build_engine(spec)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if compile:
        click.echo(f"[step compiled in {built.engine.runner.compile_s:.1f}s]", err=True)
    graphs = built.engine.runner.graphs
    if graphs is not None and graphs.capture:
        click.echo(f"[{graphs.num_graphs} CUDA graphs captured in {built.engine.runner.graph_s:.1f}s]", err=True)
    try:
        tok = built.loaded.tokenizer
        ids = tok.encode(prompt) if raw else tok.encode_chat([{"role": "user", "content": prompt}])
        t0 = time.perf_counter()
        first = None
        seq = built.engine.add_request(ids, params)
        while built.engine.has_work:
            for out in built.engine.step():
                if first is None and out.new_token_ids:
                    first = time.perf_counter() - t0
                if out.text_delta:
                    click.echo(out.text_delta, nl=False)
        click.echo("")
        dt = time.perf_counter() - t0
        n = len(seq.output_ids)
        m = seq.metrics
        click.echo(
            f"[{n} tokens in {dt:.2f}s: {n / dt:.1f} tokens/s, first token {1000 * (first or 0):.0f} ms, "
            f"finish={seq.finish_reason}, draft={draft}" + (f", block={block_len}" if draft != "none" else "")
            + f", acceptance length={m.mean_acceptance_length:.2f}, "
            f"drafts={m.num_drafts}, accepted={m.num_accepted_tokens}/{m.num_draft_tokens}]",
            err=True,
        )
    finally:
        built.close()


if __name__ == "__main__":
    main()
