"""Target features for training, cached on disk.

For every cached response (prompt + output tokens) we run the target once and keep, per token,
the hidden states of the head's feature layers and the final hidden state (before the final
norm), both in bf16.  Target distributions are *not* stored: the trainer recomputes them from the
final hidden state with the frozen LM head (one bf16 matmul, cheaper than reading V floats per
token from disk).  Two scalars per token make that cheap for a head trained over a draft
vocabulary S: ``lse``, the log-sum-exp of the target's logits over the whole vocabulary, and
``top1``, their argmax.  With them the trainer needs the target's logits over S only: p_t
restricted to S and renormalised is the softmax of those, and p_t(S) = exp(lse_S - lse).
Cost: (m W + D) * 2 + 8 bytes per token, W the width of one feature layer (``ModelArgs.
feature_width``): ~6.9 KB for SmolLM2-135M with m = 5 (W = D).

DeepSeek-V4 targets take the same path: their forward returns, per feature layer, the block's
output hyper-connection streams flattened (W = hc_mult * D), and as ``hidden`` the state the
hyper head collapses them to, which the final norm and LM head read (``lm_head``).

Layout: ``<dir>/<split>/shard_NNNN.safetensors`` holding ``tokens`` [N] int32, ``features``
[N, m W] bf16, ``final`` [N, D] bf16, ``lse`` [N] float32, ``top1`` [N] int32, ``offsets``
[n + 1] int64, ``prompt_lens`` [n] int64, and ``index.json`` listing finished shards (resume
skips them).  Shards written before ``lse`` existed load without it (the trainer then uses the
full vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dspark.models.kv_cache import make_batch


@dataclass
class FeatureStore:
    """All sequences of one split, concatenated (the large fields memory-mapped, see
    ``load_feature_store``).

    tokens [N] int64; features [N, m W] bf16 (W: one feature layer's width); final [N, D] bf16;
    starts/lengths/prompt_lens [n];
    greedy [n] bool (response generated at temperature 0).
    """

    tokens: torch.Tensor
    features: torch.Tensor
    final: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    prompt_lens: torch.Tensor
    greedy: torch.Tensor
    lse: torch.Tensor | None = None  # [N] float32 log-sum-exp of the target's logits (None: old cache)
    top1: torch.Tensor | None = None  # [N] int64 argmax of the target's logits

    @property
    def num_seqs(self) -> int:
        return int(self.starts.numel())

    def num_anchors(self) -> torch.Tensor:
        """Anchors per sequence: positions P..L-2 (the anchor needs at least one token after it)."""
        return (self.lengths - 1 - self.prompt_lens).clamp(min=0)


@torch.inference_mode()
def target_features(model, sequences: list[list[int]], feature_layers: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One target pass over several sequences: per sequence (features [L, m W], final hidden [L, D])."""
    lens = [len(s) for s in sequences]
    cache = model.make_cache(len(sequences), max(lens))
    slots = [cache.allocate() for _ in sequences]
    batch = make_batch(cache, slots, lens, model.args.n_rep)
    tokens = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=model.device)
    out = model(tokens, cache, batch, logits_index=tokens.new_zeros(0), feature_layers=feature_layers, return_hidden=True)
    res, o = [], 0
    for n in lens:
        res.append((out.features[o : o + n], out.hidden[o : o + n]))
        o += n
    return res


@torch.inference_mode()
def logit_stats(model, final: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp and argmax of the target's logits from stored final hidden states.

    final: [L, D] bf16 (exactly what the trainer reads back) -> lse [L] float32, top1 [L] int32.
    """
    lse, top1 = [], []
    for i in range(0, final.shape[0], chunk):
        logits = model.lm_head(final[i : i + chunk].to(model.device, model.dtype))  # [c, V] float32
        lse.append(torch.logsumexp(logits, dim=-1).cpu())
        top1.append(logits.argmax(-1).to(torch.int32).cpu())
    return torch.cat(lse), torch.cat(top1)


def build_feature_cache(model, rows: list[dict], feature_layers: tuple[int, ...], out_dir: Path,
                        shard_size: int = 64, batch_tokens: int = 4096) -> None:
    """Compute and store features for ``rows`` (responses of one split) under ``out_dir``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    index_file = out_dir / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {"feature_layers": list(feature_layers), "shards": {}}
    if tuple(index["feature_layers"]) != tuple(feature_layers):
        raise ValueError(f"{out_dir} holds features of layers {index['feature_layers']}, not {list(feature_layers)}")
    rows = sorted(rows, key=lambda r: r["key"])
    shards = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
    bar = tqdm(total=sum(len(r["prompt_ids"]) + len(r["output_ids"]) for r in rows), desc=f"features {out_dir.name}", unit="tok")
    for si, shard in enumerate(shards):
        name = f"shard_{si:04d}.safetensors"
        keys = [r["key"] for r in shard]
        n_tok = sum(len(r["prompt_ids"]) + len(r["output_ids"]) for r in shard)
        if index["shards"].get(name) == keys and (out_dir / name).exists():
            bar.update(n_tok)
            continue
        seqs = [r["prompt_ids"] + r["output_ids"] for r in shard]
        feats, finals, lses, top1s = [], [], [], []
        group: list[list[int]] = []
        for s in seqs + [None]:  # None flushes the last group
            if s is None or (group and sum(map(len, group)) + len(s) > batch_tokens):
                for f, h in target_features(model, group, feature_layers):
                    feats.append(f.to("cpu", torch.bfloat16))
                    finals.append(h.to("cpu", torch.bfloat16))
                    lse, top1 = logit_stats(model, finals[-1])
                    lses.append(lse)
                    top1s.append(top1)
                bar.update(sum(map(len, group)))
                group = []
            if s is not None:
                group.append(s)
        offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        tensors = {
            "tokens": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
            "features": torch.cat(feats).contiguous(),
            "final": torch.cat(finals).contiguous(),
            "lse": torch.cat(lses).contiguous(),
            "top1": torch.cat(top1s).contiguous(),
            "offsets": offsets,
            "prompt_lens": torch.tensor([len(r["prompt_ids"]) for r in shard]),
            "greedy": torch.tensor([r["temperature"] == 0 for r in shard]),
        }
        save_file(tensors, str(out_dir / name))
        index["shards"][name] = keys
        index_file.write_text(json.dumps(index))
    bar.close()


def load_feature_store(out_dir: Path) -> FeatureStore:
    """Every shard of a split as one store; the two large fields are memory-mapped.

    ``features`` and ``final`` (about 7 KB per token) are written once into one flat file per
    field next to the shards (rebuilt when the shard list changes) and mapped from it: their
    pages are read as training touches them and, being file-backed, can be dropped again by
    the kernel, so a split larger than memory still trains.  The small fields are in memory.
    """
    from safetensors.torch import load_file

    index = json.loads((out_dir / "index.json").read_text())
    names = sorted(index["shards"])
    toks, starts, lens, plens, greedy, lses, top1s = [], [], [], [], [], [], []
    shapes: dict[str, tuple[int, torch.dtype]] = {}
    base = 0
    for name in names:
        t = load_file(str(out_dir / name))
        off = t["offsets"]
        toks.append(t["tokens"].long())
        starts.append(off[:-1] + base)
        lens.append(off[1:] - off[:-1])
        plens.append(t["prompt_lens"])
        greedy.append(t["greedy"])
        lses.append(t.get("lse"))
        top1s.append(t.get("top1"))
        for field in _MAPPED:
            shapes[field] = (t[field].shape[1], t[field].dtype)
        base += int(off[-1])
    mapped = {field: _mapped_field(out_dir, index["shards"], field, base, *shapes[field]) for field in _MAPPED}
    stats = all(x is not None for x in lses)
    return FeatureStore(
        tokens=torch.cat(toks), features=mapped["features"], final=mapped["final"], starts=torch.cat(starts),
        lengths=torch.cat(lens), prompt_lens=torch.cat(plens), greedy=torch.cat(greedy),
        lse=torch.cat(lses) if stats else None, top1=torch.cat(top1s).long() if stats else None,
    )


_MAPPED = ("features", "final")


def _mapped_field(out_dir: Path, shards: dict, field: str, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, width] ``field`` of every shard in name order, from ``<field>.bin`` (written if
    missing or made from other shards: ``shards`` is the index's name -> response keys),
    memory-mapped."""
    from safetensors import safe_open

    names = sorted(shards)
    data, record = out_dir / f"{field}.bin", out_dir / f"{field}.bin.json"
    key = {"shards": shards, "rows": rows, "width": width, "dtype": str(dtype)}
    if not (data.exists() and record.exists() and json.loads(record.read_text()) == key):
        record.unlink(missing_ok=True)
        tmp = data.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            for name in names:  # one shard's field at a time
                with safe_open(str(out_dir / name), framework="pt") as sf:
                    fh.write(sf.get_tensor(field).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        tmp.replace(data)
        record.write_text(json.dumps(key))
    n = rows * width
    if n == 0:
        return torch.empty(rows, width, dtype=dtype)
    return torch.from_file(str(data), shared=False, size=n, dtype=dtype).view(rows, width)


__all__ = ["FeatureStore", "target_features", "build_feature_cache", "load_feature_store"]
