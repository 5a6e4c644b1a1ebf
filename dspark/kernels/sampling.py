"""Token sampling: the one place that turns target logits into a distribution.

Plain decoding and speculative verification both call :func:`logits_to_probs`, so the
distribution a speculative step preserves is exactly the one plain sampling draws from.

Conventions (per row of a batch):
  * ``temperature == 0`` means greedy: the row's distribution is one-hot on the argmax of the
    raw logits (ties broken towards the lowest id, as ``torch.argmax`` does);
  * ``top_k <= 0`` disables top-k, ``top_p >= 1`` disables top-p;
  * order: temperature, then top-k, then top-p (the same order vLLM applies them).

Randomness is always an argument: :func:`sample_from_probs` takes exponential noise, so a
caller that owns one ``torch.Generator`` per request gets reproducible, per-request streams.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["logits_to_probs", "sample_from_probs", "exponential_noise", "exponential_row", "apply_top_k_top_p",
           "row_argmax", "sample_proposal", "processed_logits", "token_logprobs", "LOGPROB_FLOOR", "mask_logits",
           "unpack_bitmask"]


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``: per row the index of the largest entry, the lowest one on ties, a NaN's
    if the row has one (torch's rules, and numpy's).

    On the CPU a float32 matrix goes through numpy, whose argmax is vectorised: over this model's
    49,152-entry vocabulary it takes 4 us a row against torch's 35-70 us (2.13, 2 threads), and
    every greedy step of every request pays one (a speculative step one per verified draft).

    Example:
        >>> row_argmax(torch.tensor([[0.0, 2.0, 2.0], [5.0, 1.0, 0.0]])).tolist()
        [1, 0]
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 1 and x.shape[-1] > 0:
        return torch.as_tensor(x.detach().numpy().argmax(-1).astype(np.int64, copy=False))
    return x.argmax(-1)


CANDIDATES = (1024, 8192)  # top-k / top-p look for their cut among this many of a row's largest logits, in turn


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) the logits outside each row's top-k set and top-p nucleus.

    logits: [R, V] float, top_k: [R] int (<= 0: off), top_p: [R] float (>= 1: off).
    Rows whose filter is off are untouched by it; the argmax (lowest id on ties) is never
    masked, whatever top_p is (even 0), so no row is left empty.

    The definition is the one a full descending sort gives (``_top_k_top_p_by_sort``, ties in
    id order): top-k keeps every entry >= the k-th largest value; top-p keeps the shortest
    prefix of the (top-k filtered) distribution in that order whose mass reaches top_p.  Sorting
    a whole vocabulary row costs more than a model step at large batches on a CPU, so the cut is
    first looked for among each row's 1,024 largest logits, then 8,192 (``CANDIDATES``); a row
    whose cut does not provably lie among them (k larger than that, a nucleus reaching past
    them, or a tie at their edge) takes the full sort.  All give the same mask.

    Example:
        >>> x = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
        >>> apply_top_k_top_p(x, torch.tensor([2]), torch.tensor([1.0]))
        tensor([[3., 2., -inf, -inf]])
    """
    vocab = logits.shape[-1]
    use_k = bool((top_k > 0).any())
    use_p = bool((top_p < 1.0).any())
    if not (use_k or use_p):
        return logits
    out = logits.clone()
    rest = torch.arange(logits.shape[0], device=logits.device)  # rows whose cut is not found yet
    for c in CANDIDATES:
        if c >= vocab or rest.numel() == 0:
            break
        keep, ok = _top_k_top_p_by_candidates(logits[rest], top_k[rest], top_p[rest], use_k, use_p, c)
        done = ok.nonzero().squeeze(1)
        out[rest[done]] = logits[rest[done]].masked_fill(~keep[done], float("-inf"))
        rest = rest[~ok]
    if rest.numel():
        out[rest] = _top_k_top_p_by_sort(logits[rest], top_k[rest], top_p[rest], use_k, use_p)
    return out


def _top_k_top_p_by_candidates(logits, top_k, top_p, use_k: bool, use_p: bool, c: int):
    """(keep [R, V] bool, ok [R] bool): the mask of ``apply_top_k_top_p`` from each row's c
    largest logits, valid for the rows where ``ok``."""
    vals, ids = torch.topk(logits, c, dim=-1)  # [R, c]; topk's order among equal values is unspecified
    if not (use_p and not use_k):
        return _cut_among(logits, vals, ids, top_k, top_p, use_k, use_p, None)
    # Top-p alone: a nucleus holding more mass than these c candidates cannot end among them.
    # Such rows (flat distributions) are sent on at the cost of the topk and the log-sum-exp,
    # which the cut of the other rows reuses.
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # [R, 1]
    hopeless = (top_p < 1.0) & (torch.exp(vals.float() - lse).sum(-1) < top_p)  # [R]
    if not bool(hopeless.any()):
        return _cut_among(logits, vals, ids, top_k, top_p, use_k, use_p, lse)
    keep, ok = torch.ones_like(logits, dtype=torch.bool), ~hopeless
    fine = ok.nonzero().squeeze(1)
    if fine.numel():
        keep[fine], ok[fine] = _cut_among(logits[fine], vals[fine], ids[fine], top_k[fine], top_p[fine],
                                          use_k, use_p, lse[fine])
    return keep, ok


def _cut_among(logits, vals, ids, top_k, top_p, use_k: bool, use_p: bool, lse):
    """The cut of ``_top_k_top_p_by_candidates`` given each row's c largest logits (``vals``,
    ``ids``) and, for top-p alone, the rows' log-sum-exp (None: computed here)."""
    rows, vocab = logits.shape
    c = vals.shape[-1]
    by_id, perm = ids.sort(dim=-1)  # put equal values in id order, as the stable full sort does
    vals, order = vals.gather(-1, perm).sort(dim=-1, descending=True, stable=True)
    ids = by_id.gather(-1, order)  # [R, c]: the first c entries of the full sort's order
    ok = torch.ones(rows, dtype=torch.bool, device=logits.device)
    has_k = top_k > 0  # [R]
    kth = torch.full((rows, 1), float("-inf"), dtype=logits.dtype, device=logits.device)
    if use_k:
        k = top_k.clamp(1, vocab)
        ok &= ~has_k | (k <= c)
        kth = torch.where(has_k.unsqueeze(-1), vals.gather(-1, (k.clamp(max=c) - 1).unsqueeze(-1)), kth)  # [R, 1]
    keep = logits >= kth  # top-k (ties at the k-th value stay in); everything for rows without it
    if use_p:
        p_on = top_p < 1.0  # [R]
        if lse is None:  # each candidate's probability under the softmax of the top-k filtered row
            lse = torch.logsumexp(logits.masked_fill(~keep, float("-inf")).float(), dim=-1, keepdim=True)  # [R, 1]
        probs = torch.exp(vals.float() - lse).masked_fill_(vals < kth, 0.0)  # [R, c]
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each candidate
        keep_c = (vals >= kth) & (before < top_p.unsqueeze(-1).to(before.dtype))
        keep_c[:, 0] = True  # the argmax always stays
        # The cut is exact when the last kept candidate is above the c-th value: every entry
        # outside the candidates comes after it in the full sort's order, and is dropped too.
        last = keep_c.sum(-1, keepdim=True) - 1  # [R, 1]
        ok &= ~p_on | (vals.gather(-1, last) > vals[:, -1:]).squeeze(-1)
        nucleus = torch.zeros_like(keep).scatter_(-1, ids, keep_c)
        keep = torch.where(p_on.unsqueeze(-1), nucleus, keep)
    return keep, ok


def _top_k_top_p_by_sort(logits, top_k, top_p, use_k: bool, use_p: bool) -> torch.Tensor:
    """``apply_top_k_top_p`` by one stable descending sort of every row (the reference)."""
    vocab = logits.shape[-1]
    # One descending sort serves both filters; stable, so the first of tied maxima is the lowest
    # id, the token greedy decoding picks.  sorted_logits: [R, V]
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
    # A row whose filter is off keeps everything whatever its neighbours use: masks are computed
    # for the whole batch, and without this a row would depend on which batch it lands in.
    if use_k:
        k = torch.where(top_k > 0, top_k, vocab).clamp(1, vocab)
        # Keep every entry >= the k-th largest value (ties at the boundary stay in).
        kth = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))  # [R, 1]
        keep_sorted &= (sorted_logits >= kth) | (top_k <= 0).unsqueeze(-1)
    if use_p:
        masked = sorted_logits.masked_fill(~keep_sorted, float("-inf"))
        probs = torch.softmax(masked.float(), dim=-1)
        # Mass strictly before each entry; an entry stays while that mass is < top_p, so the
        # nucleus is the smallest prefix whose mass reaches top_p (never empty).  Rows with
        # top_p >= 1 skip the test: float32 cumsum rounding over a large vocabulary reaches 1
        # before the tail and would drop tokens those rows must keep.
        before = torch.cumsum(probs, dim=-1) - probs  # [R, V]
        p_off = (top_p >= 1.0).unsqueeze(-1)  # [R, 1]
        keep_sorted &= (before < top_p.unsqueeze(-1).to(before.dtype)) | p_off
        # The argmax always stays: a top_p that is 0 in float32 (1e-46 is, as a request's float)
        # would otherwise mask every token and leave a NaN row.
        keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, sorted_idx, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def logits_to_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Target distribution per row after temperature / top-k / top-p, in float32.

    logits: [R, V]; temperature: [R] (0 = greedy -> one-hot argmax); top_k: [R]; top_p: [R].
    Returns probs: [R, V] float32, each row sums to 1.

    Example:
        >>> logits_to_probs(torch.tensor([[0.0, 1.0]]), torch.tensor([0.0]))
        tensor([[0., 1.]])
    """
    rows = logits.shape[0]
    device = logits.device
    logits = logits.float()
    temperature = temperature.to(device=device, dtype=torch.float32)
    greedy = temperature <= 0
    probs = torch.zeros_like(logits)
    # Greedy rows are one-hot on the argmax of the raw logits; only sampled rows pay for a softmax.
    probs.scatter_(-1, row_argmax(logits).unsqueeze(-1), 1.0)
    sampled = (~greedy).nonzero().flatten()
    if sampled.numel() == 0:
        return probs
    if top_k is None:
        top_k = torch.zeros(rows, dtype=torch.long, device=device)
    if top_p is None:
        top_p = torch.ones(rows, dtype=torch.float32, device=device)
    scaled = processed_logits(logits[sampled], temperature[sampled], top_k.to(device)[sampled],
                              top_p.to(device=device, dtype=torch.float32)[sampled])
    probs[sampled] = torch.softmax(scaled, dim=-1)
    return probs


def processed_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Logits of the distribution sampled rows draw from: divided by the temperature, then top-k
    and top-p (tokens outside them at -inf); its softmax is :func:`logits_to_probs`' row.

    logits: [S, V] float32; temperature: [S] (> 0); top_k: [S]; top_p: [S].

    Example:
        >>> processed_logits(torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([0.5]), torch.tensor([2]),
        ...                  torch.tensor([1.0]))
        tensor([[-inf, 2., 6.]])
    """
    t = temperature.to(dtype=torch.float32).unsqueeze(-1)  # [S, 1]
    scaled = logits / t  # [S, V]
    # A tiny temperature (1e-40 is subnormal in float32) overflows logits / t to inf, and the
    # softmax's inf - inf is NaN.  Such rows subtract their max first, so it maps to 0 and the
    # rest to at most 0: the limit t -> 0, all mass on the maximum.  Other rows keep logits / t
    # bit for bit.
    overflow = torch.isposinf(scaled.amax(-1, keepdim=True))  # [S, 1]
    if bool(overflow.any()):  # rare; the common step pays one amax, not a second [S, V] pass
        scaled = torch.where(overflow, (logits - logits.amax(-1, keepdim=True)) / t, scaled)
    return apply_top_k_top_p(scaled, top_k, top_p)


LOGPROB_FLOOR = -9999.0  # what the APIs send for -inf (JSON has no infinity), as vLLM does


def token_logprobs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    token_ids: torch.Tensor,
    num_top: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``token_ids`` and each row's ``num_top`` most likely tokens.

    The distribution is the one the row samples from (:func:`processed_logits`: temperature,
    top-k, top-p, and whatever mask the caller applied to ``logits``), except that a greedy row
    (temperature 0) uses temperature 1: its sampling distribution is one-hot, which says nothing.

    logits: [R, V]; temperature, top_k, top_p: [R]; token_ids: [R].
    Returns (chosen [R], top values [R, num_top], top ids [R, num_top]), float32 / long.

    Example:
        >>> lp, tv, ti = token_logprobs(torch.tensor([[0.0, 0.0]]), torch.tensor([0.0]),
        ...                             torch.tensor([0]), torch.tensor([1.0]), torch.tensor([1]), 1)
        >>> round(lp.item(), 4), ti.tolist()
        (-0.6931, [[0]])
    """
    t = torch.where(temperature > 0, temperature.float(), torch.ones_like(temperature, dtype=torch.float32))
    lp = torch.log_softmax(processed_logits(logits.float(), t, top_k, top_p.float()), dim=-1)  # [R, V]
    chosen = lp.gather(-1, token_ids.view(-1, 1)).view(-1)  # [R]
    if num_top <= 0:
        empty = lp.new_zeros(lp.shape[0], 0)
        return chosen, empty, empty.long()
    vals, ids = lp.topk(num_top, dim=-1)  # [R, num_top], most likely first
    return chosen, vals, ids


def exponential_row(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill the 1-D ``out`` with Exp(1) draws from ``generator`` (None: the global RNG); returns it.

    -log(1 - U) with U uniform in [0, 1) drawn in float64 (53 bits: the smallest draw is
    2^-53, the largest about 36.7, so the race is not biased at float32 resolution).  On CPU
    this is 3-5x faster than ``Tensor.exponential_``, which is what made sampling cost more than
    the model's step at large batches (a row is the whole vocabulary).
    """
    u = torch.rand(out.shape[0], dtype=torch.float64, device=out.device, generator=generator)
    return out.copy_(u.neg_().log1p_().neg_())


def exponential_noise(
    rows: int, vocab: int, generators: list[torch.Generator | None], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Draw Exp(1) noise [rows, vocab], row i from ``generators[i]`` (None: the global RNG).

    Rows are drawn one by one so each request's stream depends only on its own seed, never on
    which other requests happen to share the batch.
    """
    out = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    for i in range(rows):
        exponential_row(out[i], generators[i] if i < len(generators) else None)
    return out


def sample_from_probs(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row: ``argmax(probs / E)`` with E ~ Exp(1) (no host sync).

    This "exponential race" picks index v with probability probs[v] exactly.  Rows whose
    distribution is one-hot (greedy) return that index whatever the noise.

    probs: [R, V], noise: [R, V] positive.  Returns [R] int64.

    Example:
        >>> sample_from_probs(torch.tensor([[0.0, 1.0, 0.0]]), torch.ones(1, 3))
        tensor([1])
    """
    return (probs / noise).argmax(dim=-1)


def sample_proposal(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draft-side sampling from a top-k truncated, renormalised softmax, reported sparsely.

    A drafter may propose from any distribution q as long as it reports q exactly; truncating to
    the top-k entries keeps what travels to the verifier small.  Greedy rows (temperature 0)
    propose the argmax with q one-hot (all mass on entry 0 of the returned ids).

    logits: [R, V]; temperature: [R]; top_k: K >= 1; noise: [R, K] Exp(1).
    Returns (tokens [R], q_values [R, K], q_ids [R, K], q_of_token [R]).

    Example:
        >>> t, q, ids, p = sample_proposal(torch.tensor([[0.0, 5.0, 1.0]]), torch.tensor([0.0]), 2, torch.ones(1, 2))
        >>> t.tolist(), q.tolist(), ids.tolist()
        ([1], [[1.0, 0.0]], [[1, 2]])
    """
    k = max(1, min(top_k, logits.shape[-1]))
    top_vals, top_ids = torch.topk(logits.float(), k, dim=-1)  # [R, K], descending
    temperature = temperature.to(logits.device, torch.float32)
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    q = torch.softmax(top_vals / t, dim=-1)
    onehot = torch.zeros_like(q)
    onehot[:, 0] = 1.0
    q = torch.where(greedy.unsqueeze(-1), onehot, q)
    choice = (q / noise).argmax(dim=-1)  # [R] index into the K entries
    tokens = top_ids.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return tokens, q, top_ids, q.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with every token a row does not allow set to -inf (structured outputs).

    logits: [R, V] float; allowed: [R, V] bool, True = the row's grammar allows that token next.
    Returns a new [R, V] tensor; allowed entries keep their value bit for bit, so a row that allows
    everything samples exactly as without a mask.  A row must allow at least one token (a grammar
    matcher always allows its stop tokens when nothing else may follow), or its softmax is NaN.

    Example:
        >>> mask_logits(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, False, True]]))
        tensor([[1., -inf, 3.]])
    """
    return logits.masked_fill(~allowed, float("-inf"))


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token bitmasks, 32 tokens per int32 word, as one bool per token.

    bits: [R, W] int32 with W = ceil(V / 32), token t is bit t % 32 (least significant first) of
    word t // 32, the layout grammar engines fill.  Returns [R, V] bool on the same device: rows can
    travel to an accelerator as words (1/8 of the bytes of bools) and expand there.

    Example:
        >>> unpack_bitmask(torch.tensor([[0b101]], dtype=torch.int32), 4)
        tensor([[ True, False,  True, False]])
    """
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)  # [32]
    # An arithmetic shift of a negative word (bit 31 set) fills with ones; "& 1" keeps the bit.
    expanded = (bits.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return expanded.reshape(bits.shape[0], -1)[:, :vocab_size].bool()
