"""Tensor parallelism as a transformation of a built model (gpt-fast style).

``apply_tp`` shards, in place:
  * column-parallel: the q / k / v heads of ``wqkv`` and the gate / up halves of ``w13``;
  * row-parallel: ``wo`` and ``w2`` (their outputs are partial sums -> all-reduce);
  * vocab-parallel LM head: each rank scores a slice of the vocabulary, then all-gather.
The embedding stays whole on every rank (a lookup is cheap and needs no collective), and so do
the per-head query / key norms of Qwen3 and Gemma 4: each rank holds whole heads, and every
head is normalised with the same weight of width head_dim.  Head counts and widths are read per
layer (Gemma 4's full-attention layers have their own).

Works with any torch.distributed backend: gloo on CPU, NCCL on CUDA.  A DeepSeek-V4 model is
handed to :func:`dspark.models.deepseek_v4_tp.apply_deepseek_v4_tp` (expert parallel MoE), which
only installs the collectives when the loader already read the rank's slices (``model.shard``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dspark.models.llama import Transformer


def _shard_rows(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    rows = w.shape[0]
    if rows % world:
        raise ValueError(f"{rows} rows do not split evenly over {world} ranks")
    n = rows // world
    return w[rank * n : (rank + 1) * n]


def _shard_cols(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return _shard_rows(w.t(), rank, world).t()


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def apply_tp(model: Transformer, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """Shard ``model`` for ``rank`` of ``world_size`` and install the collectives.

    Head counts must divide evenly (SmolLM2-135M: 9 query and 3 KV heads -> TP 1 or 3).
    """
    from dspark.models.deepseek_v4 import DeepseekV4Transformer

    if isinstance(model, DeepseekV4Transformer):
        from dspark.models.deepseek_v4_tp import apply_deepseek_v4_tp

        return apply_deepseek_v4_tp(model, rank, world_size, group)
    if world_size == 1:
        return model
    args = model.args
    for layer in model.layers:
        attn = layer.attention
        if attn.n_heads % world_size or attn.n_kv_heads % world_size:
            raise ValueError(f"tensor parallel size {world_size} must divide n_heads={attn.n_heads} and "
                             f"n_kv_heads={attn.n_kv_heads} (layer {attn.layer_id})")
    for layer in model.layers:
        attn = layer.attention
        hd = attn.head_dim
        # q | k | v (or q | k where the keys double as values), each split by whole heads.
        sizes = [attn.n_heads * hd] + [attn.n_kv_heads * hd] * attn.kv_projections
        w = torch.cat([_shard_rows(t, rank, world_size) for t in attn.wqkv.weight.split(sizes)])
        b = None
        if attn.wqkv.bias is not None:
            b = torch.cat([_shard_rows(t, rank, world_size) for t in attn.wqkv.bias.split(sizes)])
        _set(attn.wqkv, w, b)
        _set(attn.wo, _shard_cols(attn.wo.weight, rank, world_size))
        attn.n_heads //= world_size
        attn.n_kv_heads //= world_size

        ff = layer.feed_forward
        gate, up = ff.w13.weight.split([ff.inter, ff.inter])
        _set(ff.w13, torch.cat([_shard_rows(gate, rank, world_size), _shard_rows(up, rank, world_size)]))
        _set(ff.w2, _shard_cols(ff.w2.weight, rank, world_size))
        ff.inter //= world_size

    head = vocab_shard(model.output.weight.detach(), rank, world_size)
    model.output = nn.Linear(args.dim, head.shape[0], bias=False, device=head.device, dtype=head.dtype)
    _set(model.output, head)
    model.tp.all_reduce, model.tp.gather_vocab = collectives(group, world_size, args.vocab_size)
    model.tp.rank, model.tp.world_size = rank, world_size
    return model


def vocab_shard(head: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's rows of a vocab-parallel head [vocab, dim]: the vocabulary padded with zero rows
    to a multiple of world_size, then cut in equal slices (a copy)."""
    vocab = head.shape[0]
    per_rank = -(-vocab // world_size)
    if per_rank * world_size != vocab:
        head = torch.cat([head, head.new_zeros(per_rank * world_size - vocab, head.shape[1])])
    return head[rank * per_rank : (rank + 1) * per_rank].clone()


def collectives(group: dist.ProcessGroup | None, world_size: int, vocab: int):
    """(all_reduce, gather_vocab) over ``group``: a sum of partial results in place, and the
    vocab-parallel logits [R, vocab / world] of every rank joined into [R, vocab]."""

    # Collectives stay outside compiled graphs (the compiled step breaks its graph around them).
    @torch.compiler.disable
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=group)
        return x

    @torch.compiler.disable
    def gather_vocab(x: torch.Tensor) -> torch.Tensor:  # x: [R, per_rank] -> [R, vocab]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)[..., :vocab]

    return all_reduce, gather_vocab
