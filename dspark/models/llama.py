"""Llama-family decoder over a flattened variable-length batch (single device).

RMSNorm, RoPE (optionally llama3-scaled), grouped-query attention with optional Qwen2-style qkv
bias and optional Qwen3-style per-head RMSNorm of queries and keys, SwiGLU MLP, tied or untied
LM head.  Tensor parallelism is applied afterwards by :func:`dspark.models.tp.apply_tp`, which
shards the linear layers in place and installs the all-reduce hooks this file calls through
``self.tp``; the model itself knows nothing of ranks.

Shapes: T = number of new tokens in the step (all requests flattened), D = dim, hd = head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dspark.models.compiled import attention_op, compile_blocks, step_context, write_and_attend
from dspark.models.config import ModelArgs, rope_inv_freq
from dspark.models.kv_cache import KVCache, VarlenBatch
from dspark.models.packing import MIN_ROWS, PackedLinear
from dspark.models.q4 import Q4Linear, Q8Head


@dataclass
class TPHooks:
    """Collectives installed by ``apply_tp``; identity functions on a single device."""

    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    gather_vocab: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class Shard:
    """Which part of a tensor-parallel group's weights a model holds: rank of world_size
    (0 of 1: the whole model)."""

    rank: int = 0
    world_size: int = 1


@dataclass
class Numerics:
    """Rounding choices shared by every layer; the runner sets them (as ``apply_tp`` sets ``tp``).

    row_invariant: every row's result is bitwise independent of how many rows the step carries
    (the deterministic mode).  Measured on oneDNN bf16: with AVX512-BF16 a product of one row
    takes another kernel than a product of 2..1,024 rows (the 1,536-wide down projection
    rounds about 1 element in 7,000 differently); with AMX, products of 2..32 rows agree with
    each other, but from 33 rows on some rows round differently (about 1 row in 10).  So
    one-row products run as several identical rows (packed ones as ``packing.MIN_ROWS`` rows,
    others as two), and larger ones in blocks of ``ROW_BLOCK``.
    """

    ROW_BLOCK = 32

    row_invariant: bool = False
    compiled: bool = False  # the blocks run under torch.compile (dspark/models/compiled.py)
    attention = None  # the compiled blocks' attention op (compiled.attention_op), set with ``compiled``

    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` for x: [T, in]; with ``row_invariant``, products of 2..ROW_BLOCK rows."""
        if not self.row_invariant:
            return layer(x)
        if isinstance(layer, PackedLinear):  # blocks inside the (compiler-opaque) product, which
            return layer(x, row_block=self.ROW_BLOCK)  # also runs one row as MIN_ROWS >= 2 rows
        if isinstance(layer, (Q4Linear, Q8Head)):  # the block kernels' rows do not depend on M (dspark.models.q4)
            return layer(x)
        if x.shape[0] == 1:
            return self.linear(layer, torch.cat((x, x)))[:1]
        if x.shape[0] <= self.ROW_BLOCK:
            return layer(x)
        return torch.cat([layer(c) for c in x.split(self.ROW_BLOCK)])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (it accumulates in fp32 for bf16 inputs, like the reference code).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of rotate-half RoPE at ``positions`` (any shape P): each [*P, 1, hd] in ``dtype``.

    inv_freq: [hd/2] float64 inverse frequencies, on the device of ``positions``.  The angles
    are formed and rotated in float64, then rounded once to ``dtype``.

    Example (hd = 2, inverse frequency 1): position 0 -> cos 1, sin 0.
        >>> cos, sin = rope_tables(torch.tensor([0]), torch.ones(1, dtype=torch.float64), torch.float32)
        >>> cos.tolist(), sin.tolist()
        ([[[1.0, 1.0]]], [[[0.0, 0.0]]])
    """
    freqs = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [*P, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # [*P, 1, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE.  x: [T, H, hd]; cos/sin: [T, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, tp: TPHooks, num: Numerics) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.kv_projections = 2  # k and v follow q in wqkv (tensor parallelism splits each)
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        # One fused projection: three matmuls become one (q | k | v along the output axis).
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.attention_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Qwen3: weights of width hd shared by all heads, so tensor parallelism keeps them whole.
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.tp = tp
        self.num = num

    def forward(self, x, cos, sin, cache: KVCache, batch: VarlenBatch) -> torch.Tensor:
        T = x.shape[0]
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        qkv = self.num.linear(self.wqkv, x).view(T, nh + 2 * nkv, hd)  # [T, nh + 2 nkv, hd]
        qk = qkv[:, : nh + nkv]  # [T, nh + nkv, hd]
        if self.q_norm is not None:  # each head's vector normalised on its own, before rotation
            qk = torch.cat((self.q_norm(qk[:, :nh]), self.k_norm(qk[:, nh:])), dim=1)
        # q and k heads rotate together: one RoPE call instead of two.
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :nh], qk[:, nh:]  # [T, nh, hd], [T, nkv, hd]
        v = qkv[:, nh + nkv :]  # [T, nkv, hd]
        if self.num.compiled:  # opaque to the compiler; the cache and plan come from the step context
            out = self.num.attention(q.contiguous(), k.contiguous(), v.contiguous(), self.layer_id)
        else:  # [T, nh, hd]
            out = write_and_attend(q, k, v, cache.k[self.layer_id], cache.v[self.layer_id], batch)
        return self.tp.all_reduce(self.num.linear(self.wo, out.reshape(T, nh * hd)))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPHooks, num: Numerics) -> None:
        super().__init__()
        self.inter = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate | up fused
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)
        self.tp = tp
        self.num = num

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.num.linear(self.w13, x).split([self.inter, self.inter], dim=-1)
        return self.tp.all_reduce(self.num.linear(self.w2, F.silu(gate) * up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, tp: TPHooks, num: Numerics) -> None:
        super().__init__()
        self.attention = Attention(args, layer_id, tp, num)
        self.feed_forward = FeedForward(args, tp, num)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache, batch) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, batch)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [R, V] float32 for the requested rows
    features: torch.Tensor | None  # [T, len(feature_layers) * D] hidden states of chosen layers
    hidden: torch.Tensor | None = None  # [T, D] final hidden state (after the last block, pre-norm)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tp = TPHooks()
        self.num = Numerics()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i, self.tp, self.num) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._compiled_blocks = None

    def enable_compile(self) -> None:
        """Run the decoder blocks through ``torch.compile`` from now on (dspark/models/compiled.py)."""
        if self._compiled_blocks is None:
            self.num.compiled = True
            self.num.attention = attention_op(self.device)
            self._compiled_blocks = compile_blocks(self._blocks)

    # -- helpers --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        emb = self.tok_embeddings  # a PackedEmbedding has no plain matrix (packing.share_tied_matrix)
        return emb.device if emb.weight is None else emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        emb = self.tok_embeddings
        return emb.dtype if emb.weight is None else emb.weight.dtype

    def make_cache(self, n_slots: int, max_seq: int) -> KVCache:
        """A KV cache for this model (per-rank head count once tensor-parallel)."""
        attn = self.layers[0].attention
        return KVCache(len(self.layers), n_slots, attn.n_kv_heads, max_seq, attn.head_dim, self.dtype, self.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables gathered at positions: each [T, 1, hd] in the model dtype."""
        if self._rope_cache is None or self._rope_cache[0].device != positions.device:
            # Every position once, in float32, on the CPU; gathered per step.
            inv = torch.tensor(rope_inv_freq(self.args), dtype=torch.float64)
            cos, sin = rope_tables(torch.arange(self.args.max_position_embeddings), inv, torch.float32)  # [P, 1, hd]
            self._rope_cache = (cos.to(positions.device), sin.to(positions.device))
        cos, sin = self._rope_cache
        return cos[positions].to(self.dtype), sin[positions].to(self.dtype)

    # -- forward --------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        batch: VarlenBatch,
        logits_index: torch.Tensor | None = None,
        feature_layers: tuple[int, ...] = (),
        n_layers: int | None = None,
        return_hidden: bool = False,
    ) -> ForwardOutput:
        """Run the new tokens of a varlen batch through the decoder.

        tokens: [T] int64, flattened in the batch's request order.
        logits_index: [R] rows of T whose logits are wanted (None: all T, empty: none).
        feature_layers: indices of blocks whose *output* hidden states are returned, concatenated
          (the drafter's context features).  n_layers: stop after this many blocks (early exit).
        """
        x = self.tok_embeddings(tokens)  # [T, D]
        cos, sin = self.rope(batch.positions)
        stop = len(self.layers) if n_layers is None else n_layers
        if self._compiled_blocks is not None:
            rows = x.shape[0]
            run = self._compiled_rows(rows)
            if run > rows:  # the extra rows repeat the last token; the attention op skips them
                x, cos, sin = (torch.cat((t, t[-1:].expand(run - rows, *t.shape[1:]))) for t in (x, cos, sin))
            with step_context(cache, batch):
                outs = self._compiled_blocks(x, cos, sin, cache, batch, stop)
            if run > rows:
                outs = [o[:rows] for o in outs]
        else:
            outs = self._blocks(x, cos, sin, cache, batch, stop)
        x = outs[-1] if outs else x
        features = torch.cat([outs[i] for i in feature_layers], dim=-1) if feature_layers else None
        logits = None
        if logits_index is None or logits_index.numel() > 0:
            h = x if logits_index is None else x[logits_index]
            logits = self.lm_head(h)
        return ForwardOutput(logits=logits, features=features, hidden=x if return_hidden else None)

    def _compiled_rows(self, rows: int) -> int:
        """How many rows a compiled step of ``rows`` tokens runs.  Packed products of fewer than
        ``MIN_ROWS`` rows run as ``MIN_ROWS`` anyway (``packing.MIN_ROWS``), each padding and
        slicing its own input inside the op, 120 times per step for this model: padding the
        step once, before the blocks, does it once.  The rows are independent in every other
        op, so the real rows' bits are those of the padded products either way.  Row-invariant
        steps never run one row: the compiler specialises one-row steps into their own graph,
        which rounds differently from the graph of 2+ rows."""
        if rows < MIN_ROWS and isinstance(self.layers[0].attention.wqkv, PackedLinear):
            return MIN_ROWS
        return 2 if self.num.row_invariant and rows == 1 else rows

    def _blocks(self, x, cos, sin, cache, batch, stop: int) -> list[torch.Tensor]:
        """Blocks 0..stop-1; returns every block's output (the features are chosen from them,
        outside a compiled graph, so one graph serves every choice of feature layers)."""
        outs = []
        for i in range(stop):
            x = self.layers[i](x, cos, sin, cache, batch)
            outs.append(x)
        return outs

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head -> float32 logits over the full vocabulary.  h: [R, D]."""
        return self.tp.gather_vocab(self.num.linear(self.output, self.norm(h))).float()
