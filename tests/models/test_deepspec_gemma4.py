"""DeepSpec's Gemma 4 drafters (``Gemma4DSparkModel``, DSpark and DFlash) on a Gemma 4 target.

The target is the tiny Gemma 4 folder of test_gemma4.py (helpers/tiny_hf.py); the drafter
folders are written by helpers/gemma4_drafters.py under the published names and config fields.
``gemma4_drafter_hidden`` recomputes a block from the folder's tensors alone, following the
Gemma 4 drafter's equations (sandwich norms, q/k norms and a weightless v norm, keys as values,
unscaled scores, proportional RoPE, GELU-tanh, layer scalars, sqrt(D)-scaled embeddings,
soft-capped logits, then the Markov bias), as an independent reference for the q the verifier
receives.  Greedy fp32 decoding with either drafter equals plain decoding; misfits are refused
naming the field.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dspark.models.deepspec_format import export_deepspec, load_deepspec_head
from dspark.models.loader import load_model
from dspark.workers.drafters.dflash import DFlashDrafter
from dspark.workers.drafters.dspark import DSparkDrafter
from helpers.drafter_checkpoints import write_deepspec_checkpoint
from helpers.gemma4_drafters import write_gemma4_drafter
from helpers.tiny_hf import PROMPTS, tiny_gemma4
from helpers.tiny_models import make_seq, tiny_target


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """(folder, our fp32 model of it): 4 layers, dim 64, vocabulary 320; full layers of width 32."""
    path = tmp_path_factory.mktemp("gemma4_target")
    tiny_gemma4(path)
    return path, load_model(path, dtype="fp32", progress=False)


# ------------------------------------------------------------------------------------------------
# Independent reference: the Gemma 4 drafter's equations on the published tensor names
# ------------------------------------------------------------------------------------------------
def _rms(x, w=None, eps=1e-6):
    y = x * (x.pow(2).mean(-1, keepdim=True) + eps).pow(-0.5)
    return y if w is None else y * w


def _rope(x, pos, hd, theta, pairs):
    """Rotate-half RoPE in which only the first ``pairs`` frequency pairs turn."""
    inv = torch.tensor([theta ** (-2 * i / hd) if i < pairs else 0.0 for i in range(hd // 2)], dtype=torch.float64)
    ang = pos.double().unsqueeze(-1) * inv
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()  # [P, hd]
    half = hd // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def gemma4_drafter_hidden(t, cfg, feats, anchor, G):
    """Final-normed hidden states [G, D] of one block anchored after ``feats`` [S, m D]."""
    S, D = feats.shape[0], cfg["hidden_size"]
    nh, hd = cfg["num_attention_heads"], cfg["global_head_dim"]
    k_eq_v = cfg["attention_k_eq_v"]
    nkv = cfg["num_global_key_value_heads"] if k_eq_v else cfg["num_key_value_heads"]
    rp = cfg["rope_parameters"]["full_attention"]
    pairs, theta = int(rp["partial_rotary_factor"] * hd // 2), rp["rope_theta"]
    ctx = _rms(feats @ t["fc.weight"].T, t["hidden_norm.weight"])
    x = t["embed_tokens.weight"][torch.tensor([anchor] + [cfg["mask_token_id"]] * (G - 1))] * D ** 0.5
    pos = torch.arange(S + G)
    for i in range(cfg["num_hidden_layers"]):
        a, m, o = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"layers.{i}."
        xn = _rms(x, t[o + "input_layernorm.weight"])
        both = torch.cat([ctx, xn])  # keys/values: the projected context, then the block
        q = _rms((xn @ t[a + "q_proj.weight"].T).view(G, nh, hd), t[a + "q_norm.weight"])
        k_raw = (both @ t[a + "k_proj.weight"].T).view(S + G, nkv, hd)
        v_raw = k_raw if k_eq_v else (both @ t[a + "v_proj.weight"].T).view(S + G, nkv, hd)
        k, v = _rms(k_raw, t[a + "k_norm.weight"]), _rms(v_raw)
        q, k = _rope(q, pos[S:], hd, theta, pairs), _rope(k, pos, hd, theta, pairs)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k), -1)  # scale 1.0; the block sees all context
        attn = torch.einsum("hqk,khd->qhd", att, v).reshape(G, nh * hd) @ t[a + "o_proj.weight"].T
        x = x + _rms(attn, t[o + "post_attention_layernorm.weight"])
        xn = _rms(x, t[o + "pre_feedforward_layernorm.weight"])
        mlp = (F.gelu(xn @ t[m + "gate_proj.weight"].T, approximate="tanh") * (xn @ t[m + "up_proj.weight"].T)) \
            @ t[m + "down_proj.weight"].T
        x = (x + _rms(mlp, t[o + "post_feedforward_layernorm.weight"])) * t[o + "layer_scalar"]
    return _rms(x, t["norm.weight"])


def gemma4_drafter_logits_and_conf(t, cfg, h, prev):
    """Soft-capped base logits plus the Markov bias [G, V], and confidences [G] (None for DFlash)."""
    cap = cfg["final_logit_softcapping"]
    logits = torch.tanh(h @ t["lm_head.weight"].T / cap) * cap
    if cfg["markov_rank"]:
        w1, w2 = t["markov_head.markov_w1.weight"], t["markov_head.markov_w2.weight"]
        e = w1[prev]  # [G, r]
        if cfg["markov_head_type"] == "gated":
            gate = torch.cat([h, e], -1) @ t["markov_head.gate_proj.weight"].T + t["markov_head.gate_proj.bias"]
            e = torch.sigmoid(gate) * e
        logits = logits + e @ w2.T
    if not cfg["enable_confidence_head"]:
        return logits, None
    feats = torch.cat([h, t["markov_head.markov_w1.weight"][prev]], -1) if cfg["confidence_head_with_markov"] else h
    return logits, torch.sigmoid(feats @ t["confidence_head.proj.weight"].T + t["confidence_head.proj.bias"]).squeeze(-1)


# ------------------------------------------------------------------------------------------------
# The q the verifier receives
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_eq_v,kind,with_markov,dflash", [
    (True, "vanilla", True, False),  # keys as values, one KV head (as the published 12B config)
    (False, "gated", False, False),  # a v_proj, two KV heads; confidence without the Markov embedding
    (True, "vanilla", False, True),  # DFlash: no Markov head, no confidence head
])
def test_proposal_matches_gemma4_drafter_math(gemma4, tmp_path, k_eq_v, kind, with_markov, dflash):
    path, lm = gemma4
    t, cfg = write_gemma4_drafter(tmp_path / "ck", path, markov_head_type=kind, with_markov=with_markov,
                                  k_eq_v=k_eq_v, dflash=dflash)
    head = load_deepspec_head(tmp_path / "ck", lm.model, dtype=torch.float32, dflash=dflash)
    c = head.cfg
    assert (c.decoder, c.head_dim, c.n_kv_heads, c.k_eq_v) == ("gemma4", 32, 1 if k_eq_v else 2, k_eq_v)
    assert (c.rope_pairs, c.rope_theta, c.logit_softcap, c.feature_layers) == (4, 1e6, 30.0, (0, 2))
    G, anchor, top_k, S = 4, 65, 8, 9
    feats = torch.randn(S, 2 * 64, generator=torch.Generator().manual_seed(3))
    h_ref = gemma4_drafter_hidden(t, cfg, feats, anchor, G)
    for temperature in (0.9, 0.0):
        drafter = (DFlashDrafter(head, n_slots=3, max_seq=64, proposal_top_k=top_k) if dflash
                   else DSparkDrafter(head, n_slots=3, max_seq=64, proposal_top_k=top_k))
        seqs = [make_seq(f"r{i}", list(range(1, S + 1)), anchor=anchor, temperature=temperature, seed=i) for i in range(3)]
        with torch.no_grad():
            for s in seqs:
                drafter.observe(s, s.prompt_ids, feats)
            blocks = drafter.propose(seqs, G)
            h, _ = drafter.block_logits(seqs[:1], torch.tensor([anchor]), G)
        assert torch.allclose(h[0], h_ref, atol=1e-4), (h[0] - h_ref).abs().max()
        for b in blocks:
            logits, conf = gemma4_drafter_logits_and_conf(t, cfg, h_ref, torch.tensor([anchor] + b.token_ids[:-1]))
            if conf is not None:
                assert torch.allclose(torch.tensor(b.confidence), conf, atol=1e-5)
            for k in range(G):
                if temperature == 0.0:  # greedy: one-hot on the argmax
                    assert b.token_ids[k] == int(logits[k].argmax()) and b.probs[k, 0].item() == 1.0
                    continue
                vals, ids = torch.topk(logits[k], top_k)
                want = dict(zip(ids.tolist(), torch.softmax(vals / temperature, -1).tolist()))
                got = dict(zip(b.prob_ids[k].tolist(), b.probs[k].tolist()))
                assert got.keys() == want.keys()
                assert all(abs(got[i] - want[i]) < 1e-5 for i in want)


# ------------------------------------------------------------------------------------------------
# Lossless through the engine
# ------------------------------------------------------------------------------------------------
def _teach_bigrams(folder, texts: list[list[int]], vocab: int) -> None:
    """Rewrite a rank-V Markov head so that x_{k-1} = a lifts the token that followed a in ``texts``
    (W1 = I, W2[b, a] = 100, far above the soft-capped base logits): drafts the target then accepts."""
    state = load_file(str(folder / "model.safetensors"))
    w2 = torch.zeros(vocab, vocab)
    for text in texts:
        for a, b in zip(text, text[1:]):
            w2[b, a] = 100.0
    state["markov_head.markov_w1.weight"], state["markov_head.markov_w2.weight"] = torch.eye(vocab), w2
    save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize("draft", ["dspark", "dflash"])
def test_greedy_drafting_on_gemma4_identical_to_plain(gemma4, tmp_path, draft):
    """Greedy fp32 outputs with the drafter equal plain decoding.  The DSpark drafter's Markov head
    knows the target's continuations, so a third of its drafts are accepted (the random DFlash
    drafter's mostly are not): both the accepting and the rejecting paths are exercised."""
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import LocalRunner, RunnerConfig

    path, lm = gemma4
    V = lm.args.vocab_size
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    runner = RunnerConfig(n_slots=3, max_seq=256)
    want = [s.output_ids for s in Engine(LocalRunner(lm.model, runner), lm.tokenizer,
                                         EngineConfig(max_batch=3)).generate(PROMPTS, params)]
    write_gemma4_drafter(tmp_path / "ck", path, dflash=draft == "dflash", rank=V, seed=5)
    if draft == "dspark":
        _teach_bigrams(tmp_path / "ck", [p[-1:] + w for p, w in zip(PROMPTS, want)], V)
    built = build_engine(EngineSpec(model=str(path), dtype="fp32", draft=draft, block_len=4, runner=runner,
                                    draft_options=(("head", str(tmp_path / "ck")),)), progress=False)
    try:
        assert [s.output_ids for s in built.engine.generate(PROMPTS, params)] == want
        m = built.engine.metrics
        assert m.num_drafts > 0
        if draft == "dspark":
            assert m.num_accepted_tokens > m.num_draft_tokens / 4, (m.num_accepted_tokens, m.num_draft_tokens)  # 66 / 193
    finally:
        built.close()


# ------------------------------------------------------------------------------------------------
# Refusals, each naming the field
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,field", [
    ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2}, "enable_moe_block"),
    ({"hidden_size_per_layer_input": 256}, "hidden_size_per_layer_input"),
    ({"num_kv_shared_layers": 1}, "num_kv_shared_layers"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "gemma4"}, "model_type"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                          "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}}, "rope_type 'yarn'"),
    ({"target_layer_ids": [0, 3]}, "target_layer_ids"),  # the last layer: DeepSpec reads the final-normed state
    ({"num_target_layers": 6}, "num_target_layers"),
    ({"vocab_size": 384}, "vocab_size"),
])
def test_misfit_gemma4_drafter_is_refused_naming_the_field(gemma4, tmp_path, change, field):
    path, lm = gemma4
    write_gemma4_drafter(tmp_path / "ck", path, config_overrides=change)
    with pytest.raises(ValueError, match=field) as err:
        load_deepspec_head(tmp_path / "ck", lm.model)
    assert "\n" not in str(err.value)


def test_per_layer_config_table_gives_the_full_layers_widths(gemma4, tmp_path):
    """A config saved by a transformers that writes per_layer_config (indexed by the target's
    layers, here 1 and 3 of a 2-layer drafter) instead of global_head_dim: same head."""
    path, lm = gemma4
    write_gemma4_drafter(tmp_path / "a", path)
    want = load_deepspec_head(tmp_path / "a", lm.model).cfg
    table = {"1": {"head_dim": 32, "num_key_value_heads": 1}, "3": {"head_dim": 32, "num_key_value_heads": 1}}
    write_gemma4_drafter(tmp_path / "b", path, config_overrides={"per_layer_config": table})
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    del cfg["global_head_dim"], cfg["num_global_key_value_heads"]
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    assert load_deepspec_head(tmp_path / "b", lm.model).cfg.replace(target_name="a") == want
    cfg["per_layer_config"]["3"] = {"head_dim": 16}
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="per_layer_config"):
        load_deepspec_head(tmp_path / "b", lm.model)


def test_gemma4_drafters_fit_gemma4_targets_only(gemma4, tmp_path):
    path, lm = gemma4
    write_gemma4_drafter(tmp_path / "g", path)
    with pytest.raises(ValueError, match="architectures 'Gemma4DSparkModel' drafts for a Gemma 4 target"):
        load_deepspec_head(tmp_path / "g", tiny_target())
    emb = lm.model.tok_embeddings.weight
    write_deepspec_checkpoint(tmp_path / "q", emb, emb, 4, layer_ids=(0, 2), mask_token_id=300)
    with pytest.raises(ValueError, match="architectures 'Qwen3DSparkModel' does not draft for a Gemma 4 target"):
        load_deepspec_head(tmp_path / "q", lm.model)
    # A v_proj beside attention_k_eq_v is a weight the drafter would not use: refused by name.
    state = load_file(str(tmp_path / "g" / "model.safetensors"))
    state["layers.1.self_attn.v_proj.weight"] = torch.zeros(32, 64)
    save_file(state, str(tmp_path / "g" / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.self_attn.v_proj.weight"):
        load_deepspec_head(tmp_path / "g", lm.model)
    write_gemma4_drafter(tmp_path / "g2", path)
    head = load_deepspec_head(tmp_path / "g2", lm.model)
    with pytest.raises(ValueError, match="decoder 'gemma4'"):
        export_deepspec(head, tmp_path / "out", mask_token_id=300)
