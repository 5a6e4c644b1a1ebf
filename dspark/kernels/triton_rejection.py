"""Triton version of :func:`dspark.kernels.rejection.rejection_sample_torch`.

Same signature, same results (the parity test runs both under ``TRITON_INTERPRET=1``).  One
program per request walks its drafts left to right, then makes a single pass over the
vocabulary that races the residual and the plain row at once, so neither a dense q for sparse
proposals nor the residual row is ever written to memory.

This module imports triton at the top; ``rejection.rejection_sample`` imports it lazily, only
when it dispatches here, so the package works without triton.  The contract (inputs, output,
placeholder) comes from ``rejection_types``, never from ``rejection``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark.kernels.rejection_types import PLACEHOLDER_TOKEN_ID, RejectionInputs, RejectionOutput

__all__ = ["rejection_sample_triton"]

# How q is passed (a constexpr of the kernel).
_Q_ONE_HOT, _Q_DENSE, _Q_SPARSE = 0, 1, 2
PLACEHOLDER = tl.constexpr(PLACEHOLDER_TOKEN_ID)


@triton.jit
def _row_argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    """First index of the maximum of a length-V row (torch.argmax's tie rule)."""
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        vals = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        m = tl.max(vals, axis=0)
        i = tl.argmax(vals, axis=0, tie_break_left=True).to(tl.int64) + v0
        take = m > best  # strict: an earlier block keeps ties
        best_idx = tl.where(take, i, best_idx)
        best = tl.where(take, m, best)
    return best_idx


@triton.jit
def _rejection_kernel(
    draft_ids_ptr,  # [N] int64
    cu_ptr,  # [B] int64
    q_ptr,  # [N, V] dense q | [N, K] sparse values | unused (one-hot)
    qid_ptr,  # [N, K] int64 sparse ids | unused
    p_ptr,  # [N + B, V] float32
    greedy_ptr,  # [B] int8
    u_ptr,  # [N] float32
    noise_ptr,  # [B, V] float32
    out_ptr,  # [B, out_width] int64
    num_acc_ptr,  # [B] int64
    V,
    K,
    out_width,
    num_drafts,  # N, or 1 when there are none (a dummy draft keeps every pointer valid)
    Q_MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    end = tl.load(cu_ptr + r)
    start = tl.load(cu_ptr + r - 1, mask=r > 0, other=0)
    n = end - start
    greedy = tl.load(greedy_ptr + r) != 0
    offs_k = tl.arange(0, BLOCK_K)

    # ---- accepted prefix -----------------------------------------------------------------------
    num_acc = n * 0
    alive = n * 0 + 1
    for j in range(0, n):
        i = start + j
        x = tl.load(draft_ids_ptr + i)
        row = i + r
        p_x = tl.load(p_ptr + row * V + x)
        if Q_MODE == 0:
            q_x = 1.0
        elif Q_MODE == 1:
            q_x = tl.load(q_ptr + i * V + x)
        else:
            q_x = tl.full((), 0.0, tl.float32)
            for k0 in range(0, K, BLOCK_K):
                km = (k0 + offs_k) < K
                ids = tl.load(qid_ptr + i * K + k0 + offs_k, mask=km, other=-1)
                vals = tl.load(q_ptr + i * K + k0 + offs_k, mask=km, other=0.0)
                q_x += tl.sum(tl.where(ids == x, vals, 0.0), axis=0)
        u = tl.load(u_ptr + i)
        ok = (q_x > 0) & (u * q_x < p_x)  # q(x) = 0: q could not propose x, reject (as vLLM)
        if greedy:
            # Same shortcut as the reference: p(x) > 1/2 is the argmax, p(x) == 0 is not.
            ok = p_x > 0.5
            if (p_x > 0) & (p_x <= 0.5):
                ok = x == _row_argmax(p_ptr + row * V, V, BLOCK_V)
        alive = alive * ok.to(tl.int64)
        num_acc += alive

    # ---- recovered or bonus token: one pass racing residual / noise and p / noise ----------
    rejected = num_acc < n
    use_residual = rejected & (greedy == 0)
    # The rejected draft's flat index; clamped for rows that were not rejected, whose residual
    # is computed but never used (a load mask would do, but the interpreter mishandles scalar &
    # block masks).
    i_rej = tl.minimum(start + num_acc, num_drafts - 1)
    row = start + r + num_acc  # the rejected position's target row, or the bonus row
    x_rej = tl.load(draft_ids_ptr + i_rej)
    best_p = tl.full((), -1.0, tl.float32)
    idx_p = tl.full((), 0, tl.int64)
    best_res = tl.full((), -1.0, tl.float32)
    idx_res = tl.full((), 0, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        vm = offs < V
        p = tl.load(p_ptr + row * V + offs, mask=vm, other=0.0)
        e = tl.load(noise_ptr + r * V + offs, mask=vm, other=1.0)
        if Q_MODE == 0:
            q = tl.where(offs == x_rej, 1.0, 0.0)
        elif Q_MODE == 1:
            q = tl.load(q_ptr + i_rej * V + offs, mask=vm, other=0.0)
        else:
            q = tl.zeros((BLOCK_V,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                km = (k0 + offs_k) < K
                ids = tl.load(qid_ptr + i_rej * K + k0 + offs_k, mask=km, other=-1)
                vals = tl.load(q_ptr + i_rej * K + k0 + offs_k, mask=km, other=0.0)
                hit = ids[:, None] == offs[None, :]  # [BLOCK_K, BLOCK_V]
                q += tl.sum(tl.where(hit, vals[:, None], 0.0), axis=0)
        # div_rn: correctly rounded, like torch's division (plain "/" is approximate on GPU).
        s_p = tl.where(vm, tl.div_rn(p, e), -1.0)
        s_r = tl.where(vm, tl.div_rn(tl.maximum(p - q, 0.0), e), -1.0)
        m_p = tl.max(s_p, axis=0)
        i_p = tl.argmax(s_p, axis=0, tie_break_left=True).to(tl.int64) + v0
        take = m_p > best_p
        idx_p = tl.where(take, i_p, idx_p)
        best_p = tl.where(take, m_p, best_p)
        m_r = tl.max(s_r, axis=0)
        i_r = tl.argmax(s_r, axis=0, tie_break_left=True).to(tl.int64) + v0
        take = m_r > best_res
        idx_res = tl.where(take, i_r, idx_res)
        best_res = tl.where(take, m_r, best_res)
    # An all-zero residual (p == q up to rounding) falls back to p, as in the reference.
    token = tl.where(use_residual & (best_res > 0), idx_res, idx_p)

    # ---- write [accepted drafts, token, -1 ...] --------------------------------------------
    for c0 in range(0, out_width, BLOCK_OUT):
        cols = c0 + tl.arange(0, BLOCK_OUT)
        cm = cols < out_width
        d = tl.load(draft_ids_ptr + start + cols, mask=cm & (cols < num_acc), other=-1)
        d = tl.where(cols < num_acc, d, PLACEHOLDER)
        d = tl.where(cols == num_acc, token, d)
        tl.store(out_ptr + r * out_width + cols, d, mask=cm)
    tl.store(num_acc_ptr + r, num_acc)


def rejection_sample_triton(inputs: RejectionInputs) -> RejectionOutput:
    """Triton twin of ``rejection_sample_torch``: same :class:`RejectionInputs`, same :class:`RejectionOutput`."""
    inputs.check()
    target_probs, draft_probs, draft_prob_ids = inputs.target_probs, inputs.draft_probs, inputs.draft_prob_ids
    device = target_probs.device
    num_reqs = inputs.cu_num_draft_tokens.shape[0]
    num_drafts = inputs.draft_token_ids.shape[0]
    vocab = target_probs.shape[1]
    if num_reqs == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return RejectionOutput(empty.view(0, 1), empty, empty)
    cu = inputs.cu_num_draft_tokens.to(device=device, dtype=torch.long).contiguous()
    num_draft = torch.diff(cu, prepend=cu.new_zeros(1))  # [B]
    max_n, total = torch.stack([num_draft.max(), cu[-1]]).tolist()
    if total != num_drafts:
        raise ValueError(f"cu_num_draft_tokens ends at {total} but there are {num_drafts} drafts")

    draft_ids = inputs.draft_token_ids.to(torch.long).contiguous()
    p = target_probs.float().contiguous()
    if draft_probs is None:
        mode, q, qid, k = _Q_ONE_HOT, p, draft_ids, 1  # q, qid unused: any valid pointer
    elif draft_prob_ids is None:
        mode, q, qid, k = _Q_DENSE, draft_probs.float().contiguous(), draft_ids, 1
    else:
        mode, q, qid = _Q_SPARSE, draft_probs.float().contiguous(), draft_prob_ids.long().contiguous()
        k = q.shape[1]
    if num_drafts == 0:  # keep the unused pointers valid
        draft_ids = torch.zeros(1, dtype=torch.long, device=device)
        u = torch.zeros(1, dtype=torch.float32, device=device)
        if mode != _Q_ONE_HOT:
            q, qid = p, draft_ids
            mode = _Q_ONE_HOT
    else:
        u = inputs.uniforms.float().contiguous()

    out_width = max_n + 1
    out = torch.empty(num_reqs, out_width, dtype=torch.long, device=device)
    num_acc = torch.empty(num_reqs, dtype=torch.long, device=device)
    _rejection_kernel[(num_reqs,)](
        draft_ids, cu, q, qid, p,
        inputs.is_greedy.to(device=device, dtype=torch.int8).contiguous(),
        u, inputs.recovery_noise.float().contiguous(),
        out, num_acc,
        vocab, k, out_width, max(num_drafts, 1),
        Q_MODE=mode,
        BLOCK_V=min(1024, triton.next_power_of_2(vocab)),
        BLOCK_K=min(16, triton.next_power_of_2(k)),
        BLOCK_OUT=min(64, triton.next_power_of_2(out_width)),
    )
    return RejectionOutput(output_token_ids=out, num_accepted=num_acc, num_emitted=num_acc + 1)
