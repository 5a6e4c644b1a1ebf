"""The paged KV cache: block accounting (no leak, reference counts, eviction, copy-on-write) on
small pools, and paged attention against the slot layout's."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from dspark.kernels.attention import build_plan, varlen_attention
from dspark.kernels.paged_attention import build_paged_plan, paged_attention
from dspark.models.kv_cache import CacheFullError, make_batch
from dspark.models.paged_cache import PagedKVCache


def small_cache(n_slots=4, max_seq=64, block=4, initial_blocks=None) -> PagedKVCache:
    return PagedKVCache(2, n_slots, 1, max_seq, 2, torch.float32, "cpu", block=block, initial_blocks=initial_blocks)


def check(cache: PagedKVCache) -> None:
    """Every block is free, cached or held, and held exactly as often as tables name it."""
    held = Counter(b for t in cache.tables for b in t)
    free, cached = set(cache._free_blocks), set(cache._cached)
    assert len(free) == len(cache._free_blocks) and not free & cached
    for b in range(cache.n_blocks):
        assert cache.refs[b] == held[b], (b, cache.refs[b], held[b])
        if held[b]:
            assert b not in free and b not in cached
        else:
            assert (b in free) != (b in cached), b
    assert all(b in cache._name_of for b in cached)
    assert {b: h for h, b in cache._block_of.items()} == cache._name_of
    for slot, t in enumerate(cache.tables):
        assert len(t) == -(-cache.lengths[slot] // cache.block), (slot, len(t), cache.lengths[slot])
    assert cache.blocks_in_use == len(held)


def write(cache: PagedKVCache, slot: int, n: int, value: float) -> None:
    """Append ``n`` positions to ``slot`` whose keys are ``value`` (every layer, head, lane)."""
    batch = make_batch(cache, [slot], [n], 1)
    for layer in range(cache.k.shape[0]):
        kv = torch.full((n, cache.k.shape[1], cache.k.shape[-1]), value)
        cache.k[layer][:, batch.paged.write_blocks, batch.paged.write_offsets] = kv.transpose(0, 1)


def keys(cache: PagedKVCache, slot: int) -> list[float]:
    """Layer 0's first lane of every position ``slot`` holds, in order."""
    t = torch.tensor(cache.tables[slot], dtype=torch.long)
    return cache.k[0, 0, t, :, 0].reshape(-1)[: cache.lengths[slot]].tolist()


def test_blocks_follow_the_length_and_are_released():
    cache = small_cache()
    write(cache, 0, 9, 1.0)  # 3 blocks of 4
    assert len(cache.tables[0]) == 3 and cache.blocks_in_use == 3
    cache.set_length(0, 4)  # rejected tokens: their blocks go back
    assert len(cache.tables[0]) == 1 and cache.blocks_in_use == 1
    write(cache, 0, 2, 2.0)
    assert keys(cache, 0) == [1.0] * 4 + [2.0] * 2
    cache.release(0)
    check(cache)
    assert cache.blocks_in_use == 0 and cache.tables[0] == []
    with pytest.raises(ValueError):
        cache.set_length(0, 1)  # no block holds position 0 any more


def test_slots_handed_out_and_freed_with_their_blocks():
    cache = small_cache(n_slots=2)
    a, b = cache.allocate(), cache.allocate()
    assert (a, b) == (0, 1) and cache.num_free == 0
    with pytest.raises(CacheFullError):
        cache.allocate()
    write(cache, a, 10, 1.0)
    cache.free(a)
    assert cache.blocks_in_use == 0 and cache.allocate() == a
    with pytest.raises(ValueError):
        cache.free(b) or cache.free(b)
    check(cache)


def test_shared_prefix_blocks_are_counted_and_never_written():
    cache = small_cache()
    write(cache, 0, 6, 1.0)  # one full block and a partial one
    cache.share_prefix(0, 1, 6)
    assert cache.tables[1][0] == cache.tables[0][0] and cache.refs[cache.tables[0][0]] == 2
    assert cache.tables[1][1] != cache.tables[0][1]  # the partial block: copied
    write(cache, 1, 3, 2.0)  # the follower continues in its own blocks
    write(cache, 0, 1, 3.0)
    assert keys(cache, 0) == [1.0] * 6 + [3.0]
    assert keys(cache, 1) == [1.0] * 6 + [2.0] * 3
    # A table moved back into a shared full block copies it before writing.
    cache.set_length(1, 2)
    write(cache, 1, 1, 4.0)
    assert keys(cache, 0)[:4] == [1.0] * 4 and keys(cache, 1) == [1.0, 1.0, 4.0]
    check(cache)
    cache.release(0)
    cache.release(1)
    check(cache)
    assert cache.blocks_in_use == 0


def test_named_blocks_are_reused_cached_and_evicted_oldest_first():
    cache = small_cache(n_slots=2, max_seq=16, block=4, initial_blocks=8)  # 8 blocks at most
    write(cache, 0, 8, 1.0)
    cache.name(0, [11, 12])
    cache.release(0)  # both named blocks stay cached
    assert cache.stats()["kv_cache_blocks_cached"] == 2 and cache.blocks_in_use == 0
    assert cache.reuse(1, [11, 12, 13]) == 2 and cache.lengths[1] == 8
    assert keys(cache, 1) == [1.0] * 8
    cache.release(1)
    write(cache, 0, 8, 2.0)
    cache.name(0, [21, 22])
    cache.release(0)  # 4 cached blocks now: 11, 12 (older), 21, 22
    write(cache, 1, 16, 3.0)  # needs 4 blocks: the 4 free ones first, no eviction
    assert cache.evictions == 0
    write(cache, 0, 8, 4.0)  # 2 more: the oldest cached (11, 12) are taken
    assert cache.evictions == 2
    check(cache)
    cache.release(0)
    assert cache.reuse(0, [11]) == 0 and cache.reuse(0, [21, 22]) == 2
    assert keys(cache, 0) == [2.0] * 8
    check(cache)
    write(cache, 0, 8, 5.0)  # both tables full: every block of the pool held, none cached
    assert cache.blocks_in_use == cache.max_blocks == cache.n_blocks and not cache._cached
    assert keys(cache, 0) == [2.0] * 8 + [5.0] * 8 and keys(cache, 1) == [3.0] * 16
    with pytest.raises(CacheFullError):
        write(cache, 0, 1, 6.0)


def test_the_pool_grows_only_when_nothing_is_free_or_cached():
    cache = small_cache(n_slots=4, max_seq=64, block=4, initial_blocks=4)
    write(cache, 0, 16, 1.0)
    assert cache.n_blocks == 4
    write(cache, 1, 1, 2.0)
    assert cache.n_blocks == 5 and keys(cache, 0) == [1.0] * 16  # contents survive the growth
    write(cache, 1, 30, 2.0)
    assert cache.n_blocks >= 12
    check(cache)


def test_no_block_leaks_under_random_steps_rejections_shares_and_releases():
    rng = random.Random(0)
    cache = small_cache(n_slots=6, max_seq=48, block=4, initial_blocks=2)
    live: set[int] = set()
    for _ in range(600):
        op = rng.random()
        free = [s for s in range(cache.n_slots) if s not in live]
        if op < 0.15 and free:  # a new request: reuse a cached prefix or share a live one
            slot = free[0]
            if live and rng.random() < 0.5:
                src = rng.choice(sorted(live))
                cache.share_prefix(src, slot, rng.randint(0, cache.lengths[src]))
            else:
                cache.reuse(slot, [rng.randint(0, 5) for _ in range(3)])
            live.add(slot)
        elif op < 0.25 and live:  # a request ends (or is aborted), naming what it holds
            slot = rng.choice(sorted(live))
            cache.name(slot, [rng.randint(0, 5) for _ in range(cache.lengths[slot] // cache.block)])
            cache.release(slot)
            live.discard(slot)
        elif live:  # a step: rejected drafts moved back, new tokens appended
            slots = rng.sample(sorted(live), rng.randint(1, len(live)))
            for s in slots:
                cache.set_length(s, rng.randint(0, cache.lengths[s]))
            room = [min(5, cache.max_seq - cache.lengths[s]) for s in slots]
            slots = [s for s, r in zip(slots, room) if r > 0]
            if slots:
                make_batch(cache, slots, [rng.randint(1, min(5, cache.max_seq - cache.lengths[s])) for s in slots], 1)
        check(cache)
    for slot in sorted(live):
        cache.release(slot)
    check(cache)
    assert cache.blocks_in_use == 0


def test_unknown_layouts_and_padded_attention_are_refused():
    from dspark.workers.runner import RunnerConfig

    with pytest.raises(ValueError, match="kv_layout"):
        RunnerConfig(kv_layout="pages")
    with pytest.raises(ValueError, match="padded"):
        make_batch(small_cache(), [0], [1], 1, padded=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_equals_the_slot_layout(dtype):
    """Decode tokens, a verification block and a long prefill chunk, read from shuffled blocks,
    give the slot layout's attention over the same keys."""
    torch.manual_seed(0)
    n_kv, rep, hd, block = 3, 3, 64, 16
    slots, starts, q_lens = [0, 1, 2, 3], [10, 0, 30, 75], [1, 7, 20, 5]  # 20 > SPAN_MAX_Q: its own call
    k_slot = torch.randn(4, n_kv, 96, hd, dtype=dtype)
    v_slot = torch.randn(4, n_kv, 96, hd, dtype=dtype)
    n_pages = 4 * 96 // block
    perm = torch.randperm(n_pages).tolist()
    tables = [perm[i * 6 : (i + 1) * 6] for i in range(4)]  # 6 blocks of 16 = 96 positions each
    k_pool = torch.zeros(n_kv, n_pages, block, hd, dtype=dtype)
    v_pool = torch.zeros_like(k_pool)
    for s, t in enumerate(tables):
        k_pool[:, t] = k_slot[s].view(n_kv, 6, block, hd)
        v_pool[:, t] = v_slot[s].view(n_kv, 6, block, hd)
    q = torch.randn(sum(q_lens), n_kv * rep, hd, dtype=dtype)
    want = varlen_attention(q, k_slot, v_slot, build_plan(slots, starts, q_lens, rep, "cpu", span=False))
    got = paged_attention(q, k_pool, v_pool, build_paged_plan(tables, starts, q_lens, rep, block, "cpu"), rep)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
