"""A tiny DeepSeek-V4 configuration for transformers' DeepseekV4 and a randomiser of its modules.

Three layers (sliding, CSA with m = 4, HCA with m' = 8), window 8, three streams, one
hash-routed MoE layer: windows close within a few dozen tokens.  Eight indexer heads: with
two, many indexer scores are exactly 0 (every head's ReLU off), and transformers' top-k breaks
such ties differently from ours (lower entry first), which would hide real differences.
"""

from __future__ import annotations

import torch
from transformers import DeepseekV4Config as HFConfig
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

from dspark.models.deepseek_v4_config import CSA, HCA, SLIDING

LAYERS = [SLIDING, CSA, HCA]


def tiny_hf_config(**over) -> HFConfig:
    kw = dict(
        vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, head_dim=16, qk_rope_head_dim=8, q_lora_rank=24,
        n_routed_experts=8, num_experts_per_tok=2, num_hash_layers=1, layer_types=LAYERS,
        compress_rates={CSA: 4, HCA: 8}, sliding_window=8, o_groups=2, o_lora_rank=8,
        index_n_heads=8, index_head_dim=8, index_topk=3, hc_mult=3, hc_sinkhorn_iters=5,
        max_position_embeddings=1024, routed_scaling_factor=1.5,
        rope_scaling={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1},
    )  # fmt: skip
    kw.update(over)
    return HFConfig(**kw)


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (the initialiser zeroes sinks, biases and position biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for m in module.modules():
            if isinstance(m, hf.DeepseekV4TopKRouter):
                m.e_score_correction_bias.copy_(torch.randn(m.e_score_correction_bias.shape, generator=gen) * 0.3)
            if isinstance(m, hf.DeepseekV4HashRouter):
                rows = [torch.randperm(m.num_experts, generator=gen)[: m.top_k] for _ in range(m.tid2eid.shape[0])]
                m.tid2eid.copy_(torch.stack(rows))
    return module.eval()
