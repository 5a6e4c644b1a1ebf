"""Write a random-weight DeepSeek-V4 folder (HF format) for demos, tests and benchmarks.

The folder is what a released V4 checkpoint looks like to a reader, at a small size:
``config.json`` (``model_type: deepseek_v4``, the normalised spelling transformers writes),
``model.safetensors`` under the published weight names (``embed.weight``, ``layers.N.attn.wq_a
.weight``, ``layers.N.attn.kv_norm.weight``, ``layers.N.ffn.experts.E.w1.weight``,
``hc_head_fn`` ...), optionally ``mtp.safetensors`` with the next-n layer under ``mtp.0.*``,
and a byte-level tokenizer (256 byte tokens, then special tokens up to the vocabulary, a small
ChatML template).  Names and shapes come from our own model (:class:`DeepseekV4Transformer`
and :class:`MTPLayer` built on the meta device), so this module needs neither transformers nor
a template folder; the tests load the result with transformers' ``DeepseekV4ForCausalLM`` too.

Every preset has the three attention kinds (sliding window, CSA, HCA), hash-routed and
score-routed MoE layers, several hyper-connection streams, and compression ratios small enough
that windows close every few tokens:

- ``tiny``: hidden 32, 3 layers, 8 experts, vocabulary 320 (parity tests, demos);
- ``small``: hidden 512, 6 layers, 32 experts, vocabulary 4096 (a decode step is real work:
  benchmarks).

Weights: unit-variance embeddings, matrices N(0, 1/fan_in), norm weights around 1, sinks,
biases and position biases drawn away from the zeros an initialiser would leave, a random
token-id -> experts table per hash-routed layer.  Deterministic for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dspark.models.config import ModelArgs
from dspark.models.deepseek_v4_config import CSA, HCA, SLIDING, DeepseekV4Config

__all__ = ["PRESETS", "check_out_dir", "preset_config", "random_tensors", "write_random_folder"]

EOS = "<|endoftext|>"  # id 256, right after the byte tokens
_SPECIALS = [EOS, "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Preset -> the config.json fields that differ from V4-Flash's (the rest: DeepseekV4Config's defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=320, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, head_dim=16, qk_rope_head_dim=8, q_lora_rank=24,
        n_routed_experts=8, num_experts_per_tok=2, layer_types=[SLIDING, CSA, HCA],
        mlp_layer_types=["hash_moe", "moe", "moe"], compress_rates={CSA: 4, HCA: 8},
        sliding_window=8, o_groups=2, o_lora_rank=8,
        # Eight indexer heads: with two, ReLU zeroes many scores exactly and top-k ties appear.
        index_n_heads=8, index_head_dim=8, index_topk=3, hc_mult=3, hc_sinkhorn_iters=5,
        max_position_embeddings=1024,
        yarn={"factor": 16.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1},
    ),
    "small": dict(
        vocab_size=4096, hidden_size=512, moe_intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=8, head_dim=64, qk_rope_head_dim=32, q_lora_rank=256,
        n_routed_experts=32, num_experts_per_tok=4,
        layer_types=[SLIDING, CSA, HCA, CSA, HCA, CSA],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe", "moe"],
        compress_rates={CSA: 4, HCA: 16}, sliding_window=32, o_groups=4, o_lora_rank=128,
        index_n_heads=8, index_head_dim=32, index_topk=8, hc_mult=4, hc_sinkhorn_iters=20,
        max_position_embeddings=4096,
        yarn={"factor": 16.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1},
    ),
}  # fmt: skip


def preset_config(preset: str) -> dict[str, Any]:
    """The ``config.json`` dict of a preset, in the normalised spelling transformers writes.

    Example:
        >>> c = preset_config("tiny")
        >>> c["model_type"], len(c["layer_types"]), c["mlp_layer_types"]
        ('deepseek_v4', 3, ['hash_moe', 'moe', 'moe'])
    """
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    p = dict(PRESETS[preset])
    yarn, rope_dim = p.pop("yarn"), p.pop("qk_rope_head_dim")
    d = DeepseekV4Config()
    factor = rope_dim / p["head_dim"]
    main = {"rope_type": "default", "rope_theta": d.rope_theta, "partial_rotary_factor": factor}
    compress = {"rope_type": "yarn", "rope_theta": d.compress_rope_theta, "partial_rotary_factor": factor,
                "attention_factor": 1.0, **yarn}  # fmt: skip
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", **p,
        "num_key_value_heads": 1, "partial_rotary_factor": factor, "qk_rope_head_dim": rope_dim,
        "rope_theta": d.rope_theta, "compress_rope_theta": d.compress_rope_theta,
        "rope_parameters": {"main": main, "compress": compress},
        "scoring_func": d.scoring_func, "routed_scaling_factor": d.routed_scaling_factor,
        "n_shared_experts": 1, "norm_topk_prob": True, "swiglu_limit": d.swiglu_limit,
        "hc_eps": d.hc_eps, "rms_norm_eps": d.rms_norm_eps, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1, "bos_token_id": None, "eos_token_id": 256,
    }  # fmt: skip


def _draw(name: str, shape: torch.Size, cfg: DeepseekV4Config, gen: torch.Generator) -> torch.Tensor:
    """A random value for our parameter ``name`` (state-dict name) of ``shape``."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "tid2eid":  # [vocab, k]: k distinct experts per token id
        e, k = cfg.n_routed_experts, shape[-1]
        return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(shape[0])])
    if name == "embed.weight":
        return torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):  # RMSNorm weights: around 1, so dropping one shows
        return 1 + 0.2 * torch.randn(shape, generator=gen)
    if leaf.endswith("_scale"):  # hyper-connection scales of the mixing logits: positive, O(1)
        return 0.5 + torch.rand(shape, generator=gen)
    if leaf in ("attn_sink", "ape", "bias") or leaf.endswith("_base"):
        return 0.5 * torch.randn(shape, generator=gen)
    # A matrix [out, in] (experts [E, out, in]): unit-variance outputs for unit-variance inputs.
    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


def _published(name: str, t: torch.Tensor, cfg: DeepseekV4Config) -> dict[str, torch.Tensor]:
    """Our state-dict entry -> the published names (per-expert w1 / w2 / w3, ``attn.kv_norm``)."""
    i = cfg.moe_intermediate_size
    if name.endswith("ffn.experts_w13"):  # [E, 2I, hidden] = w1 | w3
        prefix = name.removesuffix("_w13")
        out = {}
        for e in range(t.shape[0]):
            out[f"{prefix}.{e}.w1.weight"] = t[e, :i].clone()
            out[f"{prefix}.{e}.w3.weight"] = t[e, i:].clone()
        return out
    if name.endswith("ffn.experts_w2"):  # [E, hidden, I]
        prefix = name.removesuffix("_w2")
        return {f"{prefix}.{e}.w2.weight": t[e].clone() for e in range(t.shape[0])}
    if name.endswith("attn.norm.weight") and ".compressor." not in name:
        return {name.replace("attn.norm.weight", "attn.kv_norm.weight"): t}  # the release's spelling
    return {name: t}


def _random_state(module: torch.nn.Module, cfg: DeepseekV4Config, gen: torch.Generator,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for name, meta in module.state_dict().items():  # built on meta: names and shapes only
        t = _draw(name, meta.shape, cfg, gen)
        t = t if name.endswith("tid2eid") else t.to(dtype)
        out.update(_published(name, t, cfg))
    return out


def random_tensors(raw: dict[str, Any], seed: int, dtype: torch.dtype = torch.bfloat16,
                   mtp: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """Random checkpoint tensors {published name: tensor} for config dict ``raw``; with ``mtp``
    also the next-n layer under ``mtp.0.*`` (a sliding-window, score-routed block, as V4-Flash's)."""
    from dspark.models.deepseek_v4 import DeepseekV4Transformer
    from dspark.models.deepseek_v4_config import deepseek_v4_config_from_hf
    from dspark.models.deepseek_v4_mtp import MTPLayer, mtp_block_config

    cfg = deepseek_v4_config_from_hf(raw)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DeepseekV4Transformer(cfg, ModelArgs(vocab_size=cfg.vocab_size, dim=cfg.hidden_size))
    tensors = _random_state(model, cfg, gen, dtype)
    if mtp:
        block_cfg = mtp_block_config(cfg, raw)
        with torch.device("meta"):
            layer = MTPLayer(block_cfg)
        own = _random_state(layer, block_cfg, gen, dtype)
        tensors.update({f"mtp.0.{k}": v for k, v in own.items()})
    return tensors


def write_byte_tokenizer(path: Path, vocab_size: int) -> None:
    """tokenizer.json (byte-level BPE, no merges, specials up to ``vocab_size``) and
    tokenizer_config.json (EOS ``<|endoftext|>`` = id 256, a ChatML template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(alphabet) + len(_SPECIALS):
        raise ValueError(f"vocab_size {vocab_size} is below the byte tokenizer's {len(alphabet) + len(_SPECIALS)}")
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = _SPECIALS + [f"<|reserved_{i}|>" for i in range(vocab_size - len(alphabet) - len(_SPECIALS))]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "chat_template": _CHAT_TEMPLATE}))


def check_out_dir(out: Path) -> None:
    """Refuse a path that is a file or a non-empty folder (nothing is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder")


def write_random_folder(out: str | Path, preset: str = "tiny", seed: int = 0, mtp: bool = False,
                        dtype: torch.dtype = torch.bfloat16, **over: Any) -> Path:  # fmt: skip
    """Write a random V4 folder at ``out`` (created; must not hold anything) and return its path.

    ``over``: config.json fields replacing the preset's (e.g. ``vocab_size``).  ``dtype``: how
    the float tensors are stored (the released checkpoints' non-quantised tensors are bf16).
    """
    from safetensors.torch import save_file

    out = Path(out)
    raw = {**preset_config(preset), **over}
    check_out_dir(out)
    tensors = random_tensors(raw, seed, dtype, mtp)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    meta = {"format": "pt"}
    save_file({k: v.contiguous() for k, v in tensors.items() if not k.startswith("mtp.")},
              str(out / "model.safetensors"), metadata=meta)  # fmt: skip
    if mtp:  # a shard of its own: transformers reads model.safetensors only
        save_file({k: v.contiguous() for k, v in tensors.items() if k.startswith("mtp.")},
                  str(out / "mtp.safetensors"), metadata=meta)  # fmt: skip
    write_byte_tokenizer(out, raw["vocab_size"])
    return out

