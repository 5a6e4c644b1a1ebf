"""Draft vocabulary: the target's own output tokens, counted and ranked by frequency.

The DSpark head can draft over the N most frequent ids of what the *target itself* writes (its
greedy and sampled responses on training-split prompts, generated with our engine) instead of the
whole vocabulary: its output layer becomes N rows of the target's LM head and the Markov head's
W2 N columns, which is most of a drafted block's cost.  The ranking is the map from draft index
to vocabulary id; it ships with the head (``<head>.vocab.safetensors``, hash and size in the
head's JSON).

The ranking covers every id: ids seen in the responses by count (descending), then the unseen
ones by id, so any N in 1..V is a prefix of the same map.  Only training-split responses are
counted (held-out prompts never shape the map); coverage is measured on held-out greedy outputs.

    python -m dspark.train.vocab --config dspark/train/configs/smollm2-135m.json \
        --out runs/vocab --max-prompts 300 --max-new-tokens 128

Generation appends each finished response to ``<out>/responses.jsonl``, so an interrupted run
resumes where it stopped; ``--count-only`` ranks whatever is cached so far.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from dspark.models.dspark_head import write_vocab_map
from dspark.train.config import DataConfig

__all__ = ["count_tokens", "rank_ids", "rank_responses", "coverage", "attach_vocab_map", "main"]


def count_tokens(rows: list[dict], vocab_size: int) -> torch.Tensor:
    """Occurrences of each id in the rows' ``output_ids``.  Returns [V] int64.

    Example:
        >>> count_tokens([{"output_ids": [2, 2, 0]}], 4)
        tensor([1, 0, 2, 0])
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for r in rows:
        ids = torch.tensor(r["output_ids"], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def rank_ids(counts: torch.Tensor) -> torch.Tensor:
    """All ids by count, descending; ties (including unseen ids) by ascending id.  [V] -> [V] int64.

    Example:
        >>> rank_ids(torch.tensor([1, 0, 2, 0]))
        tensor([2, 0, 1, 3])
    """
    # A stable sort on -count keeps ascending id order inside each tie.
    return torch.sort(-counts, stable=True).indices


def coverage(ids: torch.Tensor, tokens: torch.Tensor, sizes: list[int]) -> dict[int, float]:
    """Share of ``tokens`` inside the first N ranked ids, for each N in ``sizes``.

    Example:
        >>> coverage(torch.tensor([2, 0, 1]), torch.tensor([2, 2, 1, 0]), [1, 2])
        {1: 0.5, 2: 0.75}
    """
    rank = torch.full((int(max(ids.max(), tokens.max())) + 1,), ids.numel(), dtype=torch.long)
    rank[ids] = torch.arange(ids.numel())
    r = rank[tokens]
    return {n: float((r < n).float().mean()) for n in sizes}


def _training_rows(rows: list[dict], cfg: DataConfig) -> list[dict]:
    """Rows of training-split prompts only, re-checked against the split hash."""
    from dspark.train.data import assign_split

    return [r for r in rows if r["split"] == "train" and assign_split(r["prompt_id"], cfg) == "train"]


def rank_responses(rows: list[dict], cfg: DataConfig, vocab_size: int, path: str | Path) -> dict:
    """Count the training-split responses among ``rows``, write the ranked map to ``path``.

    Returns the map's record (size, sha256) with the counts behind it.
    """
    train = _training_rows(rows, cfg)
    counts = count_tokens(train, vocab_size)
    ids = rank_ids(counts)
    record = write_vocab_map(path, ids, counts[ids])
    return {**record, "responses": len(train), "tokens": int(counts.sum()), "seen_ids": int((counts > 0).sum())}


def attach_vocab_map(head_path: str | Path, map_path: str | Path, draft_vocab: int, record: dict | None = None) -> Path:
    """Give an existing head an id map: copy it next to the head and record it in the head's JSON.

    ``draft_vocab``: the N the head drafts over by default (0 = full vocabulary).  Returns the
    copied map's path.  The loader checks the copy against the recorded size and hash.
    """
    import shutil

    from dspark.models.dspark_head import read_vocab_map, vocab_map_path, vocab_map_sha256

    head_path = Path(head_path).with_suffix(".safetensors")
    ids = read_vocab_map(map_path)
    dest = vocab_map_path(head_path)
    if Path(map_path).resolve() != dest.resolve():
        shutil.copyfile(map_path, dest)
    meta_file = head_path.with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    rec = {**(record or {}), "size": int(ids.numel()), "sha256": vocab_map_sha256(ids)}
    meta["config"]["vocab_map"] = rec
    meta["config"]["draft_vocab"] = int(draft_vocab)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return dest


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="training config (its data section: prompts, split, sampling)")
@click.option("--out", "out_dir", default="runs/vocab", show_default=True, type=click.Path(file_okay=False))
@click.option("--max-prompts", type=int, default=300, show_default=True, help="training-split prompts to answer")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--heldout-prompts", type=int, default=60, show_default=True,
              help="test-split prompts answered greedily for the coverage figure (0: skip)")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--count-only", is_flag=True, help="rank the responses cached so far, generate nothing")
@click.option("--attach", "attach_head", default=None, type=click.Path(dir_okay=False),
              help="also give this head (.safetensors) the map, drafting over --draft-vocab ids by default")
@click.option("--draft-vocab", type=int, default=0, show_default=True, help="N for --attach (0 = full vocabulary)")
def main(config_path, out_dir, max_prompts, max_new_tokens, heldout_prompts, threads, count_only, attach_head,
         draft_vocab):
    """Count the target's own output tokens on training prompts and write the frequency-ranked ids."""
    import dataclasses

    from dspark.train.config import TrainConfig
    from dspark.train.data import generate_responses, read_responses

    torch.set_num_threads(threads)
    cfg = TrainConfig.load(config_path)
    data = dataclasses.replace(cfg.data, max_new_tokens=max_new_tokens)
    out = Path(out_dir)
    train_file, test_file = out / "responses.jsonl", out / "heldout_greedy.jsonl"
    per_prompt = data.greedy_responses + data.sampled_responses
    if not count_only:
        generate_responses(data, train_file, model=cfg.model, splits=("train",), limit=max_prompts * per_prompt)
        if heldout_prompts:
            greedy_only = dataclasses.replace(data, greedy_responses=1, sampled_responses=0)
            generate_responses(greedy_only, test_file, model=cfg.model, splits=("test",), limit=heldout_prompts)
    from dspark.models.dspark_head import read_vocab_map

    record = rank_responses(read_responses(train_file), data, cfg.head.vocab_size, out / "vocab.safetensors")
    record.update({"max_new_tokens": max_new_tokens, "prompts": data.prompts, "split_seed": data.split_seed})
    ids = read_vocab_map(out / "vocab.safetensors")
    sizes = [1024, 2048, 4096, 8192, 16384, 32768, cfg.head.vocab_size]
    held = read_responses(test_file)
    if held:
        toks = torch.tensor([t for r in held for t in r["output_ids"]], dtype=torch.long)
        record["heldout_greedy"] = {"responses": len(held), "tokens": int(toks.numel()),
                                    "coverage": {str(n): round(c, 4) for n, c in coverage(ids, toks, sizes).items()}}
    (out / "vocab.json").write_text(json.dumps(record, indent=2) + "\n")
    click.echo(json.dumps(record, indent=2))
    if attach_head:
        keep = {k: record[k] for k in ("responses", "tokens", "seen_ids", "max_new_tokens", "prompts", "split_seed")}
        dest = attach_vocab_map(attach_head, out / "vocab.safetensors", draft_vocab, keep)
        click.echo(f"attached {dest} (draft_vocab={draft_vocab})")


if __name__ == "__main__":
    main()
