"""Prefix reuse (workers/prefix_cache.py): the index and allocation, then the engine's output with
reused prefixes equal to its output without, copied from a live request and taken in place."""

from __future__ import annotations

import pytest

from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.prefix_cache import BLOCK, PrefixCache
from dspark.workers.runner import LocalRunner, RunnerConfig
from helpers.prefix import run_shared_prefix

# ---------------------------------------------------------------------------- the index


def test_a_retained_slot_is_reused_in_place_and_the_last_prompt_token_always_computed():
    pc = PrefixCache(n_slots=2)
    first = list(range(100, 140))  # 40 tokens: 2 full blocks
    r = pc.allocate(first)
    assert (r.slot, r.tokens) == (0, 0)
    pc.release(r.slot, first)
    again = pc.allocate(first)  # the same prompt: all full blocks of prompt[:-1] = 39 tokens
    assert (again.slot, again.source, again.tokens) == (0, 0, 2 * BLOCK)
    pc.release(again.slot, first)
    exact = pc.allocate(first[:33])  # 32 usable tokens: both blocks, the 33rd is computed
    assert exact.tokens == 2 * BLOCK
    pc.release(exact.slot, first[:33])
    short = pc.allocate(first[:32])  # 31 usable tokens: one block only
    assert short.tokens == BLOCK
    assert pc.stats()["prefix_cache_hit_tokens"] == 5 * BLOCK


def test_a_live_prefix_is_copied_and_a_different_prefix_misses():
    pc = PrefixCache(n_slots=3)
    a = pc.allocate(list(range(50)))
    pc.index(a.slot, list(range(50)))  # its prompt is now cached
    b = pc.allocate(list(range(40)) + [7, 7, 7])
    assert (b.source, b.tokens) == (a.slot, 2 * BLOCK) and b.slot != a.slot
    c = pc.allocate([9] + list(range(1, 50)))  # differs in the first token: no block matches
    assert c.tokens == 0 and c.source == c.slot


def test_eviction_takes_the_oldest_retained_slot_and_forgets_it():
    pc = PrefixCache(n_slots=2)
    x, y = list(range(0, 40)), list(range(1000, 1040))
    for p in (x, y):
        pc.release(pc.allocate(p).slot, p)
    z = pc.allocate(list(range(500, 540)))  # no empty slot: x's slot (released first) goes
    assert z.tokens == 0 and pc.allocate(x).tokens == 0  # x is forgotten
    pc2 = PrefixCache(n_slots=2, enabled=False)
    pc2.release(pc2.allocate(x).slot, x)
    assert pc2.allocate(x).tokens == 0


# ---------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("draft", [None, "ngram"])
def test_engine_output_with_reuse_equals_without_fp32(model_fp32, draft):
    from dspark.workers.drafters.ngram import NgramDrafter

    tok, cfg = model_fp32.tokenizer, RunnerConfig(n_slots=3, max_seq=512)
    outs = {}
    for reuse in (True, False):
        drafter = NgramDrafter() if draft else None
        eng = Engine(LocalRunner(model_fp32.model, cfg), tok, EngineConfig(prefix_caching=reuse, block_len=4), drafter)
        outs[reuse], reused = run_shared_prefix(eng, tok)
        if reuse:
            assert reused[0] == 0 and min(reused[1:]) >= 2 * BLOCK, reused
            assert eng.prefix.stats()["prefix_cache_hit_rate"] > 0.5
        else:
            assert reused == [0, 0, 0, 0]
    assert outs[True] == outs[False]


def test_reuse_only_with_drafters_that_declare_it(model_fp32):
    """Feature drafters and the remote drafter (fed by observe()) turn reuse off."""
    from dspark.workers.drafters.ngram import NgramDrafter
    from dspark.workers.drafters.remote import RemoteDrafter

    class FeatureDrafter:
        feature_layers = (3,)

    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=2, max_seq=128))
    assert not hasattr(RemoteDrafter, "prefix_reuse")
    assert not Engine(runner, model_fp32.tokenizer, EngineConfig(), FeatureDrafter()).prefix.enabled
    assert Engine(runner, model_fp32.tokenizer, EngineConfig(), NgramDrafter()).prefix.enabled
    assert not Engine(runner, model_fp32.tokenizer, EngineConfig(prefix_caching=False)).prefix.enabled
