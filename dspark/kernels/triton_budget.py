"""Triton version of :func:`dspark.kernels.budget.top_k_admission_torch`.

No sort: one program per request computes the rank of each of its candidates by counting the
candidates ranked before it (larger survival, or equal survival at an earlier row-major
position) over the whole [B, G] table, O(B * G^2) comparisons per program, which is tiny at
serving sizes (B <= a few hundred, G <= 32).  K is read from device memory, so choosing it on
the GPU needs no host sync.

Imported lazily by ``budget.top_k_admission``; the package works without triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["top_k_admission_triton"]


@triton.jit
def _top_k_admission_kernel(
    surv_ptr,  # [B, G] float, row-major
    k_ptr,  # [1] int64
    out_ptr,  # [B] int64
    B,
    G,
    BLOCK_G: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_G)
    valid = j < G
    a = tl.load(surv_ptr + r * G + j, mask=valid, other=0.0)  # this request's candidates
    me = r * G + j  # their row-major positions
    rank = tl.zeros((BLOCK_G,), tl.int64)
    for r2 in range(0, B):
        b = tl.load(surv_ptr + r2 * G + j, mask=valid, other=0.0)  # another request's row
        other = r2 * G + j
        before = (b[None, :] > a[:, None]) | ((b[None, :] == a[:, None]) & (other[None, :] < me[:, None]))
        before = before & valid[None, :]  # [BLOCK_G (mine), BLOCK_G (theirs)]
        rank += tl.sum(before.to(tl.int64), axis=1)
    k = tl.load(k_ptr)
    admitted = (a > 0) & (rank < k) & valid
    # Prefix length = first position not admitted (G if all are).
    first_gap = tl.min(tl.where(admitted, BLOCK_G, j), axis=0)
    tl.store(out_ptr + r, tl.minimum(first_gap, G).to(tl.int64))


def top_k_admission_triton(survival: torch.Tensor, num_draft_tokens: int | torch.Tensor) -> torch.Tensor:
    """Triton twin of ``top_k_admission_torch``: same arguments, same [B] int64 result."""
    num_reqs, block = survival.shape
    device = survival.device
    out = torch.empty(num_reqs, dtype=torch.long, device=device)
    if num_reqs == 0 or block == 0:
        return out.zero_()
    k = torch.as_tensor(num_draft_tokens, device=device).reshape(1).to(torch.long)
    _top_k_admission_kernel[(num_reqs,)](
        survival.contiguous(), k, out, num_reqs, block, BLOCK_G=triton.next_power_of_2(block)
    )
    return out
