"""What a Gemma 4 dense decoder adds to :class:`~dspark.models.config.ModelArgs`, read from a
Hugging Face ``config.json`` (``model_type`` ``gemma4_text``, or ``gemma4`` whose ``text_config``
describes the text decoder of the multimodal checkpoint).

Gemma 4 mixes two kinds of attention layer: sliding-window layers (``head_dim``,
``num_key_value_heads``, RoPE base 10k) and full-attention layers, which may have their own head
width (``global_head_dim``), key/value head count (``num_global_key_value_heads`` when
``attention_k_eq_v``, which also makes the values the key projection's output) and a
"proportional" RoPE that rotates only a share of the frequency pairs.  transformers writes the
full layers' widths into a ``per_layer_config`` table by layer index instead; both are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class AttentionKind:
    """One kind of attention layer (Gemma 4 has a sliding and a full kind)."""

    head_dim: int = 256  # per-head width of this kind's queries, keys and values
    n_kv_heads: int = 8  # key/value heads of this kind
    window: int | None = None  # a query reads its ``window`` latest positions (itself included); None: all
    rope_theta: float = 10000.0  # RoPE base
    rope_pairs: int | None = None  # frequency pairs that rotate (proportional RoPE); None: all hd / 2
    rope_factor: float = 1.0  # divides every RoPE frequency
    k_eq_v: bool = False  # no value projection: values are the key projection's output

    def inv_freq(self) -> list[float]:
        """RoPE inverse frequencies, hd / 2 of them; pairs past ``rope_pairs`` do not rotate.

        Example: head_dim 8, theta 10000, rope_pairs 2 -> [1.0, 0.01, 0.0, 0.0].
        """
        half = self.head_dim // 2
        pairs = half if self.rope_pairs is None else self.rope_pairs
        return [(1.0 / self.rope_theta ** (2 * i / self.head_dim) if i < pairs else 0.0) / self.rope_factor
                for i in range(half)]


@dataclass(frozen=True)
class Gemma4Args:
    """The Gemma 4 specifics of a decoder; :class:`ModelArgs` carries the shared shapes."""

    sliding: AttentionKind = AttentionKind(window=512)  # the sliding-window layers
    full: AttentionKind = AttentionKind(head_dim=512, rope_theta=1e6, rope_pairs=64)  # the global layers
    layer_types: tuple[str, ...] = ()  # SLIDING or FULL per layer
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c) when set

    def kind(self, layer: int) -> AttentionKind:
        return self.sliding if self.layer_types[layer] == SLIDING else self.full


# Fields of the text config whose non-default settings this decoder does not implement.
_REFUSED: dict[str, Any] = {
    "hidden_size_per_layer_input": 0,  # per-layer input embeddings (E2B / E4B)
    "num_kv_shared_layers": 0,  # layers reusing earlier layers' keys/values (E2B / E4B)
    "enable_moe_block": False,  # mixture-of-experts blocks (26B-A4B)
    "attention_bias": False,  # would bias o_proj too
}


def gemma4_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text decoder's config: ``cfg`` itself for ``gemma4_text``, its ``text_config`` for
    the multimodal ``gemma4`` wrapper (whose vision and audio towers are not loaded)."""
    if cfg.get("model_type") != "gemma4":
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ValueError("text_config is missing from the gemma4 config (no text decoder to load)")
    text = dict(text)
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    return text


def gemma4_args(cfg: dict[str, Any]) -> tuple[dict[str, Any], Gemma4Args]:
    """(the ModelArgs fields, Gemma4Args) of a ``gemma4_text`` config dict; refuses by name
    every field whose setting the decoder does not implement."""
    for name, neutral in _REFUSED.items():
        if cfg.get(name, neutral) not in (neutral, None):
            raise ValueError(f"{name}: {cfg[name]!r} is not supported for Gemma 4 (only {neutral!r})")
    if cfg.get("use_bidirectional_attention") == "all":
        raise ValueError("use_bidirectional_attention: 'all' is not supported (causal text decoding only)")
    act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation {act!r} is not supported for Gemma 4 (gelu_pytorch_tanh only)")
    n_layers = cfg.get("num_hidden_layers", 30)
    types = list(cfg.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)])
    bad = sorted(set(types) - {SLIDING, FULL})
    if bad or len(types) != n_layers:
        raise ValueError(f"layer_types {bad or types} are not supported ({n_layers} of {SLIDING!r} / {FULL!r})")
    types[-1] = FULL  # transformers forces the last layer global, whatever the config says

    n_heads = cfg.get("num_attention_heads", 8)
    head_dim = cfg.get("head_dim", 256)
    n_kv = cfg.get("num_key_value_heads", 4)
    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    full_hd = cfg.get("global_head_dim", 512)
    full_kv = cfg.get("num_global_key_value_heads") if k_eq_v else None
    full_kv = n_kv if full_kv is None else full_kv
    overrides = cfg.get("per_layer_config")
    if overrides:  # transformers' own table: layer index -> fields differing from the top level
        for key, fields in overrides.items():
            layer = int(key)
            unknown = sorted(set(fields) - {"head_dim", "num_key_value_heads"})
            if unknown or layer >= n_layers or types[layer] != FULL:
                raise ValueError(f"per_layer_config[{key}] {fields} is not supported (head_dim / num_key_value_heads "
                                 "of full-attention layers only)")
        full = [overrides.get(str(i), overrides.get(i, {})) for i, t in enumerate(types) if t == FULL]
        if any(f != full[0] for f in full):
            raise ValueError("per_layer_config differs between full-attention layers (not supported)")
        full_hd, full_kv = full[0].get("head_dim", head_dim), full[0].get("num_key_value_heads", n_kv)

    rope = cfg.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }

    def kind(layer_type: str, hd: int, kv: int, window: int | None, kv_shared: bool) -> AttentionKind:
        rp = rope.get(layer_type)
        if not isinstance(rp, dict):
            raise ValueError(f"rope_parameters[{layer_type!r}] is missing")
        rtype = rp.get("rope_type", "default")
        pairs, factor = None, 1.0
        if rtype == "proportional":
            pairs = int(rp.get("partial_rotary_factor", 1.0) * hd // 2)
            factor = float(rp.get("factor", 1.0))
        elif rtype != "default":
            raise ValueError(f"rope_parameters[{layer_type!r}] rope_type {rtype!r} is not supported "
                             "(default, proportional)")
        return AttentionKind(head_dim=hd, n_kv_heads=kv, window=window, rope_theta=float(rp["rope_theta"]),
                             rope_pairs=pairs, rope_factor=factor, k_eq_v=kv_shared)

    window = cfg.get("sliding_window", 512)
    gemma = Gemma4Args(
        sliding=kind(SLIDING, head_dim, n_kv, window, False),
        full=kind(FULL, full_hd, full_kv, None, k_eq_v),
        layer_types=tuple(types),
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
    )
    for k in (gemma.sliding, gemma.full):
        if n_heads % k.n_kv_heads:
            raise ValueError(f"num_attention_heads {n_heads} is not a multiple of {k.n_kv_heads} key/value heads")
    shared = dict(
        vocab_size=cfg.get("vocab_size", 262_144),
        dim=cfg.get("hidden_size", 2304),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=cfg.get("intermediate_size", 9216),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=gemma.sliding.rope_theta,
        max_position_embeddings=cfg.get("max_position_embeddings", 131_072),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
    )
    return shared, gemma


def embed_scale(dim: int) -> float:
    """Gemma multiplies the token embeddings by sqrt(hidden size).  Example: 64 -> 8.0."""
    return math.sqrt(dim)


__all__ = ["FULL", "SLIDING", "AttentionKind", "Gemma4Args", "embed_scale", "gemma4_args", "gemma4_text_config"]
