"""DeepSeek-V4 decoder over the engine's flattened variable-length steps (eager reference path).

The math is the phase-1 kernels (dspark/kernels/deepseek_v4_*.py); this file owns the weights,
the order the kernels compose in, and the per-request state (:mod:`deepseek_v4_state`).
Module and parameter names follow the published checkpoints (``layers.N.attn.wq_a.weight``,
``attn.compressor.ape``, ``ffn.gate.tid2eid`` ...), except the routed experts, which are
stacked per layer (``ffn.experts_w13`` [E, 2I, hidden] = w1 | w3, ``ffn.experts_w2``
[E, hidden, I]); :func:`dspark.models.deepseek_v4_loader.published_to_ours` maps a checkpoint.

A step carries several requests (each: slot, start position, q_len tokens).  Everything
position-wise (embeddings, hyper-connection mixing, norms, projections, MoE) runs on all T
tokens at once; the attention runs request by request (one loop iteration per request and
layer), reading and writing that request's state.  That loop is the reference path, not a
fast one: batching the attention over requests is later work (docs/DEEPSEEK_V4.md).

Precision: in bf16 the big matrices and the activations are bf16, while the parameters that
:func:`keeps_fp32` names (norm weights, hyper-connection mixing, attention sinks, compressor
position biases, the router) stay fp32, and the router logits are computed in fp32: they pick
experts (a discrete choice) and are cheap.  The kernels keep their own reductions in fp32
(norms, Sinkhorn, softmaxes, pooling, indexer scores, expert sums) and round once.

Tensor / expert parallelism is a transformation of the built model
(:func:`dspark.models.deepseek_v4_tp.apply_deepseek_v4_tp`); the model only calls ``self.tp``'s
collectives, which are identities on one device.

Shapes: T tokens in the step, N hyper-connection streams, D head_dim, H heads.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dspark.kernels import deepseek_v4_attention as att
from dspark.kernels import deepseek_v4_hyper as hyp
from dspark.kernels import deepseek_v4_moe as moe
from dspark.models.config import ModelArgs
from dspark.models.deepseek_v4_config import CSA, SLIDING, DeepseekV4Config
from dspark.models.deepseek_v4_state import Compression, DeepseekV4State, LayerState
from dspark.models.kv_cache import VarlenBatch
from dspark.models.llama import ForwardOutput, Numerics, Shard, TPHooks

# Parameters kept in fp32 in a bf16 / fp16 model: small, and each feeds a normalisation, a
# softmax or a discrete choice (norm weights, hyper-connection mixing, sinks, the compressors'
# position biases, router weight and correction bias).  Their checkpoint values are bf16 or
# fp32, so holding them in fp32 loses nothing.
_FP32 = re.compile(r"(^|\.)(attn_sink|ape|hc_\w+|\w*norm\.weight|gate\.weight|gate\.bias)$")
_ONE_DEVICE = TPHooks()


def keeps_fp32(name: str) -> bool:
    """Whether parameter ``name`` (this model's state-dict name) stays fp32 whatever the dtype.

    Example:
        >>> keeps_fp32("layers.0.attn.attn_sink"), keeps_fp32("layers.0.attn.compressor.wgate.weight")
        (True, False)
    """
    return _FP32.search(name) is not None


class _W(nn.Module):
    """A bare ``weight`` (the checkpoint's ``<name>.weight``); not an ``nn.Linear``, so the CPU
    packing pass leaves it alone and the kernels read the matrix directly."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


class _Norm(_W):
    """The final norm's weight, callable as RMSNorm (a draft head's trainer normalises with it)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__(width)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return att.rms_norm(x, self.weight, self.eps)


class _Head(_W):
    """The LM head matrix, callable as a bias-free linear layer (a draft head borrows it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class Compressor(nn.Module):
    """Token projections pooled into one entry per window (CSA: two overlapping series)."""

    def __init__(self, hidden: int, width: int, ratio: int, overlap: bool) -> None:
        super().__init__()
        proj = (2 if overlap else 1) * width
        self.wkv, self.wgate = _W(proj, hidden), _W(proj, hidden)
        self.ape = nn.Parameter(torch.empty(ratio, proj))  # position-in-window bias of the gate
        self.norm = _W(width)
        self.ratio, self.overlap = ratio, overlap

    def update(self, st: Compression, slot: int, start: int, x: torch.Tensor, inv_freq, eps: float) -> int:
        """Write the projections of positions [start, start + q) and close the windows that end
        there; returns the entry count after the step.  x: [q, hidden]."""
        kv, gate = x @ self.wkv.weight.T, x @ self.wgate.weight.T  # [q, proj] each
        m, end = self.ratio, start + x.shape[0]
        old, new = start // m, end // m
        if new > old:
            # Positions the closing windows pool: from the ring below start, the step's own above.
            first = max(0, (old - 1) * m) if self.overlap else old * m
            past = min(start, new * m) - first

            def span(ring, fresh):  # [new * m - first, proj]
                return torch.cat([ring.read(slot, first, first + past), fresh[: new * m - start]])

            kv_s, gate_s = span(st.kv, kv), span(st.gate, gate)
            prior = None
            if self.overlap and old > 0:  # window old-1's series a: the overlap tail
                d = kv_s.shape[-1] // 2
                prior = (kv_s[None, :m, :d], (gate_s[:m, :d] + self.ape[:, :d])[None])
                kv_s, gate_s = kv_s[m:], gate_s[m:]
            entries, _ = att.compress_kv(kv_s[None], gate_s[None], self.ape, self.norm.weight, inv_freq, eps,
                                         overlap=self.overlap, first_position=old * m, prior=prior)  # fmt: skip
            st.entries[slot, old:new] = entries[0].to(st.entries.dtype)
        st.kv.write(slot, start, kv)
        st.gate.write(slot, start, gate)
        return new


class Indexer(nn.Module):
    """Lightning Indexer of a CSA layer: scores compressed entries, keeps the top-k per query."""

    def __init__(self, cfg: DeepseekV4Config) -> None:
        super().__init__()
        self.wq_b = _W(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
        self.weights_proj = _W(cfg.index_n_heads, cfg.hidden_size)
        self.compressor = Compressor(cfg.hidden_size, cfg.index_head_dim, cfg.csa_compress_ratio, True)
        self.n_heads, self.topk = cfg.index_n_heads, cfg.index_topk


class Attention(nn.Module):
    """One V4 attention layer: sliding-window keys, plus compressed entries for CSA / HCA."""

    def __init__(self, cfg: DeepseekV4Config, kind: str, ratio: int) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.wq_a, self.q_norm = _W(cfg.q_lora_rank, h), _W(cfg.q_lora_rank)
        self.wq_b = _W(cfg.num_attention_heads * hd, cfg.q_lora_rank)
        self.wkv, self.norm = _W(hd, h), _W(hd)
        self.attn_sink = nn.Parameter(torch.empty(cfg.num_attention_heads))
        per_group = cfg.num_attention_heads * hd // cfg.o_groups
        self.wo_a = _W(cfg.o_groups * cfg.o_lora_rank, per_group)
        self.wo_b = _W(h, cfg.o_groups * cfg.o_lora_rank)
        self.compressor = None if kind == SLIDING else Compressor(h, hd, ratio, overlap=kind == CSA)
        self.indexer = Indexer(cfg) if kind == CSA else None
        self.kind, self.ratio, self.cfg = kind, ratio, cfg
        # Query heads and output groups held here (tensor parallelism holds a share of each).
        self.n_heads, self.o_groups = cfg.num_attention_heads, cfg.o_groups

    def forward(self, x: torch.Tensor, st: LayerState, slot: int, start: int, inv_freq: torch.Tensor) -> torch.Tensor:
        """One request's q new tokens at positions start..start+q-1.  x: [q, hidden] -> [q, hidden]
        (a partial sum over the heads held here, when sharded)."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        q_len = x.shape[0]
        pos = torch.arange(start, start + q_len, device=x.device)  # [q]
        cos, sin = att.rope_cos_sin(pos, inv_freq)  # [q, R/2]
        q, latent = att.low_rank_query(x, self.wq_a.weight, self.q_norm.weight, self.wq_b.weight,
                                       self.n_heads, eps)  # [q, H, D], [q, q_lora]  # fmt: skip
        q = att.apply_partial_rope(q, cos.unsqueeze(1), sin.unsqueeze(1))
        kv = att.apply_partial_rope(att.shared_kv(x, self.wkv.weight, self.norm.weight, eps), cos, sin)  # [q, D]
        # Sliding window: the W - 1 positions before the step, then the step's own keys.
        lo = max(0, start - (cfg.sliding_window - 1))
        keys = torch.cat([st.keys.read(slot, lo, start).to(kv.dtype), kv])  # [Tk, D]
        bias = att.sliding_window_bias(pos, torch.arange(lo, start + q_len, device=x.device), cfg.sliding_window)
        if self.compressor is not None:
            n = self.compressor.update(st.compressor, slot, start, x, inv_freq, eps)
            if n > 0:
                entries = st.compressor.entries[slot, :n].to(kv.dtype)  # [n, D]
                if self.indexer is None:  # HCA: every closed entry
                    entry_bias = att.compressed_causal_bias(pos, n, self.ratio)
                else:
                    entry_bias = self._selected(x, latent, st, slot, start, pos, inv_freq, n)
                keys = torch.cat([keys, entries])
                bias = torch.cat([bias, entry_bias.to(bias.device)], dim=-1)
            elif self.indexer is not None:  # the indexer's rings advance even before its first entry
                self.indexer.compressor.update(st.indexer, slot, start, x, inv_freq, eps)
        st.keys.write(slot, start, kv)
        o = att.sink_attention(q.transpose(0, 1)[None], keys[None], self.attn_sink, bias[None], cfg.head_dim**-0.5)
        o = att.apply_partial_rope(o[0].transpose(0, 1), cos.unsqueeze(1), sin.unsqueeze(1), inverse=True)  # [q, H, D]
        return att.grouped_output_projection(o[None], self.wo_a.weight, self.wo_b.weight, self.o_groups)[0]

    def _selected(self, x, latent, st: LayerState, slot, start, pos, inv_freq, n: int) -> torch.Tensor:
        """CSA: 0 at the entries the indexer picks for each query, -inf elsewhere: [q, n]."""
        ix = self.indexer
        n_ix = ix.compressor.update(st.indexer, slot, start, x, inv_freq, self.cfg.rms_norm_eps)
        assert n_ix == n  # both compressors close the same windows
        ikeys = st.indexer.entries[slot, :n]  # [n, c] rotated below
        iq = (latent @ ix.wq_b.weight.T).unflatten(-1, (ix.n_heads, -1))  # [q, Hi, c]
        cos, sin = att.rope_cos_sin(pos, inv_freq)  # [q, R/2]
        iq = att.apply_partial_rope(iq, cos.unsqueeze(1), sin.unsqueeze(1))
        scores = att.indexer_scores(iq[None], ikeys[None].to(iq.dtype), (x @ ix.weights_proj.weight.T)[None])
        picked = att.indexer_topk(scores, pos[None], self.ratio, ix.topk)  # [1, q, k]
        return att.selected_entries_bias(picked, n)[0]


class MoE(nn.Module):
    """Routed experts (learned top-k or token-id hash routing) plus one shared expert."""

    def __init__(self, cfg: DeepseekV4Config, kind: str) -> None:
        super().__init__()
        h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
        self.gate = _W(e, h)
        if kind == "hash_moe":
            self.gate.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        else:
            self.gate.bias = nn.Parameter(torch.empty(e))  # load-balancing correction of the choice only
        self.experts_w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.experts_w2 = nn.Parameter(torch.empty(e, h, i))
        self.shared_experts = nn.Module()
        self.shared_experts.w1, self.shared_experts.w2, self.shared_experts.w3 = _W(i, h), _W(h, i), _W(i, h)
        self.kind, self.cfg = kind, cfg
        self.first_expert = 0  # experts_w13[i] is expert first_expert + i (expert parallel: a range)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden]; tokens: [T] (hash routing reads them).  Returns [T, hidden]: a partial
        sum (this rank's experts and shared-expert slice) when sharded."""
        cfg = self.cfg
        scores = moe.router_scores(x.float() @ self.gate.weight.float().T, cfg.scoring_func)  # [T, E] fp32
        if self.kind == "hash_moe":
            w, e = moe.route_hash(scores, tokens, self.gate.tid2eid, cfg.routed_scaling_factor)
        else:
            w, e = moe.route_topk(scores, self.gate.bias, cfg.num_experts_per_tok, cfg.routed_scaling_factor)
        y = moe.moe_experts(x, e, w, self.experts_w13, self.experts_w2, cfg.swiglu_limit, self.first_expert)
        s = self.shared_experts
        return y + moe.swiglu_mlp(x, s.w1.weight, s.w3.weight, s.w2.weight, cfg.swiglu_limit)


class Block(nn.Module):
    """Attention and MoE, each between a hyper-connection collapse and expansion of the streams."""

    def __init__(self, cfg: DeepseekV4Config, index: int) -> None:
        super().__init__()
        kind = cfg.layer_types[index]
        self.attn = Attention(cfg, kind, cfg.compress_ratio_by_layer[index])
        self.ffn = MoE(cfg, cfg.mlp_layer_types[index])
        self.attn_norm, self.ffn_norm = _W(cfg.hidden_size), _W(cfg.hidden_size)
        n, flat = cfg.hc_mult, cfg.hc_mult * cfg.hidden_size
        mix = (2 + n) * n  # pre, post and the n x n comb logits
        for part in ("attn", "ffn"):
            setattr(self, f"hc_{part}_fn", nn.Parameter(torch.empty(mix, flat)))
            setattr(self, f"hc_{part}_base", nn.Parameter(torch.empty(mix)))
            setattr(self, f"hc_{part}_scale", nn.Parameter(torch.empty(3)))
        self.kind, self.cfg = kind, cfg

    def _mixed(self, part: str, streams: torch.Tensor, body) -> torch.Tensor:
        """streams [1, T, N, hidden] -> collapse, norm, body, expand."""
        cfg = self.cfg
        fn, base, scale = (getattr(self, f"hc_{part}_{k}") for k in ("fn", "base", "scale"))
        pre, post, comb = hyp.hyper_connection_weights(streams, fn, base, scale, cfg.hc_sinkhorn_iters, cfg.hc_eps,
                                                       cfg.rms_norm_eps)  # fmt: skip
        norm = getattr(self, f"{part}_norm").weight
        out = body(att.rms_norm(hyp.collapse_streams(streams, pre), norm, cfg.rms_norm_eps)[0])  # [T, hidden]
        return hyp.expand_streams(out[None], streams, post, comb)

    def forward(self, streams, tokens, state: LayerState, batch: VarlenBatch, inv_freq,
                tp: TPHooks = _ONE_DEVICE) -> torch.Tensor:  # fmt: skip
        """``tp``: the group's collectives; the attention's and the MoE's partial sums are each
        all-reduced once per block (identities on one device)."""

        def attention(h: torch.Tensor) -> torch.Tensor:  # h: [T, hidden], request by request
            outs, o = [], 0
            for slot, start, q in zip(batch.slots, batch.starts, batch.q_lens):
                outs.append(self.attn(h[o : o + q], state, slot, start, inv_freq))
                o += q
            return tp.all_reduce(torch.cat(outs))

        streams = self._mixed("attn", streams, attention)
        return self._mixed("ffn", streams, lambda h: tp.all_reduce(self.ffn(h, tokens)))


class DeepseekV4Transformer(nn.Module):
    """The V4 decoder with the runner's model interface (``make_cache``, ``forward`` over a
    :class:`VarlenBatch`, ``args``/``num``/``tp``).

    ``ring_slack``: the largest block (drafts + 1) that may be rolled back when the state uses
    rings; None (default) sizes the state to ``max_seq`` (see :mod:`deepseek_v4_state`).
    """

    def __init__(self, cfg: DeepseekV4Config, args: ModelArgs, ring_slack: int | None = None) -> None:
        super().__init__()
        self.cfg, self.args, self.ring_slack = cfg, args, ring_slack
        self.tp = TPHooks()  # collectives: identities here, set by apply_deepseek_v4_tp
        self.shard = Shard()  # the weights held: a rank's slices when loaded for a TP group
        self.num = Numerics()
        h = cfg.hidden_size
        self.embed = _W(cfg.vocab_size, h)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head_fn = nn.Parameter(torch.empty(cfg.hc_mult, cfg.hc_mult * h))
        self.hc_head_base = nn.Parameter(torch.empty(cfg.hc_mult))
        self.hc_head_scale = nn.Parameter(torch.empty(1))
        self.norm, self.head = _Norm(h, cfg.rms_norm_eps), _Head(cfg.vocab_size, h)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # The parts a DSpark draft head borrows, under the Llama family's names (``dspark_head``,
    # ``dspark.train``): the token embedding, and the final norm and LM head that follow the hyper
    # head (they read the collapsed hidden state, ``ForwardOutput.hidden``).
    @property
    def tok_embeddings(self) -> _W:
        return self.embed  # .weight [vocab, hidden]

    @property
    def output(self) -> _Head:
        return self.head

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head -> float32 logits over the vocabulary, as ``forward`` computes
        them.  h: [R, hidden] collapsed hidden states."""
        return self.tp.gather_vocab(self.head(self.norm(h))).float()

    def inv_freq(self, kind: str) -> torch.Tensor:
        """RoPE frequencies of a layer kind: main base for sliding layers, compress base + YaRN else."""
        cfg, r = self.cfg, self.cfg.qk_rope_head_dim
        if kind == SLIDING:
            return att.rope_inv_freq(r, cfg.rope_theta).to(self.device)
        y = cfg.compress_yarn
        if y is None:
            return att.rope_inv_freq(r, cfg.compress_rope_theta).to(self.device)
        return att.rope_inv_freq(r, cfg.compress_rope_theta, y.factor, y.original_max_position_embeddings,
                                 y.beta_fast, y.beta_slow).to(self.device)  # fmt: skip

    def make_cache(self, n_slots: int, max_seq: int) -> DeepseekV4State:
        return DeepseekV4State(self.cfg, n_slots, max_seq, self.dtype, self.device, slack=self.ring_slack)

    def enable_compile(self) -> None:
        raise ValueError("--compile is not supported for DeepSeek-V4 (eager reference path only)")

    def forward(
        self,
        tokens: torch.Tensor,
        cache: DeepseekV4State,
        batch: VarlenBatch,
        logits_index: torch.Tensor | None = None,
        feature_layers: tuple[int, ...] = (),
        n_layers: int | None = None,
        return_hidden: bool = False,
    ) -> ForwardOutput:
        """Run a varlen step: tokens [T] int64 in the batch's request order; logits of the rows
        in ``logits_index`` (None: all).  ``feature_layers``: blocks whose output hyper-connection
        streams are returned as features, [T, N * hidden] each (flattened, not collapsed),
        concatenated; the MTP drafter reads the last block's (the streams the MTP layer was
        trained on).  Early exit is refused."""
        bad = [i for i in feature_layers if not 0 <= i < self.cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"feature layer {bad[0]} is not a block of this model ({self.cfg.num_hidden_layers} blocks)")
        if n_layers is not None:
            raise ValueError("early exit (n_layers) is not supported for DeepSeek-V4")
        if self.num.row_invariant:
            raise ValueError("deterministic mode (row-invariant kernels) is not supported for DeepSeek-V4: "
                             "run with --no-deterministic")  # fmt: skip
        for slot, start, q in zip(batch.slots, batch.starts, batch.q_lens):
            cache.begin(slot, start, q)
        cfg = self.cfg
        x = self.embed.weight[tokens]  # [T, hidden]
        streams = x[None, :, None].expand(1, x.shape[0], cfg.hc_mult, x.shape[1]).contiguous()  # [1, T, N, hidden]
        freqs = {kind: self.inv_freq(kind) for kind in set(cfg.layer_types)}
        kept: dict[int, torch.Tensor] = {}
        for i, (block, state) in enumerate(zip(self.layers, cache.layers)):
            streams = block(streams, tokens, state, batch, freqs[block.kind], self.tp)
            if i in feature_layers:
                kept[i] = streams[0].flatten(1)  # [T, N * hidden]
        features = torch.cat([kept[i] for i in feature_layers], dim=-1) if feature_layers else None
        h = hyp.hyper_head(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, cfg.hc_eps,
                           cfg.rms_norm_eps)[0]  # [T, hidden]  # fmt: skip
        logits = None
        if logits_index is None or logits_index.numel() > 0:
            rows = h if logits_index is None else h[logits_index]
            logits = self.tp.gather_vocab(att.rms_norm(rows, self.norm.weight, cfg.rms_norm_eps) @ self.head.weight.T)
            logits = logits.float()  # [R, vocab]
        return ForwardOutput(logits=logits, features=features, hidden=h if return_hidden else None)
