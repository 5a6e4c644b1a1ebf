"""`dspark make-model`: write a random-weight model folder of a supported family.

The family registry (``HF_FAMILIES``, its ``random_writer``) says which families can be written;
each writer owns its presets and refuses an unknown one with a one-line ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path

import click

from dspark.models.config import HF_FAMILIES


def writable_families() -> list[str]:
    """Families whose registry entry names a random-folder writer."""
    return sorted(name for name, fam in HF_FAMILIES.items() if fam.random_writer)


@click.command("make-model")
@click.option("--family", default="deepseek_v4", show_default=True, help="model_type of the folder to write")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder to create (absent or empty)")
@click.option("--preset", default="tiny", show_default=True, help="size: tiny (tests, demos) or small (benchmarks)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random weights")
@click.option("--mtp", is_flag=True, help="also write the next-n (MTP) layer under mtp.0.* (for --draft mtp)")
@click.option("--dtype", default="bf16", show_default=True, help="storage dtype of the float tensors: bf16 or fp32")
def make_model(family, out, preset, seed, mtp, dtype):
    """Write a random-weight HF-format model folder (config.json, safetensors, tokenizer)."""
    import importlib
    import time

    import torch

    if family not in writable_families():
        raise click.ClickException(f"--family {family!r}: no random writer (one of {', '.join(writable_families())})")
    stored = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in stored:
        raise click.ClickException(f"--dtype {dtype!r} is not one of {', '.join(stored)}")
    module, attr = HF_FAMILIES[family].random_writer.split(":")
    write = getattr(importlib.import_module(module), attr)
    t0 = time.perf_counter()
    try:
        path = write(out, preset=preset, seed=seed, mtp=mtp, dtype=stored[dtype])
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    click.echo(f"wrote {family} preset {preset} (seed {seed}{', with MTP' if mtp else ''}) to {path}: "
               f"{size:.1f} MiB in {time.perf_counter() - t0:.1f}s")  # fmt: skip
