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

Every function here is a pure function of its inputs, computed on the host in plain Python: a
budget is decided over a few dozen candidates per step, where an operator call costs more than
its arithmetic (as some thirty torch operators, a lone request's decision took 0.6-0.8 ms in a
verifier that had just run its forward pass, 1-3% of its step on two CPU cores; in plain Python,
about 0.1 ms).  Each takes lists, numpy arrays or torch tensors and answers in the kind it was
given (a tensor on the input's device).  :func:`top_k_admission` also runs on a device, where the
survivals may already live: Triton on CUDA (``triton_budget.top_k_admission_triton``, chosen by
``dispatch.use_triton``), else :func:`top_k_admission_torch`, the torch reference both are tested
against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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

    lengths: [B] int64, drafts verified per request (a prefix of its block), in the kind the
      survivals came in: a list, a numpy array, or a tensor on their device.
    num_draft_tokens: K, the sum of ``lengths``.
    num_tokens: R + K, the token count of the target forward (one anchor row per request).
    expected_accepted: tau, expected emitted tokens incl. one bonus/recovered per request.
    expected_throughput: tau / (step_time[R + K] + draft_time), tokens per second.
    """

    lengths: list[int] | np.ndarray | torch.Tensor
    num_draft_tokens: int
    num_tokens: int
    expected_accepted: float
    expected_throughput: float


def _rows(x) -> list:
    """``x`` (a tensor, an array or lists) as Python lists: a budget's inputs are a few dozen numbers."""
    return x.tolist() if isinstance(x, (torch.Tensor, np.ndarray)) else x


_NUMPY_DTYPES = {torch.long: np.int64, torch.float64: np.float64}


def _like(out: list, ref, dtype: torch.dtype | None = None):
    """``out`` in the kind of ``ref``: a tensor on its device or an array (of ``dtype``, one of
    ``torch.long`` and ``torch.float64``, else of ``ref``'s), or lists as they are."""
    if isinstance(ref, torch.Tensor):
        return torch.tensor(out, dtype=dtype or ref.dtype, device=ref.device)
    if isinstance(ref, np.ndarray):
        return np.asarray(out, dtype=_NUMPY_DTYPES[dtype] if dtype is not None else ref.dtype)
    return out


def _survival_rows(conf: list, lengths: list) -> list:
    rows = []
    for row, n in zip(conf, lengths):
        acc, out = 1.0, []
        for j, c in enumerate(row):
            acc = acc * c if j < n else 0.0
            out.append(acc)
        rows.append(out)
    return rows


def survival(confidences, lengths):
    """a_{r,j} = prod_{i<=j} c_{r,i}, zero past each request's block length.

    confidences: [B, G] in [0, 1]; lengths: [B] int (drafts actually present, <= G).
    Returns [B, G] in the kind and dtype of ``confidences``, non-increasing along G.

    Example:
        >>> survival(torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.8, 0.9]]), torch.tensor([3, 1]))
        tensor([[0.5000, 0.2500, 0.1250],
                [1.0000, 0.0000, 0.0000]])
    """
    rows = _survival_rows(_rows(confidences), _rows(lengths))
    if not rows and isinstance(confidences, (torch.Tensor, np.ndarray)):
        return confidences[:0].clone() if isinstance(confidences, torch.Tensor) else confidences[:0].copy()  # [0, G]
    return _like(rows, confidences)


def expected_accepted(survival, lengths):
    """Expected emitted tokens per request, 1 + sum_{j<=l_r} a_{r,j}: [B] float.

    Example:
        >>> expected_accepted(torch.tensor([[0.9, 0.5], [0.4, 0.1]]), torch.tensor([2, 0]))
        tensor([2.4000, 1.0000])
    """
    return _like([1.0 + sum(row[: max(0, int(n))]) for row, n in zip(_rows(survival), _rows(lengths))], survival)


def _check_table(num_reqs: int, step_time) -> int:
    max_tokens = len(step_time) - 1
    if getattr(step_time, "ndim", 1) != 1 or num_reqs > max_tokens:
        raise ValueError(f"step_time must be 1-D with an entry for at least {num_reqs} tokens")
    return max_tokens


def _ranked(rows: list) -> tuple[list[int], list[float]]:
    """The candidates (row-major indices) by decreasing survival, ties in row-major order, and
    their survivals in that order.  A NaN survival ranks as 0: never admitted."""
    flat = [a if a == a else 0.0 for row in rows for a in row]
    order = sorted(range(len(flat)), key=flat.__getitem__, reverse=True)
    # ``reverse`` keeps equal keys in their original order, as a stable descending sort does.
    return order, [flat[i] for i in order]


def _ratio(tau: float, seconds: float) -> float:
    """tau / seconds, as a float division of arrays gives it (a hand-made table may hold a 0)."""
    if seconds:
        return tau / seconds
    return math.copysign(math.inf, tau) if tau else math.nan


def _path(num_reqs: int, ranked: list[float], step_time, draft_time: float) -> list[float]:
    """Theta_m for m = 0..M over the ranked survivals (see :func:`throughput_path`)."""
    max_tokens = _check_table(num_reqs, step_time)
    m_max = min(sum(1 for a in ranked if a > 0), max_tokens - num_reqs)
    seconds = _rows(step_time[num_reqs : num_reqs + m_max + 1])
    # tau_m = R + (a_1 + ... + a_m), the running sum added to R last: Theta's comparisons along a
    # flat stretch of the table turn on its last bit.
    total, theta = 0.0, [_ratio(float(num_reqs), seconds[0] + draft_time)]
    for m in range(m_max):
        total += ranked[m]
        theta.append(_ratio(num_reqs + total, seconds[m + 1] + draft_time))
    return theta


def throughput_path(survival, step_time, draft_time: float = 0.0):
    """Expected throughput Theta_m after admitting the m most likely drafts, m = 0..M: [M+1] float64.

    survival: [B, G]; step_time: [T+1] seconds per target step by token count; draft_time: s.
    M = min(#candidates with a > 0, T - B), so the batch never outgrows the table.

    Example (one request, Appendix A's curve: 1, 2 and 1/0.45 s for 1, 2, 3 tokens):
        >>> t = torch.tensor([0.0, 1.0, 2.0, 1 / 0.45])
        >>> throughput_path(torch.tensor([[0.8, 0.72]]), t)
        tensor([1.0000, 0.9000, 1.1340], dtype=torch.float64)
    """
    rows = _rows(survival)
    return _like(_path(len(rows), _ranked(rows)[1], _float_table(step_time), draft_time), survival, torch.float64)


def _float_table(step_time):
    """The step-time table as float64 (a tensor of another dtype rounds its path otherwise)."""
    if isinstance(step_time, torch.Tensor):
        return step_time.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(step_time, dtype=np.float64)


def _plain_theta(num_reqs: int, step_time, plain_seconds: float | None) -> float:
    """Plain decoding's expected throughput: ``num_reqs`` tokens in a step of ``num_reqs`` tokens
    that drafted nothing and takes ``plain_seconds`` beyond its forward pass (None: 0, no floor)."""
    if plain_seconds is None or not num_reqs:
        return 0.0
    return _ratio(float(num_reqs), float(step_time[num_reqs]) + plain_seconds)


def _slack_bar(best: float, slack: float, plain: float) -> float:
    """The lowest Theta the depth slack accepts: within ``slack`` of ``best``, and never below
    ``plain`` (plain decoding's expected throughput) unless ``best`` itself is."""
    return max((1.0 - slack) * best, min(best, plain))


def _capacity(rows: list, step_time, draft_time: float, slack: float, plain_seconds: float | None = None) -> int:
    if not rows:
        return 0
    theta = _path(len(rows), _ranked(rows)[1], step_time, draft_time)
    best = max(theta)
    if slack > 0:
        bar = _slack_bar(best, slack, _plain_theta(len(rows), step_time, plain_seconds))
        return len(rows) + max(m for m, x in enumerate(theta) if x >= bar)
    return len(rows) + theta.index(best)


def best_capacity(survival, step_time, draft_time: float = 0.0, slack: float = 0.0,
                  plain_seconds: float | None = None) -> int:  # fmt: skip
    """Token count R + m maximising Theta over the whole path (no early stop; smallest m on ties).
    With ``slack`` > 0: the largest m whose Theta is within ``slack`` of the maximum and, given
    ``plain_seconds``, not below plain decoding's unless the maximum is (deeper verification at
    about the same throughput; see :func:`select_budget_greedy`).

    Lossy if applied to the survivals of the block being verified (Appendix A); section 5.2
    applies it to survivals from two steps ago.  Returns 0 for an empty batch.

    Example (the jagged curve above: global search looks past the dip at m = 1):
        >>> best_capacity(torch.tensor([[0.8, 0.72]]), torch.tensor([0.0, 1.0, 2.0, 1 / 0.45]))
        3
    """
    return _capacity(_rows(survival), _float_table(step_time), draft_time, slack, plain_seconds)


def _admit(rows: list, order: list[int], ranked: list[float], k: int) -> list[int]:
    """Prefix lengths admitting the first ``k`` ranked candidates with a > 0: one per row (rows
    may differ in length; ``order`` indexes them flattened in row-major order)."""
    admitted = {i for i, a in zip(order[: max(0, k)], ranked) if a > 0}
    lengths, start = [], 0
    for row in rows:
        n = 0
        while n < len(row) and start + n in admitted:
            n += 1
        lengths.append(n)
        start += len(row)
    return lengths


def top_k_admission(survival, num_draft_tokens):
    """Prefix lengths admitting the ``num_draft_tokens`` most likely drafts: [B] int64 (a list
    for lists).

    On the host for lists, arrays and CPU tensors; on a device, Triton on CUDA when available,
    else :func:`top_k_admission_torch` (same contract, which a device-side K keeps on the device).
    """
    if isinstance(survival, torch.Tensor):
        if use_triton(survival):  # CUDA, or CPU under the parity tests' interpreter
            from dspark.kernels.triton_budget import top_k_admission_triton

            return top_k_admission_triton(survival, num_draft_tokens)
        if survival.device.type != "cpu":
            return top_k_admission_torch(survival, num_draft_tokens)
    rows = _rows(survival)
    k = num_draft_tokens.item() if isinstance(num_draft_tokens, (torch.Tensor, np.ndarray)) else num_draft_tokens
    return _like(_admit(rows, *_ranked(rows), int(k)), survival, torch.long)


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


def _decision(rows: list, lengths: list[int], step_time, draft_time: float, ref) -> BudgetDecision:
    num_reqs = len(rows)
    k = sum(lengths)
    tau = float(num_reqs + sum(sum(row[:n]) for row, n in zip(rows, lengths)))  # lengths >= 0 here
    seconds = float(step_time[num_reqs + k]) + draft_time if num_reqs else float("inf")
    return BudgetDecision(lengths=_like(lengths, ref, torch.long), num_draft_tokens=k, num_tokens=num_reqs + k,
                          expected_accepted=tau, expected_throughput=_ratio(tau, seconds))


def select_budget_greedy(survival, step_time, draft_time: float = 0.0, slack: float = 0.0,
                         plain_seconds: float | None = None) -> BudgetDecision:  # fmt: skip
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

    ``plain_seconds``: what a plain decoding step takes beyond its forward pass.  Given, the
    slack never walks below plain decoding's expected throughput, R / (step_time[R] +
    plain_seconds), unless the best Theta so far is below it too.  Deeper verification trades
    throughput for the speed of the requests whose drafts are accepted; where speculation barely
    beats plain decoding (a busy verifier) that trade made the speculative step slower than a
    plain one, and the speculation gate kept it for being within its margin.  The floor depends
    on the table and the batch size alone, so it keeps the walk lossless.

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
        >>> t, a = torch.tensor([0.0, 0.8, 1.2, 1.45]), torch.tensor([[0.5, 0.25]])  # Theta 1.15, 1.13 at m = 1, 2
        >>> [select_budget_greedy(a, t, 0.1, slack=0.05, plain_seconds=x).lengths.tolist() for x in (None, 0.0)]
        [[2], [1]]
    """
    rows, t = _rows(survival), _float_table(step_time)
    if not rows:
        return _decision(rows, [], t, draft_time, survival)
    order, ranked = _ranked(rows)
    theta = _path(len(rows), ranked, t, draft_time)  # [M+1]
    plain = _plain_theta(len(rows), t, plain_seconds)
    k, best = 0, theta[0]  # k: the length of the first improving run; best: the largest Theta in it
    for m in range(1, len(theta)):
        improving = theta[m] >= _slack_bar(best, slack, plain) if slack > 0 else theta[m] > theta[m - 1]
        if not improving:
            break
        k, best = m, max(best, theta[m])
    return _decision(rows, _admit(rows, order, ranked, k), t, draft_time, survival)


def select_budget_async(
    stale_survival, survival, step_time, draft_time: float = 0.0, slack: float = 0.0,
    plain_seconds: float | None = None,
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
    rows, t = _rows(survival), _float_table(step_time)
    max_tokens = _check_table(len(rows), t)
    capacity = _capacity(_rows(stale_survival), t, draft_time, slack, plain_seconds)
    k = max(0, min(capacity, max_tokens) - len(rows))
    return _decision(rows, _admit(rows, *_ranked(rows), k), t, draft_time, survival)
