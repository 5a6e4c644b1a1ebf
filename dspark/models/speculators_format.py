"""vLLM speculators-format DSpark / DFlash checkpoints: read one into a :class:`DSparkHead`, write ours.

The ``speculators`` library (vllm-project/speculators) trains block drafters and saves them with
Hugging Face ``save_pretrained``; vLLM loads that folder (``--speculative-config '{"method":
"dspark", ...}'``).  A folder whose config.json has ``speculators_model_type`` is read this way:

    speculators_model_type        "dspark" (or "dflash": the backbone alone, for the dflash drafter)
    transformer_layer_config      the draft layers' HF config, saved as a diff against its
                                  ``model_type``'s defaults (filled back from transformers):
                                  hidden_size, num_hidden_layers (draft layers), num_attention_heads,
                                  num_key_value_heads, head_dim, intermediate_size, rms_norm_eps,
                                  rope, vocab_size (the verifier's V).  The layers are always
                                  speculators' Qwen3 DFlash layers: QK-norm, whatever the model_type.
    draft_vocab_size              N: the LM head and Markov W2 cover N ids; N < V needs the id map
    aux_hidden_state_layer_ids    feature_layers = [i - 1 for i in ids]: speculators' id i is the
                                  input of target layer i (HF hidden_states[i]), ours the output
                                  of block i - 1 (vLLM maps them to DFlash's target_layer_ids alike)
    block_size, mask_token_id     block_len; the mask vector = embed_tokens[mask_token_id]
    sample_from_anchor            must be true (DSpark's default: anchor + mask slots all draft)
    target_hidden_size            must be absent or the target's hidden size
    markov_rank, markov_head_type, enable_confidence_head, confidence_head_with_markov
                                  as DeepSpec's (``deepspec_format``)
    speculators_config.verifier.name_or_path   target_name (informational)
    dspark                        ours only, optional: {"target_name", "sts"} (STS temperatures), as
                                  in our DeepSpec export; a PretrainedConfig keeps unknown keys

Weights: the DeepSpec names (``deepspec_format.backbone_state``, ``markov_state``,
``confidence_state``) with ``markov_head.markov_w2.weight`` [N, r] and ``lm_head.weight`` [N, D]
(the target's LM-head rows of the drafted ids, checked); ``d2t`` [N] int64 offsets (draft index n
is vocabulary id ``n + d2t[n]``) and ``t2d`` [V] bool (the same ids as a mask), present when
N < V; ``embed_tokens.weight`` optional (a frozen copy of the target's, checked).
``verifier_lm_head`` / ``verifier_norm`` (training-loss copies of the target's) are ignored.
The id map becomes the head's draft vocabulary (``trained_vocab = draft_vocab = N``; the ids
ascend, they are not frequency-ranked, so it is served whole).

:func:`export_speculators` writes our heads in this format (``dspark export-draft --format
speculators``): a head trained over N ids of its frequency-ranked map is written with those N ids
in ascending order (d2t / t2d, the LM-head rows and W2 columns permuted alike), which drafts the
same tokens with the same q; the reduced training vocabulary survives, which DeepSpec's format
cannot hold.  Only heads with QK-norm can be written: speculators' draft layers always apply it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dspark.models.deepspec_format import (
    ARCHITECTURES, CheckpointWeights, backbone_state, check_heads, check_rows, confidence_state, export_target,
    markov_state, published_tensors,
)
from dspark.models.dspark_head import MARKOV_KINDS, DSparkHead, DSparkHeadConfig, vocab_map_sha256
from dspark.models.packing import matrix_rows

WHAT = "speculators drafter"
MODEL_TYPES = ("dspark", "dflash")
IGNORED = ("verifier_lm_head.weight", "verifier_norm.weight")  # training-loss copies of the target's
_SAMPLE_ROWS = 64


def _fail(name: str, msg: str) -> ValueError:
    return ValueError(f"{WHAT} {name}: {msg}")


def is_speculators_checkpoint(path: str | Path) -> bool:
    """A folder whose config.json names a ``speculators_model_type``."""
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    return "speculators_model_type" in json.loads((path / "config.json").read_text())


def _layer_config(name: str, tl: dict) -> dict:
    """The draft layers' config with the defaults its diff left out (its model_type's, from transformers)."""
    from transformers import AutoConfig

    kind = tl.get("model_type", "qwen3")
    try:
        full = AutoConfig.for_model(kind, **{k: v for k, v in tl.items() if k != "model_type"}).to_dict()
    except ValueError:
        raise _fail(name, f"transformer_layer_config model_type {kind!r} is unknown to transformers") from None
    return full


def read_speculators_config(path: str | Path, dflash: bool = False) -> tuple[DSparkHeadConfig, dict]:
    """The head config of a speculators checkpoint folder, and its raw config.json.

    Checks everything that needs no target; :func:`load_speculators_head` checks the rest.
    ``dflash``: for the DFlash drafter (no Markov head, no confidence head).
    """
    path = Path(path)
    name = path.name
    raw = json.loads((path / "config.json").read_text())
    kind = raw.get("speculators_model_type")
    if kind not in MODEL_TYPES:
        raise _fail(name, f"speculators_model_type {kind!r} is not a block drafter this engine serves "
                          f"(served: {', '.join(MODEL_TYPES)})")
    if "transformer_layer_config" not in raw:
        raise _fail(name, "config.json has no transformer_layer_config")
    tl = _layer_config(name, raw["transformer_layer_config"])
    if tl.get("attention_bias", False):
        raise _fail(name, "transformer_layer_config attention_bias true is not supported")
    if tl.get("hidden_act", "silu") != "silu":
        raise _fail(name, f"transformer_layer_config hidden_act {tl['hidden_act']!r} is not supported (silu only)")
    if any(t != "full_attention" for t in tl.get("layer_types") or []):
        raise _fail(name, f"transformer_layer_config layer_types {tl['layer_types']} is not supported (full attention only)")
    rope = tl.get("rope_parameters") or {}
    scaling = tl.get("rope_scaling") or {}
    rope_kind = scaling.get("rope_type", scaling.get("type", rope.get("rope_type", "default")))
    if rope_kind != "default":
        raise _fail(name, f"transformer_layer_config rope type {rope_kind!r} is not supported (plain RoPE only)")
    if float(tl.get("partial_rotary_factor") or 1.0) != 1.0:
        raise _fail(name, f"transformer_layer_config partial_rotary_factor {tl['partial_rotary_factor']} is not supported")
    if not raw.get("sample_from_anchor", kind == "dspark"):
        raise _fail(name, "sample_from_anchor false is not supported (the anchor slot must draft the first token, "
                          "as DSpark's default)")
    rank = int(raw.get("markov_rank", 256)) if kind == "dspark" else 0
    markov_kind = str(raw.get("markov_head_type", "vanilla")) if rank > 0 else "vanilla"
    if rank < 0:
        raise _fail(name, f"markov_rank {rank} is negative")
    if markov_kind not in MARKOV_KINDS:
        raise _fail(name, f"markov_head_type {markov_kind!r} is not supported (supported: {', '.join(MARKOV_KINDS)})")
    confidence = bool(raw.get("enable_confidence_head", True)) if kind == "dspark" else False
    if confidence and raw.get("confidence_head_with_markov", True) and rank == 0:
        raise _fail(name, "confidence_head_with_markov true needs markov_rank > 0")
    check_heads(name, rank, confidence, dflash)
    ids = raw.get("aux_hidden_state_layer_ids")
    if not ids:
        raise _fail(name, "config.json has no aux_hidden_state_layer_ids")
    ids = [int(i) for i in ids]
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise _fail(name, f"aux_hidden_state_layer_ids {ids} must be strictly increasing")
    if ids[0] < 1:
        raise _fail(name, f"aux_hidden_state_layer_ids {ids}: id 0 (the embedding output) is not supported")
    if raw.get("mask_token_id") is None:
        raise _fail(name, "config.json has no mask_token_id")
    dim, heads = int(tl["hidden_size"]), int(tl["num_attention_heads"])
    V, N = int(tl["vocab_size"]), int(raw.get("draft_vocab_size") or tl["vocab_size"])
    if not 0 < N <= V:
        raise _fail(name, f"draft_vocab_size {N} outside 1..{V} (transformer_layer_config vocab_size)")
    theta = tl.get("rope_theta") or rope.get("rope_theta")
    if theta is None:
        raise _fail(name, "transformer_layer_config has no rope_theta")
    verifier = (raw.get("speculators_config") or {}).get("verifier") or {}
    extra = raw.get("dspark") or {}
    cfg = DSparkHeadConfig(
        target_name=str(extra.get("target_name") or verifier.get("name_or_path") or name),
        dim=dim,
        vocab_size=V,
        feature_layers=tuple(i - 1 for i in ids),
        n_layers=int(tl["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(tl.get("num_key_value_heads") or heads),
        head_dim=int(tl.get("head_dim") or dim // heads),
        intermediate_size=int(tl["intermediate_size"]),
        norm_eps=float(tl["rms_norm_eps"]),
        rope_theta=float(theta),
        block_len=int(raw.get("block_size", 8)),
        markov_rank=rank,
        sts=dict(extra.get("sts") or {}),
        trained_vocab=N if N < V else 0,
        draft_vocab=N if N < V else 0,
        qk_norm=ARCHITECTURES["Qwen3DSparkModel"],  # speculators' draft layers are Qwen3 DFlash layers
        markov_kind=markov_kind,
    )
    mask_id = int(raw["mask_token_id"])
    if not 0 <= mask_id < V:
        raise _fail(name, f"mask_token_id {mask_id} is outside the vocabulary 0..{V - 1}")
    return cfg, raw


def _id_map(name: str, w: CheckpointWeights, V: int, N: int) -> torch.Tensor:
    """Vocabulary id of each draft index from d2t (offsets), checked against t2d: [N] int64."""
    d2t = w.get("d2t", (N,)).long()  # read as float32: exact for ids below 2**24
    ids = torch.arange(N) + d2t
    if int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != N:
        raise _fail(name, f"d2t maps to ids outside 0..{V - 1} or repeats ids")
    t2d = w.get("t2d", (V,)).bool()
    if not torch.equal(t2d.nonzero().flatten(), ids.sort().values):
        raise _fail(name, "t2d does not mark the ids d2t maps to")
    return ids


def load_speculators_head(path: str | Path, target: nn.Module, target_name: str | None = None,
                          dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                          draft_vocab: int | None = None, dflash: bool = False) -> DSparkHead:
    """Read speculators checkpoint folder ``path`` into a head bound to ``target`` (as ``load_head``).

    Every weight is mapped (module docstring) or the load is refused.  ``draft_vocab``: None or
    the checkpoint's draft_vocab_size (the id map is served whole; 0 only for a full-vocabulary head).
    """
    path = Path(path)
    name = path.name
    cfg, raw = read_speculators_config(path, dflash)
    args = target.args
    if cfg.dim != args.dim:
        raise _fail(name, f"transformer_layer_config hidden_size {cfg.dim} != the target's hidden size {args.dim}")
    if raw.get("target_hidden_size") not in (None, args.dim):
        raise _fail(name, f"target_hidden_size {raw['target_hidden_size']} != the target's hidden size {args.dim}")
    if cfg.vocab_size != args.vocab_size:
        raise _fail(name, f"transformer_layer_config vocab_size {cfg.vocab_size} != the target's vocabulary {args.vocab_size}")
    bad = [i + 1 for i in cfg.feature_layers if i >= args.n_layers - 1]
    if bad:
        raise _fail(name, f"aux_hidden_state_layer_ids {bad} outside 1..{args.n_layers - 1} of the target's "
                          f"{args.n_layers} layers")
    V, D, N = cfg.vocab_size, cfg.dim, cfg.trained_vocab or cfg.vocab_size
    if draft_vocab not in (None, N) and not (draft_vocab == 0 and N == V):
        raise _fail(name, f"draft_vocab={draft_vocab}: this checkpoint drafts over its draft_vocab_size {N} ids "
                          f"(d2t ascends, it is not frequency-ranked), served whole")
    w = CheckpointWeights(path, WHAT)
    ids = _id_map(name, w, V, N) if N < V else None
    state = backbone_state(w, cfg)
    state.update(markov_state(w, cfg, N))
    state.update(confidence_state(w, cfg, bool(raw.get("enable_confidence_head", True)) and not dflash,
                                  bool(raw.get("confidence_head_with_markov", True))))

    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(N, generator=g)[: min(_SAMPLE_ROWS, N)]  # draft indices
    if "lm_head.weight" in w:
        check_rows(w, "lm_head.weight", target.output, rows, rows if ids is None else ids[rows], (N, D))
    mask_id = int(raw["mask_token_id"])
    if "embed_tokens.weight" in w:
        vrows = torch.randperm(V, generator=g)[: min(_SAMPLE_ROWS, V)]
        check_rows(w, "embed_tokens.weight", target.tok_embeddings, vrows[vrows != mask_id])
        state["mask_embedding"] = w.rows("embed_tokens.weight", torch.tensor([mask_id]), (V, D))[0]
    else:  # speculators fills embed_tokens from the verifier: the mask vector is the target's row
        state["mask_embedding"] = matrix_rows(target.tok_embeddings, torch.tensor([mask_id]))[0].float().cpu()

    unused = sorted(k for k in w.where if k not in w.used and k not in IGNORED and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise _fail(name, f"weight {unused[0]} is not understood by this engine ({len(unused)} such)")
    if ids is not None:
        cfg = cfg.replace(vocab_map={"size": N, "sha256": vocab_map_sha256(ids)})
    head = DSparkHead(cfg)
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:  # a mapping bug, not a checkpoint problem
        raise RuntimeError(f"{WHAT} {name}: missing={missing} unexpected={unexpected}")
    head = head.to(device=device or target.device, dtype=dtype or target.dtype).eval().requires_grad_(False)
    head = head.bind_target(target)
    head.vocab_ids = ids
    return head.use_draft_vocab(N if ids is not None else 0)


def export_speculators(head: DSparkHead, out: str | Path, mask_token_id: int,
                       dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``head`` (bound to its target) as a speculators DSpark folder ``out``; returns it.

    The fields and weights are those :func:`load_speculators_head` reads (module docstring):
    ``aux_hidden_state_layer_ids`` = feature layers + 1, ``draft_vocab_size`` N with ``d2t`` /
    ``t2d`` for a head trained over N < V ids, ``lm_head`` [N, D] = the target's rows of those
    ids, and every head field written explicitly (speculators' defaults differ from a DSpark
    head's).  ``mask_token_id``: the id whose ``embed_tokens`` row carries the mask vector, as for
    :func:`~dspark.models.deepspec_format.export_deepspec`.  A head served over fewer ids than it
    was trained on (``draft_vocab`` < ``trained_vocab``) is written over all N it was trained on.
    """
    from safetensors.torch import save_file

    cfg = head.cfg
    if not cfg.qk_norm:
        raise ValueError("export: qk_norm false: speculators' DSpark draft layers always apply QK-norm, so this head "
                         "cannot be written in its format (--format deepspec can)")
    target = export_target(head, mask_token_id, "speculators")
    V, D, r, N = cfg.vocab_size, cfg.dim, cfg.markov_rank, cfg.trained_vocab or cfg.vocab_size
    t = published_tensors(head, mask_token_id)
    lm_head = head.lm_head_weight.detach().float().cpu()  # [V, D]
    if N < V:
        if head.vocab_ids is None or head.vocab_ids.numel() < N:
            raise ValueError(f"export: trained_vocab={N} needs the head's id map of at least {N} ids")
        ranked = head.vocab_ids[:N].cpu().long()
        order = ranked.argsort()  # draft index n of the file = ranked index order[n]
        ids = ranked[order]  # [N] ascending, as speculators builds its maps
        lm_head = lm_head[ids]
        if r > 0:
            t["markov_head.markov_w2.weight"] = t["markov_head.markov_w2.weight"][order]  # [N, r]
        t["d2t"] = ids - torch.arange(N)
        t["t2d"] = torch.zeros(V, dtype=torch.bool)
        t["t2d"][ids] = True
    t["lm_head.weight"] = lm_head
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in t.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})

    args = target.args
    layers = {  # a Qwen3 config, every field the draft layers read written out
        "model_type": "qwen3", "hidden_size": D, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "vocab_size": V, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "attention_bias": False, "max_position_embeddings": int(args.max_position_embeddings),
        "tie_word_embeddings": False, "layer_types": ["full_attention"] * cfg.n_layers,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    }
    config = {
        "architectures": ["DSparkSpeculator"], "speculators_model_type": "dspark",
        "transformer_layer_config": layers, "draft_vocab_size": N, "block_size": cfg.block_len,
        "target_hidden_size": D, "aux_hidden_state_layer_ids": [i + 1 for i in cfg.feature_layers],
        "mask_token_id": int(mask_token_id), "sample_from_anchor": True,
        "markov_rank": r, "markov_head_type": cfg.markov_kind,
        "enable_confidence_head": True, "confidence_head_with_markov": r > 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "speculators_config": {
            "algorithm": "dspark", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": cfg.block_len}],
            "verifier": {"name_or_path": cfg.target_name, "architectures": [_verifier_architecture(args)]},
        },
        "dspark": {"target_name": cfg.target_name, "sts": cfg.sts},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _verifier_architecture(args) -> str:
    """The Hugging Face class of the target (informational in speculators_config): the name an HF
    folder's config gave it, else the Llama family's class that matches its attention."""
    if args.name.endswith("ForCausalLM"):
        return args.name
    return "Qwen3ForCausalLM" if args.qk_norm else "LlamaForCausalLM"


__all__ = ["export_speculators", "is_speculators_checkpoint", "load_speculators_head", "read_speculators_config"]
