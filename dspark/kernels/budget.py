"""Confidence-scheduled verification budget (DSpark paper, section 3.2.2 / Algorithm 1, 5.2).

Vocabulary:

  * **confidence** c_{r,j}: the drafter's estimate that draft j of request r survives
    verification given that drafts 1..j-1 did;
  * **survival** a_{r,j} = prod_{i<=j} c_{r,i}: the probability that draft j is accepted;
  * **budget**: how many drafts each request sends to the target, l_r (always a prefix), and
    their total K = sum_r l_r.

Cost model.  ``step_time[n]`` is the profiled wall time (seconds) of one target forward over n
tokens (entry 0 unused; a longer batch than the table is not allowed), and ``draft_time`` a
fixed per-step drafting time added to it.  A step over R requests with budgets l_r verifies
n = sum_r (1 + l_r) = R + K tokens: every request spends one row on its anchor (the
token emitted last step), whose output is the bonus / recovered distribution after the last
verified draft.  The expected number of tokens it emits is
    tau = sum_r (1 + sum_{j<=l_r} a_{r,j})      (the 1 is the bonus or recovered token),
and the expected throughput is Theta = tau / (step_time[R + K] + draft_time) tokens/second
(the paper's tau * SPS(B) with SPS = 1 / step time).

The greedy admission path.  Sort all candidates (r, j) with a_{r,j} > 0 by decreasing survival,
ties by (r, j) in row-major order; admitting the first m of them gives every request a prefix
(a_{r,j} never increases along j, and ties keep j before j + 1) and the largest tau of any
admission of m drafts.  ``throughput_path`` returns Theta_m for m = 0, 1, ...

Two ways to pick m:

  * :func:`select_budget_greedy` (Algorithm 1, lossless): walk the path and stop at the first
    m whose Theta does not improve;
  * :func:`select_budget_async` (section 5.2, production): pick the capacity by an unconstrained
    argmax of Theta over survivals from two steps ago, then admit the top-K current candidates.

Every function here is a pure function of tensors; :func:`top_k_admission` has a Triton twin
(``triton_budget.top_k_admission_triton``) chosen by ``dispatch.use_triton``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.kernels.dispatch import use_triton

__all__ = [
    "BudgetDecision",
    "survival",
    "expected_accepted",
    "throughput_path",
    "best_capacity",
    "top_k_admission",
    "top_k_admission_torch",
    "select_budget_greedy",
    "select_budget_async",
]


@dataclass(frozen=True)
class BudgetDecision:
    """Per-request verification budgets for one step.

    lengths: [B] int64, drafts verified per request (a prefix of its block).
    num_draft_tokens: K = lengths.sum().
    num_tokens: R + K, the token count of the target forward (one anchor row per request).
    expected_accepted: tau, expected emitted tokens incl. one bonus/recovered per request.
    expected_throughput: tau / (step_time[R + K] + draft_time), tokens per second.
    """

    lengths: torch.Tensor
    num_draft_tokens: int
    num_tokens: int
    expected_accepted: float
    expected_throughput: float


def survival(confidences: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """a_{r,j} = prod_{i<=j} c_{r,i}, zero past each request's block length.

    confidences: [B, G] in [0, 1]; lengths: [B] int (drafts actually present, <= G).
    Returns [B, G] in the dtype of ``confidences``, non-increasing along G.

    Example:
        >>> survival(torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.8, 0.9]]), torch.tensor([3, 1]))
        tensor([[0.5000, 0.2500, 0.1250],
                [1.0000, 0.0000, 0.0000]])
    """
    num_reqs, block = confidences.shape
    a = torch.cumprod(confidences, dim=1)  # [B, G]
    pos = torch.arange(block, device=confidences.device)  # [G]
    return torch.where(pos.unsqueeze(0) < lengths.to(confidences.device).unsqueeze(1), a, 0.0)


def expected_accepted(survival: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Expected emitted tokens per request, 1 + sum_{j<=l_r} a_{r,j}: [B] float.

    Example:
        >>> expected_accepted(torch.tensor([[0.9, 0.5], [0.4, 0.1]]), torch.tensor([2, 0]))
        tensor([2.4000, 1.0000])
    """
    pos = torch.arange(survival.shape[1], device=survival.device)  # [G]
    taken = pos.unsqueeze(0) < lengths.to(survival.device).unsqueeze(1)  # [B, G]
    return 1.0 + torch.where(taken, survival, 0.0).sum(1)


def _check_table(num_reqs: int, step_time: torch.Tensor) -> int:
    max_tokens = step_time.shape[0] - 1
    if step_time.dim() != 1 or num_reqs > max_tokens:
        raise ValueError(f"step_time must be 1-D with an entry for at least {num_reqs} tokens")
    return max_tokens


def throughput_path(survival: torch.Tensor, step_time: torch.Tensor, draft_time: float = 0.0) -> torch.Tensor:
    """Expected throughput Theta_m after admitting the m most likely drafts, m = 0..M: [M+1] float64.

    survival: [B, G]; step_time: [T+1] seconds per target step by token count; draft_time: s.
    M = min(#candidates with a > 0, T - B), so the batch never outgrows the table.

    Example (one request, Appendix A's curve: 1, 2 and 1/0.45 s for 1, 2, 3 tokens):
        >>> t = torch.tensor([0.0, 1.0, 2.0, 1 / 0.45])
        >>> throughput_path(torch.tensor([[0.8, 0.72]]), t)
        tensor([1.0000, 0.9000, 1.1340], dtype=torch.float64)
    """
    num_reqs = survival.shape[0]
    max_tokens = _check_table(num_reqs, step_time)
    a = torch.sort(survival.reshape(-1).double(), descending=True, stable=True).values  # [B*G]
    m_max = min(int((a > 0).sum()), max_tokens - num_reqs)
    tau = num_reqs + torch.cat([a.new_zeros(1), torch.cumsum(a[:m_max], 0)])  # [M+1]
    seconds = step_time.to(device=a.device, dtype=torch.float64)[num_reqs : num_reqs + m_max + 1] + draft_time
    return tau / seconds


def best_capacity(survival: torch.Tensor, step_time: torch.Tensor, draft_time: float = 0.0, slack: float = 0.0) -> int:
    """Token count R + m maximising Theta over the whole path (no early stop; smallest m on ties).
    With ``slack`` > 0: the largest m whose Theta is within ``slack`` of the maximum (deeper
    verification at about the same throughput; see :func:`select_budget_greedy`).

    Lossy if applied to the survivals of the block being verified (Appendix A); section 5.2
    applies it to survivals from two steps ago.  Returns 0 for an empty batch.

    Example (the jagged curve above: global search looks past the dip at m = 1):
        >>> best_capacity(torch.tensor([[0.8, 0.72]]), torch.tensor([0.0, 1.0, 2.0, 1 / 0.45]))
        3
    """
    if survival.shape[0] == 0:
        return 0
    theta = throughput_path(survival, step_time, draft_time)
    if slack > 0:
        near = (theta >= (1.0 - slack) * theta.max()).nonzero()
        return survival.shape[0] + int(near[-1])
    return survival.shape[0] + int(torch.argmax(theta))


def top_k_admission(survival: torch.Tensor, num_draft_tokens: int | torch.Tensor) -> torch.Tensor:
    """Prefix lengths admitting the ``num_draft_tokens`` most likely drafts: [B] int64.

    Triton on CUDA when available, else :func:`top_k_admission_torch` (same contract).
    """
    if use_triton(survival):
        from dspark.kernels.triton_budget import top_k_admission_triton

        return top_k_admission_triton(survival, num_draft_tokens)
    return top_k_admission_torch(survival, num_draft_tokens)


def top_k_admission_torch(survival: torch.Tensor, num_draft_tokens: int | torch.Tensor) -> torch.Tensor:
    """Admit the K candidates with the largest survival; return each request's prefix length.

    survival: [B, G], non-increasing along G (as :func:`survival` makes it); num_draft_tokens:
    K, an int or a 0-d/1-element tensor (so a device-side K needs no host sync).
    Rank order: larger a first, ties by row-major position (r, j), so within a request j
    always ranks before j + 1 and the admitted set is a prefix.  Only a > 0 is admitted.
    A request's length is the run of admitted candidates from j = 1, which keeps the result a
    prefix even for a non-monotone input.  Returns [B] int64.

    Example (K = 3: 0.9, 0.8 and the tie 0.5 at (0, 2) ranks before the 0.5 at (1, 2)):
        >>> top_k_admission_torch(torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.5, 0.0]]), 3)
        tensor([2, 1])
    """
    num_reqs, block = survival.shape
    flat = survival.reshape(-1)  # [B*G]
    order = torch.sort(flat, descending=True, stable=True).indices  # [B*G]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=flat.device)
    k = torch.as_tensor(num_draft_tokens, device=flat.device).reshape(())
    admitted = ((flat > 0) & (rank < k)).view(num_reqs, block)  # [B, G]
    return admitted.long().cumprod(1).sum(1)


def _decision(
    survival: torch.Tensor, lengths: torch.Tensor, step_time: torch.Tensor, draft_time: float
) -> BudgetDecision:
    num_reqs = survival.shape[0]
    k = int(lengths.sum())
    tau = float(expected_accepted(survival.double(), lengths).sum())
    seconds = float(step_time[num_reqs + k]) + draft_time if num_reqs else float("inf")
    return BudgetDecision(
        lengths=lengths,
        num_draft_tokens=k,
        num_tokens=num_reqs + k,
        expected_accepted=tau,
        expected_throughput=tau / seconds,
    )


def select_budget_greedy(
    survival: torch.Tensor, step_time: torch.Tensor, draft_time: float = 0.0, slack: float = 0.0
) -> BudgetDecision:
    """Algorithm 1: admit drafts by decreasing survival while expected throughput improves.

    survival: [B, G] of the blocks about to be verified; step_time: [T+1] seconds by token
    count; draft_time: seconds added to every step.  Starting from l_r = 0 for all requests
    (Theta_0 = R / step_time[R]), candidate m is admitted iff Theta_1 < ... < Theta_m: the walk
    stops at the first m with Theta_m <= Theta_{m-1} and keeps m - 1.

    Why the early stop keeps decoding lossless (paper, Appendix A): rejection sampling is exact
    only if the decision to verify draft x_{r,j} does not depend on x_{r,j} itself.  The
    survival a_{r,j} uses c_{r,j}, which the confidence head computes from x_{r,j-1}, so every
    a_{r,j'} with j' > j depends on x_{r,j}.  With the stop, whether (r, j) is admitted is
    settled when the walk reaches it and depends only on the candidates ranked before it,
    which hold a >= a_{r,j} and (ties broken by position) never include a later draft of
    request r: nothing downstream of x_{r,j} is looked at.  A global argmax over the whole
    path would instead admit x_{r,j} when a good continuation a_{r,j+1} makes a long prefix
    pay off, i.e. select drafts by their own value, which biases the output distribution
    (Appendix A builds a case where the emitted token's law moves from (0.7, 0.3) to
    (0.85, 0.15)).  The price: with a non-unimodal cost curve the stop may miss the optimum.

    ``slack`` > 0 walks on while Theta_m stays within ``slack`` of the best Theta so far (and
    keeps the last such m): deeper verification when throughput is about flat, which is faster
    for the requests whose drafts are accepted.  Still a stopping rule on the path in rank
    order, so as lossless as the strict walk.

    Returns a :class:`BudgetDecision`.

    Example (Appendix A: Theta drops from 1.0 to 0.9 at m = 1, so nothing is admitted even
    though m = 2 would give 1.134):
        >>> t = torch.tensor([0.0, 1.0, 2.0, 1 / 0.45])
        >>> select_budget_greedy(torch.tensor([[0.8, 0.72]]), t).lengths
        tensor([0])
        >>> select_budget_greedy(torch.tensor([[0.9, 0.5], [0.6, 0.0]]), torch.tensor([1.0, 1, 1, 1, 1.2, 2])).lengths
        tensor([1, 1])
        >>> t = torch.tensor([1.0, 1, 1, 1, 1.2, 1.4])  # Theta 3.5 / 1.2 = 2.92 at m = 2, 4.0 / 1.4 = 2.86 at m = 3
        >>> [select_budget_greedy(torch.tensor([[0.9, 0.5], [0.6, 0.0]]), t, slack=x).lengths.tolist() for x in (0, 0.05)]
        [[1, 1], [2, 1]]
    """
    if survival.shape[0] == 0:
        return _decision(survival, torch.zeros(0, dtype=torch.long, device=survival.device), step_time, draft_time)
    theta = throughput_path(survival, step_time, draft_time)  # [M+1]
    if slack > 0:
        improving = theta[1:] >= (1.0 - slack) * torch.cummax(theta[:-1], 0).values  # [M]
    else:
        improving = theta[1:] > theta[:-1]  # [M]
    k = int(improving.long().cumprod(0).sum())  # the length of the first improving run
    return _decision(survival, top_k_admission(survival, k), step_time, draft_time)


def select_budget_async(
    stale_survival: torch.Tensor,
    survival: torch.Tensor,
    step_time: torch.Tensor,
    draft_time: float = 0.0,
    slack: float = 0.0,
) -> BudgetDecision:
    """Section 5.2: capacity from survivals two steps old, then top-K over current survivals.

    stale_survival: [B', G'] survivals the scheduler saw two steps ago (the batch may have
    changed since); survival: [B, G] of the blocks being verified now.

    1. capacity = :func:`best_capacity` of the stale survivals: the token count maximising
       Theta with no early stop, so jagged (non-unimodal) step-time curves are handled.  It is
       fixed before the pipeline needs the next batch shape (zero-overhead scheduling).
    2. The current batch gets K = capacity - B drafts (clamped to [0, T - B]) and admits the
       K candidates of highest *current* survival (:func:`top_k_admission`); fewer if fewer
       have a > 0.  The verifier may pad the forward to ``capacity`` tokens if it needs a
       fixed shape.

    Lossless: the capacity depends only on blocks drafted two steps ago, which are settled
    before any current draft is sampled, and for a fixed K the top-K rank of (r, j) depends
    only on candidates with survival >= a_{r,j}, never on a later draft of request r.  So the
    admission of x_{r,j} never looks at x_{r,j} (the same argument as the greedy variant).

    Returns a :class:`BudgetDecision` for the current batch.

    Example (stale capacity 3 tokens for one request -> 2 drafts now):
        >>> t = torch.tensor([0.0, 1.0, 2.0, 1 / 0.45, 10.0])
        >>> select_budget_async(torch.tensor([[0.8, 0.72]]), torch.tensor([[0.9, 0.3, 0.2]]), t).lengths
        tensor([2])
    """
    num_reqs = survival.shape[0]
    max_tokens = _check_table(num_reqs, step_time)
    capacity = best_capacity(stale_survival, step_time, draft_time, slack)
    k = max(0, min(capacity, max_tokens) - num_reqs)
    return _decision(survival, top_k_admission(survival, k), step_time, draft_time)
