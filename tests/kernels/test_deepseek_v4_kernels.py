"""DeepSeek-V4 kernels and config reader against transformers' DeepseekV4 (fp32, tiny, random).

Each kernel takes plain tensors; the tests copy a randomly initialised transformers module's
weights into its arguments and compare outputs.  The last tests compose the kernels into a
whole prefill of a 3-layer model (one layer of each attention kind, hash and learned routing,
three streams) and compare logits with ``DeepseekV4ForCausalLM``.
"""

from __future__ import annotations

import doctest
import types

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from transformers import DeepseekV4Config as HFConfig  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf  # noqa: E402

from dspark.kernels import deepseek_v4_attention as att  # noqa: E402
from dspark.kernels import deepseek_v4_hyper as hyp  # noqa: E402
from dspark.kernels import deepseek_v4_moe as moe  # noqa: E402
from helpers.tiny_deepseek_v4 import LAYERS, randomise, tiny_hf_config  # noqa: E402

from dspark.models.deepseek_v4_config import (  # noqa: E402
    CSA,
    HCA,
    SLIDING,
    YarnScaling,
    deepseek_v4_config_from_hf,
)
from dspark.models.quantized import BlockQuant  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
EPS = 1e-6


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- RoPE


@pytest.mark.parametrize("big", [False, True])
def test_rope_inv_freq_main_and_yarn_compress(big):
    cfg = tiny_hf_config()
    if big:  # V4-Flash's real sizes: the YaRN ramp covers many pairs
        cfg = tiny_hf_config(head_dim=512, qk_rope_head_dim=64, rope_scaling={
            "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
            "beta_slow": 1})  # fmt: skip
    rot = hf.DeepseekV4RotaryEmbedding(cfg)
    r = cfg.qk_rope_head_dim
    torch.testing.assert_close(att.rope_inv_freq(r, cfg.rope_theta), rot.main_inv_freq, **TOL)
    y = cfg.rope_parameters["compress"]
    mine = att.rope_inv_freq(r, cfg.compress_rope_theta, y["factor"], y["original_max_position_embeddings"],
                             y["beta_fast"], y["beta_slow"])  # fmt: skip
    torch.testing.assert_close(mine, rot.compress_inv_freq, **TOL)
    assert rot.compress_attention_scaling == 1.0  # V4 never scales cos/sin by YaRN's mscale
    assert not torch.allclose(rot.compress_inv_freq, att.rope_inv_freq(r, cfg.compress_rope_theta))

    pos = torch.tensor([[0, 3, 17, 1000]])
    for kind in ("main", "compress"):
        cos_ref, sin_ref = rot(torch.zeros(1), pos, layer_type=kind)
        cos, sin = att.rope_cos_sin(pos, getattr(rot, f"{kind}_inv_freq"))
        torch.testing.assert_close(cos, cos_ref, **TOL)
        torch.testing.assert_close(sin, sin_ref, **TOL)


def test_partial_rope_and_its_inverse_match_transformers():
    b, h, s, d, r = 2, 3, 5, 16, 8
    x = randn(b, h, s, d)
    cos, sin = att.rope_cos_sin(torch.arange(s).expand(b, s), att.rope_inv_freq(r, 10000.0))  # [B, S, R/2]
    fwd = att.apply_partial_rope(x, cos.unsqueeze(1), sin.unsqueeze(1))
    torch.testing.assert_close(fwd, hf.apply_rotary_pos_emb(x, cos, sin), **TOL)
    inv = att.apply_partial_rope(x, cos.unsqueeze(1), sin.unsqueeze(1), inverse=True)
    torch.testing.assert_close(inv, hf.apply_rotary_pos_emb(x, cos, -sin), **TOL)
    torch.testing.assert_close(att.apply_partial_rope(fwd, cos.unsqueeze(1), sin.unsqueeze(1), inverse=True), x, **TOL)
    assert torch.equal(fwd[..., : d - r], x[..., : d - r])  # the nope channels are untouched


# ---------------------------------------------------------------- attention pieces


def test_sink_attention_matches_eager_attention_forward():
    b, h, s, t, d = 2, 4, 5, 9, 16
    q, kv, sinks = randn(b, h, s, d, seed=1), randn(b, t, d, seed=2), randn(h, seed=3)
    bias = torch.zeros(b, s, t).masked_fill(randn(b, s, t, seed=4) > 0.8, float("-inf"))
    bias[0, 1] = float("-inf")  # a query that sees nothing: all its mass goes to the sink
    module = types.SimpleNamespace(num_key_value_groups=h, sinks=sinks, training=False)
    ref, _ = hf.eager_attention_forward(module, q, kv.unsqueeze(1), kv.unsqueeze(1), bias.unsqueeze(1), d**-0.5)
    out = att.sink_attention(q, kv, sinks, bias, d**-0.5)  # [B, H, S, D]
    torch.testing.assert_close(out.transpose(1, 2), ref, **TOL)
    assert torch.equal(out[0, :, 1], torch.zeros(h, d))


def test_query_kv_and_grouped_output_projection_match_the_attention_module():
    cfg = tiny_hf_config()
    a = randomise(hf.DeepseekV4Attention(cfg, 0), 5)
    x = randn(2, 5, cfg.hidden_size, seed=6)
    q, latent = att.low_rank_query(x, a.q_a_proj.weight, a.q_a_norm.weight, a.q_b_proj.weight, 4, EPS)
    lat_ref = a.q_a_norm(a.q_a_proj(x))
    torch.testing.assert_close(latent, lat_ref, **TOL)
    torch.testing.assert_close(q, a.q_b_norm(a.q_b_proj(lat_ref).view(2, 5, 4, 16)), **TOL)
    kv = att.shared_kv(x, a.kv_proj.weight, a.kv_norm.weight, EPS)
    torch.testing.assert_close(kv, a.kv_norm(a.kv_proj(x)), **TOL)

    o = randn(2, 5, 4, 16, seed=7)
    ref = a.o_b_proj(a.o_a_proj(o.reshape(2, 5, cfg.o_groups, -1)).flatten(2))
    torch.testing.assert_close(att.grouped_output_projection(o, a.o_a_proj.weight, a.o_b_proj.weight, 2), ref, **TOL)


def test_sliding_window_bias_matches_transformers_mask():
    from transformers.masking_utils import sliding_window_causal_mask_function

    fn = sliding_window_causal_mask_function(3)
    pos = torch.arange(7)
    t = torch.tensor
    want = torch.tensor([[bool(fn(t(0), t(0), t(qi), t(ki))) for ki in range(7)] for qi in range(7)])
    assert torch.equal(att.sliding_window_bias(pos, pos, 3) == 0, want)


# ---------------------------------------------------------------- compressors and indexer


def compressor_inputs(c, x):
    return x @ c.kv_proj.weight.T, x @ c.gate_proj.weight.T


@pytest.mark.parametrize("kind", [CSA, HCA])
def test_compressor_one_shot_matches_transformers(kind):
    cfg = tiny_hf_config()
    rot = hf.DeepseekV4RotaryEmbedding(cfg)
    cls = hf.DeepseekV4CSACompressor if kind == CSA else hf.DeepseekV4HCACompressor
    c = randomise(cls(cfg), 8)
    b, s = 2, 27  # 6 CSA windows + 3 left over; 3 HCA windows + 3 left over
    x, q_lat = randn(b, s, cfg.hidden_size, seed=9), randn(b, s, cfg.q_lora_rank, seed=10)
    pos = torch.arange(s).expand(b, s)
    ref_kv, ref_bias = c(x, q_lat, pos, None, 1)  # [B, 1, N, D], [B, 1, S, N]
    kv, gate = compressor_inputs(c, x)
    entries, tail = att.compress_kv(kv, gate, c.position_bias, c.kv_norm.weight, rot.compress_inv_freq, EPS,
                                    overlap=kind == CSA)  # fmt: skip
    torch.testing.assert_close(entries, ref_kv.squeeze(1), **TOL)
    m = c.compress_rate
    assert entries.shape[1] == s // m and (tail is None) == (kind == HCA)
    if kind == HCA:
        assert torch.equal(att.compressed_causal_bias(pos, entries.shape[1], m), ref_bias.squeeze(1))
        return
    # CSA: the Lightning Indexer picks which of the closed entries each query attends to.
    ix = c.indexer
    ikv, igate = compressor_inputs(ix, x)
    ikeys, _ = att.compress_kv(ikv, igate, ix.position_bias, ix.kv_norm.weight, rot.compress_inv_freq, EPS, True)
    cos, sin = att.rope_cos_sin(pos, rot.compress_inv_freq)  # [B, S, R/2]
    iq = (q_lat @ ix.q_b_proj.weight.T).unflatten(-1, (cfg.index_n_heads, -1))  # [B, S, Hi, c]
    iq = att.apply_partial_rope(iq, cos.unsqueeze(2), sin.unsqueeze(2))
    scores = att.indexer_scores(iq, ikeys, x @ ix.scorer.weights_proj.weight.T)
    ref_scores = ix.scorer(iq, ikeys, x)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    picked = att.indexer_topk(scores, pos, m, cfg.index_topk)
    torch.testing.assert_close(picked, ix(x, q_lat, pos, None, 1))
    assert torch.equal(att.selected_entries_bias(picked, entries.shape[1]), ref_bias.squeeze(1))
    assert (picked[:, :3] == -1).all()  # positions 0-2: no window has closed yet


@pytest.mark.parametrize("kind", [CSA, HCA])
def test_compressor_streamed_in_chunks_matches_transformers_cache(kind):
    """Chunked calls carrying (leftover tokens, overlap tail, entry count) = one shot = transformers' cache."""
    cfg = tiny_hf_config()
    rot = hf.DeepseekV4RotaryEmbedding(cfg)
    cls = hf.DeepseekV4CSACompressor if kind == CSA else hf.DeepseekV4HCACompressor
    layer = LAYERS.index(kind)
    c = randomise(cls(cfg), 11)
    b, chunks = 2, [5, 3, 1, 7, 9, 2, 8]
    s = sum(chunks)
    x, q_lat = randn(b, s, cfg.hidden_size, seed=12), randn(b, s, cfg.q_lora_rank, seed=13)
    kv_all, gate_all = compressor_inputs(c, x)
    m = c.compress_rate
    one_shot, _ = att.compress_kv(kv_all, gate_all, c.position_bias, c.kv_norm.weight, rot.compress_inv_freq, EPS,
                                  overlap=kind == CSA)  # fmt: skip

    cache = DynamicCache(config=cfg)
    pending_kv, pending_gate = kv_all[:, :0], gate_all[:, :0]  # tokens of the open window
    entries, tail, start = [], None, 0
    for n in chunks:
        ref, _ = c(x[:, start : start + n], q_lat[:, start : start + n], torch.arange(start, start + n)[None], cache,
                   layer)  # fmt: skip
        pending_kv = torch.cat([pending_kv, kv_all[:, start : start + n]], 1)
        pending_gate = torch.cat([pending_gate, gate_all[:, start : start + n]], 1)
        closed = pending_kv.shape[1] // m * m
        new, tail = att.compress_kv(pending_kv[:, :closed], pending_gate[:, :closed], c.position_bias,
                                    c.kv_norm.weight, rot.compress_inv_freq, EPS, overlap=kind == CSA,
                                    first_position=len(entries) * m, prior=tail)  # fmt: skip
        entries.extend(new.unbind(1))
        pending_kv, pending_gate = pending_kv[:, closed:], pending_gate[:, closed:]
        start += n
        got = torch.stack(entries, 1) if entries else one_shot[:, :0]
        torch.testing.assert_close(got, ref.squeeze(1), **TOL)
    torch.testing.assert_close(torch.stack(entries, 1), one_shot, **TOL)


# ---------------------------------------------------------------- hyper-connections


def test_hyper_connection_weights_collapse_and_head_match_transformers():
    cfg = tiny_hf_config()
    hc = randomise(hf.DeepseekV4HyperConnection(cfg), 14)
    streams = randn(2, 5, cfg.hc_mult, cfg.hidden_size, seed=15)
    post_ref, comb_ref, collapsed_ref = hc(streams)
    pre, post, comb = hyp.hyper_connection_weights(streams, hc.fn, hc.base, hc.scale, cfg.hc_sinkhorn_iters,
                                                   cfg.hc_eps, cfg.rms_norm_eps)  # fmt: skip
    torch.testing.assert_close(post, post_ref, **TOL)
    torch.testing.assert_close(comb, comb_ref, **TOL)
    torch.testing.assert_close(hyp.collapse_streams(streams, pre), collapsed_ref, **TOL)
    torch.testing.assert_close(comb.sum(-2), torch.ones(2, 5, cfg.hc_mult), atol=1e-5, rtol=0)  # columns

    head = randomise(hf.DeepseekV4HyperHead(cfg), 16)
    out = hyp.hyper_head(streams, head.hc_fn, head.hc_base, head.hc_scale, cfg.hc_eps, cfg.rms_norm_eps)
    torch.testing.assert_close(out, head(streams), **TOL)


def test_sinkhorn_converges_to_doubly_stochastic():
    m = hyp.sinkhorn(randn(3, 4, 4, seed=17) * 3, 50, 0.0)
    torch.testing.assert_close(m.sum(-1), torch.ones(3, 4))
    torch.testing.assert_close(m.sum(-2), torch.ones(3, 4))


# ---------------------------------------------------------------- MoE


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_router_scores(scoring):
    logits = randn(6, 8, seed=18)
    want = {
        "sqrtsoftplus": lambda z: hf.ACT2FN["sqrtsoftplus"](z),
        "sigmoid": lambda z: hf.ACT2FN["sigmoid"](z),
        # transformers' ACT2FN has no "softmax", so its router cannot run it: the definition.
        "softmax": lambda z: torch.softmax(z, dim=-1),
    }[scoring](logits)
    torch.testing.assert_close(moe.router_scores(logits, scoring), want, **TOL)
    with pytest.raises(ValueError, match="scoring_func 'relu'"):
        moe.router_scores(logits, "relu")


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid"])
def test_topk_and_hash_routing_match_transformers(scoring):
    cfg = tiny_hf_config(scoring_func=scoring)
    x, ids = randn(2, 5, cfg.hidden_size, seed=19), torch.randint(0, 64, (2, 5))
    r = randomise(hf.DeepseekV4TopKRouter(cfg), 20)
    _, w_ref, e_ref = r(x)
    scores = moe.router_scores(x.reshape(-1, cfg.hidden_size) @ r.weight.T, scoring)
    w, e = moe.route_topk(scores, r.e_score_correction_bias, cfg.num_experts_per_tok, cfg.routed_scaling_factor)
    # transformers leaves the top-k unsorted: compare per expert id.
    order_ref, order = e_ref.argsort(-1), e.argsort(-1)
    assert torch.equal(e.gather(-1, order), e_ref.gather(-1, order_ref))
    torch.testing.assert_close(w.gather(-1, order), w_ref.gather(-1, order_ref), **TOL)
    torch.testing.assert_close(w.sum(-1), torch.full((10,), cfg.routed_scaling_factor), **TOL)

    h = randomise(hf.DeepseekV4HashRouter(cfg), 21)
    _, w_ref, e_ref = h(x, ids)
    scores = moe.router_scores(x.reshape(-1, cfg.hidden_size) @ h.weight.T, scoring)
    w, e = moe.route_hash(scores, ids.reshape(-1), h.tid2eid, cfg.routed_scaling_factor)
    assert torch.equal(e, e_ref)
    torch.testing.assert_close(w, w_ref, **TOL)


def test_experts_and_shared_expert_match_transformers():
    cfg = tiny_hf_config(swiglu_limit=0.7)  # small enough that the clips bite
    ex = randomise(hf.DeepseekV4Experts(cfg), 22)
    x = randn(10, cfg.hidden_size, seed=23)
    experts = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))[:2] for i in range(10)])
    weights = randn(10, 2, seed=24).abs()
    ref = ex(x, experts, weights)
    torch.testing.assert_close(moe.moe_experts(x, experts, weights, ex.gate_up_proj, ex.down_proj, 0.7), ref, **TOL)
    mlp = randomise(hf.DeepseekV4MLP(cfg), 25)
    out = moe.swiglu_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, 0.7)
    torch.testing.assert_close(out, mlp(x), **TOL)
    assert (x @ mlp.gate_proj.weight.T).max() > 0.7  # the clip was exercised


# ---------------------------------------------------------------- whole prefill


def attention_ref(a: hf.DeepseekV4Attention, cfg: HFConfig, x: torch.Tensor, kind: str) -> torch.Tensor:
    """One V4 attention layer of a fresh prefill, composed from the kernels. x: [B, S, hidden]."""
    b, s, _ = x.shape
    pos = torch.arange(s)
    rot = hf.DeepseekV4RotaryEmbedding(cfg)
    inv = rot.main_inv_freq if kind == SLIDING else rot.compress_inv_freq
    q, latent = att.low_rank_query(x, a.q_a_proj.weight, a.q_a_norm.weight, a.q_b_proj.weight, a.num_heads, EPS)
    kv = att.shared_kv(x, a.kv_proj.weight, a.kv_norm.weight, EPS)
    cos, sin = att.rope_cos_sin(pos, inv)  # [S, R/2]
    q = att.apply_partial_rope(q, cos.unsqueeze(1), sin.unsqueeze(1))  # [B, S, H, D]
    kv = att.apply_partial_rope(kv, cos, sin)  # [B, S, D]
    bias = att.sliding_window_bias(pos, pos, cfg.sliding_window).expand(b, s, s)
    if kind != SLIDING:
        c = a.compressor
        m = c.compress_rate
        entries, _ = att.compress_kv(*compressor_inputs(c, x), c.position_bias, c.kv_norm.weight,
                                     rot.compress_inv_freq, EPS, overlap=kind == CSA)  # fmt: skip
        qpos = pos.expand(b, s)
        if kind == HCA:
            entry_bias = att.compressed_causal_bias(qpos, entries.shape[1], m)
        else:
            ix = c.indexer
            keys, _ = att.compress_kv(*compressor_inputs(ix, x), ix.position_bias, ix.kv_norm.weight,
                                      rot.compress_inv_freq, EPS, overlap=True)  # fmt: skip
            iq = (latent @ ix.q_b_proj.weight.T).unflatten(-1, (cfg.index_n_heads, -1))
            iq = att.apply_partial_rope(iq, cos.unsqueeze(1), sin.unsqueeze(1))
            scores = att.indexer_scores(iq, keys, x @ ix.scorer.weights_proj.weight.T)
            picked = att.indexer_topk(scores, qpos, m, cfg.index_topk)
            entry_bias = att.selected_entries_bias(picked, entries.shape[1])
        kv = torch.cat([kv, entries], dim=1)
        bias = torch.cat([bias, entry_bias], dim=-1)
    o = att.sink_attention(q.transpose(1, 2), kv, a.sinks, bias, cfg.head_dim**-0.5)  # [B, H, S, D]
    o = att.apply_partial_rope(o, cos, sin, inverse=True).transpose(1, 2)  # [B, S, H, D]
    return att.grouped_output_projection(o, a.o_a_proj.weight, a.o_b_proj.weight, cfg.o_groups)


def moe_ref(block: hf.DeepseekV4SparseMoeBlock, cfg: HFConfig, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])  # [T, hidden]
    scores = moe.router_scores(flat @ block.gate.weight.T, cfg.scoring_func)
    if block.is_hash:
        w, e = moe.route_hash(scores, ids.reshape(-1), block.gate.tid2eid, cfg.routed_scaling_factor)
    else:
        w, e = moe.route_topk(scores, block.gate.e_score_correction_bias, cfg.num_experts_per_tok,
                              cfg.routed_scaling_factor)  # fmt: skip
    ex, sh = block.experts, block.shared_experts
    y = moe.moe_experts(flat, e, w, ex.gate_up_proj, ex.down_proj, cfg.swiglu_limit)
    y = y + moe.swiglu_mlp(flat, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight, cfg.swiglu_limit)
    return y.view_as(x)


def test_kernels_compose_into_transformers_prefill_logits():
    cfg = tiny_hf_config()
    cfg._attn_implementation = "eager"
    model = randomise(hf.DeepseekV4ForCausalLM(cfg), 26)
    with torch.no_grad():  # sane logit scale: random embeddings and head at unit variance
        model.model.embed_tokens.weight.normal_(generator=torch.Generator().manual_seed(27))
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(28))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits

        hc = cfg.hc_mult
        streams = model.model.embed_tokens.weight[ids].unsqueeze(2).expand(-1, -1, hc, -1)  # [B, S, N, hidden]
        for i, layer in enumerate(model.model.layers):
            for mix, norm, block in (
                (layer.attn_hc, layer.input_layernorm, lambda h: attention_ref(layer.self_attn, cfg, h, LAYERS[i])),
                (layer.ffn_hc, layer.post_attention_layernorm, lambda h: moe_ref(layer.mlp, cfg, h, ids)),
            ):
                pre, post, comb = hyp.hyper_connection_weights(
                    streams, mix.fn, mix.base, mix.scale, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
                )
                out = block(att.rms_norm(hyp.collapse_streams(streams, pre), norm.weight, cfg.rms_norm_eps))
                streams = hyp.expand_streams(out, streams, post, comb)
        head = model.model.hc_head
        h = hyp.hyper_head(streams, head.hc_fn, head.hc_base, head.hc_scale, cfg.hc_eps, cfg.rms_norm_eps)
        logits = att.rms_norm(h, model.model.norm.weight, cfg.rms_norm_eps) @ model.lm_head.weight.T
    assert ref.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- config reader


def test_config_reads_transformers_config():
    hf_cfg = tiny_hf_config()
    c = deepseek_v4_config_from_hf(hf_cfg.to_dict())
    assert c.layer_types == tuple(LAYERS) and c.mlp_layer_types == ("hash_moe", "moe", "moe")
    assert (c.csa_compress_ratio, c.hca_compress_ratio) == (4, 8)
    assert c.compress_ratio_by_layer == (0, 4, 8)
    assert c.qk_rope_head_dim == 8 and c.head_dim == 16 and c.num_attention_heads == 4
    assert c.compress_yarn == YarnScaling(factor=16.0, original_max_position_embeddings=64)
    assert (c.rope_theta, c.compress_rope_theta) == (10000.0, 160000.0)
    assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (8, 8, 3)
    assert (c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps) == (3, 5, 1e-6)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (8, 2, 1)
    assert (c.scoring_func, c.routed_scaling_factor, c.swiglu_limit) == ("sqrtsoftplus", 1.5, 10.0)
    assert (c.o_groups, c.o_lora_rank, c.q_lora_rank, c.sliding_window) == (2, 8, 24, 8)
    assert c.num_nextn_predict_layers == 1 and c.eos_token_ids == (1,)


def release_style() -> dict:
    """The spelling of the released config.json: per-layer ratios, flat rope_scaling, MTP ratio."""
    return {
        "model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], "num_hidden_layers": 4,
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
        "qk_rope_head_dim": 8, "compress_ratios": [128, 128, 4, 0, 0], "num_hash_layers": 2,
        "compress_rope_theta": 160000, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "hidden_act": "silu", "eos_token_id": [1, 2],
        "torch_dtype": "bfloat16",
    }  # fmt: skip


def test_config_reads_release_spelling_like_transformers():
    raw = release_style()
    c = deepseek_v4_config_from_hf(raw)
    ref = HFConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "torch_dtype")})
    assert c.layer_types == tuple(ref.layer_types) == (HCA, HCA, CSA, SLIDING)
    assert c.mlp_layer_types == tuple(ref.mlp_layer_types) == ("hash_moe", "hash_moe", "moe", "moe")
    assert c.qk_rope_head_dim == ref.qk_rope_head_dim == 8
    assert c.compress_yarn == YarnScaling(16.0, 65536, 32.0, 1.0, 1.0)
    assert ref.rope_parameters["compress"]["attention_factor"] == c.compress_yarn.attention_factor
    assert c.eos_token_ids == (1, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quantization_config": {"quant_method": "awq", "weight_block_size": [128, 128]}},
         "^quantization_config.quant_method 'awq'"),
        ({"expert_dtype": "fp4"}, "^expert_dtype"),
        ({"scoring_func": "relu"}, "^scoring_func 'relu'"),
        ({"num_key_value_heads": 2}, "^num_key_value_heads 2"),
        ({"hidden_act": "gelu"}, "^hidden_act 'gelu'"),
        ({"norm_topk_prob": False}, "^norm_topk_prob False"),
        ({"n_shared_experts": 2}, "^n_shared_experts 2"),
        ({"some_new_field": 1}, "^some_new_field: unknown"),
        ({"compress_ratios": [128, 128, 16, 0, 0]}, "^compress_ratios"),
        ({"compress_ratios": None, "layer_types": [SLIDING, "full_attention", CSA, HCA]}, "^layer_types"),
        ({"compress_ratios": None, "layer_types": [SLIDING, CSA]}, "^layer_types: 2 entries"),
        ({"rope_scaling": {"type": "longrope", "factor": 4}}, "^rope_scaling.rope_type 'longrope'"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "extra": 1}}, "^rope_scaling.extra"),
        ({"qk_rope_head_dim": 7}, "^qk_rope_head_dim 7"),
        ({"model_type": "deepseek_v3"}, "^model_type 'deepseek_v3'"),
    ],
)
def test_config_refusals_name_the_field(change, message):
    raw = {**release_style(), **change}
    with pytest.raises(ValueError, match=message) as err:
        deepseek_v4_config_from_hf(raw)
    assert "\n" not in str(err.value)


def test_released_quantisation_is_read_for_dequantisation():
    q = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
         "weight_block_size": [128, 128]}  # fmt: skip
    c = deepseek_v4_config_from_hf({**release_style(), "quantization_config": q, "expert_dtype": "fp4"})
    assert c.weight_quant == BlockQuant(block=(128, 128), expert_fp4=True)
    assert deepseek_v4_config_from_hf(release_style()).weight_quant is None


# ---------------------------------------------------------------- the docstring examples


@pytest.mark.parametrize("module", [att, hyp, moe])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
