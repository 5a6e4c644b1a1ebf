"""dspark.kernels.sampling: top-k / top-p masks, greedy rows, seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dspark.kernels.sampling import (
    apply_top_k_top_p,
    exponential_noise,
    logits_to_probs,
    row_argmax,
    sample_from_probs,
    sample_proposal,
)

NEG = float("-inf")


def kept(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Boolean [R, V] of the entries apply_top_k_top_p leaves unmasked."""
    out = apply_top_k_top_p(logits, torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float32))
    return torch.isfinite(out)


# ------------------------------------------------------------------ row_argmax
def test_row_argmax_matches_torch_on_ties_nans_infs_and_views():
    """Greedy decoding's token is this argmax: numpy's path must pick torch's index in every case
    (lowest on ties, a NaN's first, infinities, rows that are views with strides)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(5, 49152, generator=g)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [NEG, NEG, NEG, NEG], [0.0, math.inf, 1.0, math.inf],
                         [1.0, math.nan, 5.0, math.nan], [NEG, -1.0, NEG, -1.0]])
    rounded = (torch.randn(64, 300, generator=g) * 2).round()  # many ties
    for x in (big, ties, rounded, big[:, ::3], big.t()[:7], big[2], big[1:4, 100:50000], big.view(5, 3, -1)):
        got = row_argmax(x)
        assert got.dtype == torch.long and got.tolist() == x.argmax(-1).tolist()
    for other in (big.bfloat16(), big.double()):  # other dtypes: torch's own argmax
        assert row_argmax(other).tolist() == other.argmax(-1).tolist()


# ------------------------------------------------------------------ top-k


def test_top_k_per_row_incl_disabled_and_oversized():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    mask = kept(logits, [1, 2, 0, 9], [1.0] * 4)
    assert mask.tolist() == [
        [False, True, False, False],  # k = 1: the max only
        [False, True, False, True],  # k = 2
        [True, True, True, True],  # k = 0: off
        [True, True, True, True],  # k > V: everything
    ]


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert out.tolist() == [[3.0, 2.0, 2.0, NEG]]


def test_mask_leaves_values_untouched_and_is_identity_when_off():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    out = apply_top_k_top_p(logits, torch.tensor([0, 0, 0]), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(out, logits)
    out = apply_top_k_top_p(logits, torch.tensor([3, 3, 3]), torch.tensor([1.0, 1.0, 1.0]))
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite])


# ------------------------------------------------------------------ top-p


def test_top_p_keeps_smallest_prefix_reaching_p():
    # probs ~ [0.5, 0.25, 0.125, 0.125], mass before each entry ~ [0, 0.5, 0.75, 0.875]
    # (not exact in float, so the top_p values stay clear of those boundaries).
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]] * 5)
    mask = kept(logits, [0] * 5, [0.1, 0.49, 0.6, 0.8, 0.95])
    assert mask.sum(1).tolist() == [1, 1, 2, 3, 4]
    assert mask[:, :2].all(1).tolist() == [False, False, True, True, True]
    # top_p = 0.8 needs one of the two tied 0.125 entries: exactly one is kept.
    assert int(mask[3, 2:].sum()) == 1


def test_top_p_exact_boundaries_with_uniform_probs():
    # Equal logits give exactly 0.25 each, so the cumulative masses are exact.
    logits = torch.zeros(4, 4)
    mask = kept(logits, [0] * 4, [0.25, 0.25000003, 0.5, 1.0])
    # An entry stays while the mass strictly before it is < top_p.
    assert mask.sum(1).tolist() == [1, 2, 2, 4]


def test_top_p_tiny_keeps_only_the_argmax():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.9]])
    assert kept(logits, [0], [1e-9]).tolist() == [[False, True, False, False]]


@pytest.mark.parametrize("top_p", [0.0, 1e-46, 1e-45, 1e-30, torch.finfo(torch.float32).tiny])
def test_top_p_below_float32_precision_keeps_the_argmax(top_p):
    # top_p arrives as a Python float; in float32 1e-46 is 0, and an empty nucleus would be a
    # NaN row.  The argmax always stays, the lowest id among tied maxima (as greedy picks).
    logits = torch.tensor([[0.3, 2.0, -1.0, 2.0, 1.9]])  # [1, V]
    for _ in range(5):  # the sort must not pick another of the tied maxima
        assert kept(logits, [0], [top_p]).tolist() == [[False, True, False, False, False]]
    probs = logits_to_probs(logits, torch.tensor([0.7]), None, torch.tensor([top_p]))
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]


_EXTREME_TOP_P = [0.0, 1e-46, 1e-45, 1e-30, torch.finfo(torch.float32).tiny, 1e-7, 0.5, 0.99999999, 1.0]
_EXTREME_TEMPERATURE = [1e-46, 1e-40, 1e-30, 1e-6, 0.01, 1.0, 100.0]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.0, 1e-3, 1.0, 30.0, 1e4]),
    rows=st.lists(
        st.tuples(
            st.sampled_from(_EXTREME_TEMPERATURE) | st.floats(1e-45, 100.0),
            st.sampled_from([0, 1, 2, 64, 1000]),
            st.sampled_from(_EXTREME_TOP_P) | st.floats(0.0, 1.0),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_no_nan_distribution_reaches_sampling(seed, scale, rows):
    # Whatever the sampling parameters (as Python floats, which the engine casts to float32),
    # every row is a distribution: finite, non-negative, summing to 1, with the argmax in it.
    g = torch.Generator().manual_seed(seed)
    v = 64
    logits = torch.randn(len(rows), v, generator=g) * scale  # [R, V]; scale 0: all tied
    logits[:, v // 2 :] = logits[:, : v // 2]  # exact ties everywhere
    temp = torch.tensor([t for t, _, _ in rows])  # [R] float32
    top_k = torch.tensor([k for _, k, _ in rows])  # [R]
    top_p = torch.tensor([p for _, _, p in rows])  # [R] float32
    probs = logits_to_probs(logits, temp, top_k, top_p)  # [R, V]
    assert bool(torch.isfinite(probs).all()), (temp, top_p)
    assert bool((probs >= 0).all())
    assert torch.allclose(probs.sum(-1), torch.ones(len(rows)), atol=1e-5)
    assert bool((probs.gather(1, logits.argmax(-1, keepdim=True)) > 0).all())
    noise = torch.empty(len(rows), v).exponential_(generator=g)
    draws = sample_from_probs(probs, noise)  # [R]
    assert bool((probs.gather(1, draws[:, None]) > 0).all())


def test_top_k_applies_before_top_p():
    # Full softmax [.64, .24, .09, .03]: top-p 0.7 alone keeps two entries.  After top-k = 2 the
    # renormalised masses are [.73, .27], so the same top-p keeps one.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 2)
    mask = kept(logits, [0, 2], [0.7, 0.7])
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False]]


@pytest.mark.parametrize(
    "top_k, top_p",
    [
        ([0, 0, 40, 0], [1.0, 0.9, 1.0, 0.5]),  # top-p neighbours (and a top-k-only row among them)
        ([0, 50, 40, 1], [1.0, 1.0, 1.0, 1.0]),  # top-k neighbours
        ([0, 50, 0, 7], [1.0, 0.95, 1.0, 0.3]),  # both
    ],
)
def test_row_distribution_does_not_depend_on_batch_neighbours(top_k, top_p):
    # A real-size vocabulary: float32 cumsum rounding over 49k entries is what once dropped the
    # tail of top_p = 1 rows batched with top_p < 1 rows.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 49152, generator=g) * 3  # [R, V]
    temp = torch.tensor([0.8, 1.0, 1.3, 0.7])
    k, p = torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float32)
    mixed = logits_to_probs(logits, temp, k, p)  # [R, V]
    for i in range(4):
        alone = logits_to_probs(logits[i : i + 1], temp[i : i + 1], k[i : i + 1], p[i : i + 1])
        assert torch.equal(mixed[i], alone[0]), i
        if top_p[i] >= 1.0 and top_k[i] <= 0:  # filters off: the plain softmax, every token kept
            assert torch.equal(mixed[i], torch.softmax(logits[i] / temp[i], -1))
            assert bool((mixed[i] > 0).all())


# ------------------------------------------------------------------ logits_to_probs


def test_greedy_rows_are_one_hot_on_lowest_tied_argmax():
    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    probs = logits_to_probs(logits, torch.tensor([0.0, 1.0]))
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.allclose(probs[1], torch.softmax(logits[1], -1))
    assert probs.dtype == torch.float32


def test_logits_to_probs_temperature_and_filters():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, generator=g)
    temp = torch.tensor([0.5, 1.0, 2.0])
    probs = logits_to_probs(logits, temp, torch.tensor([0, 3, 0]), torch.tensor([1.0, 1.0, 0.5]))
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert torch.allclose(probs[0], torch.softmax(logits[0] / 0.5, -1))
    assert int((probs[1] > 0).sum()) == 3
    expected2 = torch.softmax(apply_top_k_top_p(logits[2:] / 2.0, torch.tensor([0]), torch.tensor([0.5])), -1)
    assert torch.allclose(probs[2], expected2[0])


# ------------------------------------------------------------------ sampling


def test_sample_from_probs_one_hot_ignores_noise():
    probs = torch.eye(5)[[3, 0, 4]]
    noise = torch.empty(3, 5).exponential_(generator=torch.Generator().manual_seed(0))
    assert sample_from_probs(probs, noise).tolist() == [3, 0, 4]


def test_exponential_noise_is_per_request_reproducible():
    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    a = exponential_noise(3, 11, [gen(1), gen(2), gen(3)])
    b = exponential_noise(3, 11, [gen(1), gen(2), gen(3)])
    assert torch.equal(a, b)
    assert (a > 0).all()
    # A request's stream does not depend on its batch neighbours or its row.
    c = exponential_noise(2, 11, [gen(9), gen(2)])
    assert torch.equal(c[1], a[1])
    assert not torch.equal(c[0], a[0])
    # Same seeds -> same samples.
    probs = torch.softmax(torch.randn(3, 11, generator=gen(4)), -1)
    assert torch.equal(sample_from_probs(probs, a), sample_from_probs(probs, b))


def test_exponential_noise_none_generator_uses_global_rng():
    torch.manual_seed(123)
    a = exponential_noise(2, 5, [None, None])
    torch.manual_seed(123)
    b = exponential_noise(2, 5, [None])  # missing entries count as None too
    assert torch.equal(a, b)


def test_sample_from_probs_matches_distribution():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(8, generator=g), -1)
    n = 200_000
    noise = torch.empty(n, 8).exponential_(generator=g)
    draws = sample_from_probs(probs.expand(n, 8), noise)
    counts = torch.bincount(draws, minlength=8).double()
    p_value = stats.chisquare(counts.numpy(), (probs.double() * n).numpy()).pvalue
    assert p_value > 1e-3


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_sampling_never_leaves_the_nucleus(top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 16, generator=g)
    probs = logits_to_probs(logits, torch.ones(4), None, torch.full((4,), top_p))
    noise = torch.empty(4, 16).exponential_(generator=g)
    for _ in range(20):
        noise.exponential_(generator=g)
        draws = sample_from_probs(probs, noise)
        assert (probs.gather(1, draws[:, None]) > 0).all()


# ------------------------------------------------------------------ draft-side proposals


def test_sample_proposal_greedy_is_one_hot_on_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [2.0, 0.0, 3.0, 1.0]])
    noise = torch.empty(2, 3).exponential_(generator=torch.Generator().manual_seed(0))
    tokens, q, ids, q_tok = sample_proposal(logits, torch.tensor([0.0, 0.0]), 3, noise)
    assert tokens.tolist() == [1, 2]
    assert q.tolist() == [[1.0, 0.0, 0.0]] * 2
    assert ids[:, 0].tolist() == [1, 2] and q_tok.tolist() == [1.0, 1.0]


def test_sample_proposal_follows_its_reported_sparse_q():
    g = torch.Generator().manual_seed(5)
    n, v, k = 200_000, 12, 4
    logits = torch.randn(1, v, generator=g).expand(n, v)
    tokens, q, ids, q_tok = sample_proposal(logits, torch.full((n,), 0.8), k, torch.empty(n, k).exponential_(generator=g))
    assert torch.equal(ids, ids[:1].expand_as(ids)) and torch.allclose(q.sum(1), torch.ones(n))
    expected = torch.softmax(logits[0, ids[0]].double() / 0.8, -1)
    assert torch.allclose(q[0].double(), expected)
    assert torch.equal(q_tok, q.gather(1, (ids == tokens[:, None]).long().argmax(1, keepdim=True)).squeeze(1))
    counts = torch.bincount(tokens, minlength=v)[ids[0]].double()
    assert int(counts.sum()) == n  # nothing outside the top-k
    assert stats.chisquare(counts.numpy(), (expected * n).numpy()).pvalue > 1e-3


def _filter_cases(seed: int, rows: int, vocab: int):
    """Logit rows of every shape that matters for the cut: flat, peaked, quantised (many ties,
    also at the candidates' edge), with a mix of top-k / top-p settings per row."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 1.0, 3.0, 8.0])[torch.randint(0, 4, (rows, 1), generator=g)]
    logits = torch.randn(rows, vocab, generator=g) * scale
    ties = torch.rand(rows, generator=g) < 0.4
    logits[ties] = (logits[ties] * 2).round() / 2  # quantised: large tie groups
    top_k = torch.tensor([0, 0, 1, 3, 10, 40, vocab // 2, vocab + 5])[torch.randint(0, 8, (rows,), generator=g)]
    top_p = torch.tensor([1.0, 1.0, 0.0, 1e-9, 0.3, 0.8, 0.95, 0.999])[torch.randint(0, 8, (rows,), generator=g)]
    return logits, top_k, top_p


@pytest.mark.parametrize("seed", range(6))
def test_candidate_cut_equals_the_full_sort(monkeypatch, seed):
    """The fast path (cut found among a row's largest logits) masks exactly what the full sort
    masks, on rows where it applies and on rows that fall back to the sort."""
    import dspark.kernels.sampling as sampling

    monkeypatch.setattr(sampling, "CANDIDATES", (24, 60))
    logits, top_k, top_p = _filter_cases(seed, 400, 120)
    fast = sampling.apply_top_k_top_p(logits, top_k, top_p)
    ref = sampling._top_k_top_p_by_sort(logits, top_k, top_p, True, True)
    _assert_same_cut(logits, top_k, top_p, fast, ref)
    _, ok = sampling._top_k_top_p_by_candidates(logits, top_k, top_p, True, True, 24)
    assert 0.2 < ok.float().mean() < 1.0, "both paths must be exercised"


def test_candidate_cut_at_full_vocabulary_size():
    import dspark.kernels.sampling as sampling

    logits, top_k, top_p = _filter_cases(11, 24, 49152)
    logits[:12] *= 4  # peaked rows: their nuclei fit among the candidates
    fast = sampling.apply_top_k_top_p(logits, top_k, top_p)
    ref = sampling._top_k_top_p_by_sort(logits, top_k, top_p, True, True)
    _assert_same_cut(logits, top_k, top_p, fast, ref)


def _assert_same_cut(logits, top_k, top_p, fast, ref) -> None:
    """Same mask, except where the mass before an entry equals top_p to float32 rounding (the
    two paths sum the same probabilities in another order): there either answer is the rule."""
    differ = (torch.isinf(fast) != torch.isinf(ref)).any(-1).nonzero().flatten().tolist()
    assert len(differ) <= max(2, len(logits) // 50), f"{len(differ)} rows differ"
    for r in differ:
        x = logits[r].double()
        k = int(top_k[r]) if int(top_k[r]) > 0 else x.numel()
        kth = x.sort(descending=True).values[min(k, x.numel()) - 1]
        probs = torch.softmax(x.masked_fill(x < kth, float("-inf")), -1)
        order = torch.sort(x, descending=True, stable=True).indices
        before = (torch.cumsum(probs[order], 0) - probs[order])
        where = (torch.isinf(fast[r]) != torch.isinf(ref[r]))[order].nonzero().flatten()
        assert (before[where] - float(top_p[r])).abs().max() < 1e-5, (r, int(top_k[r]), float(top_p[r]))


def test_exponential_row_is_exp1():
    """The race's noise is Exp(1): Kolmogorov-Smirnov against the exponential law."""
    from scipy import stats

    from dspark.kernels.sampling import exponential_row

    x = exponential_row(torch.empty(200_000), torch.Generator().manual_seed(3))
    assert stats.kstest(x.double().numpy(), "expon").pvalue > 1e-3
    assert (x >= 0).all() and torch.isfinite(x).all()


# ------------------------------------------------------------------ grammar masks


def test_mask_logits_sets_disallowed_to_minus_inf_and_keeps_the_rest():
    from dspark.kernels.sampling import mask_logits

    logits = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 7.0]])
    allowed = torch.tensor([[True, False, True], [False, False, True]])
    out = mask_logits(logits, allowed)
    assert out.tolist() == [[1.0, NEG, 3.0], [NEG, NEG, 7.0]]
    assert logits.tolist() == [[1.0, 2.0, 3.0], [-1.0, 0.5, 7.0]]  # a new tensor, input untouched
    probs = logits_to_probs(out, torch.tensor([1.0, 0.0]))
    assert probs[0, 1] == 0 and probs[1].tolist() == [0.0, 0.0, 1.0]  # masked tokens get no mass
    everything = torch.ones_like(allowed)
    assert torch.equal(mask_logits(logits, everything), logits)


def test_unpack_bitmask_matches_bit_by_bit_reference():
    from dspark.kernels.sampling import unpack_bitmask

    gen = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word's high bits are padding
    bits = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=gen)
    bits[0, 0] = -(2**31)  # only bit 31 set: token 31
    ref = torch.tensor([[(int(bits[r, t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)] for r in range(3)])
    out = unpack_bitmask(bits, vocab)
    assert out.dtype == torch.bool and out.shape == (3, vocab)
    assert torch.equal(out, ref)
    assert out[0, :32].nonzero().flatten().tolist() == [31]
