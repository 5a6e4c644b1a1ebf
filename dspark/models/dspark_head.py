"""The DSpark draft head: a block drafter conditioned on target features (paper, sections 2.2, 3.1, 3.2.1).

One draft step turns the target's context into ``G`` draft positions in a single non-causal pass:

    context   H_ctx = RMSNorm(W_c [h^(l1); ...; h^(lm)])      hidden states of chosen target layers
    inputs    x = [E(anchor), m, m, ..., m]                  anchor embedding + G-1 learned mask vectors
    layers    each draft layer attends over [K_i H_ctx ; K_i x]  ("KV injection", eq. 3): every block
              position sees all context positions *before* the anchor and the whole block
    base      U_k = LM_head(RMSNorm(h_k))                      the target's LM head, shared and frozen
    Markov    logits_k = U_k + W1[x_{k-1}] @ W2                low-rank transition bias (eq. 5)
              (DeepSpec's variants mix W1[x_{k-1}] with h_k first: a sigmoid gate, or a GRU-like
              state over the block; ``markov_kind``, computed in ``dspark.kernels.markov``)
    confidence c_k = sigmoid(w . [h_k ; W1[x_{k-1}]] + b)        P(x_k accepted | x_<k accepted) (eq. 7)

Position k (0-based) predicts the token after x_k, where x_0 is the anchor: the last token the target
emitted, not yet in its KV cache.  The target's embedding and LM head are borrowed (``bind_target``)
and never stored in the head's file.  Sequential temperature scaling (STS) of the confidences is a
per-position temperature on the confidence logit, kept in the config (``sts``).

Draft vocabulary: a head may draft over the N most frequent ids of the target's own outputs (an id
map ranked by frequency, ``dspark.train.vocab``) instead of all V.  Its output layer is then those N
rows of the target's LM head (gathered once, never stored) and W2 is N columns; W1 still covers the
full vocabulary, since the previous token can be any id.  Logits, q and W2 columns are indexed by
draft index n (0..N-1), whose vocabulary id is ``draft_ids[n]``.

Gemma 4 drafters (``decoder`` "gemma4", DeepSpec's Gemma4DSparkModel): the draft layers are
Gemma 4 blocks (``dspark.models.gemma_draft_layer``: sandwich norms, value norm, keys as values,
unscaled scores, GELU-tanh, a per-layer scalar) with RoPE on a share of the frequency pairs
(``rope_pairs``), the block inputs scaled by sqrt(D) as the target's embeddings are, and the base
logits soft-capped as the target's, U = c * tanh(LM_head(RMSNorm(h)) / c), before the Markov bias.

Shapes: B = requests (or training sequences), Q = block query positions (G at inference; anchors * G in
training), S = context positions, D = dim, r = Markov rank, V = vocabulary, N = draft vocabulary
(N = V without a map), M = ids in the map, W = the width of one feature layer (``feature_width``: D for
the Llama family, hc_mult * D for DeepSeek-V4, whose blocks output hc_mult hyper-connection streams).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dspark.kernels.short_attention import BlockSpans
from dspark.models.gemma_config import AttentionKind, embed_scale
from dspark.models.gemma_draft_layer import Gemma4DraftLayer
from dspark.models.int8_weights import BlockInt8Linear, Int8Linear, int8_supported
from dspark.models.llama import RMSNorm, apply_rope, rope_tables
from dspark.models.packing import (PackedLinear, matrix_dtype, matrix_rows, matrix_shape, pack_linears,
                                   packing_supported, whole_matrix)

HEADS_DIR = Path(__file__).resolve().parent / "heads"
MARKOV_KINDS = ("vanilla", "gated", "rnn")
DECODERS = ("llama", "gemma4")  # draft layer forms (DSparkHeadConfig.decoder)


@dataclass(frozen=True)
class DSparkHeadConfig:
    """Architecture of a draft head and the target it belongs to; every field has a default."""

    target_name: str = "SmolLM2-135M-Instruct"  # target model this head was trained for
    dim: int = 576  # target hidden size = draft width
    vocab_size: int = 49152  # target vocabulary (shared embedding and LM head)
    feature_layers: tuple[int, ...] = (2, 8, 14, 20, 27)  # target blocks whose outputs form the context
    feature_width: int = 0  # width of one feature layer (ModelArgs.feature_width); 0 = dim
    n_layers: int = 2  # draft transformer blocks
    n_heads: int = 9  # query heads per draft layer
    n_kv_heads: int = 3  # key/value heads per draft layer
    head_dim: int = 64  # per-head width
    intermediate_size: int = 1536  # SwiGLU inner width of the draft layers
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 100000.0  # RoPE base of the draft layers (absolute positions, as the target)
    block_len: int = 7  # G the head was trained for (positions beyond reuse the last STS temperature)
    markov_rank: int = 128  # r of the Markov head W1 [V, r] @ W2 [r, V]; 0 = no Markov head (DFlash-style)
    init_from_layers: tuple[int, ...] = ()  # target blocks copied into the draft layers at init (training only)
    sts: dict = field(default_factory=dict)  # {"greedy": [T_1..T_G], "sampled": [...]} STS temperatures
    draft_vocab: int = 0  # N drafted ids: the first N of the id map (0 = the full vocabulary, no map needed)
    trained_vocab: int = 0  # W2 columns: 0 = all V ids in id order; N = the map's first N ids (reduced training)
    vocab_map: dict = field(default_factory=dict)  # {"size": M, "sha256": ...} of <head>.vocab.safetensors; {} = none
    qk_norm: bool = False  # RMSNorm of every query and key head before RoPE (DeepSpec's Qwen3 drafters)
    markov_kind: str = "vanilla"  # Markov head: "vanilla" W1[x] W2, "gated" or "rnn" (DeepSpec's variants, eq. below)
    decoder: str = "llama"  # draft layer form: "llama" (pre-norm SwiGLU) or "gemma4" (Gemma 4 blocks, see above)
    k_eq_v: bool = False  # gemma4: no value projection, the values are the key projection's output
    rope_pairs: int = 0  # frequency pairs that rotate (Gemma's proportional RoPE); 0 = all head_dim / 2
    rope_factor: float = 1.0  # divides every RoPE frequency
    logit_softcap: float = 0.0  # base logits -> c * tanh(U / c) with c = logit_softcap; 0 = none

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DSparkHeadConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("feature_layers", "init_from_layers"):
            if k in d:
                d[k] = tuple(int(x) for x in d[k])
        return cls(**d)

    def replace(self, **changes) -> "DSparkHeadConfig":
        return dataclasses.replace(self, **changes)

    def sts_temperatures(self, greedy: bool, n: int) -> list[float]:
        """Per-position STS temperatures for n positions (1.0 = uncalibrated)."""
        temps = list(self.sts.get("greedy" if greedy else "sampled", []))
        if not temps:
            return [1.0] * n
        return [temps[min(k, len(temps) - 1)] for k in range(n)]


class DraftLayer(nn.Module):
    """Llama-style block whose attention keys/values are [context ; block] (KV injection)."""

    def __init__(self, cfg: DSparkHeadConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.inter = cfg.intermediate_size
        self.kv_packed: PackedLinear | None = None  # the k | v rows packed for oneDNN (serving)
        # Optional QK-norm: per-head RMSNorm of queries and keys (context and block) before RoPE.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def _norm(self, norm: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else norm(x)

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of projected context features (eq. 3, H_ctx is already normalised).

        ctx: [*P, D]; cos/sin: [*P, 1, hd].  Returns k, v: [*P, nkv, hd].
        """
        if self.kv_packed is not None:
            kv = self.kv_packed(ctx)
        else:
            kv = F.linear(ctx, self.wqkv.weight[self.nh * self.hd :])  # the k | v rows: [2 nkv hd, D]
        k, v = kv.split(self.nkv * self.hd, dim=-1)
        k = apply_rope(self._norm(self.k_norm, k.unflatten(-1, (self.nkv, self.hd))), cos, sin)
        return k, v.unflatten(-1, (self.nkv, self.hd))

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask) -> torch.Tensor:
        """x: [B, Q, D]; cos/sin: [B, Q, 1, hd]; ctx_k/ctx_v: [B, nkv, S, hd]; mask: [B, 1, Q, S + Q] bool.

        ctx_k/ctx_v may also be lists of B per-request contexts [1, nkv, S_b, hd] (views of the
        drafter's cache, no mask): each request then attends in a call of its own, to the bits
        it gets alone (a masked batch rounds otherwise), while the products stay batched.  Or
        ctx_k the layer's (k, v) slot caches and ctx_v a ``BlockSpans``: the whole batch attends
        in one call of our kernel, in place, each request again to the bits it gets alone."""
        B, Q, _ = x.shape
        nh, nkv, hd = self.nh, self.nkv, self.hd
        q, k, v = self.wqkv(self.attention_norm(x)).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rope(self._norm(self.q_norm, q.view(B, Q, nh, hd)), cos, sin)  # [B, Q, nh, hd]
        k = apply_rope(self._norm(self.k_norm, k.view(B, Q, nkv, hd)), cos, sin)  # [B, Q, nkv, hd]
        v = v.view(B, Q, nkv, hd)
        if isinstance(ctx_v, BlockSpans):  # in place in the drafter's cache, ctx_k = (k, v) of this layer
            out = ctx_v.attend(q.reshape(B * Q, nh, hd), k.reshape(B * Q, nkv, hd), v.reshape(B * Q, nkv, hd),
                               ctx_k[0], ctx_k[1], nh // nkv, hd**-0.5)
            h = x + self.wo(out.view(B, Q, nh * hd))
            gate, up = self.w13(self.ffn_norm(h)).split(self.inter, dim=-1)
            return h + self.w2(F.silu(gate) * up)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, Q, hd]
        if isinstance(ctx_k, (list, tuple)):
            out = torch.cat([
                F.scaled_dot_product_attention(q[b : b + 1], torch.cat([ctx_k[b], k[b : b + 1]], dim=2),
                                               torch.cat([ctx_v[b], v[b : b + 1]], dim=2), enable_gqa=True)
                for b in range(B)])
        else:
            keys = torch.cat([ctx_k, k], dim=2)  # [B, nkv, S + Q, hd]
            values = torch.cat([ctx_v, v], dim=2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # [B, nh, Q, hd]
        h = x + self.wo(out.transpose(1, 2).reshape(B, Q, nh * hd))
        gate, up = self.w13(self.ffn_norm(h)).split(self.inter, dim=-1)
        return h + self.w2(F.silu(gate) * up)


class DSparkHead(nn.Module):
    """Trainable part of the drafter; call :meth:`bind_target` before use."""

    def __init__(self, cfg: DSparkHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, m = cfg.dim, len(cfg.feature_layers)
        self.fc = nn.Linear(m * (cfg.feature_width or D), D, bias=False)  # W_c of eq. 2: [D, m W]
        self.ctx_norm = RMSNorm(D, cfg.norm_eps)
        if cfg.decoder not in DECODERS:
            raise ValueError(f"decoder {cfg.decoder!r}: expected one of {', '.join(DECODERS)}")
        layer = Gemma4DraftLayer if cfg.decoder == "gemma4" else DraftLayer
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(D))
        r = cfg.markov_rank
        if r > 0:
            self.markov_w1 = nn.Parameter(torch.zeros(cfg.vocab_size, r))  # W1: previous-token embedding
            self.markov_w2 = nn.Parameter(torch.empty(r, cfg.trained_vocab or cfg.vocab_size))  # W2: logit projection
        if cfg.markov_kind not in MARKOV_KINDS:
            raise ValueError(f"markov_kind {cfg.markov_kind!r}: expected one of {', '.join(MARKOV_KINDS)}")
        if cfg.markov_kind != "vanilla" and r == 0:
            raise ValueError(f"markov_kind {cfg.markov_kind!r} needs markov_rank > 0")
        # The variants' mixing layer (``dspark.kernels.markov.MarkovMix``): gated [r, D + r], rnn [3r, 2r + D].
        if cfg.markov_kind == "gated":
            self.markov_mix = nn.Linear(D + r, r)
        elif cfg.markov_kind == "rnn":
            self.markov_mix = nn.Linear(2 * r + D, 3 * r)
        self.confidence = nn.Linear(D + r, 1)
        # Borrowed from the target, frozen, deliberately not registered (not in state_dict).
        self._target: list = []
        # Frequency-ranked id map [M] (int64), set by load_head / the trainer; not in state_dict.
        self.vocab_ids: torch.Tensor | None = None
        # The drafted vocabulary (use_draft_vocab): ids [N], LM-head rows [N, D], W2 columns [r, N].
        self.draft_ids: torch.Tensor | None = None
        self._out_rows: torch.Tensor | None = None
        self._out_packed: PackedLinear | Int8Linear | None = None  # _out_rows prepared (pack_for_inference)
        self.rows_independent = False  # every context product row-invariant (``_to_int8`` on our AMX kernels)
        self._w2_cols: torch.Tensor | None = None
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # RoPE inverse frequencies per device (rope)

    # -- target weights ---------------------------------------------------------------------
    def bind_target(self, target: nn.Module) -> "DSparkHead":
        """Share the target's token embedding and LM head matrix (kept frozen, not saved)."""
        shape = matrix_shape(target.tok_embeddings)
        if shape != (self.cfg.vocab_size, self.cfg.dim):
            raise ValueError(f"target embedding {shape} does not match the head ({self.cfg.vocab_size}, {self.cfg.dim})")
        self._target = [target]
        if self.draft_ids is not None:
            self.use_draft_vocab(int(self.draft_ids.numel()))  # re-gather the rows of this target
        return self

    @property
    def draft_rows(self) -> torch.Tensor | None:
        """The target's LM-head rows of the drafted ids [N, D] (gathered once), or None."""
        return self._out_rows

    def use_draft_vocab(self, n: int) -> "DSparkHead":
        """Draft over the first ``n`` ids of the map (0 = the full vocabulary, today's path).

        Gathers the n LM-head rows of the bound target and, for a head trained over the full
        vocabulary, copies W2's columns of those ids; a head trained over N ids keeps its first n
        columns (n <= N).  Call after the head has its final device and dtype.
        """
        V, N_train = self.cfg.vocab_size, self.cfg.trained_vocab
        if n < 0 or n > V:
            raise ValueError(f"draft_vocab={n}: expected 0 (full vocabulary) or 1..{V}")
        if N_train and not 0 < n <= N_train:
            raise ValueError(f"draft_vocab={n}: this head was trained over {N_train} ids; choose 1..{N_train}")
        if n == 0:
            self.draft_ids = self._out_rows = self._out_packed = self._w2_cols = None
            return self
        if self.vocab_ids is None:
            raise ValueError(f"draft_vocab={n} needs the head's id map (<head>.vocab.safetensors), and this head has none")
        if n > self.vocab_ids.numel():
            raise ValueError(f"draft_vocab={n} exceeds the head's id map of {self.vocab_ids.numel()} ids")
        dev = self.mask_embedding.device
        ids = self.vocab_ids[:n].to(dev)  # [N]
        self.draft_ids = ids
        self._out_rows = matrix_rows(self._target[0].output, ids).contiguous() if self._target else None  # [N, D]
        self._out_packed = None
        if self.cfg.markov_rank == 0 or N_train:
            self._w2_cols = None  # W2 is indexed by draft index already (sliced in markov_w2_draft)
        else:
            self._w2_cols = self.markov_w2.detach()[:, ids].contiguous()  # [r, N]
        return self

    def pack_for_inference(self, weights: str = "float") -> int:
        """Serving only (frozen weights): prepare the draft layers, the context projection and the
        drafted LM-head rows for fast products on a CPU.  Returns how many matrices were prepared.

        ``weights="float"``: the head's own dtype, pre-packed for oneDNN as the target's own layers
        are (``models/packing.py``; bf16 on CPU, a no-op elsewhere), bit-identical products.
        ``weights="int8"``: the draft layers and the drafted LM-head rows held in int8 with a scale
        per row (``models/int8_weights.py``; a CPU with torch's quantized engine, whatever the
        head's dtype; elsewhere as ``"float"``): half the bytes each draft reads, products within
        int8 rounding of the float ones.  The context projection stays as with ``"float"``.

        Call after ``use_draft_vocab``; choosing another draft vocabulary drops the prepared rows."""
        if weights not in ("float", "int8"):
            raise ValueError(f"weights={weights!r}: expected 'float' or 'int8'")
        if weights == "int8" and int8_supported(self.mask_embedding.device) and not self._has_bias():
            return self._to_int8()
        if not packing_supported(self.mask_embedding.device, self.mask_embedding.dtype):
            return 0
        for layer in self.layers:  # context_kv multiplies by the k | v rows of wqkv alone
            layer.kv_packed = PackedLinear.of_matrix(layer.wqkv.weight[layer.nh * layer.hd :])
        count = pack_linears(self.layers) + len(self.layers)
        self.fc = PackedLinear(self.fc, keep_weight=True)
        if self._out_rows is not None:
            self._out_packed = PackedLinear.of_matrix(self._out_rows)
        return count + 1 + (self._out_rows is not None)

    def _has_bias(self) -> bool:
        return any(getattr(getattr(layer, name), "bias", None) is not None
                   for layer in self.layers for name in ("wqkv", "wo", "w13", "w2"))

    def _to_int8(self) -> int:
        """The draft layers and the drafted LM-head rows in int8.  The context projection keeps its
        input as it is: its input is the target's raw hidden states, whose few very large features
        would take most of the 8-bit range its input rows are quantised to (measured: in int8 it cost 5% of the hybrid's
        tokens per step on held-out prompts; these layers and rows cost nothing measurable).  On
        our AMX kernel its weights are 8-bit blocks of 32 (``BlockInt8Linear``), elsewhere it is
        packed in its float dtype.

        With our AMX kernels every product is row-invariant, and ``rows_independent`` says so:
        the drafter may then project several requests' context in one pass."""
        count = 0
        for layer in self.layers:
            layer.kv_packed = Int8Linear.of_matrix(layer.wqkv.weight[layer.nh * layer.hd :])
            for name in ("wqkv", "wo", "w13", "w2"):
                setattr(layer, name, Int8Linear.of_linear(getattr(layer, name)))
            count += 5
        if BlockInt8Linear.fits(self.fc):
            self.fc = BlockInt8Linear(self.fc)
            count += 1
        elif packing_supported(self.mask_embedding.device, self.mask_embedding.dtype):
            self.fc = PackedLinear(self.fc, keep_weight=True)
            count += 1
        if self._out_rows is not None:
            self._out_packed = Int8Linear.of_matrix(self._out_rows)
            count += 1
        self.rows_independent = isinstance(self.fc, BlockInt8Linear) and all(
            getattr(layer, name).row_invariant for layer in self.layers for name in ("kv_packed", "wqkv", "wo", "w13", "w2"))
        return count

    @property
    def markov_w2_draft(self) -> torch.Tensor:
        """W2 over the drafted vocabulary: [r, N] (the parameter itself when nothing is sliced)."""
        if self._w2_cols is not None:
            return self._w2_cols
        if self.draft_ids is not None and self.cfg.trained_vocab and self.draft_ids.numel() < self.cfg.trained_vocab:
            return self.markov_w2[:, : self.draft_ids.numel()]
        return self.markov_w2

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's embedding rows of ``ids``: [*ids.shape, D]."""
        return matrix_rows(self._target[0].tok_embeddings, ids)

    @property
    def embedding(self) -> torch.Tensor:
        """The target's whole embedding [V, D] (a copy if it is held only packed: for export)."""
        return whole_matrix(self._target[0].tok_embeddings)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The target's whole LM head [V, D] (a copy if it is held only packed: for export)."""
        return whole_matrix(self._target[0].output)

    # -- initialisation ---------------------------------------------------------------------
    def reset_parameters(self, target: nn.Module | None = None, seed: int = 0) -> None:
        """Fresh training init; optionally copy target blocks into the draft layers.

        With ``init_from_layers``, draft layer i starts as target block ``init_from_layers[i]`` and W_c
        starts as a selection of the last feature layer, so layer 0 first sees roughly the keys and
        values the target itself computes over the context.
        """
        g = torch.Generator().manual_seed(seed)
        cfg = self.cfg
        for p in self.parameters():
            if p.dim() >= 2:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[-1])))
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, RMSNorm):
                    mod.weight.fill_(1.0)
            for layer in self.layers:  # residual branches start small
                layer.wo.weight.mul_(0.1)
                layer.w2.weight.mul_(0.1)
            if cfg.markov_rank > 0:
                self.markov_w1.zero_()  # unseen previous tokens keep a zero bias
                self.markov_w2.copy_(torch.randn(self.markov_w2.shape, generator=g) * 0.02)
            self.confidence.weight.zero_()
            self.confidence.bias.fill_(1.0)
            if target is not None:
                emb = whole_matrix(target.tok_embeddings).float()
                self.mask_embedding.copy_(emb.mean(0))
                if cfg.init_from_layers:
                    if cfg.decoder != "llama":
                        raise ValueError(f"init_from_layers: copying target blocks into {cfg.decoder} draft layers "
                                         f"is not supported")
                    D = cfg.dim
                    self.fc.weight.zero_()
                    self.fc.weight[:, -D:] = torch.eye(D)
                    src = cfg.init_from_layers
                    self.ctx_norm.weight.copy_(target.layers[src[0]].attention_norm.weight.float())
                    for layer, i in zip(self.layers, src):
                        t = target.layers[i]
                        layer.wqkv.weight.copy_(t.attention.wqkv.weight.float())
                        layer.wo.weight.copy_(t.attention.wo.weight.float())
                        layer.w13.weight.copy_(t.feed_forward.w13.weight.float())
                        layer.w2.weight.copy_(t.feed_forward.w2.weight.float())
                        layer.attention_norm.weight.copy_(t.attention_norm.weight.float())
                        layer.ffn_norm.weight.copy_(t.ffn_norm.weight.float())
                    self.norm.weight.copy_(target.norm.weight.float())

    # -- pieces of the forward pass ----------------------------------------------------------
    def context(self, features: torch.Tensor) -> torch.Tensor:
        """H_ctx = RMSNorm(W_c features).  features: [*P, m W] -> [*P, D]."""
        return self.ctx_norm(self.fc(features.to(self.fc.weight.dtype)))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the draft layers at ``positions`` [*P] -> each [*P, 1, hd] (``llama.rope_tables``).

        The inverse frequencies are theta^(-2i/hd), formed on the positions' device; with
        ``rope_pairs`` or ``rope_factor`` they are those of the Gemma target's layer kind
        (``AttentionKind.inv_freq``: pairs past ``rope_pairs`` do not rotate).
        """
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:  # once per device: a draft step is small enough for this to show
            cfg, hd = self.cfg, self.cfg.head_dim
            if cfg.rope_pairs or cfg.rope_factor != 1.0:
                kind = AttentionKind(head_dim=hd, rope_theta=cfg.rope_theta, rope_pairs=cfg.rope_pairs or None,
                                     rope_factor=cfg.rope_factor)
                inv_freq = torch.tensor(kind.inv_freq(), dtype=torch.float64, device=positions.device)
            else:
                exponents = torch.arange(0, hd, 2, dtype=torch.float64, device=positions.device) / hd  # [hd/2]
                inv_freq = 1.0 / (cfg.rope_theta ** exponents)
            self._inv_freq[positions.device] = inv_freq
        return rope_tables(positions, inv_freq, dtype)

    def context_kv(self, ctx: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per draft layer (k, v) of the context.  ctx: [*P, D] from :meth:`context`; positions: [*P] -> each [*P, nkv, hd]."""
        cos, sin = self.rope(positions, ctx.dtype)
        return [layer.context_kv(ctx, cos, sin) for layer in self.layers]

    def block_inputs(self, anchor_ids: torch.Tensor, block_len: int) -> torch.Tensor:
        """[E(anchor), m, ..., m], times sqrt(D) for a gemma4 head.  anchor_ids: [*A] -> [*A, G, D]."""
        dtype = self.mask_embedding.dtype
        first = self.embed(anchor_ids).to(dtype).unsqueeze(-2)  # [*A, 1, D]
        masks = self.mask_embedding.expand(*anchor_ids.shape, block_len - 1, self.cfg.dim)
        x = torch.cat([first, masks], dim=-2)
        if self.cfg.decoder == "gemma4":  # as the target: the scale rounded to the dtype first
            x = x * torch.tensor(embed_scale(self.cfg.dim), dtype=dtype, device=x.device)
        return x

    def backbone(self, x, positions, ctx_kv, mask) -> torch.Tensor:
        """The parallel stage.  x: [B, Q, D]; positions: [B, Q]; ctx_kv: per layer (k, v) [B, nkv, S, hd];
        mask: [B, Q, S + Q] bool (True = attend; None = every query sees every key).  Returns
        normalised hidden states h: [B, Q, D]."""
        cos, sin = self.rope(positions, x.dtype)  # [B, Q, 1, hd]
        m = None if mask is None else mask.unsqueeze(1)  # [B, 1, Q, S + Q]
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, cos, sin, k, v, m)
        return self.norm(x)

    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """U = LM head(h), float32, soft-capped when ``logit_softcap``.  h: [*R, D] -> [*R, N]
        (N = V without a draft vocabulary).

        Full vocabulary: calls the target's own output layer, so a serving-side fast path (packed
        bf16 weights) serves the drafter too.  Draft vocabulary: the gathered rows only.
        """
        if self._out_packed is not None:
            logits = self._out_packed(h).float()
        elif self.draft_ids is not None:
            logits = F.linear(h.to(self._out_rows.dtype), self._out_rows).float()
        elif self.cfg.trained_vocab:
            raise ValueError(f"this head was trained over {self.cfg.trained_vocab} ids: set its id map and call use_draft_vocab")
        else:
            out = self._target[0].output
            logits = out(h.to(matrix_dtype(out))).float()
        cap = self.cfg.logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def markov_embedding(self, prev_ids: torch.Tensor) -> torch.Tensor:
        """W1[x_{k-1}]: [*R] -> [*R, r] (r = 0 without a Markov head)."""
        if self.cfg.markov_rank == 0:
            return self.mask_embedding.new_zeros(*prev_ids.shape, 0)
        return F.embedding(prev_ids, self.markov_w1)

    def markov_bias(self, prev_emb: torch.Tensor) -> torch.Tensor:
        """B(x_{k-1}, .) = W1[x_{k-1}] @ W2, float32.  prev_emb: [*R, r] -> [*R, N].

        The vanilla head only: the gated and RNN variants (served from DeepSpec checkpoints) also
        read h_k, and are computed by the drafter's kernel, never trained here.
        """
        if self.cfg.markov_kind != "vanilla":
            raise ValueError(f"markov_kind {self.cfg.markov_kind!r}: only the vanilla Markov head can be trained here")
        return (prev_emb @ self.markov_w2_draft).float()

    def confidence_logit(self, h: torch.Tensor, prev_emb: torch.Tensor) -> torch.Tensor:
        """z_k with c_k = sigmoid(z_k).  h: [*R, D], prev_emb: [*R, r] -> [*R] float32."""
        z = self.confidence(torch.cat([h, prev_emb.to(h.dtype)], dim=-1))
        return z.squeeze(-1).float()


def block_attention_mask(ctx_lens: torch.Tensor, anchors: torch.Tensor, block_len: int, ctx_size: int) -> torch.Tensor:
    """Mask of block queries over [context (ctx_size) ; blocks (A * G)] keys.

    ctx_lens: [B] valid context positions per row (unused padding beyond); anchors: [B, A] anchor
    positions (block a sees context positions < anchors[b, a], never later ones, and its own G
    positions in both directions).  Returns bool [B, A*G, ctx_size + A*G].

    Example (B=1, one anchor at 2, G=2, ctx_size=3):
        [[T, T, F, T, T],
         [T, T, F, T, T]]
    """
    B, A = anchors.shape
    dev = anchors.device
    kpos = torch.arange(ctx_size, device=dev)
    ctx = (kpos.view(1, 1, -1) < anchors.unsqueeze(-1)) & (kpos.view(1, 1, -1) < ctx_lens.view(-1, 1, 1))  # [B, A, S]
    ctx = ctx.unsqueeze(2).expand(B, A, block_len, ctx_size).reshape(B, A * block_len, ctx_size)
    blk = torch.arange(A, device=dev).repeat_interleave(block_len)  # [A G] block index of each row
    own = (blk.view(-1, 1) == blk.view(1, -1)).expand(B, -1, -1)  # [B, A G, A G]
    return torch.cat([ctx, own], dim=-1)


# ------------------------------------------------------------------------------------------------
# Files: <name>.safetensors (weights) + <name>.json (config) + <name>.vocab.safetensors (id map, when
# the head has one; its size and sha256 are in the JSON config); the target's weights are never stored.
# ------------------------------------------------------------------------------------------------
def vocab_map_path(path: str | Path) -> Path:
    """The id map stored next to a head: <name>.vocab.safetensors."""
    path = Path(path)
    return path.with_name(path.with_suffix(".safetensors").stem + ".vocab.safetensors")


def vocab_map_sha256(ids: torch.Tensor) -> str:
    """Content hash of an id map: sha256 of the ids as little-endian int32."""
    return hashlib.sha256(ids.to(torch.int32).cpu().contiguous().numpy().astype("<i4").tobytes()).hexdigest()


def write_vocab_map(path: str | Path, ids: torch.Tensor, counts: torch.Tensor | None = None) -> dict:
    """Write a ranked id map ``ids`` [M] (and optional per-rank counts [M]) as safetensors.

    Returns the record a head's config keeps: ``{"size": M, "sha256": ...}``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"ids": ids.to(torch.int32).cpu().contiguous()}
    if counts is not None:
        tensors["counts"] = counts.to(torch.int64).cpu().contiguous()
    record = {"size": int(ids.numel()), "sha256": vocab_map_sha256(ids)}
    save_file(tensors, str(path), metadata={"sha256": record["sha256"]})
    return record


def read_vocab_map(path: str | Path) -> torch.Tensor:
    """The ranked ids of an id map file: [M] int64."""
    from safetensors.torch import load_file

    return load_file(str(path))["ids"].long()


def check_vocab_map(ids: torch.Tensor, cfg: DSparkHeadConfig, name: str) -> None:
    """Refuse a map that does not belong to this head: one-line ValueError naming the problem."""
    rec, V = cfg.vocab_map, cfg.vocab_size
    if ids.dim() != 1 or ids.numel() != int(rec.get("size", -1)):
        raise ValueError(f"draft head {name}: id map has {ids.numel()} ids, the head's config says {rec.get('size')}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"draft head {name}: id map holds ids outside the vocabulary 0..{V - 1}")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"draft head {name}: id map repeats ids")
    if vocab_map_sha256(ids) != rec.get("sha256"):
        raise ValueError(f"draft head {name}: id map hash does not match the head's config (sha256 mismatch)")
    if cfg.trained_vocab > ids.numel():
        raise ValueError(f"draft head {name}: trained over {cfg.trained_vocab} ids but the map has {ids.numel()}")


def save_head(head: DSparkHead, path: str | Path, dtype: torch.dtype = torch.bfloat16, extra: dict | None = None) -> Path:
    """Write ``path`` (.safetensors), its config next to it (.json) and the id map when the head has one.

    Returns the weights path.
    """
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path))
    cfg = head.cfg
    if head.vocab_ids is not None:
        cfg = cfg.replace(vocab_map=write_vocab_map(vocab_map_path(path), head.vocab_ids))
    elif cfg.vocab_map or cfg.trained_vocab or cfg.draft_vocab:
        raise ValueError("the head's config names an id map, but the head has none to save")
    meta = {"config": cfg.to_json(), **(extra or {})}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_head_config(path: str | Path) -> tuple[DSparkHeadConfig, dict]:
    meta = json.loads(Path(path).with_suffix(".json").read_text())
    return DSparkHeadConfig.from_json(meta["config"]), meta


def load_head(path: str | Path, target: nn.Module, target_name: str | None = None,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              draft_vocab: int | None = None) -> DSparkHead:
    """Load a head and bind it to ``target``, checking that it was made for this target.

    Checks dim, vocabulary and that the feature layers exist; a differing ``target_name`` is only
    an error when both names are known and the shapes also disagree (renamed copies still load).
    The id map (when the config names one) must match the config's size and hash and hold distinct
    ids of the target's vocabulary.  ``draft_vocab``: N drafted ids (None = the config's
    ``draft_vocab``, or its ``trained_vocab``; 0 = the full vocabulary).
    """
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"draft head {path} not found")
    cfg, _ = read_head_config(path)
    args = target.args
    problems = []
    if cfg.dim != args.dim:
        problems.append(f"dim {cfg.dim} != target dim {args.dim}")
    elif (cfg.feature_width or cfg.dim) != args.feature_width:
        problems.append(f"feature_width {cfg.feature_width or cfg.dim} != the target's feature width {args.feature_width} "
                        f"({args.hc_mult} streams of {args.dim})")
    if cfg.vocab_size != args.vocab_size:
        problems.append(f"vocab {cfg.vocab_size} != target vocab {args.vocab_size}")
    bad = [i for i in cfg.feature_layers if not 0 <= i < args.n_layers]
    if bad:
        problems.append(f"feature layers {bad} outside the target's {args.n_layers} blocks")
    if problems:
        where = f" (head trained for {cfg.target_name}, target is {target_name})" if target_name else ""
        raise ValueError(f"draft head {path.name} does not fit the target{where}: " + "; ".join(problems))
    ids = None
    if cfg.vocab_map:
        vpath = vocab_map_path(path)
        if not vpath.exists():
            raise ValueError(f"draft head {path.name}: its id map {vpath.name} is missing")
        ids = read_vocab_map(vpath)
        check_vocab_map(ids, cfg, path.name)
    elif cfg.trained_vocab or cfg.draft_vocab:
        raise ValueError(f"draft head {path.name}: config asks for a draft vocabulary but names no id map")
    dtype = dtype or target.dtype
    device = device or target.device
    head = DSparkHead(cfg)
    state = load_file(str(path))
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"draft head {path.name}: missing={missing} unexpected={unexpected}")
    head = head.to(device=device, dtype=dtype).eval().requires_grad_(False).bind_target(target)
    head.vocab_ids = ids
    n = (cfg.draft_vocab or cfg.trained_vocab) if draft_vocab is None else draft_vocab
    return head.use_draft_vocab(n)


def default_head_path(target_name: str) -> Path:
    """The head shipped for a target model: dspark/models/heads/<name>.safetensors."""
    return HEADS_DIR / f"{target_name}.safetensors"


__all__ = [
    "DSparkHeadConfig", "DSparkHead", "DraftLayer", "DECODERS", "MARKOV_KINDS", "block_attention_mask",
    "save_head", "load_head", "read_head_config", "default_head_path", "HEADS_DIR",
    "vocab_map_path", "vocab_map_sha256", "write_vocab_map", "read_vocab_map", "check_vocab_map",
]
