"""`dspark bench shard-load`: what each rank of a DeepSeek-V4 tensor / expert parallel group
reads and holds when it loads its own slice, against one process loading the whole model.

Each load runs in a fresh process (spawned), so its peak resident memory is its own: the
figure is the peak after the load minus the resident memory after the imports (torch, the
model code), i.e. what loading added.  Bytes read are the tensor bytes the loader asked the
files for (``ReadStats``); "held" is the bytes of the model's parameters and buffers.  No
process group is formed: a rank's load does not need one.

    dspark make-model --preset small --out /data/v4-small
    dspark bench shard-load --model /data/v4-small --tp 4 --dtype bf16
"""

from __future__ import annotations

import queue

import click

from bench.common import table, write_json


def _load(path: str, dtype: str, rank: int, world: int, out) -> None:
    """Child process: load one rank (or the whole model, world 1) and report what it cost."""
    import resource

    import torch

    from dspark.models.deepseek_v4_loader import deepseek_v4_config_from_hf, model_args
    from dspark.models.deepseek_v4_shards import build_rank_model
    from dspark.models.llama import Shard
    from dspark.models.loader import parse_dtype

    def rss_mb() -> float:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024

    import json
    from pathlib import Path

    torch.set_num_threads(1)
    raw = json.loads((Path(path) / "config.json").read_text())
    cfg = deepseek_v4_config_from_hf(raw)
    base = rss_mb()
    model, stats = build_rank_model(Path(path), cfg, model_args(cfg, "bench"), parse_dtype(dtype), "cpu",
                                    Shard(rank, world))  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    out.put({"rank": f"{rank} of {world}", "read_MB": stats.bytes_read / 1e6, "folder_MB": stats.bytes_total / 1e6,
             "held_MB": held / 1e6, "peak_added_MB": peak - base})  # fmt: skip


def _measure(path: str, dtype: str, rank: int, world: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_load, args=(path, dtype, rank, world, q))
    p.start()
    while True:
        try:
            row = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive():
                raise click.ClickException(f"loading rank {rank} of {world} failed (exit code {p.exitcode})") from None
    p.join()
    return row


@click.command()
@click.option("--model", "path", required=True, help="a DeepSeek-V4 folder (e.g. from `dspark make-model`)")
@click.option("--tp", "world", type=int, default=4, show_default=True, help="group size")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--json", "json_path", default=None, help="where to write the results")
def main(path, world, dtype, json_path):
    """Bytes read, bytes held and peak memory added per rank of a group vs the whole model."""
    import json
    from pathlib import Path

    from dspark.models.deepseek_v4_loader import deepseek_v4_config_from_hf, is_deepseek_v4
    from dspark.models.deepseek_v4_tp import check_group_size

    if not is_deepseek_v4(Path(path)):
        raise click.UsageError(f"{path} is not a DeepSeek-V4 folder (config.json model_type deepseek_v4)")
    try:  # a group size the shapes do not allow: refused here, in one line
        check_group_size(deepseek_v4_config_from_hf(json.loads((Path(path) / "config.json").read_text())), world)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    rows = [_measure(path, dtype, 0, 1)] + [_measure(path, dtype, r, world) for r in range(world)]
    cols = ["rank", "read_MB", "folder_MB", "held_MB", "peak_added_MB"]
    print(table(rows, cols))
    result = {"model": Path(path).name, "dtype": dtype, "tp": world, "rows": rows}
    out = write_json(json_path, "shard_load.json", result)
    print(f"wrote {out}")
