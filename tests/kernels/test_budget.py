"""dspark.kernels.budget: survival, Algorithm 1 (early stop), the 5.2 async variant, top-K.

Includes the paper's Appendix A counterexample run end to end through rejection sampling:
the early-stop scheduler keeps the first token's law equal to the target's, a global argmax
over the same block does not.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from dspark.kernels.budget import (
    best_capacity,
    expected_accepted,
    select_budget_async,
    select_budget_greedy,
    survival,
    throughput_path,
    top_k_admission,
    top_k_admission_torch,
)
from dspark.kernels.rejection import RejectionInputs, rejection_sample

# Appendix A: SPS(1) = 1, SPS(2) = 0.5, SPS(3) = 0.45 steps/s, as seconds per step by token count.
APPENDIX_A_TABLE = torch.tensor([0.0, 1.0, 2.0, 1 / 0.45])


def theta(surv: torch.Tensor, lengths: torch.Tensor, step_time: torch.Tensor, draft_time: float = 0.0) -> float:
    """Expected throughput of one admission, straight from the definition."""
    tau = float(expected_accepted(surv.double(), lengths).sum())
    return tau / (float(step_time[surv.shape[0] + int(lengths.sum())]) + draft_time)


def brute_force(surv: torch.Tensor, step_time: torch.Tensor, draft_time: float = 0.0) -> float:
    """Best throughput over every prefix-length vector the table allows."""
    max_len = (surv > 0).sum(1).tolist()
    best = -1.0
    for lens in itertools.product(*[range(m + 1) for m in max_len]):
        if surv.shape[0] + sum(lens) < step_time.shape[0]:
            best = max(best, theta(surv, torch.tensor(lens), step_time, draft_time))
    return best


# ------------------------------------------------------------------ survival / expectation


def test_survival_is_cumprod_cut_at_length():
    c = torch.tensor([[0.9, 0.5, 0.8, 1.0], [0.5, 0.5, 0.5, 0.5], [0.7, 0.7, 0.7, 0.7]])
    a = survival(c, torch.tensor([4, 2, 0]))
    expected = torch.tensor([[0.9, 0.45, 0.36, 0.36], [0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(a, expected)
    assert (a[:, 1:] <= a[:, :-1]).all()


def test_expected_accepted_counts_the_bonus():
    a = torch.tensor([[0.9, 0.45], [0.5, 0.25]])
    assert torch.allclose(expected_accepted(a, torch.tensor([2, 0])), torch.tensor([2.35, 1.0]))


def test_throughput_path_stops_at_table_end_and_positive_candidates():
    a = torch.tensor([[0.9, 0.5, 0.0], [0.8, 0.0, 0.0]])
    t = torch.arange(6, dtype=torch.float64)  # up to 5 tokens
    path = throughput_path(a, t)
    assert path.shape == (4,)  # 3 positive candidates, 2 + 3 = 5 tokens fits
    assert torch.allclose(path, torch.tensor([2 / 2, 2.9 / 3, 3.7 / 4, 4.2 / 5], dtype=torch.float64))
    assert throughput_path(a, t[:4]).shape == (2,)  # only 1 draft fits in 3 tokens
    with pytest.raises(ValueError):
        throughput_path(a, t[:2])  # not even the anchors fit


# ------------------------------------------------------------------ Algorithm 1


def test_greedy_hand_made_prefixes():
    a = torch.tensor([[0.9, 0.8, 0.3], [0.7, 0.2, 0.0], [0.95, 0.0, 0.0]])
    t = torch.tensor([0.0] + [1.0] * 6 + [2.0] * 4)  # flat up to 6 tokens, then twice as slow
    d = select_budget_greedy(a, t)
    # path .95, .9, .8 | .7: Theta 3, 3.95, 4.85, 5.65 then 6.35 / 2 -> stop after three
    assert d.lengths.tolist() == [2, 0, 1]
    assert (d.num_draft_tokens, d.num_tokens) == (3, 6)
    assert d.expected_accepted == pytest.approx(5.65)
    assert d.expected_throughput == pytest.approx(5.65)


def test_greedy_flat_cost_admits_every_positive_candidate_with_ties():
    a = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25]])
    d = select_budget_greedy(a, torch.ones(10))
    assert d.lengths.tolist() == [2, 3]


def test_greedy_draft_time_makes_longer_blocks_pay():
    a = torch.tensor([[0.5, 0.2]])
    t = 0.01 * torch.arange(4, dtype=torch.float64)
    assert select_budget_greedy(a, t).lengths.tolist() == [0]  # 100 -> 75 tok/s: stop
    assert select_budget_greedy(a, t, draft_time=1.0).lengths.tolist() == [2]


def test_greedy_early_stop_on_appendix_a_curve():
    a = torch.tensor([[0.8, 0.72]])
    assert select_budget_greedy(a, APPENDIX_A_TABLE).lengths.tolist() == [0]
    assert best_capacity(a, APPENDIX_A_TABLE) == 3  # the global search would verify both


def test_greedy_stops_at_equal_throughput():
    # Theta_0 = 1 / 1, Theta_1 = 1.5 / 1.5: not an improvement, so nothing is admitted.
    assert select_budget_greedy(torch.tensor([[0.5]]), torch.tensor([0.0, 1.0, 1.5])).lengths.tolist() == [0]


@pytest.mark.parametrize("seed", range(8))
def test_global_path_optimum_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(3, 3, generator=g) ** 0.3
    a = survival(c, torch.randint(0, 4, (3,), generator=g))
    # An arbitrary increasing (jagged) step-time table up to 10 tokens.
    t = torch.cat([torch.zeros(1), torch.cumsum(torch.rand(10, generator=g) ** 3, 0) + 0.2]).double()
    best = brute_force(a, t)
    cap = best_capacity(a, t)
    lengths = top_k_admission(a, cap - 3)
    assert theta(a, lengths, t) == pytest.approx(best, rel=1e-12)
    assert float(throughput_path(a, t).max()) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_greedy_is_optimal_when_step_time_is_affine(seed):
    # tau is concave along the path and the step time affine, so Theta is unimodal and the
    # early stop finds the global optimum.
    g = torch.Generator().manual_seed(100 + seed)
    a = survival(torch.rand(3, 3, generator=g) ** 0.5, torch.tensor([3, 3, 3]))
    base, per_token = float(torch.rand(1, generator=g)) + 0.1, float(torch.rand(1, generator=g))
    t = base + per_token * torch.arange(13, dtype=torch.float64)
    d = select_budget_greedy(a, t)
    assert d.expected_throughput == pytest.approx(brute_force(a, t), rel=1e-12)
    assert d.expected_throughput == pytest.approx(theta(a, d.lengths, t), rel=1e-12)


def test_empty_batch():
    d = select_budget_greedy(torch.zeros(0, 4), torch.ones(3))
    assert d.lengths.shape == (0,) and d.num_tokens == 0
    assert best_capacity(torch.zeros(0, 4), torch.ones(3)) == 0


# ------------------------------------------------------------------ top-K and the async variant


def test_top_k_admission_orders_by_survival_then_position():
    a = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.5, 0.0], [0.5, 0.5, 0.5]])
    expected = {0: [0, 0, 0], 1: [1, 0, 0], 2: [1, 1, 0], 3: [2, 1, 0], 4: [2, 2, 0], 5: [2, 2, 1],
                6: [2, 2, 2], 7: [2, 2, 3], 8: [3, 2, 3], 9: [3, 2, 3], 100: [3, 2, 3]}
    for k, lens in expected.items():
        assert top_k_admission_torch(a, k).tolist() == lens, k
        assert top_k_admission_torch(a, torch.tensor(k)).tolist() == lens, k


def test_top_k_admission_keeps_prefixes_for_non_monotone_input():
    a = torch.tensor([[0.2, 0.9, 0.8]])  # not a survival table; the result must still be a prefix
    assert top_k_admission_torch(a, 2).tolist() == [0]
    assert top_k_admission_torch(a, 3).tolist() == [3]


def test_async_uses_stale_capacity_and_current_ranking():
    t = torch.tensor([0.0] + [1.0] * 5 + [3.0] * 6)  # best capacity: 5 tokens
    stale = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.1, 0.0]])  # 2 requests -> 3 drafts
    assert best_capacity(stale, t) == 5
    current = torch.tensor([[0.2, 0.1, 0.0], [0.95, 0.9, 0.85]])
    d = select_budget_async(stale, current, t)
    assert d.lengths.tolist() == [0, 3]  # the 3 best *current* candidates, all in request 1
    # The batch grew to 3 requests: the same 5-token capacity leaves 2 drafts.
    current3 = torch.tensor([[0.6, 0.5, 0.0], [0.95, 0.2, 0.1], [0.1, 0.0, 0.0]])
    d = select_budget_async(stale, current3, t)
    assert d.lengths.tolist() == [1, 1, 0] and d.num_tokens == 5
    # Capacity below the anchors: no drafts at all.
    current6 = torch.full((6, 3), 0.9)
    assert select_budget_async(stale, current6, t).lengths.tolist() == [0] * 6


def test_async_global_search_crosses_a_cliff_greedy_cannot():
    # A cliff at 3 tokens, cheap again per token after it: only the global search gets there.
    t = torch.tensor([0.0, 1.0, 2.0, 2.1, 2.2, 2.3])
    a = torch.tensor([[0.9, 0.85, 0.8, 0.75]])
    assert select_budget_greedy(a, t).lengths.tolist() == [0]
    d = select_budget_async(a, a, t)
    assert d.lengths.tolist() == [4]
    assert d.expected_throughput == pytest.approx(brute_force(a, t))


# ------------------------------------------------------------------ Appendix A, end to end


def _first_token_law(policy, n: int = 200_000, seed: int = 0) -> tuple[np.ndarray, float]:
    """Run Appendix A's example through a scheduling policy and the rejection sampler.

    V = {A = 0, B = 1}; p = (0.7, 0.3), q = (0.5, 0.5); a_1 = 0.8 and c_2 = 0.9 after A, 0 after
    B.  ``policy(survival [1, 2]) -> verified length``.  Returns (counts of the first emitted
    token, chi-square p-value against p).
    """
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.5, 0.5])
    verified = {x: int(policy(torch.tensor([[0.8, 0.8 * (0.9 if x == 0 else 0.0)]]))) for x in (0, 1)}
    g = torch.Generator().manual_seed(seed)
    x1 = torch.multinomial(q, n, replacement=True, generator=g)
    n_drafts = torch.where(x1 == 0, min(verified[0], 1), min(verified[1], 1))  # only x_1 matters here
    drafts = x1[n_drafts > 0]
    # Every target row (verify and bonus) is p: the first emitted token must follow p.
    target = p.expand(int(n_drafts.sum()) + n, 2).contiguous()
    out = rejection_sample(RejectionInputs(
        draft_token_ids=drafts,
        cu_num_draft_tokens=torch.cumsum(n_drafts, 0),
        draft_probs=q.expand(drafts.shape[0], 2).contiguous(),
        draft_prob_ids=None,
        target_probs=target,
        is_greedy=torch.zeros(n, dtype=torch.bool),
        uniforms=torch.rand(drafts.shape[0], generator=g),
        recovery_noise=torch.empty(n, 2).exponential_(generator=g),
    ))
    counts = np.bincount(out.output_token_ids[:, 0].numpy(), minlength=2)
    return counts, float(stats.chisquare(counts, n * p.double().numpy()).pvalue)


def test_appendix_a_early_stop_is_lossless_global_search_is_not():
    def greedy(a):
        return select_budget_greedy(a, APPENDIX_A_TABLE).lengths[0]

    def global_search(a):  # Algorithm 1 without the break: argmax over the whole path
        return top_k_admission(a, best_capacity(a, APPENDIX_A_TABLE) - 1)[0]

    def async_stale(a):  # capacity from an older block, so x_1 cannot move it
        return select_budget_async(torch.tensor([[0.8, 0.72]]), a, APPENDIX_A_TABLE).lengths[0]

    def greedy_slack(a):  # walks past the dip at m = 1 (0.9 against 1.0): x_1 is always verified
        return select_budget_greedy(a, APPENDIX_A_TABLE, slack=0.2).lengths[0]

    def async_slack(a):
        return select_budget_async(torch.tensor([[0.8, 0.72]]), a, APPENDIX_A_TABLE, slack=0.2).lengths[0]

    def greedy_slack_above_plain(a):  # plain decoding's throughput (1.0) as the slack's floor
        return select_budget_greedy(a, APPENDIX_A_TABLE, slack=0.2, plain_seconds=0.0).lengths[0]

    counts, pval = _first_token_law(global_search)
    assert pval < 1e-3
    assert counts[0] / counts.sum() == pytest.approx(0.85, abs=0.005)  # the paper's biased law
    assert greedy_slack(torch.tensor([[0.8, 0.72]])) == 2 and greedy_slack(torch.tensor([[0.8, 0.0]])) == 1
    for policy in (greedy, async_stale, greedy_slack, async_slack, greedy_slack_above_plain):
        counts, pval = _first_token_law(policy)
        assert pval > 1e-3, (policy.__name__, counts)


# ------------------------------------------------------------------ the verifier's AdaptiveBudget


def _adaptive_policy(mode: str, warmup_steps: int):
    """Appendix A's decision through a fresh ``AdaptiveBudget`` after ``warmup_steps`` steps.

    The warm-up steps verify an unrelated block (survival 0.8, 0.72), as a verifier does before
    the request of interest arrives; then the block whose second confidence depends on x_1.
    """
    from dspark.workers.budget_policy import AdaptiveBudget, CostModel
    from dspark.workers.scheduling import VerifyPolicy
    from dspark.workers.drafters.base import DraftBlock

    # The same curve as APPENDIX_A_TABLE: 1, 2 and 1/0.45 s for 1, 2 and 3 tokens.
    costs = CostModel(token_counts=[1, 2, 3], step_seconds=[1.0, 2.0, 1 / 0.45])

    def policy(a: torch.Tensor) -> int:
        budget = AdaptiveBudget(costs, VerifyPolicy(budget_mode=mode))
        for _ in range(warmup_steps):
            budget([DraftBlock(token_ids=[0, 0], confidence=[0.8, 0.9])], 2)
        c2 = float(a[0, 1]) / float(a[0, 0])
        return budget([DraftBlock(token_ids=[0, 0], confidence=[float(a[0, 0]), c2])], 2)[0]

    return policy


@pytest.mark.parametrize("warmup_steps", [0, 1, 2, 5])
@pytest.mark.parametrize("mode", ["algorithm1", "production"])
def test_adaptive_budget_is_lossless_from_its_first_step(mode, warmup_steps):
    """Production mode used to pick its capacity from the current block until two steps of
    history existed: P(first token = A) was 0.85 instead of 0.70 on the first two steps."""
    counts, pval = _first_token_law(_adaptive_policy(mode, warmup_steps), n=100_000, seed=warmup_steps)
    assert pval > 1e-3, (mode, warmup_steps, counts)
    assert counts[0] / counts.sum() == pytest.approx(0.70, abs=0.01)


@pytest.mark.parametrize("seed", range(20))
def test_slack_verifies_deeper_at_about_the_same_throughput(seed):
    """``slack``: the walk (and the capacity search) go on while throughput stays within the
    slack of the best so far.  Never shallower than the strict walk, never below (1 - slack) of
    the best throughput on the path, and deeper on a flat cost curve."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(4, 7, generator=g) * 0.6 + 0.3
    surv = survival(conf, torch.full((4,), 7))
    flat = torch.tensor([0.0] + [0.020 + 0.0004 * n for n in range(1, 64)], dtype=torch.float64)
    strict = select_budget_greedy(surv, flat)
    loose = select_budget_greedy(surv, flat, slack=0.05)
    assert (loose.lengths >= strict.lengths).all()
    assert loose.expected_throughput >= 0.95 * throughput_path(surv, flat).max()
    assert loose.num_draft_tokens > strict.num_draft_tokens
    cap = best_capacity(surv, flat, slack=0.05)
    assert cap >= best_capacity(surv, flat)
    assert float(throughput_path(surv, flat)[cap - 4]) >= 0.95 * float(throughput_path(surv, flat).max())


@pytest.mark.parametrize("seed", range(20))
def test_the_slack_stops_at_plain_decodings_throughput(seed):
    """With ``plain_seconds`` the slack never walks (or searches) below plain decoding's expected
    throughput, R / (step_time[R] + plain_seconds), unless the best Theta is below it: then the
    choice is the strict one's depth or deeper, never a Theta under the best.  Where the floor
    lies between the best Theta and the slack's own bar, the budget verifies less than the slack
    alone would."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(4, 7, generator=g) * 0.6 + 0.3
    surv = survival(conf, torch.full((4,), 7))
    steep = torch.tensor([0.0] + [0.020 + 0.0012 * n for n in range(1, 64)], dtype=torch.float64)
    draft = 0.02  # speculation a little above plain decoding, as a busy verifier sees it
    path = throughput_path(surv, steep, draft)
    best = float(path.max())
    free = select_budget_greedy(surv, steep, draft, slack=0.05)
    strict = select_budget_greedy(surv, steep, draft)
    assert free.num_draft_tokens > strict.num_draft_tokens  # the slack alone goes deeper here
    for below in (0.04, 0.02, 0.0, -0.02):  # plain decoding 4% below the best Theta ... 2% above it
        plain = best * (1 - below)
        plain_seconds = 4 / plain - float(steep[4])
        floor = max(0.95 * best, min(best, plain))
        d = select_budget_greedy(surv, steep, draft, slack=0.05, plain_seconds=plain_seconds)
        assert d.expected_throughput >= floor * (1 - 1e-9)
        assert strict.num_draft_tokens <= d.num_draft_tokens <= free.num_draft_tokens
        if below <= 0.02:
            assert d.num_draft_tokens < free.num_draft_tokens
        cap = best_capacity(surv, steep, draft, slack=0.05, plain_seconds=plain_seconds)
        assert float(path[cap - 4]) >= floor * (1 - 1e-9)
        assert best_capacity(surv, steep, draft) <= cap <= best_capacity(surv, steep, draft, slack=0.05)
        lengths, capacity = _torch_reference(surv, steep, 0.05, 4 / (float(steep[4]) + plain_seconds), draft)
        assert [int(x) for x in d.lengths] == lengths
        assert cap == capacity


# ------------------------------------------------------------------ inputs: lists, arrays, tensors


def _torch_reference(a: torch.Tensor, t: torch.Tensor, slack: float, plain: float = 0.0,
                     draft: float = 0.0) -> tuple[list[int], int]:  # fmt: skip
    """Algorithm 1 and the global capacity straight from their definitions, in torch: the path
    by a stable descending sort, the first improving run, the top-K admission by rank.  ``plain``:
    the Theta the slack may not go below unless the best one is below it; ``draft``: seconds
    added to every step."""
    flat = torch.sort(a.reshape(-1).double(), descending=True, stable=True).values
    m_max = min(int((flat > 0).sum()), t.shape[0] - 1 - a.shape[0])
    path = (a.shape[0] + torch.cat([flat.new_zeros(1), torch.cumsum(flat[:m_max], 0)])) / (t[a.shape[0]: a.shape[0] + m_max + 1] + draft)

    def bar(best):
        return max((1 - slack) * best, min(best, plain))

    k = 0
    while k + 1 < path.shape[0] and (path[k + 1] >= bar(path[: k + 1].max()) if slack else path[k + 1] > path[k]):
        k += 1
    near = (path >= bar(path.max())).nonzero()[-1] if slack else torch.argmax(path)
    return top_k_admission_torch(a, k).tolist(), a.shape[0] + int(near)


@pytest.mark.parametrize("seed", range(12))
def test_the_host_budget_matches_a_torch_reference_in_every_input_kind(seed):
    # Confidences drawn from a few levels, so survivals tie across requests and positions
    # (the rank order's tie rule decides the admission there).
    g = torch.Generator().manual_seed(1000 + seed)
    b, gamma = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
    c = torch.tensor([0.0, 0.5, 0.8, 1.0], dtype=torch.float64)[torch.randint(0, 4, (b, gamma), generator=g)]
    a = survival(c, torch.randint(0, gamma + 1, (b,), generator=g))
    t = torch.cat([torch.zeros(1), torch.cumsum(torch.rand(b * gamma + b + 2, generator=g) ** 3, 0) + 0.5]).double()
    for slack in (0.0, 0.05):
        lengths, capacity = _torch_reference(a, t, slack)
        for kind in (lambda x: x, lambda x: x.numpy(), lambda x: x.tolist()):
            d = select_budget_greedy(kind(a), kind(t), slack=slack)
            assert [int(x) for x in d.lengths] == lengths
            assert best_capacity(kind(a), kind(t), slack=slack) == capacity
            k = max(0, min(capacity, t.shape[0] - 1) - b)
            assert [int(x) for x in select_budget_async(kind(a), kind(a), kind(t), slack=slack).lengths] == \
                top_k_admission_torch(a, k).tolist()
    assert isinstance(select_budget_greedy(a, t).lengths, torch.Tensor)
    assert isinstance(select_budget_greedy(a.numpy(), t.numpy()).lengths, np.ndarray)
    assert isinstance(select_budget_greedy(a.tolist(), t).lengths, list)


@pytest.mark.parametrize("seed", range(8))
def test_the_host_budget_matches_the_reference_where_the_table_clamps_and_drafting_costs(seed):
    # A table too short for every candidate (the capacity clamps), a drafting time, float32
    # survivals and a stale batch other than the current one.
    g = torch.Generator().manual_seed(2000 + seed)
    b, gamma = 1 + seed % 4, 7
    a = survival(torch.rand(b, gamma, generator=g) ** 0.3, torch.randint(0, gamma + 1, (b,), generator=g)).float()
    stale = survival(torch.rand(b + 1, gamma, generator=g) ** 0.3, torch.full((b + 1,), gamma))
    t = torch.cat([torch.zeros(1), 0.01 + 0.001 * torch.arange(b + 5)]).double()  # b + 5 tokens at most
    draft = 0.004
    lengths, _ = _torch_reference(a, t + draft, 0.0)
    assert select_budget_greedy(a.tolist(), t, draft_time=draft).lengths == lengths
    cap = best_capacity(stale, t, draft_time=draft)
    assert cap == _torch_reference(stale, t + draft, 0.0)[1]
    d = select_budget_async(stale.tolist(), a.tolist(), t.numpy(), draft_time=draft)
    assert d.lengths == top_k_admission_torch(a, max(0, min(cap, t.shape[0] - 1) - b)).tolist()
    assert d.num_tokens == b + sum(d.lengths)
    assert d.expected_accepted == pytest.approx(float(expected_accepted(a.double(), torch.tensor(d.lengths)).sum()))


def test_the_path_adds_the_survivals_before_the_anchors():
    """Along a flat table Theta improves by a survival's worth: a tiny one decides by the last bit
    of tau, which the running sum of survivals added to the anchors gets as the reference does."""
    a = [[0.8955753946414917, 8.881784197001253e-17]]
    t = [0.0, 0.02, 0.02, 0.02]
    as_tensors = (torch.tensor(a, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))
    assert select_budget_greedy(a, t).lengths == select_budget_greedy(*as_tensors).lengths.tolist() == [2]
    ref = 1 + torch.cumsum(torch.tensor(a[0], dtype=torch.float64), 0)
    assert throughput_path(a, t)[1:] == (ref / 0.02).tolist()


def test_uneven_rows_nan_survivals_and_a_zero_in_the_table():
    ones = [0.0] + [1.0] * 10
    assert select_budget_greedy([[0.9], [0.8, 0.7], [0.6]], ones).lengths == [1, 2, 1]
    assert top_k_admission([[0.9, 0.8], [float("nan"), 0.0]], 1) == [1, 0]  # NaN: never admitted
    assert expected_accepted([[0.9, 0.5]], [-1]) == [1.0]
    assert best_capacity([[0.5]], [0.0, 0.0, 1.0, 1.0, 1.0]) == 1  # Theta_0 = 1 / 0: infinite, as arrays give it
