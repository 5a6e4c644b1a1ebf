"""DeepSpec's Gemma 4 EAGLE-3 drafters (``Gemma4Eagle3Model``, ``--draft eagle3``) on a Gemma 4 target.

The target is the tiny Gemma 4 folder of test_gemma4.py (helpers/tiny_hf.py); the drafter folders
are written by helpers/gemma4_drafters.py under the published names and config fields.
``gemma4_eagle3_logits`` recomputes the drafts' logits from the folder's tensors alone, the
straightforward way (the whole sequence through the layer with a causal mask at every step,
nothing cached), following DeepSpec's Gemma 4 EAGLE-3 layer: sqrt(D)-scaled embeddings first in a
[2 D] input, q/k norms and a weightless v norm, keys as values, unscaled scores, proportional
RoPE, sandwich norms, GELU-tanh, the layer scalar, soft-capped logits.  Greedy fp32 decoding with
the drafter equals plain decoding and its first blocks equal the reference fed transformers' own
hidden states; misfits are refused naming the field.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dspark.models.deepspec_format import load_deepspec_head, read_deepspec_config
from dspark.models.eagle3_format import Gemma4Eagle3Head, load_eagle3_head
from dspark.models.loader import load_model
from dspark.workers.drafters.eagle3 import Eagle3Drafter
from helpers.gemma4_drafters import write_gemma4_eagle3
from helpers.tiny_hf import PROMPTS, tiny_gemma4
from helpers.tiny_models import make_seq, tiny_target
from test_deepspec_gemma4 import _rms, _rope
from test_eagle3 import _check_block, write_eagle3_checkpoint

LAYER_IDS = (0, 2)


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """(folder, our fp32 model of it, the transformers model): 4 layers, dim 64, vocabulary 320;
    full layers of width 32, one KV head, keys as values, a quarter of the RoPE pairs turning."""
    path = tmp_path_factory.mktemp("gemma4_target")
    hf = tiny_gemma4(path)
    return path, load_model(path, dtype="fp32", progress=False), hf


# ------------------------------------------------------------------------------------------------
# Independent reference: DeepSpec's Gemma4Eagle3Model on its own tensor names, recomputed in full
# ------------------------------------------------------------------------------------------------
def _gemma4_layer(t, cfg, hidden, embeds):
    """Gemma4Eagle3DecoderLayer over positions 0..P-1 with a causal mask: hidden [P, D], embeds
    [P, D] (unscaled rows of embed_tokens) -> [P, D]."""
    a, m, o = "layers.0.self_attn.", "layers.0.mlp.", "layers.0."
    P, D = hidden.shape
    nh, hd = cfg["num_attention_heads"], cfg["global_head_dim"]
    k_eq_v = cfg["attention_k_eq_v"]
    nkv = cfg["num_global_key_value_heads"] if k_eq_v else cfg["num_key_value_heads"]
    rp = cfg["rope_parameters"]["full_attention"]
    pairs = int(rp["partial_rotary_factor"] * hd // 2)
    u = torch.cat([_rms(embeds * D ** 0.5, t[o + "input_layernorm.weight"]),
                   _rms(hidden, t[o + "hidden_norm.weight"])], -1)  # [P, 2 D], embedding first
    q = _rms((u @ t[a + "q_proj.weight"].T).view(P, nh, hd), t[a + "q_norm.weight"])
    k_raw = (u @ t[a + "k_proj.weight"].T).view(P, nkv, hd)
    v_raw = k_raw if k_eq_v else (u @ t[a + "v_proj.weight"].T).view(P, nkv, hd)
    k, v = _rms(k_raw, t[a + "k_norm.weight"]), _rms(v_raw)
    pos = torch.arange(P)
    q, k = _rope(q, pos, hd, rp["rope_theta"], pairs), _rope(k, pos, hd, rp["rope_theta"], pairs)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k)  # scale 1.0
    scores = scores.masked_fill(~torch.ones(P, P, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v).reshape(P, nh * hd) @ t[a + "o_proj.weight"].T
    x = hidden + _rms(attn, t[o + "post_attention_layernorm.weight"])
    xn = _rms(x, t[o + "pre_feedforward_layernorm.weight"])
    mlp = (F.gelu(xn @ t[m + "gate_proj.weight"].T, approximate="tanh") * (xn @ t[m + "up_proj.weight"].T)) \
        @ t[m + "down_proj.weight"].T
    return (x + _rms(mlp, t[o + "post_feedforward_layernorm.weight"])) * t[o + "layer_scalar"]


def gemma4_eagle3_logits(t, cfg, feats, context, drafts):
    """Logits [len(drafts) + 1, V] of each drafted position after ``context`` (x_0..x_c) with
    target features ``feats`` [c, m D] of x_0..x_{c-1}, the drafts ``drafts`` fed back (position
    i < c pairs fc(F_i) with E[x_{i+1}]; position c - 1 + k the previous output with E[d_k])."""
    E, cap = t["embed_tokens.weight"], cfg["final_logit_softcapping"]
    hidden = feats @ t["fc.weight"].T  # [c, D]
    toks = list(context[1:])
    out = []
    for k in range(len(drafts) + 1):
        h = _gemma4_layer(t, cfg, hidden, E[torch.tensor(toks)])[-1]
        out.append(torch.tanh(_rms(h, t["norm.weight"]) @ t["lm_head.weight"].T / cap) * cap)
        if k < len(drafts):
            hidden = torch.cat([hidden, h[None]])
            toks.append(drafts[k])
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# The q the verifier receives, through prefill, verification and the next block
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_eq_v", [True, False])  # keys as values with one KV head; a v_proj with two
def test_proposal_matches_gemma4_eagle3_math_across_verification(gemma4, tmp_path, k_eq_v):
    path, lm, _ = gemma4
    t, cfg = write_gemma4_eagle3(tmp_path / "ck", path, layer_ids=LAYER_IDS, k_eq_v=k_eq_v)
    head = load_eagle3_head(tmp_path / "ck", lm.model, dtype=torch.float32)
    c = head.cfg
    assert isinstance(head, Gemma4Eagle3Head) and head.scale == 1.0
    assert (c.decoder, c.head_dim, c.n_kv_heads, c.k_eq_v) == ("gemma4", 32, 1 if k_eq_v else 2, k_eq_v)
    assert (c.rope_pairs, c.rope_theta, c.logit_softcap, c.feature_layers) == (4, 1e6, 30.0, LAYER_IDS)
    V, D = c.vocab_size, c.dim
    ids = torch.arange(V)
    G, top_k = 4, 6
    gen = torch.Generator().manual_seed(3)
    for temperature in (0.9, 0.0):
        drafter = Eagle3Drafter(head, n_slots=3, max_seq=64, proposal_top_k=top_k)
        seqs, feats = [], []
        for r, n in enumerate((5, 9, 1)):  # three lengths drafted together; prefill observed in two chunks
            prompt = torch.randint(0, V, (n,), generator=gen).tolist()
            s = make_seq(f"r{r}", prompt, anchor=int(torch.randint(0, V, (1,), generator=gen)),
                         temperature=temperature, seed=r)
            f = torch.randn(n, 2 * D, generator=gen)
            cut = n // 2
            if cut:
                drafter.observe(s, prompt[:cut], f[:cut])
            drafter.observe(s, prompt[cut:], f[cut:])
            seqs.append(s)
            feats.append(f)
        for _ in range(2):  # a block, a verification that keeps part of it, the next block
            blocks = drafter.propose(seqs, G)
            for s, f, b in zip(seqs, feats, blocks):
                assert len(b) == G
                _check_block(b, gemma4_eagle3_logits(t, cfg, f, s.all_ids, b.token_ids[:-1]), ids, temperature, top_k)
            for j, (s, b) in enumerate(zip(seqs, blocks)):  # request j keeps j drafts, then a bonus token
                kept = [s.last_token] + b.token_ids[:j]
                s.output_ids += b.token_ids[:j] + [int(torch.randint(0, V, (1,), generator=gen))]
                s.num_cached += len(kept)
                new = torch.randn(len(kept), 2 * D, generator=gen)
                feats[j] = torch.cat([feats[j], new])
                drafter.observe(s, kept, new, num_verified=G)


# ------------------------------------------------------------------------------------------------
# Through the engine on the Gemma 4 target
# ------------------------------------------------------------------------------------------------
def test_greedy_on_gemma4_identical_to_plain_and_first_blocks_follow_the_target_features(gemma4, tmp_path):
    """Greedy fp32 outputs with the drafter equal plain decoding; each request's first block
    equals the reference drafts fed transformers' hidden states of the target (hidden_states[l + 1]
    for each target layer id l): the features the engine streams are the ones DeepSpec reads."""
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    path, _, hf = gemma4
    t, cfg = write_gemma4_eagle3(tmp_path / "ck", path, layer_ids=LAYER_IDS, seed=4)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    built = build_engine(EngineSpec(model=str(path), dtype="fp32", draft="eagle3", block_len=4,
                                    draft_options=(("head", str(tmp_path / "ck")),),
                                    runner=RunnerConfig(n_slots=3, max_seq=128)), progress=False)
    try:
        eng = built.engine
        saved, eng.drafter = eng.drafter, None
        try:
            plain = [s.output_ids for s in eng.generate(PROMPTS, params)]
        finally:
            eng.drafter = saved
        first: dict[str, tuple[list[int], list[int]]] = {}  # request -> (context x_0..x_c, its first block)
        propose = saved.propose

        def recording(seqs, block_len):
            blocks = propose(seqs, block_len)
            for s, b in zip(seqs, blocks):
                if len(b) and s.request_id not in first:
                    first[s.request_id] = (list(s.all_ids), list(b.token_ids))
            return blocks

        saved.propose = recording
        assert [s.output_ids for s in eng.generate(PROMPTS, params)] == plain
        assert eng.metrics.num_drafts > 0 and len(first) == len(PROMPTS)
    finally:
        built.close()
    for context, drafts in first.values():
        with torch.no_grad():
            hs = hf(torch.tensor([context[:-1]]), output_hidden_states=True).hidden_states
        feats = torch.cat([hs[i + 1][0] for i in LAYER_IDS], -1)  # [c, 2 D]
        logits = gemma4_eagle3_logits(t, cfg, feats, context, drafts[:-1])
        assert drafts == logits.argmax(-1).tolist()


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
    ({"num_hidden_layers": 2}, "num_hidden_layers"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"target_layer_ids": [0, 3]}, "target_layer_ids"),  # the last layer: DeepSpec reads the final-normed state
    ({"num_target_layers": 6}, "num_target_layers"),
    ({"vocab_size": 384}, "vocab_size"),
])
def test_misfit_gemma4_eagle3_is_refused_naming_the_field(gemma4, tmp_path, change, field):
    path, lm, _ = gemma4
    write_gemma4_eagle3(tmp_path / "ck", path, config_overrides=change)
    with pytest.raises(ValueError, match=field) as err:
        load_eagle3_head(tmp_path / "ck", lm.model)
    assert "\n" not in str(err.value)


def test_gemma4_eagle3_fits_gemma4_targets_only_and_every_weight_is_used(gemma4, tmp_path):
    path, lm, _ = gemma4
    write_gemma4_eagle3(tmp_path / "g", path)
    with pytest.raises(ValueError, match="architectures 'Gemma4Eagle3Model' drafts for a Gemma 4 target"):
        load_eagle3_head(tmp_path / "g", tiny_target())
    emb = lm.model.tok_embeddings.weight.detach()
    write_eagle3_checkpoint(tmp_path / "q", emb, emb, 4, layer_ids=LAYER_IDS)
    with pytest.raises(ValueError, match="architectures 'Qwen3Eagle3Model' does not draft for a Gemma 4 target"):
        load_eagle3_head(tmp_path / "q", lm.model)
    # A v_proj beside attention_k_eq_v is a weight the drafter would not use: refused by name.
    write_gemma4_eagle3(tmp_path / "v", path, weights={"layers.0.self_attn.v_proj.weight": torch.zeros(32, 128)})
    with pytest.raises(ValueError, match="layers.0.self_attn.v_proj.weight"):
        load_eagle3_head(tmp_path / "v", lm.model)
    state = load_file(str(tmp_path / "g" / "model.safetensors"))
    del state["layers.0.pre_feedforward_layernorm.weight"]
    save_file(state, str(tmp_path / "g" / "model.safetensors"))
    with pytest.raises(ValueError, match="pre_feedforward_layernorm.weight is missing"):
        load_eagle3_head(tmp_path / "g", lm.model)


def test_eagle3_folders_given_to_the_dspark_drafters_point_to_eagle3(gemma4, tmp_path):
    path, lm, _ = gemma4
    write_gemma4_eagle3(tmp_path / "g", path)
    for dflash in (False, True):
        with pytest.raises(ValueError, match="architectures 'Gemma4Eagle3Model' .*serve it with --draft eagle3"):
            load_deepspec_head(tmp_path / "g", lm.model, dflash=dflash)
    emb = lm.model.tok_embeddings.weight.detach()
    write_eagle3_checkpoint(tmp_path / "q", emb, emb, 4, layer_ids=LAYER_IDS)
    with pytest.raises(ValueError, match="architectures 'Qwen3Eagle3Model' .*serve it with --draft eagle3"):
        read_deepspec_config(tmp_path / "q")
