"""The Gemma 4 form of a DSpark draft layer (DeepSpec's ``Gemma4DSparkModel`` drafters).

The same KV injection as :class:`~dspark.models.dspark_head.DraftLayer` (keys and values over
[context ; block], the block non-causal), in the block of the Gemma 4 target
(:class:`~dspark.models.gemma.Gemma4Block`), with every draft layer a full-attention one:

    a = x + N_pa(Attn(N_in(x)))                       "sandwich" norms around attention
    y = (a + N_pf(MLP(N_ff(a)))) * s                  ... and the MLP; s: a per-layer scalar
    Attn: q = RoPE(N_q(W_q x)), k = RoPE(N_k(W_k u)), v = N(W_v u)   (u: context, then block)
          softmax(q k^T) v, unscaled scores (the q/k norms fix their size)
    MLP:  W_2 (gelu_tanh(W_gate y) * W_up y)

N_v has no weight.  With ``k_eq_v`` there is no W_v: the values are the key projection's output,
normalised without a weight (before the key norm and RoPE).  RoPE may rotate only a share of the
frequency pairs (Gemma's "proportional" RoPE, ``DSparkHeadConfig.rope_pairs``); the head makes
the tables.  The head also scales the input embeddings by sqrt(D) and soft-caps the base logits.

The EAGLE-3 Gemma 4 drafter (``dspark.models.eagle3_format``) uses the same layer with a wider
input (``in_dim`` 2 D: [N_in(embedding) ; normed hidden state]) through its pieces:
:meth:`Gemma4DraftLayer.project_qkv` and :meth:`Gemma4DraftLayer.finish`.

Shapes: B = requests, Q = block positions, S = context positions, D = dim, hd = head_dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dspark.models.llama import RMSNorm, apply_rope
from dspark.models.packing import PackedLinear

if TYPE_CHECKING:
    from dspark.models.dspark_head import DSparkHeadConfig
    from dspark.models.eagle3_format import Eagle3Config


class Gemma4DraftLayer(nn.Module):
    """A Gemma 4 block whose attention keys/values are [context ; block] (KV injection).

    Names follow :class:`~dspark.models.gemma.Gemma4Block`; ``wqkv`` holds q | k (| v) rows.
    """

    def __init__(self, cfg: "DSparkHeadConfig | Eagle3Config", in_dim: int | None = None) -> None:
        """``in_dim``: width of the projections' input (default ``cfg.dim``; 2 D for EAGLE-3)."""
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.k_eq_v = cfg.k_eq_v
        self.kv_projections = 1 if cfg.k_eq_v else 2
        self.eps = cfg.norm_eps
        self.wqkv = nn.Linear(in_dim or cfg.dim, (cfg.n_heads + self.kv_projections * cfg.n_kv_heads) * cfg.head_dim,
                              bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.inter = cfg.intermediate_size
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # [1], from the checkpoint
        self.kv_packed: PackedLinear | None = None  # the k (| v) rows packed for oneDNN (serving)

    def _keys_values(self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv: [*P, kv_projections nkv hd], the k (| v) projections -> k, v: [*P, nkv, hd]."""
        k = kv[..., : self.nkv * self.hd].unflatten(-1, (self.nkv, self.hd))
        v = k if self.k_eq_v else kv[..., self.nkv * self.hd :].unflatten(-1, (self.nkv, self.hd))
        v = F.rms_norm(v, (self.hd,), None, self.eps)  # values: per head, no weight
        return apply_rope(self.k_norm(k), cos, sin), v

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of projected context features.  ctx: [*P, D]; cos/sin: [*P, 1, hd] -> each [*P, nkv, hd]."""
        if self.kv_packed is not None:
            kv = self.kv_packed(ctx)
        else:
            kv = F.linear(ctx, self.wqkv.weight[self.nh * self.hd :])  # the k (| v) rows
        return self._keys_values(kv, cos, sin)

    def project_qkv(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [*P, nh, hd] and keys, values [*P, nkv, hd] of normalised inputs u [*P, in_dim]
        (normed, keys and queries rotated by cos/sin [*P, 1, hd])."""
        nh, hd = self.nh, self.hd
        qkv = self.wqkv(u)
        q = apply_rope(self.q_norm(qkv[..., : nh * hd].unflatten(-1, (nh, hd))), cos, sin)
        k, v = self._keys_values(qkv[..., nh * hd :], cos, sin)
        return q, k, v

    def attention(self, x, cos, sin, ctx_k, ctx_v, mask) -> torch.Tensor:
        """x: [B, Q, D] (normalised); cos/sin: [B, Q, 1, hd]; ctx_k/ctx_v: [B, nkv, S, hd] -> [B, Q, D]."""
        B, Q, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)  # [B, Q, nh | nkv, hd]
        keys = torch.cat([ctx_k, k.transpose(1, 2)], dim=2)  # [B, nkv, S + Q, hd]
        values = torch.cat([ctx_v, v.transpose(1, 2)], dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=1.0,
                                             enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, Q, self.nh * self.hd))

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The block after attention: residual x [*P, D], attention output attn [*P, D] (after wo)."""
        h = x + self.post_attention_norm(attn)
        gate, up = self.w13(self.ffn_norm(h)).split(self.inter, dim=-1)
        h = h + self.post_ffn_norm(self.w2(F.gelu(gate, approximate="tanh") * up))
        return h * self.layer_scalar

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask) -> torch.Tensor:
        """x: [B, Q, D]; cos/sin: [B, Q, 1, hd]; ctx_k/ctx_v: [B, nkv, S, hd]; mask: [B, 1, Q, S + Q] bool."""
        return self.finish(x, self.attention(self.attention_norm(x), cos, sin, ctx_k, ctx_v, mask))


__all__ = ["Gemma4DraftLayer"]
