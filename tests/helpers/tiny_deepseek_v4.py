"""A tiny DeepSeek-V4 configuration for transformers' DeepseekV4 and a randomiser of its modules.

Three layers (sliding, CSA with m = 4, HCA with m' = 8), window 8, three streams, one
hash-routed MoE layer: windows close within a few dozen tokens.  Eight indexer heads: with
two, many indexer scores are exactly 0 (every head's ReLU off), and transformers' top-k breaks
such ties differently from ours (lower entry first), which would hide real differences.

The MTP helpers write a next-n layer under its published ``mtp.0.*`` names: its block, hyper
head and norm from a one-block transformers model (which also serves as the reference), its
input norms and projections random (``tiny_mtp_layer``, ``mtp_checkpoint_tensors``, ``write_mtp``).
"""

from __future__ import annotations

import torch
from transformers import DeepseekV4Config as HFConfig
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

from dspark.models.deepseek_v4_config import CSA, HCA, SLIDING
from dspark.workers.drafters.base import DraftBlock, StatelessDrafter

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


# -- the MTP (next-n) layer ------------------------------------------------------------------------
# Published names of the MTP layer's own tensors (besides a decoder block's), as DeepSeek's
# reference code and vLLM's V4 MTP loader read them under ``mtp.0.``.
MTP_OWN = ("enorm.weight", "hnorm.weight", "e_proj.weight", "h_proj.weight")


def tiny_mtp_layer(target: "hf.DeepseekV4ForCausalLM", kind: str, seed: int, **over):
    """MTP layer 0 for ``target``: a one-block transformers V4 model (the MTP block, its hyper
    head and final norm, with the target's embedding and LM head) and the layer's own input
    norms and projections {published name: tensor}."""
    cfg = tiny_hf_config(num_hidden_layers=1, layer_types=[kind], mlp_layer_types=["moe"], **over)
    cfg._attn_implementation = "eager"
    one = randomise(hf.DeepseekV4ForCausalLM(cfg), seed)
    with torch.no_grad():
        one.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        one.lm_head.weight.copy_(target.lm_head.weight)
    gen = torch.Generator().manual_seed(seed + 1)
    h = cfg.hidden_size
    own = {
        "enorm.weight": 1 + 0.2 * torch.randn(h, generator=gen),
        "hnorm.weight": 1 + 0.2 * torch.randn(h, generator=gen),
        "e_proj.weight": torch.randn(h, h, generator=gen) / h**0.5,
        "h_proj.weight": torch.randn(h, h, generator=gen) / h**0.5,
    }
    return one.eval(), own


def mtp_checkpoint_tensors(one: "hf.DeepseekV4ForCausalLM", own: dict) -> dict[str, torch.Tensor]:
    """The MTP layer under its published ``mtp.0.*`` names: the block's tensors as transformers
    writes a decoder layer's (``attn.norm`` in the release's spelling ``attn.kv_norm``), the hyper
    head as ``hc_head_{fn,base,scale}``, the final norm as ``norm``; no embedding or head (shared)."""
    import tempfile
    from pathlib import Path

    from safetensors import safe_open

    top = {"model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
           "model.hc_head.hc_scale": "hc_head_scale", "model.norm.weight": "norm.weight"}  # fmt: skip
    out = {}
    with tempfile.TemporaryDirectory() as d:
        one.save_pretrained(d)
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    if key.startswith("model.layers.0."):
                        name = key.removeprefix("model.layers.0.").replace("attn.norm.", "attn.kv_norm.")
                    elif key in top:
                        name = top[key]
                    else:
                        continue  # embedding and LM head: the target's
                    out[f"mtp.0.{name}"] = fh.get_tensor(key).clone()
    out.update({f"mtp.0.{k}": v.clone() for k, v in own.items()})
    return out


def write_mtp(folder, tensors: dict[str, torch.Tensor], kind: str) -> None:
    """Add the MTP layer to a V4 folder: its tensors in a shard of their own, and (for a kind other
    than the default sliding window) the config's per-layer list one entry longer, as released."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "mtp.safetensors"))
    if kind != SLIDING:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["layer_types"] = list(cfg["layer_types"]) + [kind]
        (folder / "config.json").write_text(json.dumps(cfg))


def write_tiny_folder(path, vocab_size: int, seed: int, round_to: torch.dtype | None = None,
                      **over) -> hf.DeepseekV4ForCausalLM:  # fmt: skip
    """A tiny random V4 folder (transformers' ``save_pretrained``: published names, plus a byte
    tokenizer) at ``path``; returns transformers' model of it.  ``round_to``: every weight
    rounded to that dtype's values (still stored in fp32), as a bf16 checkpoint would hold."""
    from helpers.tiny_hf import write_byte_tokenizer

    cfg = tiny_hf_config(vocab_size=vocab_size, **over)
    cfg._attn_implementation = "eager"
    ref = randomise(hf.DeepseekV4ForCausalLM(cfg), seed)
    with torch.no_grad():  # unit-variance embeddings: logits of a sane scale
        ref.model.embed_tokens.weight.normal_(generator=torch.Generator().manual_seed(seed + 1))
        if round_to is not None:
            for p in ref.parameters():
                p.copy_(p.to(round_to).float())
    ref.save_pretrained(path)
    write_byte_tokenizer(path, vocab_size)
    return ref


def release_kv_norm_spelling(folder) -> int:
    """Rename the attention KV norms of a transformers-written V4 folder to the release's spelling
    (``layers.N.attn.kv_norm.weight``); returns how many tensors were renamed."""
    import re
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    pattern, renamed = re.compile(r"^model\.(layers\.\d+\.attn)\.norm\.weight$"), 0
    for f in sorted(Path(folder).glob("model*.safetensors")):
        tensors = load_file(str(f))
        out = {}
        for k, v in tensors.items():
            hit = pattern.match(k)
            renamed += hit is not None
            out[f"{hit[1]}.kv_norm.weight" if hit else k] = v
        save_file(out, str(f), metadata={"format": "pt"})
    return renamed


class ScriptedDrafter(StatelessDrafter):
    """Proposes the next tokens of a known greedy script, wrong at a pseudo-random block position."""

    name = "scripted"

    def __init__(self, script: list[int], vocab_size: int, seed: int) -> None:
        self.script, self.vocab_size = script, vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, seqs, block_len):
        blocks = []
        for seq in seqs:
            n = len(seq.output_ids)
            draft = list(self.script[n : n + block_len]) or [0]
            wrong = int(torch.randint(0, block_len + 2, (1,), generator=self.gen))  # > len: all right
            if wrong < len(draft):
                draft[wrong] = (draft[wrong] + 1) % self.vocab_size
            blocks.append(DraftBlock(token_ids=draft))
        return blocks
