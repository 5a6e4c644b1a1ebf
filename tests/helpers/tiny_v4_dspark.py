"""Write a V4 checkpoint's DSpark draft under its published names into a tiny V4 folder.

The draft's S blocks come from a transformers ``DeepseekV4ForCausalLM`` of S sliding-window,
top-k-routed layers (random, its own MoE size), written as ``mtp.{s}.*`` with the release's
``attn.kv_norm`` spelling; its hyper head and final norm become the last stage's
``hc_head_{fn,base,scale}`` and ``norm``.  ``main_proj`` / ``main_norm``, the Markov pair and the
confidence head are random.  The config gains the ``dspark_*`` fields, ``num_nextn_predict_layers``
and S more sliding-window entries in its per-layer list, as released.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

from dspark.models.deepseek_v4_config import SLIDING
from helpers.tiny_deepseek_v4 import randomise, release_kv_norm_spelling, tiny_hf_config
from helpers.tiny_hf import write_byte_tokenizer

STAGES = 3
DRAFT_MOE = dict(n_routed_experts=6, moe_intermediate_size=32, num_experts_per_tok=2)  # not the target's size


def draft_tensors(target_cfg, *, layer_ids: tuple[int, ...], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """The draft's tensors {published name: tensor} for a target of config ``target_cfg``."""
    cfg = tiny_hf_config(vocab_size=target_cfg.vocab_size, num_hidden_layers=STAGES, layer_types=[SLIDING] * STAGES,
                         mlp_layer_types=["moe"] * STAGES, num_hash_layers=0, **DRAFT_MOE)  # fmt: skip
    cfg._attn_implementation = "eager"
    blocks = randomise(hf.DeepseekV4ForCausalLM(cfg), seed)
    last = f"mtp.{STAGES - 1}."
    top = {"model.hc_head.hc_fn": last + "hc_head_fn", "model.hc_head.hc_base": last + "hc_head_base",
           "model.hc_head.hc_scale": last + "hc_head_scale", "model.norm.weight": last + "norm.weight"}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as d:
        blocks.save_pretrained(d)
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    if key.startswith("model.layers."):
                        s, rest = key.removeprefix("model.layers.").split(".", 1)
                        out[f"mtp.{s}.{rest.replace('attn.norm.', 'attn.kv_norm.')}"] = fh.get_tensor(key).clone()
                    elif key in top:
                        out[top[key]] = fh.get_tensor(key).clone()
    gen = torch.Generator().manual_seed(seed + 1)
    h, v, m = cfg.hidden_size, cfg.vocab_size, len(layer_ids)
    out["mtp.0.main_proj.weight"] = torch.randn(h, m * h, generator=gen) / (m * h) ** 0.5
    out["mtp.0.main_norm.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
    out[last + "markov_head.markov_w1.weight"] = torch.randn(v, rank, generator=gen) / rank**0.5
    out[last + "markov_head.markov_w2.weight"] = torch.randn(v, rank, generator=gen)
    out[last + "confidence_head.proj.weight"] = torch.randn(1, h + rank, generator=gen) / (h + rank) ** 0.5
    return out


def write_v4_dspark(folder, tensors: dict[str, torch.Tensor], *, block_size: int, layer_ids: tuple[int, ...],
                    rank: int, noise_token_id: int) -> None:  # fmt: skip
    """Add the draft to a V4 folder: its tensors in a shard of their own, the config's fields."""
    folder = Path(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "mtp.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(num_nextn_predict_layers=STAGES, dspark_block_size=block_size, dspark_markov_rank=rank,
               dspark_target_layer_ids=list(layer_ids), dspark_noise_token_id=noise_token_id)  # fmt: skip
    cfg["layer_types"] = list(cfg["layer_types"])[: cfg["num_hidden_layers"]] + [SLIDING] * STAGES
    (folder / "config.json").write_text(json.dumps(cfg))


def write_v4_dspark_folder(path, *, vocab_size: int, block_size: int, layer_ids: tuple[int, ...], rank: int,
                           noise_token_id: int, seed: int, **over):  # fmt: skip
    """A tiny random V4 folder (``tiny_hf_config`` + ``over``, the release's ``attn.kv_norm``
    spelling, a byte tokenizer) with its DSpark draft; returns (transformers target, draft tensors)."""
    cfg = tiny_hf_config(vocab_size=vocab_size, **over)
    cfg._attn_implementation = "eager"
    target = randomise(hf.DeepseekV4ForCausalLM(cfg), seed)
    with torch.no_grad():  # unit-variance embeddings: logits of a sane scale
        target.model.embed_tokens.weight.normal_(generator=torch.Generator().manual_seed(seed + 1))
    target.save_pretrained(path)
    release_kv_norm_spelling(path)
    write_byte_tokenizer(path, vocab_size)
    tensors = draft_tensors(cfg, layer_ids=layer_ids, rank=rank, seed=seed + 2)
    write_v4_dspark(path, tensors, block_size=block_size, layer_ids=layer_ids, rank=rank, noise_token_id=noise_token_id)
    return target, tensors
