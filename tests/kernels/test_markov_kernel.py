"""dspark.kernels.markov: the reported proposal is exactly the law the block was sampled from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dspark.kernels.markov import MarkovDraft, inverse_cdf_sample, markov_block_sample
from dspark.kernels.rejection import RejectionInputs, rejection_sample

ALPHA = 1e-3


def make_head(seed: int, b: int, g: int, v: int, r: int):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(b, g, v, generator=gen)
    w1 = torch.randn(v, r, generator=gen) * 0.7
    w2 = torch.randn(r, v, generator=gen) * 0.7
    anchor = torch.randint(0, v, (b,), generator=gen)
    u = torch.rand(b, g, generator=gen, dtype=torch.float64)
    return base, anchor, w1, w2, u


def test_inverse_cdf_sample_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert inverse_cdf_sample(probs, torch.tensor([0.0, 0.0, 0.0])).tolist() == [1, 2, 0]
    assert inverse_cdf_sample(probs, torch.tensor([0.5, 0.99, 0.74])).tolist() == [3, 2, 2]
    assert inverse_cdf_sample(probs, torch.tensor([1 - 1e-12] * 3, dtype=torch.float64)).tolist() == [3, 2, 3]


@pytest.mark.parametrize("top_k", [0, 4])
def test_matches_a_per_request_loop(top_k):
    b, g, v, r = 3, 4, 10, 3
    base, anchor, w1, w2, u = make_head(0, b, g, v, r)
    temp = torch.tensor([0.7, 1.0, 1.6])
    d = markov_block_sample(base, anchor, w1, w2, temp, top_k, u)
    assert d.tokens.shape == (b, g) and d.prev_embeddings.shape == (b, g, r)
    assert (d.draft_prob_ids is None) == (top_k == 0)
    for i in range(b):
        prev = int(anchor[i])
        for k in range(g):
            assert torch.equal(d.prev_embeddings[i, k], w1[prev])
            logits = base[i, k] + w1[prev] @ w2
            full = torch.softmax(logits / temp[i], -1)
            tok = int(d.tokens[i, k])
            if top_k == 0:
                assert torch.allclose(d.draft_probs[i, k], full, atol=1e-6)
                assert full[tok] > 0
            else:
                ids = d.draft_prob_ids[i, k]
                assert set(ids.tolist()) == set(logits.topk(top_k).indices.tolist())
                expected = full[ids] / full[ids].sum()
                assert torch.allclose(d.draft_probs[i, k], expected, atol=1e-6)
                assert tok in ids.tolist()
            prev = tok


def test_all_greedy_is_sparse_k1_argmax_chain():
    b, g, v, r = 4, 5, 12, 2
    base, anchor, w1, w2, u = make_head(1, b, g, v, r)
    d = markov_block_sample(base, anchor, w1, w2, torch.zeros(b), 0, u)
    assert d.draft_probs.shape == (b, g, 1) and torch.equal(d.draft_probs, torch.ones(b, g, 1))
    assert torch.equal(d.draft_prob_ids.squeeze(-1), d.tokens)
    prev = anchor
    for k in range(g):
        expected = (base[:, k] + w1[prev] @ w2).argmax(-1)
        assert torch.equal(d.tokens[:, k], expected)
        prev = expected
    # The uniforms play no part.
    assert torch.equal(markov_block_sample(base, anchor, w1, w2, torch.zeros(b), 0, 1 - u).tokens, d.tokens)


@pytest.mark.parametrize("top_k", [0, 3])
def test_mixed_batch_greedy_rows_are_one_hot(top_k):
    b, g, v, r = 4, 3, 9, 2
    base, anchor, w1, w2, u = make_head(2, b, g, v, r)
    temp = torch.tensor([0.0, 1.0, 0.0, 0.8])
    d = markov_block_sample(base, anchor, w1, w2, temp, top_k, u)
    greedy_rows = [0, 2]
    if top_k == 0:
        probs = d.draft_probs[greedy_rows]  # [2, G, V]
        assert torch.equal(probs.argmax(-1), d.tokens[greedy_rows])
        assert torch.equal(probs.sum(-1), torch.ones(2, g)) and (probs.max(-1).values == 1).all()
    else:
        assert torch.equal(d.draft_prob_ids[greedy_rows, :, 0], d.tokens[greedy_rows])
        assert torch.equal(d.draft_probs[greedy_rows], torch.tensor([1.0, 0.0, 0.0]).expand(2, g, 3))
    # Sampled rows are still proper distributions.
    assert torch.allclose(d.draft_probs[[1, 3]].sum(-1), torch.ones(2, g))


def chisq_pooled(observed: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of counts [G, V] vs laws [G, V], groups pooled, small groups skipped."""
    stat, dof = 0.0, 0
    for obs, p in zip(observed, probs):
        total = obs.sum()
        support = p > 0
        assert obs[~support].sum() == 0
        expected = total * p[support] / p[support].sum()
        if total == 0 or expected.min() < 5:
            continue
        stat += float(((obs[support] - expected) ** 2 / expected).sum())
        dof += int(support.sum()) - 1
    assert dof > 0
    return float(stats.chi2.sf(stat, dof))


def _dense_q(d: MarkovDraft, v: int) -> torch.Tensor:
    if d.draft_prob_ids is None:
        return d.draft_probs
    return torch.zeros(*d.draft_prob_ids.shape[:-1], v).scatter_add_(-1, d.draft_prob_ids, d.draft_probs)


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampled_tokens_follow_the_reported_q(top_k):
    # 200k copies of one block: position 1's law is fixed, later positions depend on the
    # previous token only (the Markov head), so group by it and compare with the reported q.
    n, g, v, r = 200_000, 3, 8, 4
    base, anchor, w1, w2, _ = make_head(3, 1, g, v, r)
    u = torch.rand(n, g, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    d = markov_block_sample(base.expand(n, g, v), anchor.expand(n), w1, w2, torch.full((n,), 0.9), top_k, u)
    q = _dense_q(d, v)  # [n, G, V]
    toks = d.tokens
    prev = torch.cat([anchor.expand(n, 1), toks[:, :-1]], 1)  # [n, G]
    for k in range(g):
        # Same previous token -> the same proposal for every request: take the first one's q
        # as the group's law and check everyone else reported it too.
        first = torch.full((v,), -1, dtype=torch.long).scatter_reduce(
            0, prev[:, k], torch.arange(n), "amin", include_self=False
        )
        seen = first >= 0
        laws = torch.zeros(v, v)
        laws[seen] = q[first[seen], k]
        assert torch.allclose(q[:, k], laws[prev[:, k]], atol=1e-6)
        counts = torch.bincount(prev[:, k] * v + toks[:, k], minlength=v * v).view(v, v)
        assert chisq_pooled(counts.numpy(), laws.double().numpy()) > ALPHA, f"position {k + 1}"
    # No token is ever drawn from outside the reported support.
    assert (q.gather(-1, toks[..., None]) > 0).all()


def test_block_feeds_the_rejection_sampler():
    # Flatten a sparse block the way a verifier would and check the shapes line up.
    b, g, v, r = 3, 4, 20, 2
    base, anchor, w1, w2, u = make_head(5, b, g, v, r)
    d = markov_block_sample(base, anchor, w1, w2, torch.tensor([1.0, 0.0, 0.7]), 6, u)
    lengths = torch.tensor([4, 0, 2])  # verified prefix per request
    keep = torch.arange(g)[None, :] < lengths[:, None]  # [B, G]
    n = int(lengths.sum())
    out = rejection_sample(RejectionInputs(
        draft_token_ids=d.tokens[keep],
        cu_num_draft_tokens=torch.cumsum(lengths, 0),
        draft_probs=d.draft_probs[keep],
        draft_prob_ids=d.draft_prob_ids[keep],
        target_probs=torch.softmax(torch.randn(n + b, v), -1),
        is_greedy=torch.tensor([False, True, False]),
        uniforms=torch.rand(n),
        recovery_noise=torch.empty(b, v).exponential_(),
    ))
    assert out.output_token_ids.shape == (b, 5)
    assert (out.num_accepted <= lengths).all()


def test_masked_position_sample_draws_its_reported_q_among_the_allowed():
    from dspark.kernels.markov import masked_position_sample

    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    allowed = torch.zeros(1, 12, dtype=torch.bool)
    allowed[0, [1, 4, 5, 9, 11]] = True
    n = 20000
    cols, q, cand = masked_position_sample(logits.expand(n, 12), allowed.expand(n, 12), torch.full((n,), 0.8), 3,
                                           torch.rand(n, dtype=torch.float64))
    assert set(cols.tolist()) <= {1, 4, 5, 9, 11}
    # q: the softmax at T = 0.8 of the top 3 allowed logits, exactly what is reported
    top = logits[0, [1, 4, 5, 9, 11]].topk(3)
    want = torch.softmax(top.values / 0.8, -1)
    assert torch.allclose(q[0], want, atol=1e-6)
    assert cand[0].tolist() == [[1, 4, 5, 9, 11][i] for i in top.indices.tolist()]
    freq = torch.bincount(cols, minlength=12).double() / n
    assert torch.allclose(freq[cand[0]], want.double(), atol=0.015)
    g, gq, _ = masked_position_sample(logits, allowed, torch.tensor([0.0]), 3, torch.rand(1, dtype=torch.float64))
    assert g.item() == [1, 4, 5, 9, 11][int(logits[0, [1, 4, 5, 9, 11]].argmax())] and gq[0, 0] == 1.0
