"""Triton kernels vs their torch references, run by the Triton interpreter on CPU tensors.

TRITON_INTERPRET must be set before the kernel modules are imported (the jit decorator reads
it), so it is set at the top of this module, which is the only place they are imported.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from dspark.kernels import dispatch  # noqa: E402
from dspark.kernels.budget import survival, top_k_admission, top_k_admission_torch  # noqa: E402
from dspark.kernels.rejection import RejectionInputs, rejection_sample, rejection_sample_torch  # noqa: E402
from dspark.kernels.sampling import logits_to_probs  # noqa: E402
from dspark.kernels import triton_budget, triton_rejection  # noqa: E402


def make_batch(seed: int, mode: str, b: int = 10, v: int = 40, k: int = 6) -> dict:
    """A random verification batch with the corner cases mixed in.

    Some requests are greedy, some have no drafts, some targets are top-p truncated; ~20% of
    drafts are replaced by random tokens (so q(x) = 0 and p(x) = 0 both occur); one request has
    p == q on a draft q cannot produce (rejection with an all-zero residual).  Sparse q keeps a
    padding slot whose id repeats a real id.
    """
    g = torch.Generator().manual_seed(seed)
    n_per = torch.randint(0, 5, (b,), generator=g)
    n_per[0], n_per[1] = 0, 2
    n = int(n_per.sum())
    greedy = torch.rand(b, generator=g) < 0.3
    greedy[1] = False
    req_of_row = torch.repeat_interleave(torch.arange(b), n_per + 1)
    top_p = torch.where(torch.rand(b, generator=g) < 0.5, 0.7, 1.0)[req_of_row]
    target = logits_to_probs(
        torch.randn(n + b, v, generator=g) * 2, torch.where(greedy[req_of_row], 0.0, 1.0), None, top_p
    )
    vals, ids = torch.softmax(torch.randn(n, v, generator=g) * 2, -1).topk(k, dim=-1)
    vals = vals / vals[:, : k - 1].sum(1, keepdim=True)
    vals[:, -1] = 0.0
    ids[:, -1] = ids[:, 0]  # padding repeating a real id
    dense = torch.zeros(n, v).scatter_add_(1, ids, vals)
    drafts = ids.gather(1, torch.multinomial(vals, 1, generator=g)).squeeze(1)
    swap = torch.rand(n, generator=g) < 0.2
    drafts = torch.where(swap, torch.randint(0, v, (n,), generator=g), drafts)
    # Request 1 (two drafts, flat index 0 and 1): p == q on its first row, and a draft outside q.
    outside = int((dense[0] == 0).nonzero()[0])
    drafts[0] = outside
    target[1] = dense[0]  # request 0 has no drafts, so row 0 is its bonus and row 1 is req 1's first
    kw = dict(
        draft_token_ids=drafts,
        cu_num_draft_tokens=torch.cumsum(n_per, 0),
        target_probs=target,
        is_greedy=greedy,
        uniforms=torch.rand(n, generator=g),
        recovery_noise=torch.empty(b, v).exponential_(generator=g),
    )
    if mode == "dense":
        kw.update(draft_probs=dense, draft_prob_ids=None)
    elif mode == "sparse":
        kw.update(draft_probs=vals, draft_prob_ids=ids)
    else:
        kw.update(draft_probs=None, draft_prob_ids=None)
    return kw


def assert_same(kw: dict) -> None:
    ref = rejection_sample_torch(RejectionInputs(**kw))
    tri = triton_rejection.rejection_sample_triton(RejectionInputs(**kw))
    assert torch.equal(ref.output_token_ids, tri.output_token_ids)
    assert torch.equal(ref.num_accepted, tri.num_accepted)
    assert torch.equal(ref.num_emitted, tri.num_emitted)


@pytest.mark.parametrize("mode", ["one_hot", "dense", "sparse"])
@pytest.mark.parametrize("seed", range(3))
def test_rejection_parity(mode, seed):
    kw = make_batch(seed, mode)
    ref = rejection_sample_torch(RejectionInputs(**kw))
    assert ref.num_accepted[1] == 0  # p(x) = 0 rejects (and with dense/sparse q the residual is 0)
    assert_same(kw)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_rejection_parity_multi_block_vocab(mode):
    # V > 1024 makes the kernel sweep the vocabulary in more than one block.
    assert_same(make_batch(7, mode, b=4, v=1500, k=20))


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_triton_rejects_drafts_with_zero_proposal_probability(mode):
    # V = 4, two drafts [0, 1] per request; p = [.3, .145, .4, .155], q = [.5, 0, .5, 0]: draft 1
    # has q(x) = 0 and must never be accepted, whatever u (parity alone would not see a bug that
    # both kernels share).
    n = 64
    g = torch.Generator().manual_seed(0)
    kw = dict(
        draft_token_ids=torch.tensor([0, 1]).repeat(n),  # [2n]
        cu_num_draft_tokens=torch.arange(1, n + 1) * 2,  # [n]
        target_probs=torch.tensor([0.3, 0.145, 0.4, 0.155]).repeat(3 * n, 1),  # [3n, V]
        is_greedy=torch.zeros(n, dtype=torch.bool),
        uniforms=torch.rand(2 * n, generator=g),
        recovery_noise=torch.empty(n, 4).exponential_(generator=g),
    )
    if mode == "dense":
        kw.update(draft_probs=torch.tensor([0.5, 0.0, 0.5, 0.0]).repeat(2 * n, 1), draft_prob_ids=None)
    else:
        kw.update(draft_probs=torch.tensor([[0.5, 0.5, 0.0]]).repeat(2 * n, 1),
                  draft_prob_ids=torch.tensor([[0, 2, 1]]).repeat(2 * n, 1))
    tri = triton_rejection.rejection_sample_triton(RejectionInputs(**kw))
    first_ok = kw["uniforms"][0::2] < 0.6  # [n]: draft 0's ratio test, p/q = .6
    assert first_ok.any() and not first_ok.all()
    assert torch.equal(tri.num_accepted, first_ok.long())
    emitted = tri.output_token_ids.gather(1, tri.num_accepted[:, None]).squeeze(1)  # [n]
    assert set(emitted.tolist()) == {1, 3}  # recovered from the residual [0, .145, 0, .155]
    assert_same(kw)


def test_rejection_parity_all_greedy_with_soft_rows():
    kw = make_batch(3, "dense")
    kw["is_greedy"] = torch.ones_like(kw["is_greedy"])  # rows are not one-hot: the argmax path
    assert_same(kw)


def test_rejection_parity_without_drafts():
    g = torch.Generator().manual_seed(0)
    kw = dict(
        draft_token_ids=torch.zeros(0, dtype=torch.long),
        cu_num_draft_tokens=torch.zeros(3, dtype=torch.long),
        draft_probs=torch.zeros(0, 4),
        draft_prob_ids=torch.zeros(0, 4, dtype=torch.long),
        target_probs=torch.softmax(torch.randn(3, 30, generator=g), -1),
        is_greedy=torch.tensor([False, True, False]),
        uniforms=torch.zeros(0),
        recovery_noise=torch.empty(3, 30).exponential_(generator=g),
    )
    assert_same(kw)


def test_dispatcher_runs_triton_when_forced(monkeypatch):
    calls = []
    real = triton_rejection.rejection_sample_triton

    def spy(inputs):
        calls.append(1)
        return real(inputs)

    monkeypatch.setattr(triton_rejection, "rejection_sample_triton", spy)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    kw = make_batch(11, "sparse")
    out = rejection_sample(RejectionInputs(**kw))
    assert calls == [1]
    assert torch.equal(out.output_token_ids, rejection_sample_torch(RejectionInputs(**kw)).output_token_ids)


# ------------------------------------------------------------------ budget


@pytest.mark.parametrize("seed", range(4))
def test_top_k_admission_parity(seed):
    g = torch.Generator().manual_seed(seed)
    b, gamma = 5 + seed, 3 + 2 * seed
    c = torch.rand(b, gamma, generator=g)
    c = torch.where(torch.rand(b, gamma, generator=g) < 0.4, torch.round(c * 4) / 4, c)  # ties, ones, zeros
    a = survival(c, torch.randint(0, gamma + 1, (b,), generator=g))
    for k in sorted({0, 1, b, (b * gamma) // 2, b * gamma - 1, b * gamma + 3}):
        assert torch.equal(top_k_admission_torch(a, k), triton_budget.top_k_admission_triton(a, k)), k
    k = torch.tensor(b)  # device-side K
    assert torch.equal(top_k_admission_torch(a, k), triton_budget.top_k_admission_triton(a, k))


def test_top_k_admission_parity_float64_and_dispatch(monkeypatch):
    a = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.5, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 0.25]], dtype=torch.float64)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    for k in range(0, 11):
        assert torch.equal(top_k_admission(a, k), top_k_admission_torch(a, k)), k
