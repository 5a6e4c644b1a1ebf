"""Random-weight drafter checkpoint folders in the published formats, for loader, engine and
cluster tests without the model hub.

``write_deepspec_checkpoint`` writes what DeepSpec's ``save_pretrained`` of its DSpark model holds
(config.json = the target's config fields + the drafter's; model.safetensors under the published
weight names).  ``write_dflash_checkpoint`` writes DeepSpec's DFlash: that model with
``markov_rank 0`` and ``enable_confidence_head false`` (no ``markov_head.*``, no
``confidence_head.*``).  ``write_speculators_checkpoint`` writes what speculators'
``save_pretrained`` of a ``DSparkDraftModel`` holds: config.json with ``speculators_model_type``,
``transformer_layer_config`` (a diff against Qwen3's defaults), ``draft_vocab_size``,
``aux_hidden_state_layer_ids`` ...; weights with an [N, D] ``lm_head``, ``markov_w2`` [N, r],
``d2t`` offsets and the ``t2d`` mask.  Each returns the tensors it wrote (float32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write_deepspec_checkpoint(folder: Path, emb: torch.Tensor, lm_head: torch.Tensor, n_target_layers: int, *,
                              layer_ids=(1, 2), markov_head_type="vanilla", with_markov=True, qk_norm=True,
                              n_layers=2, n_heads=4, n_kv=2, head_dim=8, inter=48, rank=8, block_size=4,
                              mask_token_id=3, seed=0, config_overrides: dict | None = None,
                              dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A random DeepSpec DSpark checkpoint for a target with embedding ``emb`` [V, D] and LM head [V, D]."""
    g = torch.Generator().manual_seed(seed)
    Vt, Dt = emb.shape

    def lin(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    def norm(n):
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    t = {"fc.weight": lin(Dt, len(layer_ids) * Dt), "hidden_norm.weight": norm(Dt), "norm.weight": norm(Dt),
         "embed_tokens.weight": emb.float().clone(), "lm_head.weight": lm_head.float().clone()}
    for i in range(n_layers):
        a, m, o = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"layers.{i}."
        t[a + "q_proj.weight"], t[a + "k_proj.weight"] = lin(n_heads * head_dim, Dt), lin(n_kv * head_dim, Dt)
        t[a + "v_proj.weight"], t[a + "o_proj.weight"] = lin(n_kv * head_dim, Dt), lin(Dt, n_heads * head_dim) * 0.5
        if qk_norm:
            t[a + "q_norm.weight"], t[a + "k_norm.weight"] = norm(head_dim), norm(head_dim)
        t[m + "gate_proj.weight"], t[m + "up_proj.weight"] = lin(inter, Dt), lin(inter, Dt)
        t[m + "down_proj.weight"] = lin(Dt, inter) * 0.5
        t[o + "input_layernorm.weight"], t[o + "post_attention_layernorm.weight"] = norm(Dt), norm(Dt)
    if rank:
        t["markov_head.markov_w1.weight"] = torch.randn(Vt, rank, generator=g)
        t["markov_head.markov_w2.weight"] = lin(Vt, rank) * 2.0  # nn.Linear(r, V): [V, r]
    if markov_head_type == "gated":
        t["markov_head.gate_proj.weight"], t["markov_head.gate_proj.bias"] = lin(rank, Dt + rank), torch.randn(rank, generator=g)
    if markov_head_type == "rnn":
        t["markov_head.joint_proj.weight"] = lin(3 * rank, 2 * rank + Dt)
        t["markov_head.joint_proj.bias"] = torch.randn(3 * rank, generator=g)
    t["confidence_head.proj.weight"] = lin(1, Dt + (rank if with_markov else 0))
    t["confidence_head.proj.bias"] = torch.randn(1, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in t.items()}, str(folder / "model.safetensors"))
    config = {
        # The target's own config fields (Qwen3), as DeepSpec deep-copies them.
        "architectures": ["Qwen3DSparkModel" if qk_norm else "LlamaDSparkModel"], "model_type": "qwen3",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": Dt, "head_dim": head_dim, "initializer_range": 0.02, "intermediate_size": inter,
        "max_position_embeddings": 4096, "max_window_layers": 28, "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers, "num_key_value_heads": n_kv, "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1", "use_cache": True, "use_sliding_window": False, "vocab_size": Vt,
        "layer_types": ["full_attention"] * n_layers,
        # The drafter's fields (DeepSpec's build_draft_config).
        "num_target_layers": n_target_layers, "block_size": block_size, "mask_token_id": mask_token_id,
        "target_layer_ids": list(layer_ids), "num_anchors": 512, "enable_confidence_head": True,
        "confidence_head_with_markov": with_markov, "markov_rank": rank, "markov_head_type": markov_head_type,
        **(config_overrides or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {k: v.to(dtype).float() for k, v in t.items()}


def write_dflash_checkpoint(folder: Path, emb, lm_head, n_target_layers: int, **kw) -> dict[str, torch.Tensor]:
    """DeepSpec's DFlash: the DSpark checkpoint without Markov and confidence heads (its dflash_* configs)."""
    t = write_deepspec_checkpoint(folder, emb, lm_head, n_target_layers, rank=0, with_markov=False, **kw)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("confidence_head.")}
    save_file(state, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("markov_head_type", "confidence_head_with_markov"):  # build_draft_config sets neither here
        cfg.pop(key)
    cfg["enable_confidence_head"] = False
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return {k: v for k, v in t.items() if not k.startswith("confidence_head.")}


def write_speculators_checkpoint(folder: Path, emb, lm_head, *, layer_ids=(2, 3), draft_vocab=24, rank=8,
                                 markov_head_type="vanilla", n_layers=2, n_heads=4, n_kv=2, head_dim=8, inter=48,
                                 block_size=4, mask_token_id=3, seed=0, with_embed=True, config_overrides=None,
                                 dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A random speculators DSpark checkpoint; ``layer_ids`` are speculators' aux ids (input of layer i)."""
    g = torch.Generator().manual_seed(seed)
    Vt, Dt = emb.shape
    N = draft_vocab

    def lin(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    def norm(n):
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    ids = torch.randperm(Vt, generator=g)[:N].sort().values  # build_vocab_mappings sorts the selected ids
    t = {"fc.weight": lin(Dt, len(layer_ids) * Dt), "hidden_norm.weight": norm(Dt), "norm.weight": norm(Dt),
         "lm_head.weight": lm_head.float()[ids].clone()}
    if with_embed:
        t["embed_tokens.weight"] = emb.float().clone()
    if N < Vt:
        t["d2t"] = ids - torch.arange(N)
        t["t2d"] = torch.zeros(Vt, dtype=torch.bool)
        t["t2d"][ids] = True
    for i in range(n_layers):
        a, m, o = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"layers.{i}."
        t[a + "q_proj.weight"], t[a + "k_proj.weight"] = lin(n_heads * head_dim, Dt), lin(n_kv * head_dim, Dt)
        t[a + "v_proj.weight"], t[a + "o_proj.weight"] = lin(n_kv * head_dim, Dt), lin(Dt, n_heads * head_dim) * 0.5
        t[a + "q_norm.weight"], t[a + "k_norm.weight"] = norm(head_dim), norm(head_dim)
        t[m + "gate_proj.weight"], t[m + "up_proj.weight"] = lin(inter, Dt), lin(inter, Dt)
        t[m + "down_proj.weight"] = lin(Dt, inter) * 0.5
        t[o + "input_layernorm.weight"], t[o + "post_attention_layernorm.weight"] = norm(Dt), norm(Dt)
    if rank:
        t["markov_head.markov_w1.weight"] = torch.randn(Vt, rank, generator=g)
        t["markov_head.markov_w2.weight"] = lin(N, rank) * 2.0  # nn.Linear(r, draft_vocab_size)
        if markov_head_type == "gated":
            t["markov_head.gate_proj.weight"] = lin(rank, Dt + rank)
            t["markov_head.gate_proj.bias"] = torch.randn(rank, generator=g)
        t["confidence_head.proj.weight"], t["confidence_head.proj.bias"] = lin(1, Dt + rank), torch.randn(1, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in t.items()},
              str(folder / "model.safetensors"))
    config = {
        "architectures": ["DSparkSpeculator"], "speculators_model_type": "dspark", "speculators_version": "0.5.0",
        # to_diff_dict of the verifier-derived Qwen3Config: fields equal to Qwen3's defaults are absent
        "transformer_layer_config": {
            "model_type": "qwen3", "hidden_size": Dt, "intermediate_size": inter, "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim, "vocab_size": Vt,
            "max_position_embeddings": 4096, "layer_types": ["full_attention"] * n_layers,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},  # rms_norm_eps: the default 1e-6
        },
        "draft_vocab_size": N, "block_size": block_size, "target_hidden_size": None,
        "aux_hidden_state_layer_ids": list(layer_ids), "mask_token_id": mask_token_id,
        "sliding_window_non_causal": False, "sample_from_anchor": True, "markov_rank": rank,
        "markov_head_type": markov_head_type, "enable_confidence_head": bool(rank), "confidence_head_with_markov": bool(rank),
        "speculators_config": {
            "algorithm": "dspark", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": block_size}],
            "verifier": {"name_or_path": "tiny", "architectures": ["LlamaForCausalLM"]},
        },
        **(config_overrides or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {k: v.float() if v.is_floating_point() else v for k, v in t.items()} | {"ids": ids}
