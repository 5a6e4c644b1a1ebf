"""The DSpark draft DeepSeek ships inside its V4 checkpoints (V4-Flash-DSpark, V4-Pro-DSpark).

A reading of the published format, not DeepSeek's reference code (which is not public): the
config fields and tensor names are established, the forward is the one public ports describe,
and every point the sources leave open is an option (:class:`V4DSparkOptions`), with the reading
we judge most likely as the default (docs/DEEPSEEK_V4.md, "DeepSeek-V4-Pro-DSpark").  A wrong
reading costs acceptance, never correctness: the verifier checks every draft.

The draft is ``num_nextn_predict_layers`` V4 blocks (``mtp.{0..S-1}.*``: sliding-window
attention with sinks, hyper-connections, MoE, no compressor) plus:

    feature   f_p = [mean_N h^(l1)_p ; ... ; mean_N h^(lm)_p]      target streams at the
              ``dspark_target_layer_ids`` (entering them, by default), averaged over the N streams
    context   main_p = RMSNorm_main_norm(main_proj f_p)               [hidden]   (mtp.0)
              key^s_p = RoPE_p(RMSNorm_kv_norm^s(wkv^s main_p))       [D] per stage s, last W positions
    block     [anchor, noise x (G - 1)] embedded, copied into the N streams, at positions L..L+G-1;
              in each stage every block query attends to the stage's context keys and all G block
              keys (not causal inside the block), with the stage's sinks
    output    x_k = collapse(streams_k) (the last stage's hc_head), U_k = head(RMSNorm_norm(x_k))
    Markov    logits_k = U_k + markov_w1[x_{k-1}] . markov_w2                      (vanilla head)
    confidence c_k = sigmoid(proj [x_k ; markov_w1[x_{k-1}]])

The embedding and LM head are the target's.  Keys are the values (V4's single KV head).

Shapes: B requests, G block positions, S stages, W window rows, N streams, D head_dim, m feature layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from dspark.kernels import deepseek_v4_attention as att
from dspark.kernels import deepseek_v4_hyper as hyp
from dspark.models.deepseek_v4 import Block, _W
from dspark.models.deepseek_v4_config import DeepseekV4Config

FEATURES = ("entering", "leaving")
COLLAPSES = ("hc_head", "mean")
CONFIDENCE_INPUTS = ("collapsed", "normed")
WINDOW_FEEDS = ("every", "last")


@dataclass(frozen=True)
class V4DSparkOptions:
    """The readings of the open points (docs/DEEPSEEK_V4.md); defaults = the likeliest reading."""

    query_norm: bool = True  # per-head RMS norm of the draft queries, as V4's own attention (off: V4.1's text)
    features: str = "entering"  # target streams entering the target layers (V4.1 reference) or leaving them
    collapse: str = "hc_head"  # last stage's streams -> x_k: its hc_head (V4 ships it) or their mean
    confidence_input: str = "collapsed"  # the confidence head reads x_k before the final norm, or after it
    window_feed: str = "every"  # every committed position enters the window, or only a step's last one
    experts_per_token: int = 0  # routed experts per draft token; 0: the target's num_experts_per_tok

    def __post_init__(self) -> None:
        for name, allowed in (("features", FEATURES), ("collapse", COLLAPSES),
                              ("confidence_input", CONFIDENCE_INPUTS), ("window_feed", WINDOW_FEEDS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"option {name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class V4DSparkConfig:
    """The draft's fields of a V4 ``config.json`` (``dspark_*``, ``num_nextn_predict_layers``)."""

    block_size: int  # G: the anchor plus G - 1 noise inputs, G drafts out
    markov_rank: int  # r of markov_w1 / markov_w2 [V, r]
    target_layer_ids: tuple[int, ...]  # target layers whose streams form the context feature
    noise_token_id: int  # the token embedded at the G - 1 positions after the anchor
    n_stages: int  # draft blocks, mtp.0 .. mtp.{S-1}
    window: int  # context positions each block sees (V4's sliding window, 128 in the release)


def read_v4_dspark_config(raw: dict, target: DeepseekV4Config) -> V4DSparkConfig:
    """The draft's config from a V4 ``config.json`` dict, checked against its target.

    Raises ValueError, one line naming the field, when a field is missing or does not fit.

    Example:
        >>> from dspark.models.deepseek_v4_config import deepseek_v4_config_from_hf
        >>> raw = {"model_type": "deepseek_v4", "num_hidden_layers": 4, "num_nextn_predict_layers": 3,
        ...        "dspark_block_size": 5, "dspark_markov_rank": 8, "dspark_target_layer_ids": [1, 2, 3],
        ...        "dspark_noise_token_id": 7}
        >>> read_v4_dspark_config(raw, deepseek_v4_config_from_hf(raw)).target_layer_ids
        (1, 2, 3)
    """
    missing = [k for k in ("dspark_block_size", "dspark_markov_rank", "dspark_target_layer_ids",
                           "dspark_noise_token_id") if raw.get(k) is None]  # fmt: skip
    if missing:
        raise ValueError(f"config.json has no {missing[0]}: not a V4 checkpoint with a DSpark draft")
    g, r, ids = int(raw["dspark_block_size"]), int(raw["dspark_markov_rank"]), raw["dspark_target_layer_ids"]
    n, vocab = target.num_hidden_layers, target.vocab_size
    if g < 1:
        raise ValueError(f"dspark_block_size {g}: must be at least 1")
    if r < 1:
        raise ValueError(f"dspark_markov_rank {r}: must be at least 1")
    if not isinstance(ids, list) or not ids or len(set(ids)) != len(ids):
        raise ValueError(f"dspark_target_layer_ids {ids!r}: expected distinct layer ids")
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"dspark_target_layer_ids: layer {bad[0]} is not a layer of the target ({n} layers)")
    noise = int(raw["dspark_noise_token_id"])
    if not 0 <= noise < vocab:
        raise ValueError(f"dspark_noise_token_id {noise} is outside the target's vocabulary ({vocab})")
    stages = int(raw.get("num_nextn_predict_layers", 0))
    if stages < 1:
        raise ValueError(f"num_nextn_predict_layers {stages}: the DSpark draft needs at least one block")
    return V4DSparkConfig(g, r, tuple(ids), noise, stages, target.sliding_window)


def feature_layers_of(cfg: V4DSparkConfig, opts: V4DSparkOptions) -> tuple[int, ...]:
    """The target blocks whose output streams the drafter needs: the streams *entering* layer l
    are block l - 1's output (layer 0's input, the embedding, is refused), *leaving* are block l's."""
    if opts.features == "leaving":
        return cfg.target_layer_ids
    if 0 in cfg.target_layer_ids:
        raise ValueError("dspark_target_layer_ids contains 0: the streams entering layer 0 are the embedding, "
                         "not a block output; serve with features=leaving")  # fmt: skip
    return tuple(i - 1 for i in cfg.target_layer_ids)


def stage_config(target: DeepseekV4Config, dcfg: V4DSparkConfig, n_experts: int, intermediate: int,
                 per_token: int) -> DeepseekV4Config:  # fmt: skip
    """The stages as a V4 decoder of S sliding-window blocks with learned top-k MoE of their own size."""
    k = per_token or target.num_experts_per_tok
    if not 1 <= k <= n_experts:
        raise ValueError(f"experts_per_token {k}: the draft has {n_experts} routed experts")
    s = dcfg.n_stages
    return dataclasses.replace(target, num_hidden_layers=s, layer_types=("sliding_attention",) * s,
                               mlp_layer_types=("moe",) * s, n_routed_experts=n_experts,
                               moe_intermediate_size=intermediate, num_experts_per_tok=k)  # fmt: skip


class V4DSparkLayers(nn.Module):
    """The draft's weights: S V4 blocks and the parts around them (names as loaded, see format)."""

    def __init__(self, cfg: DeepseekV4Config, dcfg: V4DSparkConfig) -> None:
        super().__init__()
        h, n, r, v = cfg.hidden_size, cfg.hc_mult, dcfg.markov_rank, cfg.vocab_size
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(dcfg.n_stages))
        self.main_proj, self.main_norm = _W(h, len(dcfg.target_layer_ids) * h), _W(h)
        self.norm = _W(h)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * h))
        self.hc_head_base = nn.Parameter(torch.empty(n))
        self.hc_head_scale = nn.Parameter(torch.empty(1))
        self.markov_w1, self.markov_w2 = _W(v, r), _W(v, r)
        self.confidence = _W(1, h + r)
        self.confidence_bias = nn.Parameter(torch.zeros(1))  # the release lists no bias: 0 unless shipped


class DeepseekV4DSpark(nn.Module):
    """The draft bound to its target's embedding and LM head (see the module docstring)."""

    def __init__(self, layers: V4DSparkLayers, cfg: DeepseekV4Config, dcfg: V4DSparkConfig, opts: V4DSparkOptions,
                 embed: torch.Tensor, head: torch.Tensor, inv_freq: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        self.w, self.cfg, self.dcfg, self.opts = layers, cfg, dcfg, opts
        self.embed, self.head = embed, head  # [V, hidden] each: the target's tensors
        self._inv_freq = inv_freq  # sliding-window layers' RoPE (main base, no YaRN)
        self.feature_layers = feature_layers_of(dcfg, opts)

    @property
    def device(self) -> torch.device:
        return self.w.main_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.main_proj.weight.dtype

    def context_keys(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each stage's context keys of committed positions.  features: [n, m * N * hidden] (the
        verifier's flattened streams of ``feature_layers``, concatenated); positions: [n].
        Returns [S, n, D], rotated at their positions."""
        cfg, w, eps = self.cfg, self.w, self.cfg.rms_norm_eps
        n, m = features.shape[0], len(self.dcfg.target_layer_ids)
        f = features.to(self.dtype).view(n, m, cfg.hc_mult, cfg.hidden_size).float().mean(2)  # [n, m, hidden]
        main = att.rms_norm(f.flatten(1).to(self.dtype) @ w.main_proj.weight.T, w.main_norm.weight, eps)  # [n, hidden]
        cos, sin = att.rope_cos_sin(positions.to(self.device), self._inv_freq)  # [n, R/2]
        keys = [att.apply_partial_rope(att.shared_kv(main, b.attn.wkv.weight, b.attn.norm.weight, eps), cos, sin)
                for b in w.layers]  # fmt: skip
        return torch.stack(keys)  # [S, n, D]

    def block_tokens(self, anchors: torch.Tensor, g: int) -> torch.Tensor:
        """[anchor, noise x (g - 1)] per request: [B, g]."""
        noise = torch.full((anchors.shape[0], g - 1), self.dcfg.noise_token_id, dtype=torch.long, device=anchors.device)
        return torch.cat([anchors.view(-1, 1).long(), noise], dim=1)

    def block_states(self, anchors: torch.Tensor, starts: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                     g: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The stages over one block per request.  anchors, starts (the anchor's position L): [B];
        keys: [S, B, W, D] each request's window; valid: [B, W] which rows hold a position.
        Returns (x [B, g, hidden] the collapsed last streams, RMSNorm_norm(x) [B, g, hidden])."""
        cfg, w, eps = self.cfg, self.w, self.cfg.rms_norm_eps
        b, h, n = anchors.shape[0], cfg.hidden_size, cfg.hc_mult
        tokens = self.block_tokens(anchors, g).flatten()  # [B * g]
        x = self.embed[tokens]  # [B * g, hidden]
        streams = x[None, :, None].expand(1, b * g, n, h).contiguous()  # [1, B * g, N, hidden]
        pos = starts.view(-1, 1).to(self.device) + torch.arange(g, device=self.device)  # [B, g]
        cos, sin = att.rope_cos_sin(pos, self._inv_freq)  # [B, g, R/2]
        ctx_bias = torch.where(valid, 0.0, float("-inf")).to(self.device)  # [B, W]
        bias = torch.cat([ctx_bias[:, None].expand(b, g, -1), torch.zeros(b, g, g, device=self.device)], -1)
        for s, block in enumerate(w.layers):
            attn = block.attn

            def attention(hid: torch.Tensor, attn=attn, s=s) -> torch.Tensor:  # [B * g, hidden]
                hid = hid.view(b, g, h)
                q, _ = att.low_rank_query(hid, attn.wq_a.weight, attn.q_norm.weight, attn.wq_b.weight, attn.n_heads,
                                          eps, head_norm=self.opts.query_norm)  # [B, g, H, D]  # fmt: skip
                q = att.apply_partial_rope(q, cos.unsqueeze(2), sin.unsqueeze(2))
                kv = att.apply_partial_rope(att.shared_kv(hid, attn.wkv.weight, attn.norm.weight, eps), cos, sin)
                kv = torch.cat([keys[s].to(kv.dtype), kv], dim=1)  # [B, W + g, D]: window, then the block
                o = att.sink_attention(q.transpose(1, 2), kv, attn.attn_sink, bias, cfg.head_dim**-0.5)  # [B, H, g, D]
                o = att.apply_partial_rope(o.transpose(1, 2), cos.unsqueeze(2), sin.unsqueeze(2), inverse=True)
                return att.grouped_output_projection(o, attn.wo_a.weight, attn.wo_b.weight, attn.o_groups).flatten(0, 1)

            streams = block._mixed("attn", streams, attention)
            streams = block._mixed("ffn", streams, lambda hid, block=block: block.ffn(hid, tokens))
        if self.opts.collapse == "hc_head":
            x = hyp.hyper_head(streams, w.hc_head_fn, w.hc_head_base, w.hc_head_scale, cfg.hc_eps, eps)[0]
        else:
            x = streams[0].float().mean(1).to(streams.dtype)  # [B * g, hidden]
        x = x.view(b, g, h)
        return x, att.rms_norm(x, w.norm.weight, eps)

    def base_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """U = head(normed), float32: [*R, hidden] -> [*R, V]."""
        return (normed.to(self.head.dtype) @ self.head.T).float()

    def markov_w2(self) -> torch.Tensor:
        """W2 as the Markov kernel takes it: [r, V]."""
        return self.w.markov_w2.weight.T

    def confidence_logit(self, x: torch.Tensor, normed: torch.Tensor, prev_emb: torch.Tensor) -> torch.Tensor:
        """z_k with c_k = sigmoid(z_k); reads x or normed per ``confidence_input``.  [B, g, *] -> [B, g]."""
        h = x if self.opts.confidence_input == "collapsed" else normed
        z = torch.cat([h, prev_emb.to(h.dtype)], dim=-1) @ self.w.confidence.weight.T.to(h.dtype)
        return z.squeeze(-1).float() + self.w.confidence_bias.float()


class ContextWindow:
    """Each request's last W context keys per stage, in a ring of W rows (committed positions only).

    Rows are written in order; a row's position says where it came from (-1: empty), so the window
    needs no rollback: rejected drafts never enter it.  Memory: S * W * D values per request.
    """

    def __init__(self, n_stages: int, n_slots: int, window: int, head_dim: int, dtype, device) -> None:
        self.keys = torch.zeros(n_stages, n_slots, window, head_dim, dtype=dtype, device=device)
        self.positions = torch.full((n_slots, window), -1, dtype=torch.long, device=device)
        self.written = [0] * n_slots  # rows written so far per slot (the next row is written % W)
        self._free = list(range(n_slots))[::-1]

    @property
    def window(self) -> int:
        return self.keys.shape[2]

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free slot in the V4 DSpark context window")
        slot = self._free.pop()
        self.positions[slot] = -1
        self.written[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def add(self, slot: int, keys: torch.Tensor, positions: torch.Tensor) -> None:
        """keys: [S, n, D]; positions: [n].  Only the last W of them can stay."""
        w = self.window
        keys, positions = keys[:, -w:], positions[-w:]
        rows = (self.written[slot] + torch.arange(positions.shape[0])) % w
        self.keys[:, slot, rows.to(self.keys.device)] = keys.to(self.keys.dtype)
        self.positions[slot, rows.to(self.keys.device)] = positions.to(self.positions.device)
        self.written[slot] += positions.shape[0]

    def gather(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [S, B, W, D], valid [B, W]) of the requests in ``slots``."""
        idx = torch.tensor(slots, device=self.keys.device)
        return self.keys[:, idx], self.positions[idx] >= 0


__all__ = ["COLLAPSES", "CONFIDENCE_INPUTS", "ContextWindow", "DeepseekV4DSpark", "FEATURES", "V4DSparkConfig",
           "V4DSparkLayers", "V4DSparkOptions", "WINDOW_FEEDS", "feature_layers_of", "read_v4_dspark_config",
           "stage_config"]  # fmt: skip
