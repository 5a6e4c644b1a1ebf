"""DeepSeek-V4 configuration: every field the published V4 configurations use, validated.

Read from a Hugging Face ``config.json`` dict (``model_type: deepseek_v4``) with
:func:`deepseek_v4_config_from_hf`.  Two spellings of the same settings exist in the wild and
both are read:

- the normalised one that transformers writes (``layer_types``, ``mlp_layer_types``,
  ``compress_rates``, ``partial_rotary_factor``, nested ``rope_parameters`` with ``main`` and
  ``compress`` entries);
- the release spelling (per-layer ``compress_ratios`` of 0 / m / m', ``num_hash_layers``,
  ``qk_rope_head_dim``, a flat ``rope_scaling`` for YaRN, ``compress_rate_csa/hca``).

Anything this engine would compute differently from the reference is refused with a one-line
``ValueError`` naming the field: an unknown key, a scoring function or activation we do not
implement, a key/value head count other than one.  The released checkpoints' block-scaled
FP8 / FP4 weights (``quantization_config``, ``expert_dtype``) are read into ``weight_quant``
and dequantised by the loader; other quantisation formats are refused
(:mod:`dspark.models.quantized`).

Phase 1 only reads and validates; nothing serves V4 yet (docs/DEEPSEEK_V4.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dspark.models.quantized import BlockQuant, block_quant_from_hf

__all__ = [
    "CSA",
    "HCA",
    "SLIDING",
    "DeepseekV4Config",
    "YarnScaling",
    "deepseek_v4_config_from_hf",
]

# Attention layer kinds, spelled as transformers spells them in ``layer_types``.
SLIDING = "sliding_attention"  # sliding-window keys only
CSA = "compressed_sparse_attention"  # + overlapping compressed entries picked by the indexer
HCA = "heavily_compressed_attention"  # + all non-overlapping compressed entries
ATTENTION_KINDS = (SLIDING, CSA, HCA)
MLP_KINDS = ("hash_moe", "moe")  # expert choice by token-id table, or by learned top-k
SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")

# transformers' default schedules for 43 layers: two HCA layers then CSA / HCA alternating;
# three hash-routed MoE layers then learned routing.
_DEFAULT_LAYER_TYPES = tuple([HCA] * 2 + [CSA if i % 2 else HCA for i in range(41)])
_DEFAULT_MLP_LAYER_TYPES = tuple(["hash_moe"] * 3 + ["moe"] * 40)


@dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency interpolation of the compressed layers' RoPE (``rope_type: yarn``).

    V4 applies it to CSA / HCA layers only and never scales cos/sin by YaRN's mscale: the
    attention factor is 1 unless the config names another one.
    """

    factor: float = 16.0  # context extension factor
    original_max_position_embeddings: int = 65536  # context the base frequencies were trained at
    beta_fast: float = 32.0  # rotations above which a frequency is kept (extrapolated)
    beta_slow: float = 1.0  # rotations below which a frequency is fully interpolated
    attention_factor: float = 1.0  # multiplier on cos/sin; V4 fixes it to 1


@dataclass(frozen=True)
class DeepseekV4Config:
    """Shapes and hyper-parameters of a DeepSeek-V4 decoder; defaults are V4-Flash's."""

    vocab_size: int = 129280  # rows of the embedding and the LM head
    hidden_size: int = 4096  # width of each residual stream
    num_hidden_layers: int = 43  # decoder blocks (the MTP layers come on top)
    num_attention_heads: int = 64  # query heads; all share one key/value head
    head_dim: int = 512  # per-head width of queries and of the shared key/value
    qk_rope_head_dim: int = 64  # trailing channels of each head that get RoPE
    q_lora_rank: int = 1024  # width of the low-rank query bottleneck
    o_groups: int = 8  # head groups of the grouped output projection
    o_lora_rank: int = 1024  # per-group width inside the grouped output projection
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    max_position_embeddings: int = 1048576  # longest supported context

    # Attention layout.
    layer_types: tuple[str, ...] = _DEFAULT_LAYER_TYPES  # per layer: sliding_attention / CSA / HCA
    sliding_window: int = 128  # keys every layer sees uncompressed (query included)
    csa_compress_ratio: int = 4  # m: tokens per CSA window (windows overlap by m)
    hca_compress_ratio: int = 128  # m': tokens per HCA window (no overlap)
    rope_theta: float = 10000.0  # RoPE base of sliding-window-only layers
    compress_rope_theta: float = 160000.0  # RoPE base of CSA / HCA layers (and their indexer)
    compress_yarn: YarnScaling | None = None  # YaRN of CSA / HCA layers; None = plain RoPE

    # Lightning indexer (CSA layers).
    index_n_heads: int = 64  # indexer query heads
    index_head_dim: int = 128  # indexer query / key width
    index_topk: int = 512  # compressed entries each query attends to

    # Manifold-constrained hyper-connections.
    hc_mult: int = 4  # residual streams per token
    hc_sinkhorn_iters: int = 20  # Sinkhorn iterations of the stream-mixing matrix
    hc_eps: float = 1e-6  # floor added to the mixing weights and the Sinkhorn denominators

    # Mixture of experts.
    moe_intermediate_size: int = 2048  # SwiGLU inner width of each routed and shared expert
    n_routed_experts: int = 256  # routed experts per layer
    num_experts_per_tok: int = 6  # experts each token is sent to
    n_shared_experts: int = 1  # always-on experts (one SwiGLU of that width)
    scoring_func: str = "sqrtsoftplus"  # router score: sqrtsoftplus / softmax / sigmoid
    routed_scaling_factor: float = 1.5  # multiplier on the normalised top-k weights
    mlp_layer_types: tuple[str, ...] = _DEFAULT_MLP_LAYER_TYPES  # per layer: hash_moe (token-id table) / moe
    swiglu_limit: float = 10.0  # clip of the SwiGLU gate (above) and up (both sides)

    num_nextn_predict_layers: int = 1  # MTP layers stored after the decoder blocks
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    bos_token_id: int | None = 0  # beginning-of-sequence id
    eos_token_ids: tuple[int, ...] = (1,)  # ids that end generation
    weight_quant: BlockQuant | None = None  # the checkpoint's FP8 / FP4 block storage; None: floats

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def compress_ratio_by_layer(self) -> tuple[int, ...]:
        """Tokens per compressed entry of each layer; 0 for sliding-window-only layers."""
        ratio = {SLIDING: 0, CSA: self.csa_compress_ratio, HCA: self.hca_compress_ratio}
        return tuple(ratio[t] for t in self.layer_types)


def _validate(c: DeepseekV4Config) -> None:
    n = c.num_hidden_layers
    if len(c.layer_types) != n:
        raise ValueError(f"layer_types: {len(c.layer_types)} entries for num_hidden_layers {n}")
    bad = sorted(set(c.layer_types) - set(ATTENTION_KINDS))
    if bad:
        raise ValueError(f"layer_types: {bad} not among {list(ATTENTION_KINDS)}")
    if len(c.mlp_layer_types) != n:
        raise ValueError(f"mlp_layer_types: {len(c.mlp_layer_types)} entries for num_hidden_layers {n}")
    bad = sorted(set(c.mlp_layer_types) - set(MLP_KINDS))
    if bad:
        raise ValueError(f"mlp_layer_types: {bad} not among {list(MLP_KINDS)}")
    if c.scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func {c.scoring_func!r} is not supported (one of {list(SCORING_FUNCS)})")
    rope = c.qk_rope_head_dim
    if rope <= 0 or rope % 2 or rope > c.head_dim:
        raise ValueError(f"qk_rope_head_dim {rope}: must be even, positive and at most head_dim {c.head_dim}")
    if (c.num_attention_heads * c.head_dim) % c.o_groups:
        raise ValueError(f"o_groups {c.o_groups} does not divide num_attention_heads * head_dim")
    for name in ("csa_compress_ratio", "hca_compress_ratio", "sliding_window", "hc_mult", "hc_sinkhorn_iters"):
        if getattr(c, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(c, name)}")
    if not 1 <= c.num_experts_per_tok <= c.n_routed_experts:
        raise ValueError(f"num_experts_per_tok {c.num_experts_per_tok} not in [1, n_routed_experts]")
    if c.n_shared_experts not in (0, 1):
        # The reference builds one shared SwiGLU of moe_intermediate_size whatever the count says.
        raise ValueError(f"n_shared_experts {c.n_shared_experts} is not supported (0 or 1)")
    if c.index_topk < 1 or c.index_n_heads < 1 or c.index_head_dim < 2:
        raise ValueError("index_topk, index_n_heads and index_head_dim must be positive")
    if c.index_head_dim < rope:
        raise ValueError(f"index_head_dim {c.index_head_dim} is narrower than qk_rope_head_dim {rope}")


# Keys every transformers config carries; they say nothing about the network's numerics.
_GENERIC_KEYS = frozenset(
    {
        "_name_or_path", "architectures", "auto_map", "chunk_size_feed_forward", "dtype", "torch_dtype",
        "id2label", "label2id", "is_encoder_decoder", "model_type", "output_attentions",
        "output_hidden_states", "problem_type", "return_dict", "transformers_version", "use_cache",
        "initializer_range", "pad_token_id", "attention_dropout", "output_router_logits",
        "router_aux_loss_coef", "router_jitter_noise", "tokenizer_class",
    }
)  # fmt: skip

_FIELD_KEYS = frozenset(
    {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
        "q_lora_rank", "o_groups", "o_lora_rank", "rms_norm_eps", "max_position_embeddings",
        "layer_types", "sliding_window", "rope_theta", "compress_rope_theta", "index_n_heads",
        "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
        "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
        "scoring_func", "routed_scaling_factor", "mlp_layer_types", "swiglu_limit",
        "num_nextn_predict_layers", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        # read and checked below rather than copied
        "num_key_value_heads", "qk_rope_head_dim", "partial_rotary_factor", "compress_rates",
        "compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers",
        "rope_parameters", "rope_scaling", "norm_topk_prob", "hidden_act", "attention_bias",
        "mlp_bias", "quantization_config", "expert_dtype",
        # the DSpark draft shipped under mtp.* (V4-Flash-DSpark, -0731): its drafter's, not the decoder's
        "dspark_block_size", "dspark_markov_rank", "dspark_target_layer_ids", "dspark_noise_token_id",
    }
)  # fmt: skip

# YaRN keys V4 reads; mscale / mscale_all_dim only feed an attention factor V4 fixes to 1.
_YARN_KEYS = frozenset(
    {"rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
     "attention_factor", "mscale", "mscale_all_dim", "rope_theta", "partial_rotary_factor"}
)  # fmt: skip


def deepseek_v4_config_from_hf(cfg: dict[str, Any]) -> DeepseekV4Config:
    """Build a :class:`DeepseekV4Config` from a ``config.json`` dict, refusing what we lack.

    Example:
        >>> c = deepseek_v4_config_from_hf({"model_type": "deepseek_v4", "num_hidden_layers": 2,
        ...                                 "compress_ratios": [0, 4], "num_hash_layers": 1})
        >>> c.layer_types, c.mlp_layer_types
        (('sliding_attention', 'compressed_sparse_attention'), ('hash_moe', 'moe'))
    """
    if cfg.get("model_type") != "deepseek_v4":
        raise ValueError(f"model_type {cfg.get('model_type')!r} is not deepseek_v4")
    unknown = sorted(set(cfg) - _GENERIC_KEYS - _FIELD_KEYS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown DeepSeek-V4 config field (not read by this engine)")
    weight_quant = block_quant_from_hf(cfg)
    _refuse_value(cfg, "num_key_value_heads", 1, "shared-KV attention reads exactly one key/value head")
    _refuse_value(cfg, "hidden_act", "silu", "the experts are SwiGLU with silu")
    _refuse_value(cfg, "attention_bias", False, "V4 projections carry no bias")
    _refuse_value(cfg, "mlp_bias", False, "V4 projections carry no bias")
    # The reference always renormalises the selected weights, whatever this flag says.
    _refuse_value(cfg, "norm_topk_prob", True, "top-k weights are always renormalised")

    d = DeepseekV4Config()
    n = int(cfg.get("num_hidden_layers", d.num_hidden_layers))
    head_dim = int(cfg.get("head_dim", d.head_dim))
    kw: dict[str, Any] = {
        k: cfg[k]
        for k in (
            "vocab_size", "hidden_size", "num_attention_heads", "q_lora_rank", "o_groups",
            "o_lora_rank", "rms_norm_eps", "max_position_embeddings", "sliding_window",
            "rope_theta", "compress_rope_theta", "index_n_heads", "index_head_dim", "index_topk",
            "hc_mult", "hc_sinkhorn_iters", "hc_eps", "moe_intermediate_size", "n_routed_experts",
            "num_experts_per_tok", "n_shared_experts", "scoring_func", "routed_scaling_factor",
            "swiglu_limit", "num_nextn_predict_layers", "tie_word_embeddings", "bos_token_id",
        )
        if k in cfg
    }  # fmt: skip
    kw.update(num_hidden_layers=n, head_dim=head_dim, weight_quant=weight_quant)
    eos = cfg.get("eos_token_id", d.eos_token_ids)
    kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    kw["qk_rope_head_dim"] = _rope_head_dim(cfg, head_dim, d.qk_rope_head_dim)
    csa, hca = _compress_ratios(cfg, d)
    kw.update(csa_compress_ratio=csa, hca_compress_ratio=hca)
    kw["layer_types"] = _layer_types(cfg, n, csa, hca)
    kw["mlp_layer_types"] = _mlp_layer_types(cfg, n)
    kw["compress_yarn"], main_theta, compress_theta = _rope(cfg)
    if main_theta is not None:
        kw["rope_theta"] = main_theta
    if compress_theta is not None:
        kw["compress_rope_theta"] = compress_theta
    return DeepseekV4Config(**kw)


def _refuse_value(cfg: dict[str, Any], key: str, want: Any, why: str) -> None:
    if key in cfg and cfg[key] is not None and cfg[key] != want:
        raise ValueError(f"{key} {cfg[key]!r} is not supported ({why})")


def _rope_head_dim(cfg: dict[str, Any], head_dim: int, default: int) -> int:
    if "qk_rope_head_dim" in cfg:
        return int(cfg["qk_rope_head_dim"])
    factor = cfg.get("partial_rotary_factor")
    if factor is None:
        return default
    dim = head_dim * float(factor)
    if not math.isclose(dim, round(dim)):
        raise ValueError(f"partial_rotary_factor {factor} * head_dim {head_dim} is not a whole channel count")
    return int(round(dim))


def _compress_ratios(cfg: dict[str, Any], d: DeepseekV4Config) -> tuple[int, int]:
    rates = dict(cfg.get("compress_rates") or {})
    bad = sorted(set(rates) - {CSA, HCA})
    if bad:
        raise ValueError(f"compress_rates: unknown layer kind {bad[0]!r}")
    csa = int(cfg.get("compress_rate_csa", rates.get(CSA, d.csa_compress_ratio)))
    hca = int(cfg.get("compress_rate_hca", rates.get(HCA, d.hca_compress_ratio)))
    if csa == hca:
        raise ValueError(f"compress_rates: CSA and HCA ratios are both {csa}; per-layer ratios would be ambiguous")
    return csa, hca


def _layer_types(cfg: dict[str, Any], n: int, csa: int, hca: int) -> tuple[str, ...]:
    if cfg.get("layer_types") is not None:
        # The release lists the MTP layers' kinds after the decoder's; only the first n are blocks.
        return tuple(cfg["layer_types"][:n])
    ratios = cfg.get("compress_ratios")
    if ratios is not None:
        by_ratio = {0: SLIDING, csa: CSA, hca: HCA}
        bad = sorted({int(r) for r in ratios[:n]} - set(by_ratio))
        if bad:
            raise ValueError(f"compress_ratios: {bad} match neither 0, the CSA ratio {csa} nor the HCA ratio {hca}")
        return tuple(by_ratio[int(r)] for r in ratios[:n])
    # transformers' default: two HCA layers, then CSA and HCA alternating.
    return tuple([HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))])


def _mlp_layer_types(cfg: dict[str, Any], n: int) -> tuple[str, ...]:
    if cfg.get("mlp_layer_types") is not None:
        return tuple(cfg["mlp_layer_types"][:n])
    n_hash = int(cfg.get("num_hash_layers", 3))
    return tuple(["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash))


def _rope(cfg: dict[str, Any]) -> tuple[YarnScaling | None, float | None, float | None]:
    """(YaRN of the compressed layers, main theta, compress theta) from either spelling."""
    nested = cfg.get("rope_parameters")
    if isinstance(nested, dict) and isinstance(nested.get("main"), dict):
        main, comp = nested["main"], nested.get("compress") or {}
        kind = main.get("rope_type", main.get("type", "default"))
        if kind != "default":
            raise ValueError(f"rope_parameters.main.rope_type {kind!r} is not supported (plain RoPE only)")
        return _yarn(comp, "rope_parameters.compress"), main.get("rope_theta"), comp.get("rope_theta")
    flat = cfg.get("rope_scaling") or (nested if isinstance(nested, dict) else None) or {}
    name = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    return _yarn(flat, name), None, None


def _yarn(p: dict[str, Any], name: str) -> YarnScaling | None:
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"{name}.rope_type {kind!r} is not supported (default or yarn)")
    unknown = sorted(set(p) - _YARN_KEYS)
    if unknown:
        raise ValueError(f"{name}.{unknown[0]}: unknown YaRN parameter")
    d = YarnScaling()
    return YarnScaling(
        factor=float(p.get("factor", d.factor)),
        original_max_position_embeddings=int(
            p.get("original_max_position_embeddings", d.original_max_position_embeddings)
        ),
        beta_fast=float(p.get("beta_fast") or d.beta_fast),
        beta_slow=float(p.get("beta_slow") or d.beta_slow),
        attention_factor=float(d.attention_factor if p.get("attention_factor") is None else p["attention_factor"]),
    )
