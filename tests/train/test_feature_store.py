"""The feature store's large fields are memory-mapped from one flat file per field: equal to the
shards concatenated, and rebuilt when the shards change."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dspark.train.features import load_feature_store


def _write_split(out_dir: Path, seq_counts: tuple[int, ...], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    shards = {}
    for i, n in enumerate(seq_counts):
        rows = 3 * n
        t = {"tokens": torch.randint(0, 100, (rows,), dtype=torch.int32, generator=g),
             "features": torch.randn(rows, 6, generator=g).bfloat16(),
             "final": torch.randn(rows, 4, generator=g).bfloat16(),
             "lse": torch.randn(rows, generator=g), "top1": torch.randint(0, 9, (rows,), dtype=torch.int32, generator=g),
             "offsets": torch.arange(0, rows + 1, 3), "prompt_lens": torch.ones(n, dtype=torch.long),
             "greedy": torch.ones(n, dtype=torch.bool)}
        name = f"shard_{i:04d}.safetensors"
        save_file(t, str(out_dir / name))
        shards[name] = t
    keys = {name: [f"{seed}-{name}-{j}" for j in range(len(t["prompt_lens"]))] for name, t in shards.items()}
    (out_dir / "index.json").write_text(json.dumps({"feature_layers": [0], "shards": keys}))
    return shards


def test_mapped_fields_equal_the_shards_and_follow_them(tmp_path: Path):
    shards = _write_split(tmp_path, (5, 7), seed=0)
    store = load_feature_store(tmp_path)
    for field in ("features", "final"):
        assert torch.equal(getattr(store, field), torch.cat([shards[k][field] for k in sorted(shards)]))
    assert (tmp_path / "features.bin").stat().st_size == store.features.numel() * 2
    assert store.starts.tolist()[:2] == [0, 3] and store.num_seqs == 12
    # Other responses in shards of the same names and sizes (a rebuilt split): written again.
    shards = _write_split(tmp_path, (5, 7), seed=1)
    store = load_feature_store(tmp_path)
    assert torch.equal(store.features, torch.cat([shards[k]["features"] for k in sorted(shards)]))
    assert torch.equal(store.final, torch.cat([shards[k]["final"] for k in sorted(shards)]))
