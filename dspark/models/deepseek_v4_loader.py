"""Load a DeepSeek-V4 Hugging Face folder (config.json ``model_type: deepseek_v4`` + safetensors).

Weight names are the published ones (``layers.N.attn.wq_a.weight``, ``layers.N.ffn.experts.E.w1
.weight``, ``hc_head_fn`` ...), with or without transformers' ``model.`` prefix and with either
spelling of the few top-level names transformers renames (``embed`` / ``embed_tokens``, ``head``
/ ``lm_head``, ``hc_head_fn`` / ``hc_head.hc_fn``).  The released checkpoints' FP8 / FP4 weights
with block scales are dequantised on load (:mod:`dspark.models.quantized`), each to the dtype it
is held in; any other tensor stored in a dtype other than F32 / F16 / BF16 is refused by name.
The MTP layers (``mtp.*``) are not part of the decoder: the ``mtp`` drafter reads them
(:mod:`dspark.models.deepseek_v4_mtp`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from dspark.models.config import ModelArgs
from dspark.models.deepseek_v4_config import DeepseekV4Config, deepseek_v4_config_from_hf
from dspark.models.llama import Shard

log = logging.getLogger(__name__)

MODEL_TYPE = "deepseek_v4"

# transformers' spelling -> the published one, for the names it renames at the top level.
_TOP_LEVEL = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
EXPERT_NAME = re.compile(r"^(layers\.\d+\.ffn)\.experts\.(\d+)\.(w[123])\.weight$")
# The release spells the attention's KV norm ``attn.kv_norm``; transformers writes ``attn.norm``.
_KV_NORM = re.compile(r"^(layers\.\d+\.attn)\.kv_norm\.")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_deepseek_v4(path: Path) -> bool:
    """Whether ``path`` is a folder whose config.json says ``model_type: deepseek_v4``."""
    cfg = path / "config.json"
    return path.is_dir() and cfg.exists() and json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE


def model_args(cfg: DeepseekV4Config, name: str) -> ModelArgs:
    """The fields of :class:`ModelArgs` that other components read (sizes, vocabulary, name)."""
    return ModelArgs(
        vocab_size=cfg.vocab_size,
        dim=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=1,  # one shared key/value head
        head_dim=cfg.head_dim,
        intermediate_size=cfg.moe_intermediate_size,
        norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        name=name,
        hc_mult=cfg.hc_mult,  # a feature layer is a block's hc_mult output streams
    )


def our_name(name: str) -> str:
    """A checkpoint tensor's name in this model's spelling (routed experts still one per expert).

    Example:
        >>> our_name("model.layers.0.attn.kv_norm.weight"), our_name("lm_head.weight")
        ('layers.0.attn.norm.weight', 'head.weight')
    """
    name = name.removeprefix("model.")
    name = _TOP_LEVEL.get(name, name)
    return _KV_NORM.sub(r"\1.norm.", name)


def published_to_ours(tensors: dict[str, torch.Tensor], cfg: DeepseekV4Config) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> this model's state dict (experts stacked per layer).

    Raises ValueError naming a tensor of a non-float dtype (quantised) or an expert that is
    missing; unknown names are left for ``load_state_dict`` to report.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("mtp."):  # the next-n (MTP) layers: the drafter's, not the decoder's
            continue
        name = our_name(name)
        if not name.endswith("tid2eid") and t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name} has dtype {t.dtype} and no block scale: not a format this loader reads")
        hit = EXPERT_NAME.match(name)
        if hit:
            experts.setdefault((hit[1], hit[3]), {})[int(hit[2])] = t
        else:
            out[name] = t
    n = cfg.n_routed_experts
    for (prefix, w), by_id in sorted(experts.items()):
        if sorted(by_id) != list(range(n)):
            raise ValueError(f"{prefix}.experts: {len(by_id)} {w} tensors for {n} routed experts")
    layers = sorted({p for p, _ in experts})
    for prefix in layers:
        stack = {w: torch.stack([experts[(prefix, w)][e] for e in range(n)]) for w in ("w1", "w2", "w3")}
        out[f"{prefix}.experts_w13"] = torch.cat([stack["w1"], stack["w3"]], dim=1)  # [E, 2I, hidden]
        out[f"{prefix}.experts_w2"] = stack["w2"]  # [E, hidden, I]
    return out


def load_deepseek_v4(path: Path, dtype: torch.dtype, device, shard: Shard = Shard()):
    """``load_model`` for a V4 folder: a :class:`dspark.models.loader.LoadedModel` whose model
    holds ``shard``'s weights (the whole model by default), reading only those
    (:mod:`dspark.models.deepseek_v4_shards`)."""
    from dspark.models.deepseek_v4_shards import build_rank_model
    from dspark.models.loader import LoadedModel
    from dspark.models.tokenizer import Tokenizer

    raw = json.loads((path / "config.json").read_text())
    cfg = deepseek_v4_config_from_hf(raw)
    args = model_args(cfg, str((raw.get("architectures") or [MODEL_TYPE])[0]))
    model, stats = build_rank_model(path, cfg, args, dtype, device, shard)
    log.info("%s rank %d of %d: read %.1f of %.1f MB", path.name, shard.rank, shard.world_size,
             stats.bytes_read / 1e6, stats.bytes_total / 1e6)  # fmt: skip
    return LoadedModel(model=model, tokenizer=Tokenizer.from_hf_dir(path), args=args, source=str(path), name=path.name)


def deepseek_v4_args(path: Path) -> ModelArgs:
    """``load_tokenizer``'s architecture answer for a V4 folder (no weights read)."""
    raw = json.loads((path / "config.json").read_text())
    return model_args(deepseek_v4_config_from_hf(raw), str((raw.get("architectures") or [MODEL_TYPE])[0]))
