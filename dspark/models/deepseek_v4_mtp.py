"""DeepSeek-V4's MTP (next-n) layer: the checkpoint's ``mtp.0.*`` block as a small model of its own.

V4 checkpoints store ``num_nextn_predict_layers`` extra blocks after the decoder's, under
``mtp.{i}.*`` (transformers does not read them; our target loader skips them).  Each is one V4
decoder block plus the parts that join it to the target, and the math is the one of DeepSeek's
reference inference code (``MTPBlock``), which vLLM's V4 MTP implements too.  For the token at
position i, with the target's hyper-connection streams h_i [N, hidden] after its last block
(*before* the hyper head collapses them: the streams, not the collapsed hidden state) and the
next token t_{i+1}:

    e   = RMSNorm_enorm(Embed(t_{i+1}))                               [hidden]
    x   = h_proj(RMSNorm_hnorm(h_i)) + e_proj(e)                      [N, hidden]
          (hnorm and h_proj act on each stream, e_proj(e) is added to every stream)
    s_i = Block(x)   one V4 block: HC collapse / expand around attention and MoE, at position i
    p(t_{i+2}) = softmax(Head(RMSNorm_norm(HyperHead_mtp(s_i))))

The block, its hyper head (``hc_head_fn/base/scale``) and its final norm (``mtp.0.norm``) are
the MTP layer's own; the embedding and the LM head are the target's (a checkpoint that carries
its own copies as ``mtp.0.emb.tok_emb.weight`` / ``mtp.0.head.weight`` has them used).  Drafting
a second token feeds s_i back in place of the target's streams, at position i + 1, with the
drafted token's embedding (what vLLM does for more than one speculative token per MTP layer).

The block's attention kind is the config's per-layer entry after the decoder's
(``compress_ratios[n]`` or ``layer_types[n]``); V4-Flash ships 0 there (sliding window only),
and that is the default when the config lists only the decoder's layers (transformers cuts the
lists when it saves).  Its MoE routes by learned top-k (hash routing covers only the first
``num_hash_layers`` layer ids, and the MTP layer's id is ``num_hidden_layers``).  Only
``mtp.0`` is used: V4 ships one MTP layer; further ones are not read.

Weight names: those of a decoder block (``attn.*``, ``ffn.*``, ``attn_norm``, ``hc_attn_*`` ...,
with per-expert ``ffn.experts.E.w{1,2,3}``; ``attn.kv_norm`` as the release spells it or
``attn.norm`` as transformers writes it) plus ``e_proj``, ``h_proj``, ``enorm``, ``hnorm``,
``norm``, ``hc_head_{fn,base,scale}``.  The release's FP8 / FP4 tensors and their ``.scale``
companions are dequantised by :func:`load_mtp` as the target's are (:mod:`dspark.models.quantized`);
:func:`build_mtp` itself takes float tensors and refuses others by name.

Shapes: T tokens in a step, N hyper-connection streams.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dspark.kernels import deepseek_v4_attention as att
from dspark.kernels import deepseek_v4_hyper as hyp
from dspark.models.deepseek_v4 import Block, DeepseekV4Transformer, _W, keeps_fp32
from dspark.models.deepseek_v4_config import CSA, HCA, SLIDING, DeepseekV4Config
from dspark.models.deepseek_v4_loader import published_to_ours
from dspark.models.deepseek_v4_state import DeepseekV4State
from dspark.models.kv_cache import VarlenBatch
from dspark.models.quantized import dequantise_tensors

PREFIX = "mtp.0."
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SHARED = {"embed": ("embed.weight", "model.embed_tokens.weight", "embed_tokens.weight"),
           "head": ("head.weight", "lm_head.weight")}  # fmt: skip


def mtp_block_config(cfg: DeepseekV4Config, raw: dict[str, Any]) -> DeepseekV4Config:
    """The one-block configuration of MTP layer 0: the target's sizes, the MTP layer's kinds.

    Example:
        >>> from dspark.models.deepseek_v4_config import deepseek_v4_config_from_hf
        >>> raw = {"model_type": "deepseek_v4", "num_hidden_layers": 2, "compress_ratios": [0, 4, 0]}
        >>> mtp_block_config(deepseek_v4_config_from_hf(raw), raw).layer_types
        ('sliding_attention',)
    """
    n = cfg.num_hidden_layers
    kind = SLIDING
    if raw.get("layer_types") is not None and len(raw["layer_types"]) > n:
        kind = raw["layer_types"][n]
    elif raw.get("compress_ratios") is not None and len(raw["compress_ratios"]) > n:
        by_ratio = {0: SLIDING, cfg.csa_compress_ratio: CSA, cfg.hca_compress_ratio: HCA}
        ratio = int(raw["compress_ratios"][n])
        if ratio not in by_ratio:
            raise ValueError(f"compress_ratios[{n}] (the MTP layer) {ratio} matches neither 0, CSA nor HCA")
        kind = by_ratio[ratio]
    mlp = "moe"
    if raw.get("mlp_layer_types") is not None and len(raw["mlp_layer_types"]) > n:
        mlp = raw["mlp_layer_types"][n]
    elif raw.get("num_hash_layers") is not None and int(raw["num_hash_layers"]) > n:
        mlp = "hash_moe"
    return dataclasses.replace(cfg, num_hidden_layers=1, layer_types=(kind,), mlp_layer_types=(mlp,))


class MTPLayer(Block):
    """A V4 block plus the MTP layer's input projections, hyper head and final norm."""

    def __init__(self, cfg: DeepseekV4Config) -> None:
        super().__init__(cfg, 0)
        h, n = cfg.hidden_size, cfg.hc_mult
        self.e_proj, self.h_proj = _W(h, h), _W(h, h)
        self.enorm, self.hnorm, self.norm = _W(h), _W(h), _W(h)
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * h))
        self.hc_head_base = nn.Parameter(torch.empty(n))
        self.hc_head_scale = nn.Parameter(torch.empty(1))


class DeepseekV4MTP(nn.Module):
    """MTP layer 0 of a V4 checkpoint, bound to its target's embedding, LM head and RoPE.

    ``forward`` runs the layer over a varlen step in its own :class:`DeepseekV4State` (one
    attention layer), which rolls back as the target's does: by length.
    """

    def __init__(self, target: DeepseekV4Transformer, layer: MTPLayer, embed: torch.Tensor, head: torch.Tensor) -> None:
        super().__init__()
        self.target_cfg, self.cfg, self.layer = target.cfg, layer.cfg, layer
        self.embed, self.head = embed, head  # [V, hidden] each: the target's tensors unless the checkpoint has copies
        self._inv_freq = target.inv_freq(layer.kind)
        self.n_streams, self.hidden = layer.cfg.hc_mult, layer.cfg.hidden_size

    @property
    def device(self) -> torch.device:
        return self.layer.e_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.e_proj.weight.dtype

    def make_state(self, n_slots: int, max_seq: int) -> DeepseekV4State:
        """Full-length state (no ring floor): drafts past the anchor are rolled back freely."""
        return DeepseekV4State(self.cfg, n_slots, max_seq, self.dtype, self.device, slack=None)

    def forward(
        self, streams: torch.Tensor, next_tokens: torch.Tensor, state: DeepseekV4State, batch: VarlenBatch,
        logits_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """streams: [T, N, hidden] (the target's last-block streams, or this layer's own output when
        drafting further); next_tokens: [T] the token after each position.  Returns this layer's
        output streams [T, N, hidden] and the logits [rows, V] of the rows in ``logits_index``."""
        cfg, lay, eps = self.cfg, self.layer, self.cfg.rms_norm_eps
        for slot, start, q in zip(batch.slots, batch.starts, batch.q_lens):
            state.begin(slot, start, q)
        e = att.rms_norm(self.embed[next_tokens], lay.enorm.weight, eps) @ lay.e_proj.weight.T  # [T, hidden]
        x = att.rms_norm(streams.to(self.dtype), lay.hnorm.weight, eps) @ lay.h_proj.weight.T  # [T, N, hidden]
        x = (x + e.unsqueeze(1))[None]  # [1, T, N, hidden]
        out = lay(x, next_tokens, state.layers[0], batch, self._inv_freq)[0]  # [T, N, hidden]
        rows = out if logits_index is None else out[logits_index]
        h = hyp.hyper_head(rows[None], lay.hc_head_fn, lay.hc_head_base, lay.hc_head_scale, cfg.hc_eps, eps)[0]
        logits = (att.rms_norm(h, lay.norm.weight, eps) @ self.head.T).float()  # [rows, V]
        return out, logits


def read_mtp_tensors(path: Path, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The ``prefix`` tensors (default ``mtp.0.*``) of a folder's safetensors files, prefix removed
    (nothing else is read; the V4 DSpark draft reads all of ``mtp.*``)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = fh.get_tensor(key)
    return out


def build_mtp(target: DeepseekV4Transformer, raw_config: dict[str, Any], tensors: dict[str, torch.Tensor],
              source: str = "checkpoint") -> DeepseekV4MTP:
    """MTP layer 0 from its tensors (names without the ``mtp.0.`` prefix), bound to ``target``.

    Raises ValueError, one line: no MTP weights, a quantised tensor, or names that do not fit.
    """
    if not tensors or int(raw_config.get("num_nextn_predict_layers", 1)) < 1:
        raise ValueError(f"{source} has no MTP layer (no {PREFIX}* weights): --draft mtp needs a DeepSeek-V4 "
                         f"checkpoint that ships its next-n layer")  # fmt: skip
    cfg = mtp_block_config(target.cfg, raw_config)
    block: dict[str, torch.Tensor] = {}
    embed, head = target.embed.weight, target.head.weight
    for name, t in tensors.items():
        quantised = name.endswith(".scale") or (t.dtype not in _FLOAT_DTYPES and not name.endswith("tid2eid"))
        if quantised:  # FP8 / FP4 blocks and their block scales
            raise ValueError(f"tensor {PREFIX}{name} has dtype {t.dtype}: build_mtp takes float tensors (load_mtp "
                             f"dequantises the release's FP8 / FP4)")  # fmt: skip
        if name == "emb.tok_emb.weight":
            embed = t
        elif name == "head.weight":
            head = t
        else:
            block[f"layers.0.{name}"] = t
    state = {k.removeprefix("layers.0."): v for k, v in published_to_ours(block, cfg).items()}
    dev, dtype = target.device, target.dtype
    with torch.device("meta"):
        layer = MTPLayer(cfg)

    def dtype_of(name: str) -> torch.dtype:  # as the target's loader: norms, mixing, sinks, router in fp32
        return torch.long if name.endswith("tid2eid") else torch.float32 if keeps_fp32(name) else dtype

    state = {k: v.to(device=dev, dtype=dtype_of(k)) for k, v in state.items()}
    missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{source}: the {PREFIX}* weights do not match a V4 MTP layer: missing={missing} "
                         f"unexpected={unexpected}")  # fmt: skip
    layer = layer.eval().requires_grad_(False)
    want = (target.cfg.vocab_size, target.cfg.hidden_size)
    for name, t in (("embedding", embed), ("LM head", head)):
        if tuple(t.shape) != want:  # a vocabulary-parallel target holds a shard: pass the whole tensors in
            raise ValueError(f"{source}: the MTP layer needs the whole {name} {want}, got {tuple(t.shape)}")
    return DeepseekV4MTP(target, layer, embed.to(device=dev, dtype=dtype), head.to(device=dev, dtype=dtype))


def read_shared_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The target's embedding and LM head as ``mtp.0.emb.tok_emb.weight`` / ``head.weight`` would
    give them (for a target whose own copies are sharded over a tensor-parallel group)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                for ours, names in (("emb.tok_emb.weight", _SHARED["embed"]), ("head.weight", _SHARED["head"])):
                    if key in names:
                        out[ours] = fh.get_tensor(key)
    return out


def load_mtp(path, target: DeepseekV4Transformer) -> DeepseekV4MTP:
    """MTP layer 0 of the V4 folder ``path`` (the target's own folder), bound to ``target``.

    The embedding and LM head are the target's tensors on one device; when the target is sharded
    (tensor parallel) they are read whole from the folder, unless the layer carries its own."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    tensors = read_mtp_tensors(path)
    if target.cfg.weight_quant is not None:  # the layer's FP8 / FP4 blocks, as the target loader does
        dtype = target.dtype
        tensors = dequantise_tensors(tensors, target.cfg.weight_quant,
                                     lambda n: torch.float32 if keeps_fp32(n) else dtype)  # fmt: skip
    if tensors and target.tp.world_size > 1:
        tensors = {**read_shared_tensors(path), **tensors}
    return build_mtp(target, raw, tensors, source=path.name)


__all__ = ["DeepseekV4MTP", "MTPLayer", "build_mtp", "load_mtp", "mtp_block_config", "read_mtp_tensors",
           "read_shared_tensors"]  # fmt: skip
