"""Lossless rejection sampling for a batch of speculative blocks (flat, variable-length layout).

Terms, used the same way across the project:

  * **draft tokens**: the tokens a drafter proposed for a request, x_1..x_n (n may be 0);
  * **accepted tokens**: the longest prefix of the drafts the target keeps.  Draft x_j is
    accepted with probability min(1, p_j(x_j) / q_j(x_j)), p_j the target distribution and q_j
    the distribution the drafter *actually sampled x_j from* (never if q_j(x_j) = 0);
  * **recovered token**: at the first rejected position j, a replacement sampled from the
    residual normalize(max(0, p_j - q_j));
  * **bonus token**: when every draft is accepted, one extra token sampled from the target
    distribution of the position after the last draft (the "bonus row").

So each request emits its accepted drafts plus exactly one recovered-or-bonus token.  This is
the speculative sampling rule of Leviathan et al. 2023 ("Fast Inference from Transformers via
Speculative Decoding") and Chen et al. 2023 ("Accelerating Large Language Model Decoding with
Speculative Sampling"): every emitted token is distributed exactly as plain sampling from the
target (after its temperature / top-k / top-p transform) would produce it.

Flat layout (as vLLM v1): request r owns drafts ``draft_token_ids[s_r : s_r + n_r]`` where
``cu_num_draft_tokens`` is the inclusive cumsum of the n_r and s_r = cu[r] - n_r, and target rows
``target_probs[s_r + r : s_r + r + n_r + 1]`` (its n_r verify rows, then its bonus row).

Greedy requests (their target rows are one-hot, see ``sampling.logits_to_probs``) accept while
the draft equals the target argmax and then emit the target argmax: identical to greedy decoding.

Which backend runs: :func:`rejection_sample` dispatches (see ``dispatch.py``) between the
torch reference :func:`rejection_sample_torch` and ``triton_rejection.rejection_sample_triton``;
both take one :class:`~dspark.kernels.rejection_types.RejectionInputs` (``rejection_types.py``,
the contract both backends import).
"""

from __future__ import annotations

import torch

from dspark.kernels.dispatch import use_triton
from dspark.kernels.rejection_types import PLACEHOLDER_TOKEN_ID, RejectionInputs, RejectionOutput
from dspark.kernels.sampling import row_argmax

__all__ = [
    "PLACEHOLDER_TOKEN_ID",
    "RejectionInputs",
    "RejectionOutput",
    "rejection_sample",
    "rejection_sample_torch",
]


def rejection_sample(inputs: RejectionInputs) -> RejectionOutput:
    """Verify B requests' draft blocks; Triton on CUDA when available, else the torch reference.

    Same contract as :func:`rejection_sample_torch` (see there for an example).
    """
    if use_triton(inputs.target_probs):
        from dspark.kernels.triton_rejection import rejection_sample_triton

        return rejection_sample_triton(inputs)
    return rejection_sample_torch(inputs)


def greedy_verify(logits: torch.Tensor, drafts: list[list[int]]) -> RejectionOutput:
    """The greedy rule alone, for a step whose every request is greedy.

    Same output as :func:`rejection_sample` with one-hot target rows (``logits_to_probs`` at
    temperature 0): a draft is accepted while it equals the argmax of its row (lowest id on
    ties, as ``torch.argmax``), then the argmax of the first mismatching row, or of the bonus
    row, is emitted.  It skips building [R, V] probabilities and noise, which at batch 32 cost
    more than a third of a decode step.

    logits: [N + B, V], per request its drafts' rows then its bonus row; drafts: per request.

    Example (V = 3; request 0 drafted [2, 1], the target agrees on 2 only):
        >>> out = greedy_verify(torch.tensor([[0., 0., 5.], [4., 0., 0.], [0., 3., 0.]]), [[2, 1]])
        >>> out.output_token_ids.tolist(), out.num_accepted.tolist()
        ([[2, 0, -1]], [1])
    """
    target = row_argmax(logits).tolist()
    width = max(len(d) for d in drafts) + 1
    rows, accepted, o = [], [], 0
    for d in drafts:
        a = 0
        while a < len(d) and d[a] == target[o + a]:
            a += 1
        emitted = d[:a] + [target[o + a]]
        rows.append(emitted + [PLACEHOLDER_TOKEN_ID] * (width - len(emitted)))
        accepted.append(a)
        o += len(d) + 1
    dev = logits.device
    num_accepted = torch.tensor(accepted, dtype=torch.long, device=dev)
    return RejectionOutput(torch.tensor(rows, dtype=torch.long, device=dev), num_accepted, num_accepted + 1)


def _draft_prob_of_drafted(
    draft_token_ids: torch.Tensor,  # [N]
    draft_probs: torch.Tensor | None,  # [N, V] dense | [N, K] sparse values | None
    draft_prob_ids: torch.Tensor | None,  # [N, K] | None
) -> torch.Tensor:
    """q_j(x_j) for every draft: [N] float32."""
    if draft_probs is None:  # one-hot q (n-gram and other deterministic drafters)
        return torch.ones(draft_token_ids.shape, dtype=torch.float32, device=draft_token_ids.device)
    if draft_prob_ids is None:
        return draft_probs.gather(1, draft_token_ids.unsqueeze(1)).squeeze(1).float()
    # Sparse q: ids are distinct apart from zero-valued padding, so the sum picks one entry.
    hit = draft_prob_ids == draft_token_ids.unsqueeze(1)  # [N, K]
    return torch.where(hit, draft_probs.float(), 0.0).sum(1)


def _sparse_residual_scores(
    p_at: torch.Tensor,  # [B, K] target probs at the q entries
    ids: torch.Tensor,  # [B, K] their vocabulary ids (distinct except zero-valued padding)
    vals: torch.Tensor,  # [B, K] their q values
    noise_at: torch.Tensor,  # [B, K] recovery noise at the same ids
) -> torch.Tensor:
    """Race scores max(0, p - q) / noise at the ids of a sparse q: [B, K].

    q(v) is summed over slots with the same id, so padding that repeats a real id is harmless.
    """
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # [B, K, K]
    q_at = torch.where(same, vals.unsqueeze(1), 0.0).sum(2)  # [B, K]
    return (p_at - q_at).clamp_min(0.0) / noise_at


def rejection_sample_torch(inputs: RejectionInputs) -> RejectionOutput:
    """Accept the longest allowed prefix of each request's drafts, then one recovered/bonus token.

    The inputs' shapes are documented on :class:`RejectionInputs`.

    Acceptance: draft x is accepted iff ``q(x) > 0 and u * q(x) < p(x)``, i.e. with probability
    min(1, p(x)/q(x)) for u ~ U[0, 1).  The corner cases: p(x) = 0 always rejects (even for
    u = 0); q(x) = 0 always rejects too (vLLM's choice): q could not have proposed x, so the
    drafter broke its contract and its draft is not trusted; the recovered token then comes from
    the residual as for any rejection.  A correct drafter never sends such a draft, so this costs
    no exactness.  If the residual of a rejection is all zero (p == q up to rounding) the
    recovered token is sampled from p instead.

    Greedy requests accept iff x == argmax p (lowest id on ties) and emit argmax p of the next
    row.  With rows summing to 1, p(x) > 1/2 already proves x is the argmax and p(x) = 0 that it
    is not, so only rows with 0 < p(x) <= 1/2 pay for an argmax (one-hot rows never do).  The
    emitted token uses the same race as sampling, which returns the argmax of a one-hot row.

    Returns a :class:`RejectionOutput`.

    Example (two greedy requests, V = 4; request 1 has no drafts, so it only gets a bonus):
        >>> onehot = torch.eye(4)
        >>> out = rejection_sample_torch(RejectionInputs(
        ...     draft_token_ids=torch.tensor([2, 3]), cu_num_draft_tokens=torch.tensor([2, 2]),
        ...     draft_probs=None, draft_prob_ids=None,
        ...     target_probs=onehot[[2, 1, 0, 3]],  # req 0: verify rows 2, 1, bonus 0; req 1: bonus 3
        ...     is_greedy=torch.tensor([True, True]), uniforms=torch.zeros(2),
        ...     recovery_noise=torch.ones(2, 4)))
        >>> out.output_token_ids  # req 0: draft 2 accepted, draft 3 rejected -> recovered 1
        tensor([[ 2,  1, -1],
                [ 3, -1, -1]])
        >>> out.num_accepted
        tensor([1, 0])
    """
    inputs.check()
    target_probs, draft_probs, draft_prob_ids = inputs.target_probs, inputs.draft_probs, inputs.draft_prob_ids
    device = target_probs.device
    num_reqs = inputs.cu_num_draft_tokens.shape[0]
    num_drafts = inputs.draft_token_ids.shape[0]
    draft_token_ids = inputs.draft_token_ids.long()
    cu = inputs.cu_num_draft_tokens.long()
    is_greedy = inputs.is_greedy.bool()
    req_ids = torch.arange(num_reqs, device=device)  # [B]
    num_draft = torch.diff(cu, prepend=cu.new_zeros(1))  # n_r: [B]
    starts = cu - num_draft  # s_r: [B]
    # Host syncs: this one (output width, layout check), plus two checks that skip rare work.
    max_n, total = (torch.stack([num_draft.max(), cu[-1]]).tolist() if num_reqs else (0, 0))
    if total != num_drafts:
        raise ValueError(f"cu_num_draft_tokens ends at {total} but there are {num_drafts} drafts")

    # --- acceptance, one entry per draft ---------------------------------------------------
    tok_req = torch.repeat_interleave(req_ids, num_draft, output_size=num_drafts)  # [N]
    tok_flat = torch.arange(num_drafts, device=device)  # [N]
    tok_pos = tok_flat - starts[tok_req]  # position j-1 inside its block: [N]
    tok_row = tok_flat + tok_req  # its target row (each earlier request adds a bonus row): [N]
    p_x = target_probs[tok_row, draft_token_ids].float()  # [N]
    q_x = _draft_prob_of_drafted(draft_token_ids, draft_probs, draft_prob_ids)  # [N]
    accepted = (q_x > 0) & (inputs.uniforms.float() * q_x < p_x)  # [N]
    tok_greedy = is_greedy[tok_req]  # [N]
    # Greedy: accept iff x == argmax p.  A row summing to 1 with p(x) > 1/2 has x as its unique
    # argmax and p(x) == 0 cannot be the argmax, so only rows with 0 < p(x) <= 1/2 need the
    # O(V) argmax; one-hot rows (what logits_to_probs makes) never do.
    accepted = torch.where(tok_greedy, p_x > 0.5, accepted)
    unsure = tok_greedy & (p_x > 0) & (p_x <= 0.5)  # [N]
    if num_drafts and bool(unsure.any()):
        s = unsure.nonzero().squeeze(1)
        accepted[s] = draft_token_ids[s] == row_argmax(target_probs[tok_row[s]])
    # num_accepted = position of the first rejection (n_r if none): a segmented min.
    first_reject = torch.where(accepted, num_draft[tok_req], tok_pos)  # [N]
    num_accepted = num_draft.clone().scatter_reduce_(0, tok_req, first_reject, "amin", include_self=True)

    # --- one recovered-or-bonus token per request ---------------------------------------------
    # Exponential race argmax(w / noise), w = the residual after a sampled rejection, else the
    # row itself (bonus row, or a greedy row, which is one-hot so the race returns its argmax).
    # The row after the accepted prefix is the rejected position's row, or the bonus row.
    rows = starts + req_ids + num_accepted  # [B]
    noise = inputs.recovery_noise.float()
    scores = target_probs[rows].float().div_(noise)  # p / noise: [B, V]
    if num_drafts:
        use_residual = (num_accepted < num_draft) & ~is_greedy  # [B]
        flat_idx = (starts + num_accepted).clamp(max=num_drafts - 1)  # the rejected draft: [B]
        if draft_probs is not None and draft_prob_ids is None:  # dense q
            residual = (target_probs[rows].float() - draft_probs[flat_idx].float())
            scores = torch.where(use_residual.unsqueeze(1), residual.clamp_min_(0.0).div_(noise), scores)
        else:
            # Sparse or one-hot q changes p only at its K ids, so only K scores change per row.
            if draft_probs is None:
                ids = draft_token_ids[flat_idx].unsqueeze(1)  # [B, 1]
                vals = torch.ones(ids.shape, dtype=torch.float32, device=device)
            else:
                ids = draft_prob_ids[flat_idx]  # [B, K]
                vals = draft_probs[flat_idx].float()
            p_at = target_probs[rows.unsqueeze(1), ids].float()  # [B, K]
            res_at = _sparse_residual_scores(p_at, ids, vals, noise.gather(1, ids))
            scores.scatter_(1, ids, torch.where(use_residual.unsqueeze(1), res_at, scores.gather(1, ids)))
        best, extra_token = scores.max(1)  # [B], [B]
        # A residual with no positive entry (p == q up to rounding): sample from p instead.
        empty = use_residual & (best <= 0)
        if bool(empty.any()):
            e = empty.nonzero().squeeze(1)
            extra_token[e] = (target_probs[rows[e]].float() / noise[e]).argmax(1)
    else:
        extra_token = scores.argmax(1)

    # --- assemble [B, max_n + 1] ---------------------------------------------------------------
    cols = torch.arange(max_n, device=device).unsqueeze(0)  # [1, max_n]
    out = torch.full((num_reqs, max_n + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=device)
    if max_n:
        drafts = draft_token_ids[(starts.unsqueeze(1) + cols).clamp(max=num_drafts - 1)]  # [B, max_n]
        out[:, :max_n] = torch.where(cols < num_accepted.unsqueeze(1), drafts, PLACEHOLDER_TOKEN_ID)
    out.scatter_(1, num_accepted.unsqueeze(1), extra_token.unsqueeze(1))
    return RejectionOutput(output_token_ids=out, num_accepted=num_accepted, num_emitted=num_accepted + 1)
