"""Tensor and expert parallelism for the DeepSeek-V4 decoder: which slice each rank holds.

The geometry is defined once, by parameter name (:func:`param_range`), and used two ways: the
loader (:mod:`dspark.models.deepseek_v4_shards`) reads only those slices from the checkpoint
into a model whose shapes :func:`shard_in_place` cut on the meta device, and
``apply_deepseek_v4_tp`` cuts a whole model that is already built (tests, a model in memory).
Either way ``apply_deepseek_v4_tp`` installs the collectives; the model itself stays
single-device code that calls ``model.tp.all_reduce`` / ``gather_vocab``.

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
``o_groups``.  Gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from dspark.models.deepseek_v4 import DeepseekV4Transformer
from dspark.models.deepseek_v4_config import DeepseekV4Config
from dspark.models.safetensors_slices import Range
from dspark.models.llama import Shard

_LAYER = re.compile(r"^layers\.\d+\.(attn\.(wq_b\.weight|attn_sink|wo_a\.weight|wo_b\.weight)|ffn\.(experts_w13|"
                    r"experts_w2|shared_experts\.w[123]\.weight))$")  # fmt: skip


def check_group_size(cfg: DeepseekV4Config, world_size: int) -> None:
    """Raise ValueError naming the first field that ``world_size`` ranks cannot split."""
    for field in ("num_attention_heads", "n_routed_experts", "moe_intermediate_size"):
        n = getattr(cfg, field)
        if n % world_size:
            raise ValueError(f"tensor / expert parallel size {world_size} must divide {field}={n}")
    g = cfg.o_groups
    if g % world_size and world_size % g:
        raise ValueError(f"tensor parallel size {world_size} must divide o_groups={g} or be a multiple of it")


def expert_range(cfg: DeepseekV4Config, shard: Shard) -> range:
    """The routed experts ``shard`` holds: E / w consecutive ones.

    Example (V4-Flash: 256 experts):
        >>> expert_range(DeepseekV4Config(), Shard(1, 8))
        range(32, 64)
    """
    n = cfg.n_routed_experts // shard.world_size
    return range(shard.rank * n, (shard.rank + 1) * n)


def vocab_rows(vocab: int, shard: Shard) -> tuple[int, int, int]:
    """(first, stop, per_rank): the real LM-head rows ``shard`` holds, and its padded row count
    (the vocabulary is padded with zero rows to a multiple of w)."""
    per = -(-vocab // shard.world_size)
    first = min(shard.rank * per, vocab)
    return first, min(first + per, vocab), per


def param_ranges(name: str, cfg: DeepseekV4Config, shard: Shard) -> tuple[Range, ...]:
    """The ranges of parameter ``name`` (this model's state-dict name) that ``shard`` holds, one
    per cut dimension; () for a replicated parameter.  The LM head's and experts' are
    :func:`vocab_rows` and :func:`expert_range` (a head range may need zero rows after it).

    Example (V4-Flash: 64 heads of 512 in 8 output groups of rank 1024, expert width 2048):
        >>> param_ranges("layers.0.attn.wq_b.weight", DeepseekV4Config(), Shard(1, 8))
        ((0, 4096, 8192),)
        >>> param_ranges("layers.0.attn.wo_a.weight", DeepseekV4Config(), Shard(9, 16))  # half of group 4
        ((0, 4096, 5120), (1, 2048, 4096))
        >>> param_ranges("layers.0.ffn.shared_experts.w2.weight", DeepseekV4Config(), Shard(1, 8))
        ((1, 256, 512),)
    """
    rank, w = shard.rank, shard.world_size
    if w == 1:
        return ()
    if name == "head.weight":
        first, stop, _ = vocab_rows(cfg.vocab_size, shard)
        return ((0, first, stop),)
    hit = _LAYER.match(name)
    if hit is None:
        return ()

    def part(dim: int, size: int, index: int, parts: int) -> Range:
        n = size // parts
        return (dim, index * n, (index + 1) * n)

    h, d, g, r, i = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank, cfg.moe_intermediate_size
    leaf = name.split(".", 3)[3]
    if leaf == "wq_b.weight":
        return (part(0, h * d, rank, w),)  # [H/w * D, q_lora]
    if leaf == "attn_sink":
        return (part(0, h, rank, w),)
    if leaf == "wo_a.weight":  # [G * r, H*D/G]
        if g % w == 0:  # G/w whole groups
            return (part(0, g * r, rank, w),)
        group, piece = divmod(rank, w // g)  # w/G ranks per group: a column slice of its block
        return ((0, group * r, (group + 1) * r), part(1, h * d // g, piece, w // g))
    if leaf == "wo_b.weight":  # [hidden, G * r]: the columns of the groups held
        return (part(1, g * r, rank, w),) if g % w == 0 else ((1, (rank // (w // g)) * r, (rank // (w // g) + 1) * r),)
    if leaf in ("experts_w13", "experts_w2"):
        e = expert_range(cfg, shard)
        return ((0, e.start, e.stop),)
    if leaf in ("shared_experts.w1.weight", "shared_experts.w3.weight"):
        return (part(0, i, rank, w),)
    return (part(1, i, rank, w),)  # shared_experts.w2 [hidden, I]


def cut(t: torch.Tensor, ranges: tuple[Range, ...]) -> torch.Tensor:
    """``t`` restricted to ``ranges`` (a view; meta tensors stay meta)."""
    for dim, a, b in ranges:
        t = t.narrow(dim, a, b - a)
    return t


def shard_in_place(model: DeepseekV4Transformer, shard: Shard) -> DeepseekV4Transformer:
    """Cut every sharded parameter of ``model`` to ``shard``'s slice (copies; free on the meta
    device, where the loader calls it before reading) and set the head and expert counts."""
    cfg, w = model.cfg, shard.world_size
    check_group_size(cfg, w)
    vocab = cfg.vocab_size
    for name, p in list(model.named_parameters()):
        ranges = param_ranges(name, cfg, shard)
        if not ranges:
            continue
        shape = list(p.shape)
        for dim, a, b in ranges:
            shape[dim] = b - a
        if name == "head.weight":  # padded with zero rows to the same count on every rank
            shape[0] = vocab_rows(vocab, shard)[2]
        if p.is_meta:  # a new meta tensor: meta views and copies would import torch's decompositions
            t = torch.empty(shape, dtype=p.dtype, device="meta")
        else:
            t = p.detach().new_zeros(shape)
            cut(t, tuple((dim, 0, b - a) for dim, a, b in ranges)).copy_(cut(p.detach(), ranges))
        owner, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        setattr(owner, leaf, nn.Parameter(t, requires_grad=False))
    for block in model.layers:
        block.attn.n_heads = cfg.num_attention_heads // w
        block.attn.o_groups = cfg.o_groups // w if cfg.o_groups % w == 0 else 1
        block.ffn.first_expert = expert_range(cfg, shard).start
    model.shard = shard
    return model


def apply_deepseek_v4_tp(
    model: DeepseekV4Transformer, rank: int, world_size: int, group: dist.ProcessGroup | None = None
) -> DeepseekV4Transformer:
    """Install the collectives for ``rank`` of ``world_size`` on ``model``, cutting its weights
    first unless the loader built it already sharded for that rank (``model.shard``)."""
    from dspark.models.tp import collectives

    shard = Shard(rank, world_size)
    if model.shard == shard:
        pass
    elif model.shard.world_size != 1:
        held = model.shard
        raise ValueError(f"the model holds rank {held.rank} of {held.world_size}, not {rank} of {world_size}")
    elif world_size == 1:
        return model
    else:
        shard_in_place(model, shard)
    model.tp.all_reduce, model.tp.gather_vocab = collectives(group, world_size, model.cfg.vocab_size)
    model.tp.rank, model.tp.world_size = rank, world_size
    return model
