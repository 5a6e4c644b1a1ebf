"""Tensor and expert parallelism for the DeepSeek-V4 decoder, as a transformation of a built model.

Like :func:`dspark.models.tp.apply_tp` for the Llama family, ``apply_deepseek_v4_tp`` slices the
weights of a whole model in place for one rank of a group and installs the collectives; the
model itself stays single-device code that calls ``model.tp.all_reduce`` / ``gather_vocab``.

What each rank holds (world size w):

* attention: H / w query heads (rows of ``wq_b``, their sinks) and the output projection of
  those heads: whole output groups when w divides ``o_groups`` (rows of ``wo_a``, columns of
  ``wo_b``), or a column slice of one group when ``o_groups`` divides w.  The output is a
  partial sum over heads -> one all-reduce per layer.
* replicated: the query's low-rank input (``wq_a``, ``q_norm``: the whole latent feeds the
  indexer), the single shared key/value head (``wkv``, its norm; one head cannot be split),
  the compressors and the Lightning Indexer (they write the one KV state every head reads, and
  the indexer's top-k is a discrete choice: a sum split over ranks would round differently from
  one device and could flip a pick), the per-request state, the hyper-connection mixing (tiny,
  and it mixes whole hidden vectors), the norms, the embedding (a lookup needs no collective).
* MoE, expert parallel: each rank holds n_routed_experts / w consecutive experts.  The router
  (replicated, fp32) runs on every rank over every token, so the routing is the same
  everywhere; since the tokens are already replicated after the attention's all-reduce, a rank
  simply computes its own experts' tokens, and the combine is an all-reduce of the partial
  sums.  The shared expert is split like a dense MLP (w1 / w3 rows, w2 columns), and its
  partial sum rides in the same all-reduce: one per MoE layer.  An all-to-all dispatch would
  only pay off with tokens partitioned over the ranks (data-parallel attention), not here.
* LM head: vocab-parallel (rows of ``head``, zero-padded to a multiple of w), then all-gather.

Refused with a one-line error naming the field: a group size that does not divide the query
heads, the routed experts or the expert width, or that neither divides nor is divided by
``o_groups``.  Every rank reads the whole checkpoint and drops what it does not hold (no
sharded loading yet).  Gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dspark.models.deepseek_v4 import DeepseekV4Transformer
from dspark.models.deepseek_v4_config import DeepseekV4Config


def check_group_size(cfg: DeepseekV4Config, world_size: int) -> None:
    """Raise ValueError naming the first field that ``world_size`` ranks cannot split."""
    for field in ("num_attention_heads", "n_routed_experts", "moe_intermediate_size"):
        n = getattr(cfg, field)
        if n % world_size:
            raise ValueError(f"tensor / expert parallel size {world_size} must divide {field}={n}")
    g = cfg.o_groups
    if g % world_size and world_size % g:
        raise ValueError(f"tensor parallel size {world_size} must divide o_groups={g} or be a multiple of it")


def _part(w: torch.Tensor, dim: int, index: int, parts: int) -> nn.Parameter:
    """Slice ``index`` of ``parts`` equal slices along ``dim``, as its own (copied) parameter."""
    n = w.shape[dim] // parts
    return nn.Parameter(w.narrow(dim, index * n, n).clone(), requires_grad=False)


def _shard_attention(attn, rank: int, world: int) -> None:
    h, g = attn.n_heads, attn.o_groups
    attn.wq_b.weight = _part(attn.wq_b.weight, 0, rank, world)  # [H/w * D, q_lora]
    attn.attn_sink = _part(attn.attn_sink, 0, rank, world)  # [H/w]
    wo_a = attn.wo_a.weight.unflatten(0, (g, -1))  # [G, r, H*D/G]
    if g % world == 0:  # whole groups: G/w blocks of wo_a, their r columns of wo_b each
        attn.wo_a.weight = nn.Parameter(_part(wo_a, 0, rank, world).flatten(0, 1), requires_grad=False)
        attn.wo_b.weight = _part(attn.wo_b.weight, 1, rank, world)
        attn.o_groups = g // world
    else:  # w / G ranks per group: group rank // (w/G), a column slice of its block
        per = world // g
        group, part = divmod(rank, per)
        attn.wo_a.weight = _part(wo_a[group], 1, part, per)  # [r, H*D/w]
        attn.wo_b.weight = _part(attn.wo_b.weight, 1, group, g)  # [hidden, r]
        attn.o_groups = 1
    attn.n_heads = h // world


def _shard_moe(ffn, rank: int, world: int) -> None:
    e = ffn.experts_w13.shape[0]
    ffn.experts_w13 = _part(ffn.experts_w13, 0, rank, world)  # [E/w, 2I, hidden]
    ffn.experts_w2 = _part(ffn.experts_w2, 0, rank, world)  # [E/w, hidden, I]
    ffn.first_expert = rank * (e // world)
    s = ffn.shared_experts
    s.w1.weight, s.w3.weight = _part(s.w1.weight, 0, rank, world), _part(s.w3.weight, 0, rank, world)
    s.w2.weight = _part(s.w2.weight, 1, rank, world)


def apply_deepseek_v4_tp(
    model: DeepseekV4Transformer, rank: int, world_size: int, group: dist.ProcessGroup | None = None
) -> DeepseekV4Transformer:
    """Shard ``model`` in place for ``rank`` of ``world_size`` and install the collectives."""
    from dspark.models.tp import collectives, vocab_shard

    if world_size == 1:
        return model
    check_group_size(model.cfg, world_size)
    for block in model.layers:
        _shard_attention(block.attn, rank, world_size)
        _shard_moe(block.ffn, rank, world_size)
    vocab = model.cfg.vocab_size
    model.head.weight = nn.Parameter(vocab_shard(model.head.weight.detach(), rank, world_size), requires_grad=False)
    model.tp.all_reduce, model.tp.gather_vocab = collectives(group, world_size, vocab)
    model.tp.rank, model.tp.world_size = rank, world_size
    return model
