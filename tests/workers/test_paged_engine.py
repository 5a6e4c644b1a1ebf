"""The engine on the paged KV layout (real default model, fp32): the same tokens as the slot
layout and transformers, speculative truncation, prefix reuse by block, n > 1 followers on the
leader's blocks, aborts and finished requests giving every block back, the compiled step and
tensor parallelism."""

from __future__ import annotations

import pytest
import torch

from dspark.workers.drafters.ngram import NgramDrafter
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.prefix_cache import BLOCK, BlockPrefixCache
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig
from helpers.prefix import run_shared_prefix

PAGED = RunnerConfig(n_slots=4, max_seq=512, kv_layout="paged")
SLOT = RunnerConfig(n_slots=4, max_seq=512)


def _prompts(lm, texts):
    return [lm.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]


def _engine(lm, cfg, drafter=None, **kw) -> Engine:
    return Engine(LocalRunner(lm.model, cfg), lm.tokenizer, EngineConfig(**{"block_len": 4, **kw}), drafter)


def _no_block_held(eng: Engine) -> None:
    cache = eng.runner.cache
    assert cache.blocks_in_use == 0 and all(not t for t in cache.tables)
    assert eng.prefix.num_free == eng.n_slots


def test_greedy_equals_transformers_and_the_slot_layout(model_fp32, hf_model, prompts20):
    prompts = _prompts(model_fp32, prompts20[:3])
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    paged = _engine(model_fp32, PAGED)
    assert isinstance(paged.prefix, BlockPrefixCache)
    got = [s.output_ids for s in paged.generate(prompts, params)]
    assert got == [s.output_ids for s in _engine(model_fp32, SLOT).generate(prompts, params)]
    for p, out in zip(prompts, got):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                    pad_token_id=model_fp32.tokenizer.eos_token_id)[0, len(p):].tolist()
        assert out == ref
    _no_block_held(paged)


def test_speculative_truncation_gives_plain_output_and_releases_blocks(model_fp32, prompts20):
    """n-gram drafts, many rejected: the output is plain greedy decoding's, and the blocks that
    rejected tokens took are given back at the next step."""
    prompts = _prompts(model_fp32, prompts20[4:6])
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = [s.output_ids for s in _engine(model_fp32, PAGED).generate(prompts, params)]
    eng = _engine(model_fp32, PAGED, NgramDrafter(), prefix_caching=False)
    seqs = [eng.add_request(p, params) for p in prompts]
    cache = eng.runner.cache
    shrunk = 0
    while eng.has_work:
        before = {s.slot: len(cache.tables[s.slot]) for s in seqs if s.slot >= 0 and not s.finished}
        eng.step()
        for s in seqs:  # every running table holds exactly the blocks of its length
            if s.slot >= 0 and not s.finished:
                assert len(cache.tables[s.slot]) == -(-cache.lengths[s.slot] // cache.block)
                shrunk += len(cache.tables[s.slot]) < before.get(s.slot, 0)
    m = eng.metrics
    assert 0 < m.num_accepted_tokens < m.num_draft_tokens  # some drafts rejected
    assert shrunk > 0  # a table gave blocks back
    assert [s.output_ids for s in seqs] == plain
    _no_block_held(eng)
    assert eng.cache_stats()["kv_cache_blocks_cached"] == 0  # reuse off: nothing named


@pytest.fixture(scope="module")
def shared_prefix_run(model_fp32):
    """The shared-prefix scenario on one device, paged, with reuse: (engine, outputs, reused)."""
    eng = _engine(model_fp32, PAGED, prefix_caching=True)
    return (eng, *run_shared_prefix(eng, model_fp32.tokenizer))


def test_prefix_reuse_by_block_equals_no_reuse(model_fp32, shared_prefix_run):
    outs = {}
    for reuse in (True, False):
        if reuse:
            eng, outs[reuse], reused = shared_prefix_run
        else:
            eng = _engine(model_fp32, PAGED, prefix_caching=False)
            outs[reuse], reused = run_shared_prefix(eng, model_fp32.tokenizer)
        stats = eng.cache_stats()
        if reuse:
            assert reused[0] == 0 and min(reused[1:]) >= 2 * BLOCK, reused
            assert stats["prefix_cache_hit_rate"] > 0.5 and stats["kv_cache_blocks_cached"] > 0
        else:
            assert reused == [0, 0, 0, 0]
        assert stats["kv_cache_block_usage"] == 0.0
        _no_block_held(eng)
    assert outs[True] == outs[False]


def test_followers_share_the_leaders_prompt_blocks(model_fp32):
    (prompt,) = _prompts(model_fp32, ["Write a Python function that adds two numbers, then explain it."])
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=5, n=3)
    eng = _engine(model_fp32, PAGED)
    leader = eng.add_request(prompt, params, "r")
    seqs = [leader, *leader.followers]
    outs = []
    while leader.num_cached < len(prompt):
        outs += eng.step()
    cache = eng.runner.cache
    full = len(prompt) // cache.block
    tables = [cache.tables[s.slot][:full] for s in seqs]
    assert tables[0] == tables[1] == tables[2]  # the prompt's full blocks, held three times
    assert all(cache.refs[b] == 3 for b in tables[0])
    while eng.has_work:
        outs += eng.step()
    got = {i: [t for o in outs if o.index == i for t in o.new_token_ids] for i in range(3)}
    slot_eng = _engine(model_fp32, SLOT)
    slot_eng.add_request(prompt, params, "r")
    slot_outs = []
    while slot_eng.has_work:
        slot_outs += slot_eng.step()
    assert got == {i: [t for o in slot_outs if o.index == i for t in o.new_token_ids] for i in range(3)}
    _no_block_held(eng)


def test_abort_gives_every_block_back(model_fp32):
    (prompt,) = _prompts(model_fp32, ["Tell me a long story about a lighthouse keeper."])
    eng = _engine(model_fp32, PAGED, NgramDrafter(), max_prefill_tokens=16)
    eng.add_request(prompt, SamplingParams(max_tokens=64, temperature=1.0, n=3), "a")
    eng.add_request(prompt[:20], SamplingParams(max_tokens=64), "b")
    for _ in range(3):  # "a" mid-prefill (its followers still waiting for the prompt)
        eng.step()
    assert eng.runner.cache.blocks_in_use > 0
    assert eng.abort("a")
    for _ in range(3):
        eng.step()
    assert eng.abort("b")
    assert not eng.has_work
    _no_block_held(eng)


def test_deterministic_bf16_speculative_equals_plain_and_the_slot_layout():
    """The deterministic mode on the paged layout (its start-up check passes): in bf16, greedy
    n-gram speculation gives plain decoding's tokens, and those of the slot layout."""
    from dspark.models.loader import load_model

    lm = load_model(None, dtype="bf16", progress=False)
    prompts = _prompts(lm, ["Count from 1 to 30, separated by commas.", "Write a haiku about rain and explain it."])
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    outs = {}
    for layout in ("slot", "paged"):
        for draft in (None, NgramDrafter()):
            cfg = RunnerConfig(n_slots=4, max_seq=512, kv_layout=layout, deterministic=True)
            eng = _engine(lm, cfg, draft, block_len=5)
            outs[layout, draft is None] = [s.output_ids for s in eng.generate(prompts, params)]
            if draft is not None:
                assert 0 < eng.metrics.num_accepted_tokens < eng.metrics.num_draft_tokens
    assert outs["paged", False] == outs["paged", True] == outs["slot", True]


def test_compiled_step_equals_eager(model_fp32, prompts20):
    prompts = _prompts(model_fp32, prompts20[:2])
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    eager = [s.output_ids for s in _engine(model_fp32, PAGED).generate(prompts, params)]
    compiled_cfg = RunnerConfig(n_slots=4, max_seq=512, kv_layout="paged", compile=True)
    from dspark.models.loader import load_model

    lm = load_model(None, dtype="fp32", progress=False)  # its own copy: compiling changes the model
    eng = _engine(lm, compiled_cfg)
    assert [s.output_ids for s in eng.generate(prompts, params)] == eager
    _no_block_held(eng)


def test_tensor_parallel_ranks_hold_the_same_tables(model_fp32, shared_prefix_run):
    """TP = 3 on the paged layout: every block operation reaches every rank (the prefix scenario
    reuses, names and releases blocks), and the output is a single device's."""
    from dspark.workers.runner import TPGroup, TPSpec

    tok = model_fp32.tokenizer
    group = TPGroup(TPSpec(model_path=None, dtype="fp32", world_size=3, runner=PAGED, threads_per_rank=1))
    try:
        tp_out, reused = run_shared_prefix(Engine(group.driver, tok, EngineConfig(block_len=4)), tok)
        _, one_out, one_reused = shared_prefix_run
        assert min(reused[1:]) > 0 and reused == one_reused and tp_out == one_out
    finally:
        group.close()
