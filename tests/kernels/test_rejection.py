"""dspark.kernels.rejection: exact cases from hand-made tensors, then losslessness by chi-square.

The statistical tests run one speculative step for 200k independent requests at once (flat
layout, V = 8) and check the law of the emitted tokens against the target at significance
0.001; a deliberately wrong sampler (recovery from p instead of the residual) must fail the
same check, so the test is known to have teeth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dspark.kernels import dispatch
from dspark.kernels.rejection import (
    RejectionInputs,
    RejectionOutput,
    greedy_verify,
    rejection_sample,
    rejection_sample_torch,
)
from dspark.kernels.sampling import logits_to_probs

ALPHA = 1e-3
NUM_DRAWS = 200_000
V = 8


def run(**kw) -> RejectionOutput:
    """The reference with defaults for the randomness (uniforms 0.5, noise 1)."""
    n = kw["draft_token_ids"].shape[0]
    b = kw["cu_num_draft_tokens"].shape[0]
    v = kw["target_probs"].shape[1]
    kw.setdefault("draft_probs", None)
    kw.setdefault("draft_prob_ids", None)
    kw.setdefault("uniforms", torch.full((n,), 0.5))
    kw.setdefault("recovery_noise", torch.ones(b, v))
    return rejection_sample_torch(RejectionInputs(**kw))


# ====================================================================== exact cases


def test_greedy_accepts_while_draft_is_argmax_then_emits_target_token():
    e = torch.eye(6)
    # req 0: drafts [1, 2, 3] vs target [1, 2, 5] -> 2 accepted, recovered 5
    # req 1: no drafts -> bonus 4
    # req 2: drafts [0, 0] all match -> bonus 3
    # req 3: first draft wrong -> recovered 2, nothing accepted
    target = e[[1, 2, 5, 0, 4, 0, 0, 3, 2, 1]]
    out = run(
        draft_token_ids=torch.tensor([1, 2, 3, 0, 0, 4]),
        cu_num_draft_tokens=torch.tensor([3, 3, 5, 6]),
        target_probs=target,
        is_greedy=torch.ones(4, dtype=torch.bool),
        uniforms=torch.full((6,), 0.999),  # irrelevant for greedy
    )
    assert out.output_token_ids.tolist() == [[1, 2, 5, -1], [4, -1, -1, -1], [0, 0, 3, -1], [2, -1, -1, -1]]
    assert out.num_accepted.tolist() == [2, 0, 2, 0]
    assert out.num_emitted.tolist() == [3, 1, 3, 1]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_fast_path_equals_the_sampler_with_one_hot_targets(seed):
    """greedy_verify (the all-greedy step's shortcut) = the rejection sampler at temperature 0,
    with ties in the logits (lowest id wins in both) and blocks of 0..5 drafts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (7,), generator=g).tolist()
    rows = sum(counts) + len(counts)
    logits = torch.randint(0, 3, (rows, V), generator=g).float()  # many ties
    target = logits.argmax(-1)
    drafts, o = [], 0
    for n in counts:  # drafts mostly agree with the target, sometimes not
        d = [int(target[o + i]) if torch.rand(1, generator=g) < 0.7 else int(torch.randint(0, V, (1,), generator=g))
             for i in range(n)]
        drafts.append(d)
        o += n + 1
    fast = greedy_verify(logits, drafts)
    ref = run(draft_token_ids=torch.tensor([t for d in drafts for t in d], dtype=torch.long),
              cu_num_draft_tokens=torch.tensor(counts).cumsum(0), is_greedy=torch.ones(len(counts), dtype=torch.bool),
              target_probs=logits_to_probs(logits, torch.zeros(rows)))
    assert torch.equal(fast.num_accepted, ref.num_accepted)
    assert torch.equal(fast.num_emitted, ref.num_emitted)
    assert torch.equal(fast.output_token_ids, ref.output_token_ids[:, : fast.output_token_ids.shape[1]])


def test_greedy_ignores_q_and_noise():
    e = torch.eye(4)
    noise = torch.tensor([[1.0, 1e-6, 1e-6, 1e-6]]).expand(1, 4)
    q = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # q puts all its mass elsewhere
    out = run(
        draft_token_ids=torch.tensor([3]),
        cu_num_draft_tokens=torch.tensor([1]),
        draft_probs=q,
        target_probs=e[[1, 2]],
        is_greedy=torch.tensor([True]),
        recovery_noise=noise,
    )
    assert out.output_token_ids.tolist() == [[1, -1]]


def test_greedy_non_one_hot_rows_still_use_argmax():
    # Rows from logits_to_probs are one-hot; a softer row takes the argmax path.
    target = torch.tensor([[0.3, 0.4, 0.3], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    out = run(
        draft_token_ids=torch.tensor([1, 1]),
        cu_num_draft_tokens=torch.tensor([2]),
        target_probs=target,
        is_greedy=torch.tensor([True]),
    )
    assert out.output_token_ids.tolist() == [[1, 2, -1]]


def test_sampling_hand_made():
    # V = 4, noise 1 unless set, so the race picks the largest weight.
    target = torch.tensor(
        [
            [0.1, 0.6, 0.2, 0.1],  # req 0, pos 1: p(1) = .6
            [0.25, 0.25, 0.25, 0.25],  # req 0, pos 2: p(2) = .25
            [0.0, 0.0, 0.0, 1.0],  # req 0 bonus (not reached)
            [0.1, 0.2, 0.3, 0.4],  # req 1 bonus (no drafts)
            [0.0, 0.0, 0.1, 0.9],  # req 2, pos 1
            [0.0, 0.0, 0.1, 0.9],  # req 2, pos 2
            [0.5, 0.5, 0.0, 0.0],  # req 2 bonus
        ]
    )
    q = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0],  # accept iff u < .6
            [0.0, 0.0, 1.0, 0.0],  # accept iff u < .25
            [0.0, 0.0, 0.0, 1.0],  # accept iff u < .9
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    noise = torch.ones(3, 4)
    noise[0] = torch.tensor([1.0, 2.0, 1.0, 4.0])  # residual [.25, .25, 0, .25] -> scores [.25, .125, 0, .0625]
    noise[2] = torch.tensor([1.0, 0.5, 1.0, 1.0])  # bonus [.5, .5, 0, 0] -> token 1
    out = run(
        draft_token_ids=torch.tensor([1, 2, 3, 3]),
        cu_num_draft_tokens=torch.tensor([2, 2, 4]),
        draft_probs=q,
        target_probs=target,
        is_greedy=torch.zeros(3, dtype=torch.bool),
        uniforms=torch.tensor([0.5, 0.9, 0.1, 0.8]),
        recovery_noise=noise,
    )
    assert out.output_token_ids.tolist() == [[1, 0, -1], [3, -1, -1], [3, 3, 1]]
    assert out.num_accepted.tolist() == [1, 0, 2]


def test_acceptance_corner_cases():
    # V = 2, one draft per request (token 0), dense q:
    #   req 0: p(x) = 0 and u = 0      -> rejected (never emit what the target cannot)
    #   req 1: q(x) = 0 < p(x)         -> rejected (q did not propose x), residual [.5, 0] -> 0
    #   req 2: u * q(x) == p(x)        -> rejected (accept iff u * q < p)
    #   req 3: p == q with p(x) = 0    -> rejected, residual all zero -> sampled from p
    target = torch.tensor(
        [
            [0.0, 1.0], [0.5, 0.5],  # req 0: verify row, bonus row
            [0.5, 0.5], [1.0, 0.0],  # req 1
            [0.25, 0.75], [0.5, 0.5],  # req 2
            [0.0, 1.0], [1.0, 0.0],  # req 3
        ]
    )
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    out = run(
        draft_token_ids=torch.tensor([0, 0, 0, 0]),
        cu_num_draft_tokens=torch.tensor([1, 2, 3, 4]),
        draft_probs=q,
        target_probs=target,
        is_greedy=torch.zeros(4, dtype=torch.bool),
        uniforms=torch.tensor([0.0, 0.9, 0.25, 0.0]),
    )
    assert out.num_accepted.tolist() == [0, 0, 0, 0]
    # req 3 would emit token 0 (probability 0) without the fallback: all race scores are 0.
    assert out.output_token_ids.tolist() == [[1, -1], [0, -1], [1, -1], [1, -1]]


def zero_q_draft_step(q_mode: str, n: int = 1000, seed: int = 0) -> dict:
    """n requests of two drafts [0, 1] each: q(0) = .5 > 0 = q(1), with p(1) = .145.

    V = 4; p = [.3, .145, .4, .155] and q = [.5, 0, .5, 0] on every row, so draft 0 passes
    the ratio test iff u < .6, and the recovered token after rejecting draft 1 comes from the
    residual [0, .145, 0, .155] (token 1 or 3).
    """
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([0.3, 0.145, 0.4, 0.155])
    q = torch.tensor([0.5, 0.0, 0.5, 0.0])
    kw = dict(
        draft_token_ids=torch.tensor([0, 1]).repeat(n),  # [2n]
        cu_num_draft_tokens=torch.arange(1, n + 1) * 2,  # [n]
        target_probs=p.repeat(3 * n, 1),  # [3n, V]: two verify rows and a bonus row each
        is_greedy=torch.zeros(n, dtype=torch.bool),
        uniforms=torch.rand(2 * n, generator=g),
        recovery_noise=torch.empty(n, 4).exponential_(generator=g),
    )
    if q_mode == "dense":
        kw.update(draft_probs=q.repeat(2 * n, 1), draft_prob_ids=None)
    else:  # sparse, with a zero-valued padding slot that names the draft itself
        kw.update(draft_probs=torch.tensor([[0.5, 0.5, 0.0]]).repeat(2 * n, 1),
                  draft_prob_ids=torch.tensor([[0, 2, 1]]).repeat(2 * n, 1))
    return kw


@pytest.mark.parametrize("q_mode", ["dense", "sparse"])
def test_draft_with_zero_proposal_probability_is_rejected(q_mode):
    # A drafter that sends a token its own q gives probability 0 broke the contract; accepting it
    # (the limit p/q -> inf) would emit it whenever p(x) > 0.  vLLM rejects it; so do we.
    kw = zero_q_draft_step(q_mode)
    out = rejection_sample_torch(RejectionInputs(**kw))
    first_ok = kw["uniforms"][0::2] < 0.6  # [n]: draft 0's ratio test
    assert first_ok.any() and not first_ok.all()
    assert torch.equal(out.num_accepted, first_ok.long())  # draft 1 never accepted
    emitted = out.output_token_ids.gather(1, out.num_accepted[:, None]).squeeze(1)  # [n]
    assert set(emitted.tolist()) == {1, 3}  # both rejections recover from the residual [0, .145, 0, .155]


def test_all_requests_without_drafts():
    target = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    out = run(
        draft_token_ids=torch.zeros(0, dtype=torch.long),
        cu_num_draft_tokens=torch.tensor([0, 0]),
        target_probs=target,
        is_greedy=torch.tensor([True, False]),
    )
    assert out.output_token_ids.tolist() == [[1], [2]]
    assert out.num_accepted.tolist() == [0, 0]


def test_layout_errors():
    with pytest.raises(ValueError):
        run(
            draft_token_ids=torch.tensor([1, 2]),
            cu_num_draft_tokens=torch.tensor([1]),  # ends at 1, two drafts given
            target_probs=torch.full((3, 4), 0.25),
            is_greedy=torch.tensor([False]),
        )
    with pytest.raises(ValueError):
        run(
            draft_token_ids=torch.tensor([1]),
            cu_num_draft_tokens=torch.tensor([1]),
            target_probs=torch.full((1, 4), 0.25),  # needs N + B = 2 rows
            is_greedy=torch.tensor([False]),
        )


def _random_step(seed: int, b: int = 12, v: int = 50, k: int = 6):
    """A random batch (some greedy, some without drafts) and every representation of one q."""
    g = torch.Generator().manual_seed(seed)
    n_per = torch.randint(0, 5, (b,), generator=g)
    n = int(n_per.sum())
    greedy = torch.rand(b, generator=g) < 0.3
    logits = torch.randn(n + b, v, generator=g) * 2
    req_of_row = torch.repeat_interleave(torch.arange(b), n_per + 1)
    target = logits_to_probs(logits, torch.where(greedy[req_of_row], 0.0, 1.0))
    # A sparse q: top-k of a random softmax, renormalised; the last slot is padding (id 0).
    vals, ids = torch.softmax(torch.randn(n, v, generator=g), -1).topk(k, dim=-1)  # [N, K]
    vals = vals / vals[:, : k - 1].sum(1, keepdim=True)
    vals[:, -1] = 0.0
    ids[:, -1] = 0
    dense = torch.zeros(n, v).scatter_add_(1, ids, vals)
    drafts = ids.gather(1, torch.multinomial(vals, 1, generator=g)).squeeze(1)
    common = dict(
        draft_token_ids=drafts,
        cu_num_draft_tokens=torch.cumsum(n_per, 0),
        target_probs=target,
        is_greedy=greedy,
        uniforms=torch.rand(n, generator=g),
        recovery_noise=torch.empty(b, v).exponential_(generator=g),
    )
    return common, (vals, ids), dense


@pytest.mark.parametrize("seed", range(5))
def test_sparse_and_dense_q_give_identical_results(seed):
    common, (vals, ids), dense = _random_step(seed)
    a = rejection_sample_torch(RejectionInputs(draft_probs=dense, draft_prob_ids=None, **common))
    b = rejection_sample_torch(RejectionInputs(draft_probs=vals, draft_prob_ids=ids, **common))
    assert torch.equal(a.output_token_ids, b.output_token_ids)
    assert torch.equal(a.num_accepted, b.num_accepted)


@pytest.mark.parametrize("seed", range(3))
def test_one_hot_q_equals_dense_one_hot_and_sparse_k1(seed):
    common, _, _ = _random_step(seed)
    drafts = common["draft_token_ids"]
    n = drafts.shape[0]
    onehot = torch.zeros(n, common["target_probs"].shape[1]).scatter_(1, drafts[:, None], 1.0)
    a = rejection_sample_torch(RejectionInputs(draft_probs=None, draft_prob_ids=None, **common))
    b = rejection_sample_torch(RejectionInputs(draft_probs=onehot, draft_prob_ids=None, **common))
    c = rejection_sample_torch(RejectionInputs(draft_probs=torch.ones(n, 1), draft_prob_ids=drafts[:, None], **common))
    assert torch.equal(a.output_token_ids, b.output_token_ids)
    assert torch.equal(a.output_token_ids, c.output_token_ids)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    common, (vals, ids), _ = _random_step(0)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    inputs = RejectionInputs(draft_probs=vals, draft_prob_ids=ids, **common)
    a = rejection_sample(inputs)
    monkeypatch.delenv(dispatch.ENV_VAR)
    b = rejection_sample(inputs)
    assert torch.equal(a.output_token_ids, b.output_token_ids)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError):
        rejection_sample(inputs)


# ====================================================================== statistics


def chisq_pvalue(observed: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value of counts [G, V] against row laws [G, V] (groups pooled).

    Cells with probability 0 must be empty (asserted) and carry no degree of freedom.  Groups
    with an expected count under ``min_expected`` are left out (the chi-square approximation
    needs large cells); which groups are left out depends only on group sizes, not outcomes.
    """
    observed = np.atleast_2d(observed).astype(np.float64)
    probs = np.atleast_2d(probs).astype(np.float64)
    stat, dof = 0.0, 0
    for obs, p in zip(observed, probs):
        total = obs.sum()
        support = p > 0
        assert obs[~support].sum() == 0, "a token with target probability 0 was emitted"
        expected = total * p[support] / p[support].sum()
        if total == 0 or expected.min() < min_expected:
            continue
        stat += float(((obs[support] - expected) ** 2 / expected).sum())
        dof += int(support.sum()) - 1
    assert dof > 0, "no group large enough to test"
    return float(stats.chi2.sf(stat, dof))


def _law(g: torch.Generator, v: int, *, sharp: float = 1.0) -> torch.Tensor:
    """A random distribution with no tiny entries (so every expected count is large)."""
    return 0.7 * torch.softmax(torch.randn(v, generator=g) * sharp, -1) + 0.3 / v


def _sample_rows(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One draw per row of probs [R, V] (inverse CDF, float64)."""
    cdf = probs.double().cumsum(1)
    u = torch.rand(probs.shape[0], 1, generator=g, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


class Chain:
    """A toy first-order 'language': target and draft laws depend on the previous token.

    target[k][prev] is the target law at block position k + 1 (k = gamma: the bonus row);
    draft[k][prev] the proposal at position k + 1.  Position 1 conditions on a fixed anchor 0.
    """

    def __init__(self, target: torch.Tensor, draft: torch.Tensor, gamma: int):
        self.target, self.draft, self.gamma = target, draft, gamma  # [gamma+1, V, V], [gamma, V, V]

    def step(self, g: torch.Generator, n: int, q_mode: str = "dense", k_sparse: int = 0,
             draft_law: torch.Tensor | None = None) -> tuple[RejectionOutput, torch.Tensor]:
        """One speculative step for n requests of gamma drafts.  Returns (output, drafts [n, gamma])."""
        gamma = self.gamma
        drafts = torch.empty(n, gamma, dtype=torch.long)
        q_rows = torch.empty(n, gamma, V)
        p_rows = torch.empty(n, gamma + 1, V)
        prev = torch.zeros(n, dtype=torch.long)
        for k in range(gamma + 1):
            p_rows[:, k] = self.target[k][prev]
            if k == gamma:
                break
            q = self.draft[k][prev] if draft_law is None else draft_law.expand(n, V)
            q_rows[:, k] = q
            prev = _sample_rows(q, g)
            drafts[:, k] = prev
        kw = dict(
            draft_token_ids=drafts.reshape(-1),
            cu_num_draft_tokens=torch.arange(1, n + 1) * gamma,
            target_probs=p_rows.reshape(-1, V),
            is_greedy=torch.zeros(n, dtype=torch.bool),
            uniforms=torch.rand(n * gamma, generator=g),
            recovery_noise=torch.empty(n, V).exponential_(generator=g),
        )
        flat_q = q_rows.reshape(-1, V)
        if q_mode == "dense":
            kw.update(draft_probs=flat_q, draft_prob_ids=None)
        elif q_mode == "sparse":
            vals, ids = flat_q.topk(k_sparse, dim=-1)
            pad = vals == 0  # padding: value 0, id 0
            kw.update(draft_probs=vals, draft_prob_ids=torch.where(pad, 0, ids))
        else:  # one-hot: the drafts came from draft_law, but q is declared one-hot
            kw.update(draft_probs=None, draft_prob_ids=None)
        return rejection_sample(RejectionInputs(**kw)), drafts


def _check_chain(out: RejectionOutput, chain: Chain) -> list[float]:
    """p-values: first token vs target[0][0]; token k given k-1 accepted drafts vs target[k][prev]."""
    toks = out.output_token_ids.numpy()
    acc = out.num_accepted.numpy()
    pvals = [chisq_pvalue(np.bincount(toks[:, 0], minlength=V), chain.target[0][0].numpy())]
    for k in range(1, chain.gamma + 1):
        rows = acc >= k  # x_k was accepted, so the k+1-th token was emitted after it
        prev, nxt = toks[rows, k - 1], toks[rows, k]
        counts = np.zeros((V, V))
        np.add.at(counts, (prev, nxt), 1)
        pvals.append(chisq_pvalue(counts, chain.target[k].numpy()))
    return pvals


def _random_chain(seed: int, gamma: int, *, target_fn=None, draft_fn=None) -> Chain:
    g = torch.Generator().manual_seed(seed)
    target_fn = target_fn or (lambda: _law(g, V, sharp=1.5))
    draft_fn = draft_fn or (lambda: _law(g, V, sharp=1.5))
    target = torch.stack([torch.stack([target_fn() for _ in range(V)]) for _ in range(gamma + 1)])
    draft = torch.stack([torch.stack([draft_fn() for _ in range(V)]) for _ in range(gamma)])
    return Chain(target, draft, gamma)


def test_dense_q_is_lossless():
    chain = _random_chain(0, gamma=3)
    out, _ = chain.step(torch.Generator().manual_seed(10), NUM_DRAWS)
    assert 0.5 < out.num_accepted.double().mean() < 2.5  # a real mix of accept and reject
    assert min(_check_chain(out, chain)) > ALPHA


def test_sparse_q_is_lossless():
    g = torch.Generator().manual_seed(1)

    def truncated() -> torch.Tensor:  # top-4 of a random law, renormalised: exactly what was sampled
        law = _law(g, V, sharp=1.5)
        vals, ids = law.topk(4)
        return torch.zeros(V).scatter_(0, ids, vals / vals.sum())

    chain = _random_chain(1, gamma=3, draft_fn=truncated)
    out, _ = chain.step(torch.Generator().manual_seed(11), NUM_DRAWS, q_mode="sparse", k_sparse=5)
    assert min(_check_chain(out, chain)) > ALPHA


def test_one_hot_q_is_lossless_for_any_draft_source():
    # Prompt-lookup style: drafts come from anywhere; q is declared one-hot on them.
    g = torch.Generator().manual_seed(2)
    chain = _random_chain(2, gamma=2)
    out, _ = chain.step(torch.Generator().manual_seed(12), NUM_DRAWS, q_mode="one_hot",
                        draft_law=_law(g, V, sharp=2.0))
    assert min(_check_chain(out, chain)) > ALPHA


def test_lossless_after_temperature_top_k_top_p():
    # Target and draft laws come from logits_to_probs, so both have exact zeros.
    g = torch.Generator().manual_seed(3)

    def target_law() -> torch.Tensor:
        return logits_to_probs(torch.randn(1, V, generator=g), torch.tensor([0.7]), None, torch.tensor([0.8]))[0]

    def draft_law() -> torch.Tensor:
        return logits_to_probs(torch.randn(1, V, generator=g), torch.tensor([1.3]), torch.tensor([5]))[0]

    chain = _random_chain(3, gamma=2, target_fn=target_law, draft_fn=draft_law)
    out, _ = chain.step(torch.Generator().manual_seed(13), NUM_DRAWS)
    assert min(_check_chain(out, chain)) > ALPHA


def _wrong_rejection_sample(kw: dict) -> torch.Tensor:
    """One draft per request, recovering from p instead of the residual (the classic bug)."""
    p_rows = kw["target_probs"].view(-1, 2, V)[:, 0]  # [n, V]
    x = kw["draft_token_ids"]
    p_x = p_rows.gather(1, x[:, None]).squeeze(1)
    q_x = kw["draft_probs"].gather(1, x[:, None]).squeeze(1)
    accepted = kw["uniforms"] * q_x < p_x
    recovered = (p_rows / kw["recovery_noise"]).argmax(1)
    return torch.where(accepted, x, recovered)


def test_negative_control_wrong_residual_is_caught():
    g = torch.Generator().manual_seed(4)
    p, q = _law(g, V, sharp=1.5), _law(g, V, sharp=1.5)
    n = NUM_DRAWS
    x = _sample_rows(q.expand(n, V), g)
    kw = dict(
        draft_token_ids=x,
        cu_num_draft_tokens=torch.arange(1, n + 1),
        draft_probs=q.expand(n, V).contiguous(),
        draft_prob_ids=None,
        target_probs=torch.stack([p, p], 0).repeat(n, 1),
        is_greedy=torch.zeros(n, dtype=torch.bool),
        uniforms=torch.rand(n, generator=g),
        recovery_noise=torch.empty(n, V).exponential_(generator=g),
    )
    wrong = _wrong_rejection_sample(kw)
    right = rejection_sample(RejectionInputs(**kw)).output_token_ids[:, 0]
    assert chisq_pvalue(np.bincount(wrong.numpy(), minlength=V), p.numpy()) < ALPHA
    assert chisq_pvalue(np.bincount(right.numpy(), minlength=V), p.numpy()) > ALPHA
