"""DeepSpec's DSpark drafter checkpoints: read one into a :class:`DSparkHead`, write ours in that format.

DeepSpec (deepseek-ai/DeepSpec) saves a drafter with Hugging Face ``save_pretrained``: a folder with

    config.json         the target's own config, then the drafter's fields (below)
    model.safetensors   (or model-*-of-*.safetensors + model.safetensors.index.json)

config.json fields and what they become here (``DSparkHeadConfig``):

    architectures                 Qwen3DSparkModel (QK-norm) | LlamaDSparkModel (ours, no QK-norm) |
                                  Gemma4DSparkModel (Gemma 4 draft layers, for a Gemma 4 target; below)
    hidden_size, vocab_size       dim, vocab_size (must equal the target's)
    num_hidden_layers             n_layers (draft layers)
    num_attention_heads, num_key_value_heads, head_dim, intermediate_size, rms_norm_eps, rope_theta
    num_target_layers             must equal the target's block count
    target_layer_ids              feature_layers (DeepSpec's id l reads hidden_states[l + 1] of HF
                                  ``output_hidden_states``: the output of block l, as ours)
    block_size                    block_len
    mask_token_id                 mask_embedding = embed_tokens[mask_token_id]
    markov_rank, markov_head_type markov_rank, markov_kind (vanilla | gated | rnn)
    enable_confidence_head, confidence_head_with_markov
                                  the confidence layer over [h ; W1[x_{k-1}]] (without the Markov
                                  embedding its r extra inputs get weight 0)
    dspark                        ours only, optional: {"target_name", "sts"} (STS temperatures)

Weights (DeepSpec name -> ours): fc -> fc; hidden_norm -> ctx_norm; norm -> norm;
layers.i.self_attn.{q,k,v}_proj -> layers.i.wqkv (stacked); o_proj -> wo; {q,k}_norm -> q_norm /
k_norm; layers.i.mlp.{gate,up}_proj -> w13 (stacked); down_proj -> w2; input_layernorm ->
attention_norm; post_attention_layernorm -> ffn_norm; markov_head.markov_w1 [V, r] -> markov_w1;
markov_head.markov_w2 [V, r] -> markov_w2 transposed [r, V]; markov_head.gate_proj /
markov_head.joint_proj -> markov_mix; confidence_head.proj -> confidence.  embed_tokens and
lm_head are frozen copies of the target's: we read the mask row, check a sample of rows against
the target's and otherwise serve the target's own.

Gemma4DSparkModel: config.json is the target's Gemma 4 text config (``gemma4_text``) with the
drafter's fields; it is read as the target's is (``gemma_config.gemma4_args``: MoE blocks,
per-layer inputs, shared KV layers, biases, other activations and RoPE types refused by name) and
every draft layer is a full-attention one (DeepSpec's): global_head_dim (or the widths of a
``per_layer_config`` table, whatever its layer indices) -> head_dim,
num_global_key_value_heads (with attention_k_eq_v; else num_key_value_heads) -> n_kv_heads,
attention_k_eq_v -> k_eq_v, rope_parameters.full_attention -> rope_theta / rope_pairs /
rope_factor, final_logit_softcapping -> logit_softcap, decoder "gemma4" (embeddings scaled by
sqrt(hidden_size), ``dspark.models.gemma_draft_layer``).  Its layer weights: input_layernorm ->
attention_norm, post_attention_layernorm -> post_attention_norm, pre_feedforward_layernorm ->
ffn_norm, post_feedforward_layernorm -> post_ffn_norm, layer_scalar -> layer_scalar (1 when
absent: DeepSpec's buffer starts at 1), no v_proj with attention_k_eq_v (v_norm has no weight).

Anything this engine would compute differently is refused with a one-line ``ValueError`` naming
the field or weight (biases, other activations, RoPE scaling, sliding windows, an
embedding-output or final-norm feature layer, a missing confidence head, a Gemma 4 drafter for
another target family).  DeepSpec's DFlash
checkpoints are the same model with ``markov_rank 0`` and ``enable_confidence_head false``: read
with ``dflash=True`` for the ``dflash`` drafter (``check_heads``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dspark.models.dspark_head import MARKOV_KINDS, DSparkHead, DSparkHeadConfig
from dspark.models.gemma_config import gemma4_args
from dspark.models.packing import matrix_rows, matrix_shape

# architectures[0] -> QK-norm, for the Llama-form draft layers.
ARCHITECTURES = {"Qwen3DSparkModel": True, "LlamaDSparkModel": False}
GEMMA4_ARCHITECTURE = "Gemma4DSparkModel"  # Gemma 4 draft layers (DSparkHeadConfig.decoder "gemma4")
MODEL_TYPES = {True: "qwen3", False: "llama"}
EXPORT_NUM_ANCHORS = 512  # training-only field DeepSpec's constructor requires; its configs use 512
_SAMPLE_ROWS = 64  # embedding / LM-head rows compared with the target's


def is_deepspec_checkpoint(path: str | Path) -> bool:
    """A folder with a config.json (the Hugging Face layout DeepSpec saves); our heads are files."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def _fail(name: str, msg: str, what: str = "DeepSpec drafter") -> ValueError:
    return ValueError(f"{what} {name}: {msg}")


def check_heads(name: str, markov_rank: int, confidence_head: bool, dflash: bool) -> None:
    """Which drafter serves a checkpoint: DSpark needs a confidence head; DFlash has neither head.

    DeepSpec's DFlash checkpoints are its DSpark model with ``markov_rank 0`` and
    ``enable_confidence_head false``; ``--draft dflash`` serves exactly those (confidences from the
    online estimate), ``--draft dspark`` everything with a confidence head.
    """
    if dflash and markov_rank:
        raise _fail(name, f"markov_rank {markov_rank}: a DSpark checkpoint; serve it with --draft dspark "
                          f"(draft option markov=0 for the DFlash-style ablation)")
    if dflash and confidence_head:
        raise _fail(name, "enable_confidence_head true: serve it with --draft dspark (DFlash checkpoints have none)")
    if not dflash and not confidence_head:
        raise _fail(name, "enable_confidence_head false is not supported by --draft dspark (verification budgets "
                          "need confidences); a DFlash checkpoint is served with --draft dflash")


def _need(raw: dict, name: str, key: str, what: str = "DeepSpec drafter"):
    if raw.get(key) is None:
        raise _fail(name, f"config.json has no {key}", what)
    return raw[key]


def llama_layer_fields(raw: dict, name: str, what: str = "DeepSpec drafter") -> dict:
    """The draft layers' fields of a Qwen3 / Llama-form drafter config (DeepSpec's DSpark, DFlash
    and EAGLE-3 folders), refusing, with ``what`` and the field named, what they do not compute."""
    def fail(msg: str) -> ValueError:
        return _fail(name, msg, what)

    if raw.get("attention_bias", False):
        raise fail("attention_bias true is not supported (draft layers have no biases)")
    if raw.get("mlp_bias", False):
        raise fail("mlp_bias true is not supported")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise fail(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise fail(f"layer_types {raw['layer_types']} is not supported (full attention only)")
    if raw.get("use_sliding_window", False):
        raise fail("use_sliding_window true is not supported")
    if float(raw.get("partial_rotary_factor") or 1.0) != 1.0:
        raise fail(f"partial_rotary_factor {raw['partial_rotary_factor']} is not supported")
    if raw.get("final_logit_softcapping") is not None:
        raise fail(f"final_logit_softcapping {raw['final_logit_softcapping']} is not supported")
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", rope.get("rope_type", "default")))
    if kind != "default":
        raise fail(f"rope_scaling type {kind!r} is not supported (plain RoPE only)")
    theta = raw.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise fail("config.json has no rope_theta")
    dim, heads = int(_need(raw, name, "hidden_size", what)), int(_need(raw, name, "num_attention_heads", what))
    return dict(n_heads=heads, n_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or dim // heads),
                intermediate_size=int(_need(raw, name, "intermediate_size", what)),
                norm_eps=float(_need(raw, name, "rms_norm_eps", what)), rope_theta=float(theta))


def gemma4_layer_fields(raw: dict, name: str, arch: str = GEMMA4_ARCHITECTURE, what: str = "DeepSpec drafter") -> dict:
    """The draft layers' fields of a DeepSpec Gemma 4 drafter (``arch``: Gemma4DSparkModel, or
    Gemma4Eagle3Model for ``eagle3_format``): its config read as a Gemma 4 text config, every draft
    layer of the full-attention kind (head width, key/value heads, RoPE, keys as values).
    Refusals are one-line ``ValueError`` s prefixed ``what``."""
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "rms_norm_eps"):
        if key not in raw:
            raise _fail(name, f"config.json has no {key}", what)
    if raw.get("model_type", "gemma4_text") != "gemma4_text":
        raise _fail(name, f"model_type {raw['model_type']!r} is not supported for {arch} (gemma4_text)", what)
    # DeepSpec's layers read global_head_dim / num_global_key_value_heads; newer transformers
    # save them as a per_layer_config table indexed by the (copied) target's layers instead.
    text = {k: v for k, v in raw.items() if k != "per_layer_config"}
    widths = [dict(v) for v in (raw.get("per_layer_config") or {}).values()]
    if widths and "global_head_dim" not in raw:
        if any(w != widths[0] for w in widths) or set(widths[0]) - {"head_dim", "num_key_value_heads"}:
            raise _fail(name, f"per_layer_config {raw['per_layer_config']} is not supported (the same head_dim / "
                              f"num_key_value_heads for every full-attention layer)", what)
        text["global_head_dim"] = widths[0].get("head_dim", raw.get("head_dim"))
        if "num_key_value_heads" in widths[0]:
            text["num_global_key_value_heads"] = widths[0]["num_key_value_heads"]
    try:
        shared, gemma = gemma4_args(text)
    except ValueError as e:  # the same refusals as for a Gemma 4 target, naming the field
        raise _fail(name, str(e), what) from None
    full = gemma.full
    return dict(n_heads=shared["n_heads"], n_kv_heads=full.n_kv_heads, head_dim=full.head_dim,
                intermediate_size=shared["intermediate_size"], norm_eps=float(shared["norm_eps"]),
                rope_theta=full.rope_theta, rope_pairs=full.rope_pairs or 0, rope_factor=full.rope_factor,
                qk_norm=True, decoder="gemma4", k_eq_v=full.k_eq_v,
                logit_softcap=float(gemma.final_logit_softcapping or 0.0))


def read_deepspec_config(path: str | Path, dflash: bool = False) -> tuple[DSparkHeadConfig, dict]:
    """The head config of a DeepSpec checkpoint folder, and its raw config.json.

    Checks everything that needs no target; :func:`load_deepspec_head` checks the rest.
    ``dflash``: read it for the DFlash drafter (no Markov head, no confidence head; see
    :func:`check_heads`).
    """
    path = Path(path)
    name = path.name
    raw = json.loads((path / "config.json").read_text())

    def need(key: str):
        return _need(raw, name, key)

    arch = (raw.get("architectures") or ["(none)"])[0]
    if arch not in ARCHITECTURES and arch != GEMMA4_ARCHITECTURE:
        from dspark.models.eagle3_format import ARCHITECTURES as EAGLE3  # lazy: eagle3_format imports this module
        why = ("an EAGLE-3 checkpoint: serve it with --draft eagle3" if arch in EAGLE3
               else f"served: {', '.join([*ARCHITECTURES, GEMMA4_ARCHITECTURE])}")
        raise _fail(name, f"architectures {arch!r} is not a DSpark drafter this engine serves ({why})")
    layer = (gemma4_layer_fields(raw, name) if arch == GEMMA4_ARCHITECTURE
             else {**llama_layer_fields(raw, name), "qk_norm": ARCHITECTURES[arch]})

    rank = int(need("markov_rank"))
    markov_kind = str(raw.get("markov_head_type", "vanilla")).lower() if rank > 0 else "vanilla"
    if rank < 0:
        raise _fail(name, f"markov_rank {rank} is negative")
    if markov_kind not in MARKOV_KINDS:
        raise _fail(name, f"markov_head_type {raw['markov_head_type']!r} is not supported "
                          f"(supported: {', '.join(MARKOV_KINDS)})")
    check_heads(name, rank, bool(raw.get("enable_confidence_head", False)), dflash)
    if raw.get("confidence_head_with_markov", False) and rank == 0:
        raise _fail(name, "confidence_head_with_markov true needs markov_rank > 0")
    layer_ids = [int(i) for i in need("target_layer_ids")]
    if not layer_ids or any(b <= a for a, b in zip(layer_ids, layer_ids[1:])):
        raise _fail(name, f"target_layer_ids {layer_ids} must be non-empty and strictly increasing")
    if layer_ids[0] < 0:
        raise _fail(name, "target_layer_ids -1 (the embedding output) is not supported")

    extra = raw.get("dspark") or {}
    cfg = DSparkHeadConfig(
        target_name=str(extra.get("target_name", raw.get("_name_or_path", name))),
        dim=int(need("hidden_size")),
        vocab_size=int(need("vocab_size")),
        feature_layers=tuple(layer_ids),
        n_layers=int(need("num_hidden_layers")),
        block_len=int(need("block_size")),
        markov_rank=rank,
        sts=dict(extra.get("sts") or {}),
        markov_kind=markov_kind,
        **layer,
    )
    mask_id = int(need("mask_token_id"))
    if not 0 <= mask_id < cfg.vocab_size:
        raise _fail(name, f"mask_token_id {mask_id} is outside the vocabulary 0..{cfg.vocab_size - 1}")
    return cfg, raw


def _check_target(name: str, cfg: DSparkHeadConfig, raw: dict, args) -> None:
    """Refuse a checkpoint that does not fit the target (``args``: its ``ModelArgs``), naming the field."""
    arch = (raw.get("architectures") or ["(none)"])[0]
    if cfg.decoder == "gemma4" and args.decoder != "gemma4":
        raise _fail(name, f"architectures {arch!r} drafts for a Gemma 4 target, not a {args.decoder} one")
    if cfg.decoder != "gemma4" and args.decoder == "gemma4":
        raise _fail(name, f"architectures {arch!r} does not draft for a Gemma 4 target ({GEMMA4_ARCHITECTURE} does)")
    if cfg.dim != args.dim:
        raise _fail(name, f"hidden_size {cfg.dim} != the target's hidden size {args.dim}")
    if cfg.vocab_size != args.vocab_size:
        raise _fail(name, f"vocab_size {cfg.vocab_size} != the target's vocabulary {args.vocab_size}")
    n = raw.get("num_target_layers")
    if n is not None and int(n) != args.n_layers:
        raise _fail(name, f"num_target_layers {n} != the target's {args.n_layers} layers")
    # DeepSpec reads hidden_states[l + 1]; for the last layer that is the final-normed state.
    bad = [i for i in cfg.feature_layers if not 0 <= i < args.n_layers - 1]
    if bad:
        raise _fail(name, f"target_layer_ids {bad} outside 0..{args.n_layers - 2} of the target's {args.n_layers} layers")


class CheckpointWeights:
    """The tensors of a checkpoint folder, read lazily; records which names were used."""

    def __init__(self, path: Path, what: str = "DeepSpec drafter") -> None:
        from safetensors import safe_open

        self.what = what
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise _fail(path.name, "no model.safetensors (or model.safetensors.index.json) in the folder", what)
        self.name = path.name
        self.where: dict[str, object] = {}
        for f in files:
            handle = safe_open(str(path / f), framework="pt")
            for key in handle.keys():
                self.where[key] = handle
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.where:
            raise _fail(self.name, f"weight {key} is missing", self.what)
        self.used.add(key)
        t = self.where[key].get_tensor(key)
        if tuple(t.shape) != shape:
            raise _fail(self.name, f"weight {key} has shape {tuple(t.shape)}, the config implies {shape}", self.what)
        return t.float()

    def rows(self, key: str, idx: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Rows ``idx`` of a [V, D] matrix without reading the rest: [len(idx), D] float32."""
        if key not in self.where:
            raise _fail(self.name, f"weight {key} is missing", self.what)
        self.used.add(key)
        sl = self.where[key].get_slice(key)
        if tuple(sl.get_shape()) != shape:
            raise _fail(self.name, f"weight {key} has shape {tuple(sl.get_shape())}, the config implies {shape}", self.what)
        return torch.stack([sl[int(i) : int(i) + 1][0] for i in idx]).float()


def backbone_state(w: CheckpointWeights, cfg: DSparkHeadConfig) -> dict[str, torch.Tensor]:
    """Our state of the block backbone from the published names (DeepSpec's and speculators' alike):
    fc, hidden_norm, norm, and per draft layer the split attention / MLP projections and norms
    (a gemma4 head: its four norms and layer scalar, no v_proj with ``k_eq_v``)."""
    D, hd = cfg.dim, cfg.head_dim
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    state = {
        "fc.weight": w.get("fc.weight", (D, len(cfg.feature_layers) * D)),
        "ctx_norm.weight": w.get("hidden_norm.weight", (D,)),
        "norm.weight": w.get("norm.weight", (D,)),
    }
    for i in range(cfg.n_layers):
        a, m, o = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"layers.{i}."
        kv = [w.get(a + "k_proj.weight", (kv_out, D))] + ([] if cfg.k_eq_v else [w.get(a + "v_proj.weight", (kv_out, D))])
        state[o + "wqkv.weight"] = torch.cat([w.get(a + "q_proj.weight", (q_out, D)), *kv])
        state[o + "wo.weight"] = w.get(a + "o_proj.weight", (D, q_out))
        state[o + "w13.weight"] = torch.cat([w.get(m + "gate_proj.weight", (cfg.intermediate_size, D)),
                                             w.get(m + "up_proj.weight", (cfg.intermediate_size, D))])
        state[o + "w2.weight"] = w.get(m + "down_proj.weight", (D, cfg.intermediate_size))
        state[o + "attention_norm.weight"] = w.get(o + "input_layernorm.weight", (D,))
        if cfg.decoder == "gemma4":  # sandwich norms; the layer scalar is DeepSpec's buffer (1 unless saved)
            state[o + "post_attention_norm.weight"] = w.get(o + "post_attention_layernorm.weight", (D,))
            state[o + "ffn_norm.weight"] = w.get(o + "pre_feedforward_layernorm.weight", (D,))
            state[o + "post_ffn_norm.weight"] = w.get(o + "post_feedforward_layernorm.weight", (D,))
            state[o + "layer_scalar"] = w.get(o + "layer_scalar", (1,)) if o + "layer_scalar" in w else torch.ones(1)
        else:
            state[o + "ffn_norm.weight"] = w.get(o + "post_attention_layernorm.weight", (D,))
        if cfg.qk_norm:
            state[o + "q_norm.weight"] = w.get(a + "q_norm.weight", (hd,))
            state[o + "k_norm.weight"] = w.get(a + "k_norm.weight", (hd,))
    return state


def markov_state(w: CheckpointWeights, cfg: DSparkHeadConfig, n_out: int) -> dict[str, torch.Tensor]:
    """The Markov head: markov_w1 [V, r]; markov_w2, an nn.Linear(r, n_out) stored [n_out, r], transposed
    to our [r, n_out]; the gated / RNN mixing layer.  Empty without a Markov head."""
    D, V, r = cfg.dim, cfg.vocab_size, cfg.markov_rank
    if r == 0:
        return {}
    state = {"markov_w1": w.get("markov_head.markov_w1.weight", (V, r)),
             "markov_w2": w.get("markov_head.markov_w2.weight", (n_out, r)).t()}
    if cfg.markov_kind == "gated":
        state["markov_mix.weight"] = w.get("markov_head.gate_proj.weight", (r, D + r))
        state["markov_mix.bias"] = w.get("markov_head.gate_proj.bias", (r,))
    elif cfg.markov_kind == "rnn":
        state["markov_mix.weight"] = w.get("markov_head.joint_proj.weight", (3 * r, 2 * r + D))
        state["markov_mix.bias"] = w.get("markov_head.joint_proj.bias", (3 * r,))
    return state


def confidence_state(w: CheckpointWeights, cfg: DSparkHeadConfig, enabled: bool, with_markov: bool) -> dict[str, torch.Tensor]:
    """Our confidence layer over [h ; W1[x_{k-1}]] from ``confidence_head.proj``: without the Markov
    embedding its r extra inputs get weight 0; without a confidence head (DFlash) all zeros, unused."""
    D, r = cfg.dim, cfg.markov_rank
    if not enabled:
        return {"confidence.weight": torch.zeros(1, D + r), "confidence.bias": torch.zeros(1)}
    conf = w.get("confidence_head.proj.weight", (1, D + r if with_markov else D))
    return {"confidence.weight": conf if with_markov else torch.cat([conf, conf.new_zeros(1, r)], dim=1),
            "confidence.bias": w.get("confidence_head.proj.bias", (1,))}


def check_rows(w: CheckpointWeights, key: str, target_layer: nn.Module, idx: torch.Tensor,
               target_idx: torch.Tensor | None = None, shape: tuple[int, int] | None = None) -> None:
    """A frozen copy of the target's matrix must match it (up to the storage dtypes' rounding).

    Rows ``idx`` of checkpoint weight ``key`` (of ``shape``, default the target's) against rows
    ``target_idx`` (default ``idx``) of the matrix of ``target_layer`` (its embedding or LM
    head): a reduced LM head's row n is the target's row ids[n].
    """
    rows = idx if target_idx is None else target_idx
    ours = matrix_rows(target_layer, rows).float().cpu()
    theirs = w.rows(key, idx, shape or matrix_shape(target_layer))
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    if bool((cos < 0.99).any()):
        raise _fail(w.name, f"weight {key} differs from the target's (trained for another target?)", w.what)


def load_deepspec_head(path: str | Path, target: nn.Module, target_name: str | None = None,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                       draft_vocab: int | None = None, dflash: bool = False) -> DSparkHead:
    """Read DeepSpec checkpoint folder ``path`` into a head bound to ``target`` (as ``load_head``).

    Every weight of the checkpoint is mapped (see the module docstring) or the load is refused;
    ``draft_vocab`` must be 0/None (DeepSpec heads draft over the full vocabulary).  ``dflash``:
    a DFlash checkpoint (see :func:`check_heads`); its head's confidence layer is zero, unused.
    """
    path = Path(path)
    name = path.name
    cfg, raw = read_deepspec_config(path, dflash)
    _check_target(name, cfg, raw, target.args)
    if draft_vocab:
        raise _fail(name, f"draft_vocab={draft_vocab}: a DeepSpec head drafts over the full vocabulary (no id map)")
    w = CheckpointWeights(path)
    D, V = cfg.dim, cfg.vocab_size
    head = DSparkHead(cfg)
    state = backbone_state(w, cfg)
    state.update(markov_state(w, cfg, cfg.vocab_size))
    state.update(confidence_state(w, cfg, bool(raw.get("enable_confidence_head", False)),
                                  bool(raw.get("confidence_head_with_markov", False))))

    # embed_tokens / lm_head: frozen copies of the target's.  The mask row is the mask vector.
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(V, generator=g)[: min(_SAMPLE_ROWS, V)]
    mask_id = int(raw["mask_token_id"])
    idx = idx[idx != mask_id]
    check_rows(w, "embed_tokens.weight", target.tok_embeddings, idx)
    if "lm_head.weight" in w:
        check_rows(w, "lm_head.weight", target.output, idx)
    state["mask_embedding"] = w.rows("embed_tokens.weight", torch.tensor([mask_id]), (V, D))[0]

    unused = sorted(k for k in w.where if k not in w.used and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise _fail(name, f"weight {unused[0]} is not understood by this engine ({len(unused)} such)")
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:  # a mapping bug, not a checkpoint problem
        raise RuntimeError(f"DeepSpec drafter {name}: missing={missing} unexpected={unexpected}")
    dtype = dtype or target.dtype
    device = device or target.device
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False).bind_target(target)


def export_target(head: DSparkHead, mask_token_id: int, what: str) -> nn.Module:
    """The target ``head`` is bound to, after the checks every published format needs: a
    Llama-form head, feature layers before the target's last (the formats' ids for it would mean
    the final-normed hidden state), a ``mask_token_id`` inside the vocabulary.  ``what``: the
    format, for the messages."""
    cfg = head.cfg
    target = head._target[0] if head._target else None
    if target is None:
        raise ValueError("export: bind the head to its target first (embed_tokens and lm_head are written)")
    if cfg.decoder != "llama":
        raise ValueError(f"export: decoder {cfg.decoder!r}: only Llama-form heads are written in {what}'s format")
    last = target.args.n_layers - 1
    if last in cfg.feature_layers:
        raise ValueError(f"export: feature_layers {list(cfg.feature_layers)} include the target's last layer {last}, "
                         f"which {what}'s layer ids read after the final norm")
    if not 0 <= mask_token_id < cfg.vocab_size:
        raise ValueError(f"export: mask_token_id {mask_token_id} outside the vocabulary 0..{cfg.vocab_size - 1}")
    return target


def published_tensors(head: DSparkHead, mask_token_id: int) -> dict[str, torch.Tensor]:
    """The head's weights under the published names (DeepSpec's, which speculators shares), float32 on
    the CPU: the backbone, the Markov head (``markov_w2`` [N, r] as stored, N = V or trained_vocab),
    the confidence head, and embed_tokens = the target's with the mask vector in row ``mask_token_id``
    (the formats embed a real id as the mask).  No lm_head: each format writes its own rows."""
    cfg = head.cfg
    s = {k: v.detach().float().cpu() for k, v in head.state_dict().items()}
    t: dict[str, torch.Tensor] = {"fc.weight": s["fc.weight"], "hidden_norm.weight": s["ctx_norm.weight"],
                                  "norm.weight": s["norm.weight"]}
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        o, a, m = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        q, k, v = s[o + "wqkv.weight"].split([q_out, kv_out, kv_out])
        t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"] = q, k, v
        t[a + "o_proj.weight"] = s[o + "wo.weight"]
        t[m + "gate_proj.weight"], t[m + "up_proj.weight"] = s[o + "w13.weight"].split(cfg.intermediate_size)
        t[m + "down_proj.weight"] = s[o + "w2.weight"]
        t[o + "input_layernorm.weight"] = s[o + "attention_norm.weight"]
        t[o + "post_attention_layernorm.weight"] = s[o + "ffn_norm.weight"]
        if cfg.qk_norm:
            t[a + "q_norm.weight"], t[a + "k_norm.weight"] = s[o + "q_norm.weight"], s[o + "k_norm.weight"]
    if cfg.markov_rank > 0:
        t["markov_head.markov_w1.weight"] = s["markov_w1"]
        t["markov_head.markov_w2.weight"] = s["markov_w2"].t()
    if cfg.markov_kind in ("gated", "rnn"):
        layer = "gate_proj" if cfg.markov_kind == "gated" else "joint_proj"
        t[f"markov_head.{layer}.weight"], t[f"markov_head.{layer}.bias"] = s["markov_mix.weight"], s["markov_mix.bias"]
    t["confidence_head.proj.weight"], t["confidence_head.proj.bias"] = s["confidence.weight"], s["confidence.bias"]
    emb = head.embedding.detach().float().cpu().clone()
    emb[mask_token_id] = s["mask_embedding"]
    t["embed_tokens.weight"] = emb
    return t


def export_deepspec(head: DSparkHead, out: str | Path, mask_token_id: int,
                    dtype: torch.dtype = torch.bfloat16, num_anchors: int = EXPORT_NUM_ANCHORS) -> Path:
    """Write ``head`` (bound to its target) as a DeepSpec checkpoint folder ``out``; returns it.

    ``mask_token_id``: the id whose embed_tokens row carries the head's mask vector (DeepSpec's
    drafter embeds a real token id as the mask; pick a reserved special token the target never
    emits).  Loading the folder back with :func:`load_deepspec_head` gives the same proposals and
    confidences.  A head drafting over an id map (``trained_vocab``/``draft_vocab``) is refused:
    the format has no draft vocabulary.
    """
    from safetensors.torch import save_file

    cfg = head.cfg
    if cfg.trained_vocab or cfg.draft_vocab:
        field = "trained_vocab" if cfg.trained_vocab else "draft_vocab"
        raise ValueError(f"export: {field}={cfg.trained_vocab or cfg.draft_vocab}: DeepSpec's format has "
                         f"full-vocabulary heads only (--format speculators has a draft vocabulary)")
    target = export_target(head, mask_token_id, "DeepSpec")
    V, D, r = cfg.vocab_size, cfg.dim, cfg.markov_rank
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = published_tensors(head, mask_token_id)
    t["lm_head.weight"] = head.lm_head_weight.detach().float().cpu()
    save_file({k: v.to(dtype).contiguous() for k, v in t.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})

    args = target.args
    config = {
        "architectures": ["Qwen3DSparkModel" if cfg.qk_norm else "LlamaDSparkModel"],
        "model_type": MODEL_TYPES[cfg.qk_norm],
        "hidden_size": D, "vocab_size": V, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "max_position_embeddings": int(args.max_position_embeddings), "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * cfg.n_layers,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "num_target_layers": int(args.n_layers), "target_layer_ids": list(cfg.feature_layers),
        "block_size": cfg.block_len, "mask_token_id": int(mask_token_id), "num_anchors": int(num_anchors),
        "markov_rank": r, **({"markov_head_type": cfg.markov_kind} if r > 0 else {}),
        "enable_confidence_head": True, "confidence_head_with_markov": r > 0,
        "dspark": {"target_name": cfg.target_name, "sts": cfg.sts},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


__all__ = [
    "ARCHITECTURES", "CheckpointWeights", "backbone_state", "check_heads", "check_rows", "confidence_state",
    "export_deepspec", "export_target", "gemma4_layer_fields", "is_deepspec_checkpoint", "load_deepspec_head",
    "markov_state",
    "published_tensors", "read_deepspec_config",
]
