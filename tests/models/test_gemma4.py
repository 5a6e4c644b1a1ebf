"""Gemma 4 dense against transformers' Gemma4ForCausalLM, on tiny random-weight folders that
transformers writes (helpers/tiny_hf.py) and our loader reads: sliding-window layers (window 8,
shorter than two of the prompts) and full layers with their own head width, one KV head whose
values are the key projection and proportional RoPE; sandwich norms, per-layer output scalars,
q/k/v norms, unscaled scores, GELU-tanh MLP, scaled embeddings, soft-capped logits.

fp32: prefill logits and 224 greedy decode steps (token ids and every step's logits) match
transformers; the window matters (without it the logits differ); a varlen batch equals each
request alone; TP = 2 equals TP = 1; bf16 compiled steps follow eager.  The multimodal
checkpoint's text decoder loads; config fields we do not implement are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.kernels.attention import build_plan, varlen_attention
from dspark.models.gemma_config import FULL, SLIDING
from dspark.models.loader import load_model
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput, TPGroup, TPSpec
from helpers.tiny_hf import PROMPTS, tiny_gemma4
from helpers.varlen import (
    assert_engine_batch_equals_alone,
    assert_greedy_decode_matches_transformers,
    prefill,
    rel_err,
)

DECODE_STEPS = 224


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """(folder, transformers' model of it in fp32): full layers with keys as values, 1 KV head."""
    path = tmp_path_factory.mktemp("gemma4")
    return path, tiny_gemma4(path)


@pytest.fixture(scope="module")
def gemma4_kv2(tmp_path_factory):
    """The same shapes without attention_k_eq_v: full layers have a v_proj and 2 KV heads."""
    path = tmp_path_factory.mktemp("gemma4_kv2")
    return path, tiny_gemma4(path, seed=1, attention_k_eq_v=False)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def test_the_folder_loads_as_gemma4(gemma4):
    path, hf = gemma4
    lm = load_model(path, dtype="fp32", progress=False)
    g = lm.args.gemma4
    assert lm.args.decoder == "gemma4" and lm.args.tie_word_embeddings and g.final_logit_softcapping == 30.0
    assert g.layer_types == (SLIDING, FULL, SLIDING, FULL)
    assert (g.sliding.head_dim, g.sliding.n_kv_heads, g.sliding.window, g.sliding.rope_pairs) == (16, 2, 8, None)
    assert (g.full.head_dim, g.full.n_kv_heads, g.full.window, g.full.rope_pairs, g.full.k_eq_v) == (32, 1, None, 4, True)
    for ours, ref in zip(lm.model.layers, hf.model.layers):
        assert torch.equal(ours.layer_scalar, ref.layer_scalar)
        assert torch.equal(ours.attention.k_norm.weight, ref.self_attn.k_norm.weight)
        assert torch.equal(ours.post_ffn_norm.weight, ref.post_feedforward_layernorm.weight)
    assert lm.model.output.weight is lm.model.tok_embeddings.weight
    cache = lm.model.make_cache(2, 64)
    assert [tuple(k.shape[1::2]) for k in cache.k] == [(2, 16), (1, 32), (2, 16), (1, 32)]


@pytest.mark.parametrize("folder", ["gemma4", "gemma4_kv2"])
def test_prefill_logits_match_transformers(folder, request):
    path, hf = request.getfixturevalue(folder)
    model = load_model(path, dtype="fp32", progress=False).model
    runner = LocalRunner(model, RunnerConfig(n_slots=1, max_seq=128))
    for ids in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert rel_err(prefill(runner, ids), ref) < 1e-5
    # The 40-token prompt is longer than the window of 8: full attention in the sliding layers
    # gives other logits, so the match above shows the window is applied.
    model._kinds[SLIDING] = dataclasses.replace(model._kinds[SLIDING], window=None)
    assert rel_err(prefill(runner, PROMPTS[-1]), ref) > 1e-2
    assert rel_err(prefill(runner, PROMPTS[0]), hf(torch.tensor([PROMPTS[0]])).logits[0]) < 1e-5  # 7 < 8


def test_greedy_decode_matches_transformers_generate(gemma4):
    path, hf = gemma4
    assert_greedy_decode_matches_transformers(path, hf, PROMPTS[:2], DECODE_STEPS)


def test_batched_varlen_requests_equal_each_alone(gemma4):
    path, _ = gemma4
    assert_engine_batch_equals_alone(path, PROMPTS)


@pytest.mark.parametrize("window", [None, 1, 5])
def test_windowed_varlen_attention_matches_a_dense_reference(window):
    """Every attention path (per-request loop, one span call, padded, row-invariant tiles) with
    a sliding window and scale 1 against softmax over the visible keys written out per query."""
    torch.manual_seed(0)
    n_kv, rep, hd, max_seq = 2, 3, 8, 64
    slots, starts, q_lens = [0, 2, 1], [9, 0, 3], [1, 12, 4]
    k_cache, v_cache = torch.randn(3, n_kv, max_seq, hd), torch.randn(3, n_kv, max_seq, hd)
    q = torch.randn(sum(q_lens), n_kv * rep, hd)
    want = torch.empty_like(q)
    t = 0
    for slot, start, n in zip(slots, starts, q_lens):
        for pos in range(start, start + n):
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(n_kv * rep):
                keys, vals = k_cache[slot, h // rep, lo : pos + 1], v_cache[slot, h // rep, lo : pos + 1]
                want[t, h] = torch.softmax(keys @ q[t, h], dim=0) @ vals
            t += 1
    for kw in (dict(span=False), dict(), dict(padded=True), dict(row_invariant=True, max_keys=max_seq)):
        plan = build_plan(slots, starts, q_lens, rep, "cpu", window=window, scale=1.0, **kw)
        assert rel_err(varlen_attention(q, k_cache, v_cache, plan), want) < 1e-5, kw


def test_tp2_matches_tp1(gemma4_kv2):
    """Each rank keeps the norms and layer scalars whole and takes half of every layer's heads
    (2 KV heads of width 16 in sliding layers, of width 32 in full ones): TP = 2 gives TP = 1's
    logits, features and greedy tokens."""
    path, _ = gemma4_kv2
    lm = load_model(path, dtype="fp32", progress=False)
    cfg = RunnerConfig(n_slots=4, max_seq=256)
    step = StepInput([t for p in PROMPTS for t in p], [0, 1, 2], [0, 0, 0], [len(p) for p in PROMPTS],
                     feature_layers=(0, 3))
    ref = LocalRunner(lm.model, cfg).forward(step)
    group = TPGroup(TPSpec(model_path=str(path), dtype="fp32", world_size=2, runner=cfg, threads_per_rank=1))
    try:
        out = group.driver.forward(step)
        assert rel_err(out.logits, ref.logits) <= 1e-5
        assert rel_err(out.features, ref.features) <= 1e-5, rel_err(out.features, ref.features)
        params = SamplingParams(max_tokens=48, ignore_eos=True)
        tp_seqs = Engine(group.driver, lm.tokenizer, EngineConfig(max_batch=4)).generate(PROMPTS, params)
        one_seqs = Engine(LocalRunner(lm.model, cfg), lm.tokenizer, EngineConfig(max_batch=4)).generate(PROMPTS, params)
        assert [s.output_ids for s in tp_seqs] == [s.output_ids for s in one_seqs]
    finally:
        group.close()


def test_compiled_steps_follow_eager(gemma4):
    """The compiled blocks (a plan per layer kind through the step context) give eager's fp32
    logits, past the window, in prefill, decode and verification-sized steps; the CPU serving
    path (bf16, packed linears where oneDNN has them, compiled) follows transformers' fp32
    logits within bf16 rounding."""
    path, hf = gemma4
    ids = PROMPTS[1]
    with torch.no_grad():
        ref = hf(torch.tensor([ids + [5, 6, 7, 8]])).logits[0]

    def steps(dtype: str, compiled: bool) -> torch.Tensor:
        model = load_model(path, dtype=dtype, progress=False).model
        runner = LocalRunner(model, RunnerConfig(n_slots=1, max_seq=128, compile=compiled))
        return torch.cat([prefill(runner, ids), runner.forward(StepInput([5], [0], [len(ids)], [1])).logits,
                          runner.forward(StepInput([6, 7, 8], [0], [len(ids) + 1], [3])).logits])

    assert rel_err(steps("fp32", compiled=True), steps("fp32", compiled=False)) < 1e-4  # measured 2e-6
    # bf16 against fp32: measured 7.9e-2 (the logits here peak at 1.5, so rounding weighs more
    # than for Qwen3's test model); eager bf16 is 8.1e-2 off.
    assert rel_err(steps("bf16", compiled=True), ref) < 0.15


def test_the_multimodal_checkpoint_loads_its_text_decoder(gemma4, tmp_path):
    """A ``gemma4`` folder (text_config nested, decoder weights under model.language_model.,
    a vision tower beside them) loads the text decoder, equal to the text-only folder's."""
    path, _ = gemma4
    text_cfg = json.loads((path / "config.json").read_text())
    cfg = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text_cfg,
           "vision_config": {"model_type": "gemma4_vision"}, "tie_word_embeddings": True}
    tensors = {"model.language_model." + k[len("model."):]: v for k, v in load_file(path / "model.safetensors").items()}
    tensors["model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / name, tmp_path / name)
    ids = PROMPTS[-1]
    text = LocalRunner(load_model(path, dtype="fp32", progress=False).model, RunnerConfig(n_slots=1, max_seq=64))
    both = LocalRunner(load_model(tmp_path, dtype="fp32", progress=False).model, RunnerConfig(n_slots=1, max_seq=64))
    assert torch.equal(prefill(both, ids), prefill(text, ids))


@pytest.mark.parametrize("changes, field", [
    ({"hidden_size_per_layer_input": 256}, "hidden_size_per_layer_input"),
    ({"num_kv_shared_layers": 2}, "num_kv_shared_layers"),
    ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}, "enable_moe_block"),
    ({"attention_bias": True}, "attention_bias"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "rope_type 'yarn'"),
    ({"model_type": "gemma4", "text_config": None}, "text_config"),
    ({"model_type": "gemma3_text"}, "model_type 'gemma3_text'"),
])
def test_unsupported_config_fields_are_refused_by_name(gemma4, tmp_path, changes, field):
    path, _ = gemma4
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | changes))
    with pytest.raises(ValueError, match=field):
        load_model(tmp_path, dtype="fp32", progress=False)
