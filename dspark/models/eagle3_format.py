"""DeepSpec's EAGLE-3 drafter checkpoints: read one into an :class:`Eagle3Head` bound to its target.

DeepSpec (deepseek-ai/DeepSpec, ``deepspec/modeling/eagle3``) trains EAGLE-3 drafters and saves
them with Hugging Face ``save_pretrained`` (its released ``eagle3_*_ttt7`` checkpoints): a folder
with ``config.json`` (the target's own config deep-copied, then the drafter's fields) and
``model.safetensors`` (or shards with ``model.safetensors.index.json``).

config.json fields and what they become here (``Eagle3Config``):

    architectures                 Qwen3Eagle3Model | Gemma4Eagle3Model (for a Gemma 4 target, below)
    hidden_size, vocab_size       dim, vocab_size (must equal the target's)
    num_hidden_layers, draft_num_hidden_layers
                                  draft decoder layers: must be 1 (DeepSpec's evaluator asserts it:
                                  the cache is extended without a causal mask, exact for one layer)
    num_attention_heads, num_key_value_heads, head_dim, intermediate_size, rms_norm_eps, rope_theta
                                  the draft layer (attention over 2 * hidden_size inputs)
    num_target_layers             must equal the target's block count
    target_layer_ids              feature_layers (id l reads hidden_states[l + 1]: the output of
                                  target block l, as ours); DeepSpec's configs use 5 ids
    ttt_length                    the draft depth it was trained for (informational: the engine's
                                  block length, ``--block``, sets how many tokens are drafted)
    step_loss_decay, target_model_name_or_path
                                  training only / informational (target_name)
    draft_vocab_size              optional (SpecForge-style reduced vocabulary, not in DeepSpec's
                                  own code): N < V needs ``d2t`` (and ``t2d``), lm_head is [N, D]

Weights (DeepSpec name -> ours): fc [D, m D] -> fc; layers.0.hidden_norm -> hidden_norm;
layers.0.input_layernorm -> input_norm; layers.0.self_attn.{q,k,v}_proj [*, 2 D] -> wqkv
(stacked); o_proj -> wo; {q,k}_norm -> q_norm / k_norm; layers.0.mlp.{gate,up}_proj -> w13
(stacked); down_proj -> w2; layers.0.post_attention_layernorm -> post_norm; norm -> norm.
embed_tokens and lm_head are frozen copies of the target's (DeepSpec's trainer copies and freezes
them): sampled rows are checked against the target's and the target's own are served.  With a
reduced vocabulary, lm_head row n must be the target's row of vocabulary id ``n + d2t[n]``.

The math (``Qwen3Eagle3DecoderLayer`` / ``Qwen3Eagle3Model`` / ``Qwen3Eagle3Evaluator``), for
a context x_0..x_{c} whose target features F_0..F_{c-1} are known (x_c, the anchor, has none yet):

    position i < c:   g_i = fc(F_i),  e_i = E[x_{i+1}]                (feature i with token i + 1)
    layer(g, e) at position p:
        u = [input_norm(e) ; hidden_norm(g)]                          [2 D]
        q, k, v = split(W_qkv u); q, k = RoPE_p(q_norm(q)), RoPE_p(k_norm(k))
        a = g + W_o attention(q, keys/values of positions <= p)
        h = a + W_2 (silu(W_gate post_norm(a)) * W_up post_norm(a))
    h_0 = layer(g_{c-1}, E[x_c]) at c - 1;     logits_k = lm_head(norm(h_{k-1}))  -> draft d_k
    h_k = layer(h_{k-1}, E[d_k]) at c - 1 + k   (the draft's own hidden state fed back)

Keys/values of positions < c come from the target's features and are cached; those of the drafted
positions are the draft's own, kept only while a block is drafted.  Anything computed differently
is refused with a one-line ``ValueError`` naming the field or weight.

Gemma4Eagle3Model (DeepSpec's ``eagle3/gemma4``, for a Gemma 4 target): config.json is the
target's Gemma 4 text config (``gemma4_text``) with the same drafter fields, read as the
Gemma4DSparkModel's is (``deepspec_format.gemma4_layer_fields``: MoE blocks, per-layer inputs,
shared KV layers, biases, other activations and RoPE types refused by name); its one draft layer
is a Gemma 4 block of the full-attention kind (``dspark.models.gemma_draft_layer``) whose
projections read the same [2 D] input.  What differs from the math above:

    e = sqrt(D) E[x]                                  embeddings scaled as the target's
    u = [N_in(e) ; hidden_norm(g)]                    N_in: input_layernorm
    q = RoPE(q_norm(W_q u)), k = RoPE(k_norm(W_k u)), v = N(W_v u), or N(W_k u) with
        attention_k_eq_v (no v_proj); N: RMS norm without weight; scores unscaled (scale 1)
    RoPE: rope_parameters.full_attention (proportional: only a share of the pairs rotate) at
        width global_head_dim, key/value heads num_global_key_value_heads (with k_eq_v)
    a = g + N_pa(W_o attention)                       sandwich norms around attention
    h = (a + N_pf(W_2 (gelu_tanh(W_gate N_ff(a)) * W_up N_ff(a)))) * s     ... and the MLP
    logits = c tanh(lm_head(norm(h)) / c)             c: final_logit_softcapping (none if null)

Weights: layers.0.input_layernorm -> layer.attention_norm, post_attention_layernorm ->
layer.post_attention_norm, pre_feedforward_layernorm -> layer.ffn_norm,
post_feedforward_layernorm -> layer.post_ffn_norm, layer_scalar -> layer.layer_scalar (1 when
absent), {q,k,(v)}_proj -> layer.wqkv, o_proj -> layer.wo, {q,k}_norm, mlp.* -> layer.w13 / w2;
fc, hidden_norm, norm, embed_tokens and lm_head as above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dspark.models.deepspec_format import CheckpointWeights, check_rows, gemma4_layer_fields, llama_layer_fields
from dspark.models.gemma_config import AttentionKind, embed_scale
from dspark.models.gemma_draft_layer import Gemma4DraftLayer
from dspark.models.llama import RMSNorm, apply_rope, rope_tables
from dspark.models.packing import matrix_dtype, matrix_rows, matrix_shape, whole_matrix

WHAT = "EAGLE-3 drafter"
QWEN3_ARCHITECTURE, GEMMA4_ARCHITECTURE = "Qwen3Eagle3Model", "Gemma4Eagle3Model"
ARCHITECTURES = (QWEN3_ARCHITECTURE, GEMMA4_ARCHITECTURE)
# architectures -> why not here (a one-line hint in the refusal)
_DSPARK = "a DSpark/DFlash checkpoint: serve it with --draft dspark or --draft dflash"
OTHER_ARCHITECTURES = {"Qwen3DSparkModel": _DSPARK, "LlamaDSparkModel": _DSPARK, "Gemma4DSparkModel": _DSPARK}
_SAMPLE_ROWS = 64  # embedding / LM-head rows compared with the target's


def _fail(name: str, msg: str) -> ValueError:
    return ValueError(f"{WHAT} {name}: {msg}")


@dataclass(frozen=True)
class Eagle3Config:
    """What the drafter needs of a checkpoint's config.json (see the module docstring)."""

    target_name: str
    dim: int
    vocab_size: int
    feature_layers: tuple[int, ...]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    ttt_length: int = 0  # draft depth it was trained for (0: not given)
    draft_vocab: int = 0  # N drafted ids (0: the full vocabulary)
    num_target_layers: int | None = None
    decoder: str = "qwen3"  # draft layer form: "qwen3" or "gemma4" (Gemma4Eagle3Model, module docstring)
    k_eq_v: bool = False  # gemma4: no v_proj, the values are the key projection's output
    rope_pairs: int = 0  # gemma4: frequency pairs that rotate (proportional RoPE); 0 = all head_dim / 2
    rope_factor: float = 1.0  # gemma4: divides every RoPE frequency
    logit_softcap: float = 0.0  # gemma4: logits -> c * tanh(logits / c) with c = logit_softcap; 0 = none


def read_eagle3_config(path: str | Path) -> tuple[Eagle3Config, dict]:
    """The config of a DeepSpec EAGLE-3 folder and its raw config.json; checks all that needs no target."""
    path = Path(path)
    name = path.name
    if not (path / "config.json").is_file():
        raise _fail(name, "not a checkpoint folder with a config.json")
    raw = json.loads((path / "config.json").read_text())

    def need(key: str):
        if raw.get(key) is None:
            raise _fail(name, f"config.json has no {key}")
        return raw[key]

    arch = str((raw.get("architectures") or ["(none)"])[0])
    if arch not in ARCHITECTURES:
        why = OTHER_ARCHITECTURES.get(arch, f"served: {', '.join(ARCHITECTURES)}")
        raise _fail(name, f"architectures {arch!r} is not an EAGLE-3 drafter this engine serves ({why})")
    for key in ("num_hidden_layers", "draft_num_hidden_layers"):
        if key in raw and int(raw[key]) != 1:
            raise _fail(name, f"{key} {raw[key]} is not supported (one draft layer, as DeepSpec's evaluator requires)")
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise _fail(name, f"layer_types {raw['layer_types']} is not supported (full attention only)")
    layer = _gemma4_fields(raw, name) if arch == GEMMA4_ARCHITECTURE else _qwen3_fields(raw, name)

    layer_ids = [int(i) for i in need("target_layer_ids")]
    if not layer_ids or any(b <= a for a, b in zip(layer_ids, layer_ids[1:])):
        raise _fail(name, f"target_layer_ids {layer_ids} must be non-empty and strictly increasing")
    if layer_ids[0] < 0:
        raise _fail(name, f"target_layer_ids {layer_ids}: negative ids (the embedding output) are not supported")
    if len(layer_ids) == 1:  # DeepSpec tells features from fed-back states by width: one id would be ambiguous
        raise _fail(name, f"target_layer_ids {layer_ids}: a single id is not supported (DeepSpec's forward would "
                          f"pass the fed-back hidden state through fc again; its configs use 5 ids)")
    V = int(need("vocab_size"))
    N = int(raw.get("draft_vocab_size") or V)
    if not 0 < N <= V:
        raise _fail(name, f"draft_vocab_size {N} outside 1..{V} (vocab_size)")
    cfg = Eagle3Config(
        target_name=str(raw.get("target_model_name_or_path") or raw.get("_name_or_path") or name),
        dim=int(need("hidden_size")),
        vocab_size=V,
        feature_layers=tuple(layer_ids),
        ttt_length=int(raw.get("ttt_length") or 0),
        draft_vocab=N if N < V else 0,
        num_target_layers=None if raw.get("num_target_layers") is None else int(raw["num_target_layers"]),
        **layer,
    )
    if cfg.n_heads % cfg.n_kv_heads:
        raise _fail(name, f"num_attention_heads {cfg.n_heads} is not a multiple of num_key_value_heads {cfg.n_kv_heads}")
    return cfg, raw


def _gemma4_fields(raw: dict, name: str) -> dict:
    """The draft layer's Eagle3Config fields of a Gemma4Eagle3Model (a Gemma 4 block, full-attention kind)."""
    f = gemma4_layer_fields(raw, name, GEMMA4_ARCHITECTURE, WHAT)
    return dict(n_heads=f["n_heads"], n_kv_heads=f["n_kv_heads"], head_dim=f["head_dim"],
                intermediate_size=f["intermediate_size"], norm_eps=f["norm_eps"], rope_theta=f["rope_theta"],
                decoder="gemma4", k_eq_v=f["k_eq_v"], rope_pairs=f["rope_pairs"], rope_factor=f["rope_factor"],
                logit_softcap=f["logit_softcap"])


def _qwen3_fields(raw: dict, name: str) -> dict:
    """The draft layer's Eagle3Config fields of a Qwen3Eagle3Model, refusing what it does not compute."""
    return llama_layer_fields(raw, name, WHAT)


def check_target(name: str, cfg: Eagle3Config, args) -> None:
    """Refuse a checkpoint that does not fit the target (``args``: its ``ModelArgs``), naming the field."""
    if cfg.decoder == "gemma4" and args.decoder != "gemma4":
        raise _fail(name, f"architectures {GEMMA4_ARCHITECTURE!r} drafts for a Gemma 4 target, "
                          f"not a {args.decoder} one")
    if cfg.decoder != "gemma4" and args.decoder == "gemma4":
        raise _fail(name, f"architectures {QWEN3_ARCHITECTURE!r} does not draft for a Gemma 4 target "
                          f"({GEMMA4_ARCHITECTURE} does)")
    if cfg.dim != args.dim:
        raise _fail(name, f"hidden_size {cfg.dim} != the target's hidden size {args.dim}")
    if cfg.vocab_size != args.vocab_size:
        raise _fail(name, f"vocab_size {cfg.vocab_size} != the target's vocabulary {args.vocab_size}")
    width = args.feature_width
    if width != args.dim:  # DeepSeek-V4's hyper-connection streams
        raise _fail(name, f"fc reads target layers hidden_size {cfg.dim} wide; the target's feature layers are "
                          f"{width} wide (hc_mult {args.hc_mult})")
    if cfg.num_target_layers is not None and cfg.num_target_layers != args.n_layers:
        raise _fail(name, f"num_target_layers {cfg.num_target_layers} != the target's {args.n_layers} layers")
    # DeepSpec reads hidden_states[l + 1]; for the last layer that is the final-normed state.
    bad = [i for i in cfg.feature_layers if not 0 <= i < args.n_layers - 1]
    if bad:
        raise _fail(name, f"target_layer_ids {bad} outside 0..{args.n_layers - 2} of the target's {args.n_layers} layers")


class Eagle3Head(nn.Module):
    """The EAGLE-3 draft layer and its output norm; the embedding and LM head are the target's.

    Pieces of the math (module docstring), each over any leading shape:
    :meth:`project` g = fc(F); :meth:`qkv` the layer's queries/keys/values at positions;
    :meth:`finish` the layer after attention; :meth:`logits` lm_head(norm(h)).  This class is the
    Qwen3 form; :class:`Gemma4Eagle3Head` the Gemma 4 one.
    """

    scale: float | None = None  # attention score scale (None: 1 / sqrt(head_dim))

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.fc = nn.Linear(len(cfg.feature_layers) * D, D, bias=False)
        self.hidden_norm = RMSNorm(D, cfg.norm_eps)
        self._build_layer(cfg)
        self.norm = RMSNorm(D, cfg.norm_eps)
        self._target: list = []  # borrowed embedding / LM head (not registered, never saved)
        self.draft_ids: torch.Tensor | None = None  # [N] vocabulary id of each logit column, None = all V
        self._out_rows: torch.Tensor | None = None  # [N, D] the target's LM-head rows of draft_ids

    def _build_layer(self, cfg: Eagle3Config) -> None:
        """The draft layer's own modules (Qwen3 form)."""
        D, hd = cfg.dim, cfg.head_dim
        self.input_norm = RMSNorm(D, cfg.norm_eps)
        self.wqkv = nn.Linear(2 * D, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps)
        self.k_norm = RMSNorm(hd, cfg.norm_eps)
        self.wo = nn.Linear(cfg.n_heads * hd, D, bias=False)
        self.post_norm = RMSNorm(D, cfg.norm_eps)
        self.w13 = nn.Linear(D, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, D, bias=False)

    def bind_target(self, target: nn.Module, draft_ids: torch.Tensor | None = None) -> "Eagle3Head":
        """Share the target's embedding and LM head; ``draft_ids``: a reduced draft vocabulary."""
        shape = matrix_shape(target.tok_embeddings)
        if shape != (self.cfg.vocab_size, self.cfg.dim):
            raise ValueError(f"target embedding {shape} does not match the drafter "
                             f"({self.cfg.vocab_size}, {self.cfg.dim})")
        self._target = [target]
        dev = self.fc.weight.device
        self.draft_ids = None if draft_ids is None else draft_ids.to(dev, torch.long)
        self._out_rows = None if draft_ids is None else matrix_rows(target.output, self.draft_ids).to(
            dev, self.fc.weight.dtype).contiguous()
        return self

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's embedding rows of ``ids``: [*ids.shape, D]."""
        return matrix_rows(self._target[0].tok_embeddings, ids)

    @property
    def embedding(self) -> torch.Tensor:
        """The target's whole embedding [V, D] (a copy if it is held only packed: for export)."""
        return whole_matrix(self._target[0].tok_embeddings)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at ``positions`` [*P] -> each [*P, 1, hd] (plain RoPE, base ``rope_theta``)."""
        hd = self.hd
        exponents = torch.arange(0, hd, 2, dtype=torch.float64, device=positions.device) / hd
        return rope_tables(positions, 1.0 / (self.cfg.rope_theta ** exponents), dtype)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """g = fc(F).  features: [*P, m D] -> [*P, D]."""
        return self.fc(features.to(self.fc.weight.dtype))

    def qkv(self, g: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor, with_q: bool = True
            ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The layer's q [*P, nh, hd] (None unless ``with_q``), k, v [*P, nkv, hd] at ``positions`` [*P]
        for hidden inputs g [*P, D] and tokens [*P] (vocabulary ids)."""
        e = self.embed(token_ids).to(g.dtype)
        u = torch.cat([self.input_norm(e), self.hidden_norm(g)], dim=-1)  # [*P, 2 D]: embedding first
        q_rows = self.nh * self.hd
        w = self.wqkv.weight if with_q else self.wqkv.weight[q_rows:]  # the k | v rows alone
        out = F.linear(u, w)
        q, kv = (out[..., :q_rows], out[..., q_rows:]) if with_q else (None, out)
        k, v = kv.split(self.nkv * self.hd, dim=-1)
        cos, sin = self.rope(positions, g.dtype)
        k = apply_rope(self.k_norm(k.unflatten(-1, (self.nkv, self.hd))), cos, sin)
        if q is not None:
            q = apply_rope(self.q_norm(q.unflatten(-1, (self.nh, self.hd))), cos, sin)
        return q, k, v.unflatten(-1, (self.nkv, self.hd))

    def finish(self, g: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h from the residual g [*P, D] and the attention output attn [*P, nh hd]."""
        a = g + self.wo(attn)
        gate, up = self.w13(self.post_norm(a)).split(self.cfg.intermediate_size, dim=-1)
        return a + self.w2(F.silu(gate) * up)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head(norm(h)), float32, soft-capped when ``logit_softcap``: [*P, N] (N = V without a
        reduced draft vocabulary)."""
        x = self.norm(h)
        if self._out_rows is not None:
            logits = F.linear(x.to(self._out_rows.dtype), self._out_rows).float()
        else:
            out = self._target[0].output
            logits = out(x.to(matrix_dtype(out))).float()
        cap = self.cfg.logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits


class Gemma4Eagle3Head(Eagle3Head):
    """DeepSpec's Gemma4Eagle3Model (module docstring): the draft layer is a Gemma 4 block
    (:class:`Gemma4DraftLayer`, its attention_norm the embedding's input_layernorm) reading
    [N_in(sqrt(D) E[x]) ; hidden_norm(g)], scores unscaled, RoPE of the target's full layers."""

    scale = 1.0

    def _build_layer(self, cfg: Eagle3Config) -> None:
        self.layer = Gemma4DraftLayer(cfg, in_dim=2 * cfg.dim)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at ``positions`` [*P] -> each [*P, 1, hd]: the frequencies of the target's full
        layers (``AttentionKind.inv_freq``: pairs past ``rope_pairs`` do not rotate)."""
        cfg = self.cfg
        kind = AttentionKind(head_dim=self.hd, rope_theta=cfg.rope_theta, rope_pairs=cfg.rope_pairs or None,
                             rope_factor=cfg.rope_factor)
        return rope_tables(positions, torch.tensor(kind.inv_freq(), dtype=torch.float64, device=positions.device),
                           dtype)

    def qkv(self, g: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor, with_q: bool = True
            ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """As :meth:`Eagle3Head.qkv`, for the Gemma 4 layer."""
        emb = self.embed(token_ids)
        # sqrt(D) rounded to the embedding's dtype first, as the target (and DeepSpec's embedding) do
        scale = torch.tensor(embed_scale(self.cfg.dim), dtype=emb.dtype, device=emb.device)
        e = (emb * scale).to(g.dtype)
        u = torch.cat([self.layer.attention_norm(e), self.hidden_norm(g)], dim=-1)  # [*P, 2 D]: embedding first
        cos, sin = self.rope(positions, g.dtype)
        if not with_q:
            return (None, *self.layer.context_kv(u, cos, sin))
        return self.layer.project_qkv(u, cos, sin)

    def finish(self, g: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h from the residual g [*P, D] and the attention output attn [*P, nh hd]."""
        return self.layer.finish(g, self.layer.wo(attn))


def _id_map(name: str, w: CheckpointWeights, V: int, N: int) -> torch.Tensor:
    """Vocabulary id of each draft index from ``d2t`` offsets (id = n + d2t[n]), checked against ``t2d``."""
    d2t = w.get("d2t", (N,)).long()  # read as float32: exact for ids below 2**24
    ids = torch.arange(N) + d2t
    if int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != N:
        raise _fail(name, f"d2t maps to ids outside 0..{V - 1} or repeats ids")
    if "t2d" in w:
        t2d = w.get("t2d", (V,)).bool()
        if not torch.equal(t2d.nonzero().flatten(), ids.sort().values):
            raise _fail(name, "t2d does not mark the ids d2t maps to")
    return ids


def _qwen3_layer_state(w: CheckpointWeights, cfg: Eagle3Config) -> dict[str, torch.Tensor]:
    """The Qwen3 draft layer's weights under our names (:class:`Eagle3Head`)."""
    D, hd, inter = cfg.dim, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    a, m, o = "layers.0.self_attn.", "layers.0.mlp.", "layers.0."
    return {
        "input_norm.weight": w.get(o + "input_layernorm.weight", (D,)),
        "wqkv.weight": torch.cat([w.get(a + "q_proj.weight", (q_out, 2 * D)), w.get(a + "k_proj.weight", (kv_out, 2 * D)),
                                  w.get(a + "v_proj.weight", (kv_out, 2 * D))]),
        "q_norm.weight": w.get(a + "q_norm.weight", (hd,)),
        "k_norm.weight": w.get(a + "k_norm.weight", (hd,)),
        "wo.weight": w.get(a + "o_proj.weight", (D, q_out)),
        "post_norm.weight": w.get(o + "post_attention_layernorm.weight", (D,)),
        "w13.weight": torch.cat([w.get(m + "gate_proj.weight", (inter, D)), w.get(m + "up_proj.weight", (inter, D))]),
        "w2.weight": w.get(m + "down_proj.weight", (D, inter)),
    }


def _gemma4_layer_state(w: CheckpointWeights, cfg: Eagle3Config) -> dict[str, torch.Tensor]:
    """The Gemma 4 draft layer's weights under our names (``layer.*`` of :class:`Gemma4Eagle3Head`):
    no v_proj with ``k_eq_v``; the layer scalar is DeepSpec's buffer (1 unless saved)."""
    D, hd, inter = cfg.dim, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    a, m, o = "layers.0.self_attn.", "layers.0.mlp.", "layers.0."
    kv = [w.get(a + "k_proj.weight", (kv_out, 2 * D))]
    if not cfg.k_eq_v:
        kv.append(w.get(a + "v_proj.weight", (kv_out, 2 * D)))
    return {
        "layer.wqkv.weight": torch.cat([w.get(a + "q_proj.weight", (q_out, 2 * D)), *kv]),
        "layer.wo.weight": w.get(a + "o_proj.weight", (D, q_out)),
        "layer.q_norm.weight": w.get(a + "q_norm.weight", (hd,)),
        "layer.k_norm.weight": w.get(a + "k_norm.weight", (hd,)),
        "layer.attention_norm.weight": w.get(o + "input_layernorm.weight", (D,)),
        "layer.post_attention_norm.weight": w.get(o + "post_attention_layernorm.weight", (D,)),
        "layer.ffn_norm.weight": w.get(o + "pre_feedforward_layernorm.weight", (D,)),
        "layer.post_ffn_norm.weight": w.get(o + "post_feedforward_layernorm.weight", (D,)),
        "layer.w13.weight": torch.cat([w.get(m + "gate_proj.weight", (inter, D)),
                                       w.get(m + "up_proj.weight", (inter, D))]),
        "layer.w2.weight": w.get(m + "down_proj.weight", (D, inter)),
        "layer.layer_scalar": w.get(o + "layer_scalar", (1,)) if o + "layer_scalar" in w else torch.ones(1),
    }


def load_eagle3_head(path: str | Path, target: nn.Module, target_name: str | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Eagle3Head:
    """Read DeepSpec EAGLE-3 folder ``path`` into a head bound to ``target``; every weight is mapped
    (module docstring) or the load is refused."""
    path = Path(path)
    name = path.name
    cfg, raw = read_eagle3_config(path)
    check_target(name, cfg, target.args)
    w = CheckpointWeights(path, WHAT)
    D, V = cfg.dim, cfg.vocab_size
    N = cfg.draft_vocab or V
    state = {
        "fc.weight": w.get("fc.weight", (D, len(cfg.feature_layers) * D)),
        "hidden_norm.weight": w.get("layers.0.hidden_norm.weight", (D,)),
        "norm.weight": w.get("norm.weight", (D,)),
        **(_gemma4_layer_state(w, cfg) if cfg.decoder == "gemma4" else _qwen3_layer_state(w, cfg)),
    }
    ids = None
    if N < V:
        ids = _id_map(name, w, V, N)
    elif "d2t" in w or "t2d" in w:
        raise _fail(name, "weights d2t/t2d without a draft_vocab_size below vocab_size")
    # embed_tokens / lm_head: frozen copies of the target's (a reduced lm_head: the rows of its ids).
    g = torch.Generator().manual_seed(0)
    vrows = torch.randperm(V, generator=g)[: min(_SAMPLE_ROWS, V)]
    check_rows(w, "embed_tokens.weight", target.tok_embeddings, vrows)
    rows = torch.randperm(N, generator=g)[: min(_SAMPLE_ROWS, N)]
    check_rows(w, "lm_head.weight", target.output, rows, rows if ids is None else ids[rows], (N, D))

    unused = sorted(k for k in w.where if k not in w.used and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise _fail(name, f"weight {unused[0]} is not understood by this engine ({len(unused)} such)")
    head = (Gemma4Eagle3Head if cfg.decoder == "gemma4" else Eagle3Head)(cfg)
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:  # a mapping bug, not a checkpoint problem
        raise RuntimeError(f"{WHAT} {name}: missing={missing} unexpected={unexpected}")
    head = head.to(device=device or target.device, dtype=dtype or target.dtype).eval().requires_grad_(False)
    return head.bind_target(target, ids)


__all__ = ["ARCHITECTURES", "Eagle3Config", "Eagle3Head", "Gemma4Eagle3Head", "check_target", "load_eagle3_head",
           "read_eagle3_config"]
