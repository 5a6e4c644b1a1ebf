"""Gemma 4 dense text decoder over a flattened variable-length batch (single device).

Built from the Llama decoder's pieces (fused projections, RMSNorm, rotate-half RoPE, the varlen
cache attention, tensor-parallel hooks, the compiled step), with what Gemma 4 changes:

* token embeddings scaled by sqrt(D); logits soft-capped, c * tanh(logits / c), when configured;
* "sandwich" norms: RMSNorm before and after attention and before and after the MLP, and the
  block's output multiplied by a learned per-layer scalar;
* per-head RMSNorm of queries and keys (with weights) and of values (without), before RoPE;
  attention scores unscaled (scale 1.0: the norms fix the queries' size);
* GELU-tanh gated MLP;
* two kinds of attention layer (:class:`~dspark.models.gemma_config.AttentionKind`): sliding
  window layers and full layers, each with its own head width, key/value heads, RoPE (the full
  layers' "proportional" RoPE rotates only a share of the frequency pairs) and, for full
  layers, optionally values equal to the key projection's output (no v_proj).

Each kind gets its own attention plan per step (window, head grouping, scale), made from the
step's :class:`VarlenBatch`; the KV cache holds every position of every layer, with per-layer
shapes, and the sliding window is a mask.

Shapes: T = number of new tokens in the step, D = dim, hd = the layer kind's head_dim.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from dspark.kernels.attention import build_plan
from dspark.kernels.short_attention import kernel_for
from dspark.models.compiled import step_context, write_and_attend
from dspark.models.config import ModelArgs
from dspark.models.gemma_config import FULL, SLIDING, AttentionKind, embed_scale
from dspark.models.kv_cache import KVCache, VarlenBatch
from dspark.models.llama import (
    FeedForward, ForwardOutput, Numerics, RMSNorm, TPHooks, Transformer, apply_rope, rope_tables,
)


class Gemma4Attention(nn.Module):
    def __init__(self, args: ModelArgs, kind: AttentionKind, layer_id: int, tp: TPHooks, num: Numerics) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, kind.n_kv_heads, kind.head_dim
        self.k_eq_v = kind.k_eq_v
        self.kv_projections = 1 if kind.k_eq_v else 2  # q | k, or q | k | v, in wqkv
        self.eps = args.norm_eps
        hd = kind.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + self.kv_projections * kind.n_kv_heads) * hd, bias=False)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=False)
        self.q_norm = RMSNorm(hd, args.norm_eps)  # width hd: kept whole on every tensor-parallel rank
        self.k_norm = RMSNorm(hd, args.norm_eps)
        self.tp = tp
        self.num = num

    def forward(self, x, cos, sin, cache: KVCache, batch: VarlenBatch) -> torch.Tensor:
        T = x.shape[0]
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        qkv = self.num.linear(self.wqkv, x).view(T, nh + self.kv_projections * nkv, hd)
        k = qkv[:, nh : nh + nkv]  # [T, nkv, hd], before its norm
        v = k if self.k_eq_v else qkv[:, nh + nkv :]  # [T, nkv, hd]
        v = F.rms_norm(v, (hd,), None, self.eps)  # values: normalised per head, no weight
        # Each head normalised on its own, then q and k heads rotate together in one call.
        qk = apply_rope(torch.cat((self.q_norm(qkv[:, :nh]), self.k_norm(k)), dim=1), cos, sin)
        q, k = qk[:, :nh], qk[:, nh:]  # [T, nh, hd], [T, nkv, hd]
        if self.num.compiled:  # the step context holds this layer's batch (its kind's plan)
            out = torch.ops.dspark.cache_attention(q.contiguous(), k.contiguous(), v.contiguous(), self.layer_id)
        else:  # [T, nh, hd]
            out = write_and_attend(q, k, v, cache.k[self.layer_id], cache.v[self.layer_id], batch)
        return self.tp.all_reduce(self.num.linear(self.wo, out.reshape(T, nh * hd)))


class GeluFeedForward(FeedForward):
    """The gated MLP with GELU (tanh approximation) in place of SiLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.num.linear(self.w13, x).split([self.inter, self.inter], dim=-1)
        return self.tp.all_reduce(self.num.linear(self.w2, F.gelu(gate, approximate="tanh") * up))


class Gemma4Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, tp: TPHooks, num: Numerics) -> None:
        super().__init__()
        self.kind = args.gemma4.layer_types[layer_id]  # SLIDING or FULL
        self.attention = Gemma4Attention(args, args.gemma4.kind(layer_id), layer_id, tp, num)
        self.feed_forward = GeluFeedForward(args, tp, num)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.post_ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # [1], learned, in the checkpoint

    def forward(self, x, cos, sin, cache, batch) -> torch.Tensor:
        h = x + self.post_attention_norm(self.attention(self.attention_norm(x), cos, sin, cache, batch))
        h = h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))
        return h * self.layer_scalar


class Gemma4Transformer(Transformer):
    """The Gemma 4 decoder with the :class:`Transformer` interface (runner, TP, packing, drafter
    features and early exit work unchanged)."""

    def __init__(self, args: ModelArgs) -> None:
        nn.Module.__init__(self)
        if args.gemma4 is None:
            raise ValueError("gemma4: a Gemma 4 decoder needs ModelArgs.gemma4")
        self.args = args
        self.tp = TPHooks()
        self.num = Numerics()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Gemma4Block(args, i, self.tp, self.num) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_cache = None
        self._compiled_blocks = None
        kinds = {SLIDING: args.gemma4.sliding, FULL: args.gemma4.full}
        self._kinds = {name: kinds[name] for name in dict.fromkeys(args.gemma4.layer_types)}  # the kinds in use
        self._inv_freq: dict[str, torch.Tensor] = {}  # kind -> [hd/2] float64, made on first use (not on meta)

    def make_cache(self, n_slots: int, max_seq: int) -> KVCache:
        """A KV cache with each layer's (per-rank) key/value heads and head width."""
        shapes = [(layer.attention.n_kv_heads, layer.attention.head_dim) for layer in self.layers]
        first = shapes[0]
        return KVCache(len(self.layers), n_slots, first[0], max_seq, first[1], self.dtype, self.device,
                       layer_shapes=shapes)

    def rope_of(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of layer kind ``kind`` at ``positions``: each [T, 1, hd] in the model dtype.

        Computed per step (a table of every position would be 262k x 512 floats per kind)."""
        inv = self._inv_freq.get(kind)
        if inv is None or inv.device != positions.device:
            inv = self._inv_freq[kind] = torch.tensor(self._kinds[kind].inv_freq(), dtype=torch.float64,
                                                      device=positions.device)
        cos, sin = rope_tables(positions, inv, torch.float32)
        return cos.to(self.dtype), sin.to(self.dtype)

    def kind_batches(self, cache: KVCache, batch: VarlenBatch) -> dict[str, VarlenBatch]:
        """The step's batch once per layer kind, each with that kind's attention plan."""
        p = batch.plan
        device, dtype = batch.positions.device, cache.k[0].dtype
        return {name: dataclasses.replace(batch, short=None, plan=build_plan(
            batch.slots, batch.starts, batch.q_lens, self.args.n_heads // k.n_kv_heads, device,
            padded=p.padded, row_invariant=p.row_invariant, max_keys=cache.max_seq, window=k.window, scale=1.0,
            kernel=not p.padded and kernel_for(device, dtype, k.head_dim)))
            for name, k in self._kinds.items()}

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
        """As :meth:`Transformer.forward`."""
        scale = torch.tensor(embed_scale(self.args.dim), dtype=self.dtype)  # rounded to the model dtype first
        x = self.tok_embeddings(tokens) * scale  # [T, D]
        ropes = {name: self.rope_of(name, batch.positions) for name in self._kinds}
        batches = self.kind_batches(cache, batch)
        stop = len(self.layers) if n_layers is None else n_layers
        if self._compiled_blocks is not None:
            # One-row steps padded to two in the deterministic mode, as in Transformer.forward.
            pad = self.num.row_invariant and x.shape[0] == 1
            if pad:
                x = torch.cat((x, x))
                ropes = {n: (torch.cat((c, c)), torch.cat((s, s))) for n, (c, s) in ropes.items()}
            with step_context(cache, batch, [batches[layer.kind] for layer in self.layers]):
                outs = self._compiled_blocks(x, ropes, cache, batches, stop)
            if pad:
                outs = [o[:1] for o in outs]
        else:
            outs = self._blocks(x, ropes, cache, batches, stop)
        x = outs[-1] if outs else x
        features = torch.cat([outs[i] for i in feature_layers], dim=-1) if feature_layers else None
        logits = None
        if logits_index is None or logits_index.numel() > 0:
            logits = self.lm_head(x if logits_index is None else x[logits_index])
        return ForwardOutput(logits=logits, features=features, hidden=x if return_hidden else None)

    def _blocks(self, x, ropes, cache, batches, stop: int) -> list[torch.Tensor]:
        """Blocks 0..stop-1, each with its kind's RoPE tables and batch; every block's output."""
        outs = []
        for layer in self.layers[:stop]:
            cos, sin = ropes[layer.kind]
            x = layer(x, cos, sin, cache, batches[layer.kind])
            outs.append(x)
        return outs

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ soft-capping) -> float32 logits.  h: [R, D]."""
        logits = super().lm_head(h)
        cap = self.args.gemma4.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
