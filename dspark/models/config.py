"""Architecture description of a decoder: the Llama family (Llama 2/3, SmolLM, Qwen2, Qwen3, Mistral)
and Gemma 4 dense (its specifics in :mod:`dspark.models.gemma_config`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from dspark.models.gemma_config import Gemma4Args, gemma4_args, gemma4_text_config


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float = 8.0  # how much longer than the original context the model reaches
    low_freq_factor: float = 1.0  # wavelengths above original/low_freq_factor are fully scaled
    high_freq_factor: float = 4.0  # wavelengths below original/high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # context length the base frequencies were trained at


@dataclass(frozen=True)
class ModelArgs:
    """Shapes and hyper-parameters of the decoder; every field has a default."""

    vocab_size: int = 49152  # number of token embeddings (rows of the LM head)
    dim: int = 576  # hidden size
    n_layers: int = 30  # decoder blocks
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads (grouped-query attention when < n_heads)
    head_dim: int = 64  # per-head width; dim // n_heads for most checkpoints
    intermediate_size: int = 1536  # SwiGLU inner width
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 100000.0  # RoPE base
    rope_scaling: RopeScaling | None = None  # llama3-style scaling, None for plain RoPE
    max_position_embeddings: int = 8192  # longest context the checkpoint supports
    tie_word_embeddings: bool = True  # LM head shares the embedding matrix
    attention_bias: bool = False  # Qwen2-style bias on q/k/v projections
    qk_norm: bool = False  # Qwen3-style RMSNorm of every query and key head before RoPE
    rope_freq_factors: tuple[float, ...] | None = None  # per-frequency divisors (GGUF rope_freqs)
    name: str = "llama"  # free-form name, used in logs and /v1/models
    decoder: str = "llama"  # the implementation that builds it: a key of DECODERS
    gemma4: Gemma4Args | None = None  # sliding/full layer kinds etc. when decoder is "gemma4"
    hc_mult: int = 1  # residual streams per token (DeepSeek-V4's hyper-connections); 1 = one residual

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def feature_width(self) -> int:
        """Width of one feature layer (``forward(feature_layers=...)``): a block's output streams,
        hc_mult * dim (dim for the Llama family)."""
        return self.hc_mult * self.dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Build from a Hugging Face ``config.json`` dict of a family in :data:`HF_FAMILIES`.

        Fields the decoder does not implement are refused by name rather than ignored, since
        ignoring one would serve different outputs from the checkpoint's.
        """
        model_type = cfg.get("model_type", "llama")
        family = HF_FAMILIES.get(model_type)
        if family is None:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(HF_FAMILIES)}")
        arch = (cfg.get("architectures") or [model_type])[0]
        if family.args_reader:
            raise ValueError(f"model_type {model_type!r} is read by its own loader (dspark.models.loader.load_model)")
        if family.decoder == "gemma4":
            shared, gemma = gemma4_args(gemma4_text_config(cfg))
            return cls(**shared, decoder="gemma4", gemma4=gemma, name=str(arch))
        _refuse_unsupported_fields(cfg, model_type)
        n_heads = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        scaling = None
        # transformers >= 5 nests RoPE settings under "rope_parameters".
        rp = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
        rs = cfg.get("rope_scaling") or (rp if rp.get("rope_type") not in (None, "default") else None)
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "llama3":
                scaling = RopeScaling(
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs["low_freq_factor"]),
                    high_freq_factor=float(rs["high_freq_factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                )
            elif kind not in (None, "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}")
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads", n_heads),
            head_dim=cfg.get("head_dim") or dim // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", family.attention_bias),
            qk_norm=family.qk_norm,
            name=str(arch),
        )

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class HFFamily:
    """What a Hugging Face ``model_type`` adds to the plain Llama decoder."""

    attention_bias: bool = False  # q/k/v bias when the config has no "attention_bias" field
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (weights ``self_attn.{q,k}_norm``)
    decoder: str = "llama"  # the implementation (a key of DECODERS); it reads the config its own way
    weight_prefix: str = "model."  # where the decoder's weights sit in the checkpoint
    # A family with its own checkpoint reader and per-request state: "module:function" of
    # load(path, dtype, device) -> LoadedModel and of args(path) -> ModelArgs ("" = the shared path).
    loader: str = ""
    args_reader: str = ""
    compiles: bool = True  # its step can run through torch.compile (`dspark serve` compiles by default)
    row_invariant: bool = True  # it has row-invariant kernels (the deterministic mode)
    # "module:function" of write(out, preset, seed, mtp, dtype) -> Path: a random-weight folder of
    # this family (`dspark make-model`); "" = none.
    random_writer: str = ""


# model_type -> family; other model types are refused.
HF_FAMILIES: dict[str, HFFamily] = {
    "llama": HFFamily(),
    "mistral": HFFamily(),
    "qwen2": HFFamily(attention_bias=True),
    "qwen3": HFFamily(qk_norm=True),
    "gemma4_text": HFFamily(decoder="gemma4"),
    # The multimodal checkpoint: its text decoder only (vision and audio towers are not read).
    "gemma4": HFFamily(decoder="gemma4", weight_prefix="model.language_model."),
    # Compressed attention, hyper-connections, MoE: its own decoder, state and loader (eager).
    "deepseek_v4": HFFamily(decoder="deepseek_v4", loader="dspark.models.deepseek_v4_loader:load_deepseek_v4",
                            args_reader="dspark.models.deepseek_v4_loader:deepseek_v4_args",
                            compiles=False, row_invariant=False,
                            random_writer="dspark.models.deepseek_v4_random:write_random_folder"),
}

# decoder -> "module:class" building it (imported when a model is built).
DECODERS: dict[str, str] = {
    "llama": "dspark.models.llama:Transformer",
    "gemma4": "dspark.models.gemma:Gemma4Transformer",
    "deepseek_v4": "dspark.models.deepseek_v4:DeepseekV4Transformer",  # built by its family's loader
}


def decoder_class(args: ModelArgs) -> type:
    """The model class of ``args`` (its ``decoder`` looked up in :data:`DECODERS`)."""
    import importlib

    if args.decoder not in DECODERS:
        raise ValueError(f"unknown decoder {args.decoder!r}; known: {', '.join(DECODERS)}")
    module, name = DECODERS[args.decoder].split(":")
    return getattr(importlib.import_module(module), name)


def _refuse_unsupported_fields(cfg: dict[str, Any], model_type: str) -> None:
    """Raise ValueError naming the first config field whose setting the decoder lacks."""
    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window: true is not supported (sliding-window attention layers)")
    windowed = sorted({t for t in cfg.get("layer_types") or () if t != "full_attention"})
    if windowed:
        raise ValueError(f"layer_types {windowed} are not supported (full attention only)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if HF_FAMILIES[model_type].qk_norm and cfg.get("attention_bias"):
        # Qwen3's flag also puts a bias on o_proj, which the decoder's output projection lacks.
        raise ValueError(f"attention_bias: true is not supported for model_type {model_type!r}")


def rope_inv_freq(args: ModelArgs) -> list[float]:
    """Inverse frequencies of RoPE, with llama3 scaling applied when configured.

    Example: head_dim 4, theta 10000 -> [1.0, 0.01].
    """
    half = args.head_dim // 2
    inv = [1.0 / (args.rope_theta ** (2 * i / args.head_dim)) for i in range(half)]
    if args.rope_freq_factors is not None:
        # GGUF files of llama3-scaled models store the scaling as explicit per-frequency factors.
        return [f / d for f, d in zip(inv, args.rope_freq_factors)]
    s = args.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:  # high frequency: untouched
            out.append(f)
        elif wavelen > low_wavelen:  # low frequency: fully interpolated
            out.append(f / s.factor)
        else:  # smooth blend in between
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out


__all__ = ["DECODERS", "HF_FAMILIES", "HFFamily", "ModelArgs", "RopeScaling", "decoder_class", "rope_inv_freq"]
