"""Reading the DSpark draft of a V4 checkpoint folder: its ``mtp.*`` tensors into :mod:`deepseek_v4_dspark`.

Published names (V4-Flash-DSpark / -0731 listings; issue 17 says V4-Pro's draft has the same
layout), per stage s of ``num_nextn_predict_layers``:

* ``mtp.{s}.*``: a V4 block without compressor or indexer (``attn.{wq_a, q_norm, wq_b, wkv,
  kv_norm, wo_a, wo_b, attn_sink}``, ``ffn.{gate.weight, gate.bias, experts.E.w1/w2/w3,
  shared_experts.*}``, ``attn_norm``, ``ffn_norm``, ``hc_attn_*``, ``hc_ffn_*``); FP8 / FP4 with
  ``.scale`` companions, dequantised as the target's (:mod:`dspark.models.quantized`);
* ``mtp.0.main_proj.weight`` [hidden, m * hidden], ``mtp.0.main_norm.weight``;
* the last stage: ``norm.weight``, ``hc_head_{fn,base,scale}``, ``markov_head.markov_w1.weight``
  and ``markov_w2.weight`` [V, r] (V4.1's ``markov_head.embed`` / ``markov_head.head``: the same
  pair renamed, mapped), ``confidence_head.proj.weight`` [1, hidden + r] (and a bias if shipped).

The draft MoE's size is read from its tensors (experts counted, width from ``w1``), not from the
target's config.  Refused, one line naming the field or tensor: a missing ``dspark_*`` field or
one that does not fit the target, no ``mtp.*`` tensors, an MTP layer instead of a DSpark draft,
a Markov head other than the vanilla pair (gated / RNN mixing tensors), V4.1's ``gate.bias_vl``,
a stage that is not sliding-window in the config's per-layer list, and shapes that disagree with
the config (main_proj's width and ``dspark_target_layer_ids``, the Markov pair and
``dspark_markov_rank``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dspark.models.deepseek_v4 import DeepseekV4Transformer, keeps_fp32
from dspark.models.deepseek_v4_config import SLIDING
from dspark.models.deepseek_v4_dspark import (
    DeepseekV4DSpark, V4DSparkConfig, V4DSparkLayers, V4DSparkOptions, read_v4_dspark_config, stage_config,
)
from dspark.models.deepseek_v4_loader import published_to_ours
from dspark.models.deepseek_v4_mtp import read_mtp_tensors, read_shared_tensors
from dspark.models.quantized import dequantise_tensors

PREFIX = "mtp."
_STAGE = re.compile(r"^(\d+)\.(.+)$")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Published name (after ``mtp.{s}.``) -> ours, for the parts outside the blocks.
_FIRST = {"main_proj.weight": "main_proj.weight", "main_norm.weight": "main_norm.weight"}
_LAST = {
    "norm.weight": "norm.weight", "hc_head_fn": "hc_head_fn", "hc_head_base": "hc_head_base",
    "hc_head_scale": "hc_head_scale",
    "markov_head.markov_w1.weight": "markov_w1.weight", "markov_head.markov_w2.weight": "markov_w2.weight",
    "markov_head.embed.weight": "markov_w1.weight", "markov_head.head.weight": "markov_w2.weight",  # V4.1 spelling
    "confidence_head.proj.weight": "confidence.weight", "confidence_head.proj.bias": "confidence_bias",
}  # fmt: skip
_HC_HEAD = ("hc_head_fn", "hc_head_base", "hc_head_scale")


def split_stages(tensors: dict[str, torch.Tensor], n_stages: int, source: str) -> tuple[dict, dict]:
    """``mtp.*`` tensors (prefix removed) -> (block tensors as ``layers.{s}.*``, the other parts
    under our names).  Refuses what this reading does not serve, naming the tensor."""
    blocks, parts = {}, {}
    last = n_stages - 1
    for name, t in tensors.items():
        hit = _STAGE.match(name)
        if hit is None or int(hit[1]) >= n_stages:
            raise ValueError(f"{source}: tensor {PREFIX}{name} is past the draft's num_nextn_predict_layers {n_stages}")
        s, rest = int(hit[1]), hit[2]
        if rest.endswith("gate.bias_vl"):
            raise ValueError(f"{source}: tensor {PREFIX}{name} (V4.1's gate.bias_vl) is not read by this drafter")
        if rest.startswith("markov_head.") and rest not in _LAST:
            raise ValueError(f"{source}: tensor {PREFIX}{name}: a Markov head other than the vanilla pair "
                             f"(markov_w1 / markov_w2) is not served")  # fmt: skip
        if rest in ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight"):
            raise ValueError(f"{source}: tensor {PREFIX}{name} belongs to an MTP layer, not a DSpark draft "
                             f"(serve it with --draft mtp)")  # fmt: skip
        if s == 0 and rest in _FIRST:
            parts[_FIRST[rest]] = t
        elif s == last and rest in _LAST:
            parts[_LAST[rest]] = t
        elif rest in ("emb.tok_emb.weight", "head.weight"):
            parts[rest] = t
        else:
            blocks[f"layers.{s}.{rest}"] = t
    return blocks, parts


def _moe_size(blocks: dict[str, torch.Tensor], source: str) -> tuple[int, int]:
    """(routed experts, expert width) of the draft's MoE, read from stage 0's tensors."""
    ids = {int(m[1]) for k in blocks if (m := re.match(r"layers\.0\.ffn\.experts\.(\d+)\.w1\.weight$", k))}
    if not ids:
        raise ValueError(f"{source}: no {PREFIX}0.ffn.experts.E.w1.weight tensors (the draft's routed experts)")
    return len(ids), int(blocks["layers.0.ffn.experts.0.w1.weight"].shape[0])


def _check_stage_kinds(raw: dict, n_layers: int, n_stages: int) -> None:
    """The stages are sliding-window blocks: their per-layer entries (after the decoder's) say so."""
    for key, sliding in (("compress_ratios", 0), ("layer_types", SLIDING)):
        extra = list(raw.get(key) or [])[n_layers : n_layers + n_stages]
        bad = [i for i, v in enumerate(extra) if v != sliding]
        if bad:
            raise ValueError(f"{key}[{n_layers + bad[0]}] = {extra[bad[0]]!r}: the DSpark draft's blocks are read "
                             f"as sliding-window only")  # fmt: skip


def build_v4_dspark(target: DeepseekV4Transformer, raw: dict, tensors: dict[str, torch.Tensor],
                    opts: V4DSparkOptions = V4DSparkOptions(), source: str = "checkpoint") -> DeepseekV4DSpark:  # fmt: skip
    """The draft from its float ``mtp.*`` tensors (prefix removed), bound to ``target``."""
    tcfg = target.cfg
    dcfg = read_v4_dspark_config(raw, tcfg)
    if not tensors:
        raise ValueError(f"{source} has no DSpark draft (no {PREFIX}* tensors): --draft v4-dspark needs a V4 "
                         f"checkpoint that ships its draft blocks")  # fmt: skip
    _check_stage_kinds(raw, tcfg.num_hidden_layers, dcfg.n_stages)
    blocks, parts = split_stages(tensors, dcfg.n_stages, source)
    for name in ("main_proj.weight", "main_norm.weight", "norm.weight", "markov_w1.weight", "markov_w2.weight",
                 "confidence.weight"):  # fmt: skip
        if name not in parts:
            where = 0 if name in _FIRST.values() else dcfg.n_stages - 1
            published = next(k for k, v in {**_FIRST, **_LAST}.items() if v == name)
            raise ValueError(f"{source}: tensor {PREFIX}{where}.{published} is missing (a V4 DSpark draft ships it)")
    if opts.collapse == "hc_head" and any(k not in parts for k in _HC_HEAD):
        raise ValueError(f"{source}: tensor {PREFIX}{dcfg.n_stages - 1}.hc_head_fn is missing: serve with "
                         f"--draft-option collapse=mean")  # fmt: skip
    h, m, vocab = tcfg.hidden_size, len(dcfg.target_layer_ids), tcfg.vocab_size
    if tuple(parts["main_proj.weight"].shape) != (h, m * h):
        raise ValueError(f"dspark_target_layer_ids: {m} layers need {PREFIX}0.main_proj.weight [{h}, {m * h}], the "
                         f"checkpoint's is {list(parts['main_proj.weight'].shape)}")  # fmt: skip
    for name in ("markov_w1.weight", "markov_w2.weight"):
        if tuple(parts[name].shape) != (vocab, dcfg.markov_rank):
            raise ValueError(f"dspark_markov_rank {dcfg.markov_rank}: the Markov head's {name.split('.')[0]} is "
                             f"{list(parts[name].shape)}, expected [{vocab}, {dcfg.markov_rank}]")  # fmt: skip
    if tuple(parts["confidence.weight"].shape) != (1, h + dcfg.markov_rank):
        raise ValueError(f"{source}: confidence_head.proj.weight is {list(parts['confidence.weight'].shape)}, "
                         f"expected [1, {h + dcfg.markov_rank}]")  # fmt: skip
    bad = [k for k, t in {**blocks, **parts}.items() if t.dtype not in _FLOAT_DTYPES]
    if bad:
        raise ValueError(f"{source}: tensor {bad[0]} is not a float (quantised without a scale?)")
    n_experts, width = _moe_size(blocks, source)
    cfg = stage_config(tcfg, dcfg, n_experts, width, opts.experts_per_token)
    embed = parts.pop("emb.tok_emb.weight", target.embed.weight)
    head = parts.pop("head.weight", target.head.weight)
    if "confidence_bias" in parts:
        parts["confidence_bias"] = parts["confidence_bias"].reshape(1)
    state = {**published_to_ours(blocks, cfg), **parts}
    dev, dtype = target.device, target.dtype
    with torch.device("meta"):
        layers = V4DSparkLayers(cfg, dcfg)

    def dtype_of(name: str) -> torch.dtype:  # as the target: norms, mixing, sinks, router in fp32
        return torch.float32 if keeps_fp32(name) or name == "confidence_bias" else dtype

    state = {k: v.to(device=dev, dtype=dtype_of(k)) for k, v in state.items()}
    if "confidence_bias" not in state:
        state["confidence_bias"] = torch.zeros(1, device=dev)
    if opts.collapse != "hc_head":  # not read; V4.1 does not ship them
        for k in _HC_HEAD:
            state.setdefault(k, torch.zeros(getattr(layers, k).shape, device=dev))
    missing, unexpected = layers.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        what = "missing" if missing else "not part of the draft as read here"
        raise ValueError(f"{source}: draft tensor {first} is {what} ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected)")  # fmt: skip
    layers = layers.eval().requires_grad_(False)
    want = (vocab, h)
    for name, t in (("embedding", embed), ("LM head", head)):
        if tuple(t.shape) != want:
            raise ValueError(f"{source}: the DSpark draft needs the whole {name} {want}, got {tuple(t.shape)}")
    return DeepseekV4DSpark(layers, cfg, dcfg, opts, embed.to(device=dev, dtype=dtype), head.to(device=dev, dtype=dtype),
                            target.inv_freq(SLIDING))  # fmt: skip


def load_v4_dspark(path, target: DeepseekV4Transformer, opts: V4DSparkOptions = V4DSparkOptions()) -> DeepseekV4DSpark:
    """The DSpark draft of the V4 folder ``path`` (the target's own folder), bound to ``target``."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    read_v4_dspark_config(raw, target.cfg)  # refuse a folder without the fields before reading tensors
    tensors = read_mtp_tensors(path, PREFIX)
    if target.cfg.weight_quant is not None:
        dtype = target.dtype
        tensors = dequantise_tensors(tensors, target.cfg.weight_quant,
                                     lambda n: torch.float32 if keeps_fp32(n) else dtype)  # fmt: skip
    if tensors and target.tp.world_size > 1:  # a sharded target: the whole embedding and head from the folder
        shared = read_shared_tensors(path)
        tensors = {**{f"0.{k}": v for k, v in shared.items()}, **tensors}
    return build_v4_dspark(target, raw, tensors, opts, source=path.name)


__all__ = ["V4DSparkConfig", "build_v4_dspark", "load_v4_dspark", "split_stages"]
