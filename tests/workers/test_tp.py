"""Tensor parallelism over gloo in real processes: SmolLM2's 9 query / 3 KV heads split 3 ways,
and a tiny Qwen3 folder's 4 query / 2 KV heads (with per-head q/k norms) split 2 ways."""

from __future__ import annotations

import torch

from dspark.models.loader import load_model
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput, TPGroup, TPSpec
from helpers.prefix import run_shared_prefix
from helpers.tiny_hf import PROMPTS, tiny_qwen3


def test_tp3_matches_tp1(model_fp32, prompts20):
    tok = model_fp32.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in prompts20[:3]]
    cfg = RunnerConfig(n_slots=4, max_seq=512)
    single = LocalRunner(model_fp32.model, cfg)
    step = StepInput(
        [t for p in prompts for t in p], [0, 1, 2], [0, 0, 0], [len(p) for p in prompts],
        feature_layers=(3, 29),
    )
    ref = single.forward(step)
    group = TPGroup(TPSpec(model_path=None, dtype="fp32", world_size=3, runner=cfg, threads_per_rank=1))
    try:
        out = group.driver.forward(step)
        err = float((out.logits - ref.logits).abs().max() / ref.logits.abs().max())
        assert err <= 1e-4, err
        assert torch.allclose(out.features, ref.features, atol=1e-3)
        params = SamplingParams(max_tokens=24)
        tp_seqs = Engine(group.driver, tok, EngineConfig(max_batch=4)).generate(prompts, params)
        one_seqs = Engine(LocalRunner(model_fp32.model, cfg), tok, EngineConfig(max_batch=4)).generate(prompts, params)
        assert [s.output_ids for s in tp_seqs] == [s.output_ids for s in one_seqs]
        # Prefix reuse copies between slots on every rank (a copy command, like a step).
        tp_out, reused = run_shared_prefix(Engine(group.driver, tok, EngineConfig(max_batch=4)), tok)
        one_out, _ = run_shared_prefix(Engine(LocalRunner(model_fp32.model, cfg), tok, EngineConfig(max_batch=4)), tok)
        assert min(reused[1:]) > 0 and tp_out == one_out
    finally:
        group.close()


def test_tp2_matches_tp1_on_qwen3(tmp_path):
    """Each rank keeps the q/k norm weights whole and normalises its own heads: TP = 2 gives
    TP = 1's logits, features and greedy tokens."""
    tiny_qwen3(tmp_path)
    lm = load_model(tmp_path, dtype="fp32", progress=False)
    cfg = RunnerConfig(n_slots=4, max_seq=256)
    step = StepInput([t for p in PROMPTS for t in p], [0, 1, 2], [0, 0, 0], [len(p) for p in PROMPTS],
                     feature_layers=(0, 2))
    ref = LocalRunner(lm.model, cfg).forward(step)
    group = TPGroup(TPSpec(model_path=str(tmp_path), dtype="fp32", world_size=2, runner=cfg, threads_per_rank=1))
    try:
        out = group.driver.forward(step)
        assert float((out.logits - ref.logits).abs().max() / ref.logits.abs().max()) <= 1e-5
        assert torch.allclose(out.features, ref.features, atol=1e-5)
        params = SamplingParams(max_tokens=48, ignore_eos=True)
        tp_seqs = Engine(group.driver, lm.tokenizer, EngineConfig(max_batch=4)).generate(PROMPTS, params)
        one_seqs = Engine(LocalRunner(lm.model, cfg), lm.tokenizer, EngineConfig(max_batch=4)).generate(PROMPTS, params)
        assert [s.output_ids for s in tp_seqs] == [s.output_ids for s in one_seqs]
    finally:
        group.close()
