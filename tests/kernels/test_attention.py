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
