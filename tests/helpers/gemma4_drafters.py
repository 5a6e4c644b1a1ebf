"""Random-weight DeepSpec Gemma 4 drafter folders (``Gemma4DSparkModel``) for a Gemma 4 target
folder, as DeepSpec's ``save_pretrained`` writes them, for loader and engine tests without the
model hub.

config.json: the target's text config (DeepSpec deep-copies it) with ``global_head_dim`` and
``num_global_key_value_heads`` as fields (the transformers DeepSpec builds on has them; a
``per_layer_config`` table of the target's layer indices is not carried over), then what
``build_draft_config`` changes or adds: architectures, num_hidden_layers and layer_types (every
draft layer full attention), tie_word_embeddings false, the target's model types and layer count,
block size, mask token, target layer ids, anchors, the Markov and confidence heads' fields.

model.safetensors: embed_tokens / lm_head (the target's, frozen copies), fc, hidden_norm, norm,
per layer self_attn.{q,k,(v),o}_proj and {q,k}_norm (v_norm has no weight), mlp.{gate,up,down}_proj,
the four norms input_layernorm, post_attention_layernorm, pre_feedforward_layernorm,
post_feedforward_layernorm, and the ``layer_scalar`` buffer; markov_head.* and confidence_head.*
as for the Qwen3 drafters.  DFlash (``dflash=True``): markov_rank 0 and no confidence head.

``write_gemma4_eagle3`` writes DeepSpec's Gemma 4 EAGLE-3 drafter (``Gemma4Eagle3Model``) the same
way: config.json = the same copied text config, then what its eagle3 ``build_draft_config`` sets
(architectures, model types, num_target_layers, one full-attention layer, target layer ids,
ttt_length, step_loss_decay, draft_num_hidden_layers, tie_word_embeddings false);
model.safetensors: embed_tokens / lm_head (the target's), fc, norm, and layers.0.{hidden_norm, the
four sandwich norms, self_attn.{q,k,(v),o}_proj reading 2 D inputs, {q,k}_norm, mlp.*, layer_scalar}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def copied_text_config(target_folder: Path) -> dict:
    """The target's text config as DeepSpec's drafter configs copy it (global widths as fields)."""
    text = json.loads((target_folder / "config.json").read_text())
    table = text.pop("per_layer_config", None) or {}
    full = next(iter(table.values()), {})
    return {**text, "global_head_dim": full.get("head_dim", text.get("head_dim")),
            "num_global_key_value_heads": full.get("num_key_value_heads", text["num_key_value_heads"])}


def gemma4_drafter_config(target_folder: Path, *, n_layers: int, layer_ids, block_size: int, mask_token_id: int,
                          rank: int, markov_head_type: str, with_markov: bool, confidence: bool, k_eq_v: bool,
                          overrides: dict | None = None) -> dict:
    """config.json of a Gemma4DSparkModel built for the target at ``target_folder``."""
    cfg = copied_text_config(target_folder)
    cfg.update({
        "architectures": ["Gemma4DSparkModel"], "attention_k_eq_v": k_eq_v,
        "target_model_type": "gemma4_text", "target_text_model_type": "gemma4_text",
        "num_target_layers": cfg["num_hidden_layers"], "num_hidden_layers": n_layers,
        "layer_types": ["full_attention"] * n_layers, "tie_word_embeddings": False,
        "block_size": block_size, "mask_token_id": mask_token_id, "target_layer_ids": list(layer_ids),
        "num_anchors": 512, "enable_confidence_head": confidence, "markov_rank": rank,
    })
    if confidence:
        cfg["confidence_head_with_markov"] = with_markov
    if rank:
        cfg["markov_head_type"] = markov_head_type
    cfg.update(overrides or {})
    return cfg


def write_gemma4_drafter(folder: Path, target_folder: Path, *, layer_ids=(0, 2), n_layers=2, rank=8,
                         markov_head_type="vanilla", with_markov=True, k_eq_v=True, block_size=4, mask_token_id=300,
                         dflash=False, seed=0, config_overrides: dict | None = None,
                         dtype=torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """Write the folder; returns (its tensors as float32, its config)."""
    rank = 0 if dflash else rank
    cfg = gemma4_drafter_config(target_folder, n_layers=n_layers, layer_ids=layer_ids, block_size=block_size,
                                mask_token_id=mask_token_id, rank=rank, markov_head_type=markov_head_type,
                                with_markov=with_markov and rank > 0, confidence=not dflash, k_eq_v=k_eq_v)
    inter = cfg["intermediate_size"]  # the target's, as DeepSpec's drafters keep it
    emb = load_file(str(target_folder / "model.safetensors"))["model.embed_tokens.weight"].float()
    V, D = emb.shape
    nh, hd = cfg["num_attention_heads"], cfg["global_head_dim"]
    nkv = cfg["num_global_key_value_heads"] if k_eq_v else cfg["num_key_value_heads"]
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    def norm(n):
        return 1.0 + 0.3 * torch.randn(n, generator=g)

    t = {"embed_tokens.weight": emb.clone(), "lm_head.weight": emb.clone(), "fc.weight": lin(D, len(layer_ids) * D),
         "hidden_norm.weight": norm(D), "norm.weight": norm(D)}
    for i in range(n_layers):
        a, m, o = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"layers.{i}."
        t[a + "q_proj.weight"], t[a + "k_proj.weight"] = lin(nh * hd, D), lin(nkv * hd, D)
        if not k_eq_v:
            t[a + "v_proj.weight"] = lin(nkv * hd, D)
        t[a + "o_proj.weight"] = lin(D, nh * hd)
        t[a + "q_norm.weight"], t[a + "k_norm.weight"] = norm(hd), norm(hd)
        t[m + "gate_proj.weight"], t[m + "up_proj.weight"], t[m + "down_proj.weight"] = lin(inter, D), lin(inter, D), lin(D, inter)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            t[o + n + ".weight"] = norm(D)
        t[o + "layer_scalar"] = torch.empty(1).uniform_(0.5, 1.5, generator=g)
    if rank:
        t["markov_head.markov_w1.weight"] = torch.randn(V, rank, generator=g)
        t["markov_head.markov_w2.weight"] = lin(V, rank) * 2.0  # nn.Linear(r, V): [V, r]
        if markov_head_type == "gated":
            t["markov_head.gate_proj.weight"], t["markov_head.gate_proj.bias"] = lin(rank, D + rank), torch.randn(rank, generator=g)
    if not dflash:
        t["confidence_head.proj.weight"] = lin(1, D + (rank if with_markov and rank else 0))
        t["confidence_head.proj.bias"] = torch.randn(1, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in t.items()}, str(folder / "model.safetensors"))
    cfg.update(config_overrides or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return {k: v.to(dtype).float() for k, v in t.items()}, cfg


def write_gemma4_eagle3(folder: Path, target_folder: Path, *, layer_ids=(0, 2), k_eq_v=True, seed=0,
                        weights: dict | None = None, config_overrides: dict | None = None,
                        dtype=torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """Write a random Gemma4Eagle3Model folder for the target at ``target_folder``; ``weights``
    replaces or adds tensors.  Returns (its tensors as float32, its config)."""
    text = copied_text_config(target_folder)
    cfg = {**text, "architectures": ["Gemma4Eagle3Model"], "attention_k_eq_v": k_eq_v,
           "target_model_type": "gemma4_text", "target_text_model_type": "gemma4_text",
           "num_target_layers": text["num_hidden_layers"], "num_hidden_layers": 1, "layer_types": ["full_attention"],
           "target_model_name_or_path": target_folder.name, "target_layer_ids": list(layer_ids), "ttt_length": 7,
           "step_loss_decay": 0.8, "draft_num_hidden_layers": 1, "tie_word_embeddings": False}
    emb = load_file(str(target_folder / "model.safetensors"))["model.embed_tokens.weight"].float()
    D, inter = emb.shape[1], cfg["intermediate_size"]
    nh, hd = cfg["num_attention_heads"], cfg["global_head_dim"]
    nkv = cfg["num_global_key_value_heads"] if k_eq_v else cfg["num_key_value_heads"]
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    def norm(n):
        return 1.0 + 0.3 * torch.randn(n, generator=g)

    a, m, o = "layers.0.self_attn.", "layers.0.mlp.", "layers.0."
    t = {"embed_tokens.weight": emb.clone(), "lm_head.weight": emb.clone(), "fc.weight": lin(D, len(layer_ids) * D),
         "norm.weight": norm(D), a + "q_proj.weight": lin(nh * hd, 2 * D), a + "k_proj.weight": lin(nkv * hd, 2 * D),
         a + "o_proj.weight": lin(D, nh * hd), a + "q_norm.weight": norm(hd), a + "k_norm.weight": norm(hd),
         m + "gate_proj.weight": lin(inter, D), m + "up_proj.weight": lin(inter, D), m + "down_proj.weight": lin(D, inter),
         o + "layer_scalar": torch.empty(1).uniform_(0.5, 1.5, generator=g)}
    if not k_eq_v:
        t[a + "v_proj.weight"] = lin(nkv * hd, 2 * D)
    for n in ("hidden_norm", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
              "post_feedforward_layernorm"):
        t[o + n + ".weight"] = norm(D)
    t.update(weights or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in t.items()}, str(folder / "model.safetensors"))
    cfg.update(config_overrides or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return {k: v.to(dtype).float() for k, v in t.items()}, cfg


__all__ = ["copied_text_config", "gemma4_drafter_config", "write_gemma4_drafter", "write_gemma4_eagle3"]
