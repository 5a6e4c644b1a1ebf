"""dspark.kernels.attention: the deterministic mode's row-invariant tiles, bit for bit."""

from __future__ import annotations

import pytest
import torch

from dspark.kernels.attention import KEY_BLOCK, build_plan, padded_keys, varlen_attention


def test_a_verification_tile_rounds_like_one_token_steps():
    """Eight queries in one tile give each query's bits alone.  At these starts, with AMX, a
    tile reading only its own keys (start + 8) rounded some rows differently from the query
    alone (start + i + 1 keys): the P @ V product and the softmax change their blocking with
    the key count.  The cache beyond each request is stale but finite."""
    torch.manual_seed(0)
    n_kv, rep, hd, max_seq = 3, 3, 64, 600
    k = torch.randn(2, n_kv, max_seq, hd, dtype=torch.bfloat16)
    v = torch.randn(2, n_kv, max_seq, hd, dtype=torch.bfloat16)
    q = torch.randn(8, n_kv * rep, hd, dtype=torch.bfloat16) * 2
    for start in (39, 44, 58, 59, 64, 98, 104, 106, 122, 145):
        plan = build_plan([1], [start], [8], rep, "cpu", row_invariant=True, max_keys=max_seq)
        tile = varlen_attention(q, k, v, plan)
        for i in range(8):
            one = build_plan([1], [start + i], [1], rep, "cpu", row_invariant=True, max_keys=max_seq)
            assert torch.equal(tile[i], varlen_attention(q[i : i + 1], k, v, one)[0]), (start, i)


def test_tiles_split_where_the_padded_key_count_changes():
    plan = build_plan([0], [60], [8], 3, "cpu", row_invariant=True, max_keys=1000)
    # tokens at positions 60..63 see up to 64 keys, 64..67 up to 128
    assert [(n, keys) for _, _, n, keys, _ in plan.tiles] == [(4, KEY_BLOCK), (4, 2 * KEY_BLOCK)]
    assert padded_keys(1000, 1000) == 1000 and padded_keys(999, 1000) == 1000


def test_a_row_invariant_plan_needs_the_cache_length():
    with pytest.raises(ValueError, match="max_keys"):
        build_plan([0], [5], [3], 3, "cpu", row_invariant=True)


def test_a_batch_of_requests_rounds_like_each_request_alone():
    """Tiles of equal size and key length run as one batched call: 48 requests (decode tokens
    and verification blocks, contexts from 1 to ~700 keys) give every request the bits it gets
    alone in its own step, with a handful of calls per layer instead of one per request."""
    torch.manual_seed(1)
    n_kv, rep, hd, max_seq, n_req = 3, 3, 64, 768, 48
    k = torch.randn(n_req, n_kv, max_seq, hd, dtype=torch.bfloat16)
    v = torch.randn(n_req, n_kv, max_seq, hd, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    starts = torch.randint(0, max_seq - 9, (n_req,), generator=gen).tolist()
    starts[:8] = [0, 5, 63, 64, 65, 130, 500, 700]
    q_lens = [1 if i % 3 else 1 + i % 8 for i in range(n_req)]
    slots = list(range(n_req))[::-1]
    q = torch.randn(sum(q_lens), n_kv * rep, hd, dtype=torch.bfloat16) * 2
    plan = build_plan(slots, starts, q_lens, rep, "cpu", row_invariant=True, max_keys=max_seq)
    assert len(plan.tile_groups) < len(plan.tiles), (len(plan.tile_groups), len(plan.tiles))
    out = varlen_attention(q, k, v, plan)
    a = 0
    for slot, start, n in zip(slots, starts, q_lens):
        alone = build_plan([slot], [start], [n], rep, "cpu", row_invariant=True, max_keys=max_seq)
        assert alone.tile_groups is not None and len(alone.tile_groups) <= 2
        assert torch.equal(out[a : a + n], varlen_attention(q[a : a + n], k, v, alone)), (slot, start, n)
        a += n
    # Decoding requests whose contexts fall in one key block: one call per layer.
    decode = build_plan(list(range(32)), [10 + i for i in range(32)], [1] * 32, rep, "cpu", row_invariant=True,
                        max_keys=max_seq)
    assert len(decode.tiles) == 32 and len(decode.tile_groups) == 1


def test_tiles_read_in_place_round_like_gathered_copies():
    """A tile group whose slots lie close together reads the cache in place over their span
    (slots between them compute rows nobody reads); a scattered one reads gathered copies.
    The same requests give the same bits either way, and the same as each alone."""
    torch.manual_seed(3)
    n_kv, rep, hd, max_seq = 3, 3, 64, 512
    k = torch.randn(64, n_kv, max_seq, hd, dtype=torch.bfloat16)
    v = torch.randn(64, n_kv, max_seq, hd, dtype=torch.bfloat16)
    starts = [100, 101, 102, 110, 120, 121, 70, 75]  # one key block for the decode tokens
    q_lens = [1, 1, 1, 1, 1, 1, 5, 5]
    q = torch.randn(sum(q_lens), n_kv * rep, hd, dtype=torch.bfloat16) * 2
    layouts = {
        "consecutive": [3, 4, 5, 6, 7, 8, 9, 10],
        "with gaps": [3, 5, 7, 8, 10, 11, 20, 22],  # spans of 9 slots for 6 tiles, 3 for 2
        "scattered": [0, 9, 18, 27, 36, 63, 1, 50],
    }
    outs = {}
    for name, slots in layouts.items():
        kk, vv = torch.zeros_like(k), torch.zeros_like(v)
        kk[slots], vv[slots] = k[:8], v[:8]  # request i's keys wherever its slot is
        plan = build_plan(slots, starts, q_lens, rep, "cpu", row_invariant=True, max_keys=max_seq)
        in_place = [g.lo is not None for g in plan.tile_groups]
        assert all(in_place) if name != "scattered" else not any(in_place), (name, in_place)
        outs[name] = varlen_attention(q, kk, vv, plan)
    assert torch.equal(outs["consecutive"], outs["with gaps"])
    assert torch.equal(outs["consecutive"], outs["scattered"])
    a = 0
    for i, (start, n) in enumerate(zip(starts, q_lens)):
        alone = build_plan([i], [start], [n], rep, "cpu", row_invariant=True, max_keys=max_seq)
        assert torch.equal(outs["scattered"][a : a + n], varlen_attention(q[a : a + n], k, v, alone)), i
        a += n
