"""Prefix reuse when two prefixes share a block name (workers/prefix_cache.py): a 64-bit chained
hash is an address, not a proof, so every hit must be confirmed on the tokens.  The collisions
here are forced by replacing the chain hash with one that names blocks by their depth alone
(every prompt's block i gets the same name), the worst a crafted prompt could do."""

from __future__ import annotations

import pytest
import torch

from dspark.models.kv_cache import make_batch
from dspark.models.paged_cache import PagedKVCache
from dspark.workers import prefix_cache
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.prefix_cache import BLOCK, PrefixCache, block_hashes, block_keys
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig
from helpers.prefix import SYSTEM


@pytest.fixture
def colliding(monkeypatch):
    """Every block at depth i is named i + 1, whatever its tokens."""
    monkeypatch.setattr(prefix_cache, "chain_hash", lambda parent, tokens: parent + 1)
    assert block_hashes(list(range(40))) == block_hashes(list(range(500, 540))) == [1, 2]


def test_slot_index_confirms_hits_on_the_tokens(colliding):
    pc = PrefixCache(n_slots=3)
    a = list(range(100, 150))  # 3 full blocks
    pc.index(pc.allocate(a).slot, a)
    assert pc.allocate(list(range(600, 650))).tokens == 0  # same names, other tokens: a miss
    half = a[:BLOCK] + list(range(900, 934))  # the first block is a's, the second is not
    r = pc.allocate(half)
    assert r.tokens == BLOCK and r.source == 0


def test_paged_names_confirm_hits_on_each_block_and_its_parent(colliding):
    cache = PagedKVCache(1, 3, 1, 64, 2, torch.float32, "cpu", block=4)
    a = list(range(10, 19))  # two full blocks of 4
    make_batch(cache, [0], [8], 1)  # slot 0 now holds 8 positions
    cache.name(0, block_hashes(a[:8], 4), block_keys(a[:8], 4))
    other = list(range(50, 59))
    assert cache.reuse(1, block_hashes(other[:8], 4), block_keys(other[:8], 4)) == 0
    mixed = a[:4] + other[4:8]
    assert cache.reuse(1, block_hashes(mixed, 4), block_keys(mixed, 4)) == 1
    cache.release(1)
    assert cache.reuse(2, block_hashes(a[:8], 4), block_keys(a[:8], 4)) == 2
    # Without keys (a rank that mirrors rank 0) the names alone decide, as rank 0 sent them.
    cache.release(2)
    assert cache.reuse(2, block_hashes(other[:8], 4)) == 2


def _run(eng: Engine, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    outs, reused = [], []
    for p in prompts:  # one after another: each finds the earlier ones' blocks
        seq = eng.add_request(p, SamplingParams(max_tokens=12))
        eng.run_until_done()
        outs.append(seq.output_ids)
        reused.append(seq.num_reused)
    return outs, reused


@pytest.mark.parametrize("layout", ["slot", "paged"])
def test_engine_never_reuses_another_prefix_under_colliding_names(model_fp32, colliding, layout):
    tok = model_fp32.tokenizer
    prompts = [
        tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where in spring?"}]),
        tok.encode_chat([{"role": "user", "content": "List three prime numbers, then explain why the sky looks "
                          "blue in one sentence, and finally name a river in Africa and a city in Peru."}]),
        tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where in autumn?"}]),
    ]
    assert len(prompts[1]) > 2 * BLOCK  # long enough for a false hit on two blocks
    cfg = RunnerConfig(n_slots=2, max_seq=256, kv_layout=layout)
    outs = {}
    for reuse in (True, False):
        eng = Engine(LocalRunner(model_fp32.model, cfg), tok, EngineConfig(prefix_caching=reuse))
        outs[reuse], reused = _run(eng, prompts)
        if reuse:
            assert reused[1] == 0, reused  # every name of prompt 1 is taken by prompt 0's blocks
            assert reused[2] >= 2 * BLOCK, reused  # the true shared system prompt is still reused
    assert outs[True] == outs[False]
