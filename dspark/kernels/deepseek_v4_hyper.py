"""Manifold-constrained hyper-connections (mHC) of DeepSeek-V4, as pure tensor functions.

V4 carries N = hc_mult residual streams per token instead of one, [B, S, N, D].  Around each
attention and each MoE block, a small projection of the (flattened, RMS-normalised) streams
gives three sets of weights per token (:func:`hyper_connection_weights`):

- pre [N]: how the streams collapse into the block's input (:func:`collapse_streams`);
- post [N]: how the block's output is written back into each stream;
- comb [N, N]: how the old streams are mixed into the new ones.  It is pushed towards a
  doubly-stochastic matrix by Sinkhorn iterations (:func:`sinkhorn`), so the mixing neither
  grows nor shrinks the residual on average across a deep stack.

streams' = post * block_out + comb^T @ streams  (:func:`expand_streams`).  After the last
layer, :func:`hyper_head` collapses the streams with its own sigmoid weights.
"""

from __future__ import annotations

import torch

__all__ = ["collapse_streams", "expand_streams", "hyper_connection_weights", "hyper_head", "sinkhorn"]


def _normalised_flat(streams: torch.Tensor, eps: float) -> torch.Tensor:
    flat = streams.flatten(-2).float()  # [B, S, N*D]
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Near-doubly-stochastic matrices from logits [..., N, N] by Sinkhorn-Knopp, fp32.

    Row softmax (+ eps, so no entry is 0), a column normalisation, then ``iters - 1`` rounds of
    row then column normalisation; every denominator gets + eps.  With the last step on
    columns, the columns sum to 1 (up to eps) and the rows approximately.

    Example:
        >>> sinkhorn(torch.zeros(2, 2), 3, 0.0)
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    m = torch.softmax(logits.float(), dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def hyper_connection_weights(
    streams: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    sinkhorn_iters: int,
    hc_eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre [B, S, N], post [B, S, N], comb [B, S, N, N]) for one block, all fp32.

    streams: [B, S, N, D]; fn: [(2 + N) * N, N * D]; base: [(2 + N) * N]; scale: [3] (one for
    pre, post and comb).  The normalised flat streams are projected by fn; the three slices are
    scaled, biased and squashed: pre = sigmoid + hc_eps (every stream keeps some weight),
    post = 2 * sigmoid (in (0, 2): a block may amplify its write), comb = Sinkhorn of the logits.

    Example:
        >>> n, d = 2, 3
        >>> pre, post, comb = hyper_connection_weights(torch.ones(1, 1, n, d), torch.zeros(8, n * d),
        ...                                            torch.zeros(8), torch.ones(3), 2, 0.0, 1e-6)
        >>> pre, post
        (tensor([[[0.5000, 0.5000]]]), tensor([[[1., 1.]]]))
    """
    n = streams.shape[-2]
    mixes = _normalised_flat(streams, norm_eps) @ fn.float().T  # [B, S, (2 + N) * N]
    pre_l, post_l, comb_l = mixes.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    s = scale.float()
    pre = torch.sigmoid(pre_l * s[0] + pre_b) + hc_eps  # [B, S, N]
    post = 2 * torch.sigmoid(post_l * s[1] + post_b)  # [B, S, N]
    comb = sinkhorn((comb_l * s[2] + comb_b).unflatten(-1, (n, n)), sinkhorn_iters, hc_eps)  # [B, S, N, N]
    return pre, post, comb


def collapse_streams(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The block input: sum_n pre[n] * streams[n], [B, S, D] in streams' dtype.

    streams: [B, S, N, D]; pre: [B, S, N].

    Example:
        >>> collapse_streams(torch.tensor([[[[1.0], [3.0]]]]), torch.tensor([[[0.5, 0.5]]]))
        tensor([[[2.]]])
    """
    return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)


def expand_streams(
    block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """New streams [B, S, N, D]: post[k] * block_out + sum_j comb[j, k] * streams[j].

    block_out: [B, S, D]; streams: [B, S, N, D]; post: [B, S, N]; comb: [B, S, N, N].  comb is
    read column-wise (old stream j feeds new stream k through comb[j, k]); Sinkhorn output is not
    symmetric, so the direction matters.  Computed in fp32 and rounded to streams' dtype once
    (in bf16 the residual streams are the only copy of the residual: one rounding per block).

    Example:
        >>> out = expand_streams(torch.zeros(1, 1, 1), torch.tensor([[[[1.0], [3.0]]]]),
        ...                      torch.ones(1, 1, 2), torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]]))
        >>> out.flatten()  # comb swaps the streams
        tensor([3., 1.])
    """
    mixed = torch.einsum("bsjk,bsjd->bskd", comb.float(), streams.float())  # [B, S, N, D]
    return (post.float().unsqueeze(-1) * block_out.float().unsqueeze(-2) + mixed).to(streams.dtype)


def hyper_head(
    streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float, norm_eps: float
) -> torch.Tensor:
    """Collapse the final streams [B, S, N, D] into one hidden state [B, S, D] for the LM head.

    fn: [N, N * D]; base: [N]; scale: [1].  Weights sigmoid(scale * fn(norm(flat)) + base) + eps.
    (The model's final RMSNorm comes after, outside this function.)

    Example:
        >>> hyper_head(torch.tensor([[[[2.0], [4.0]]]]), torch.zeros(2, 2), torch.zeros(2),
        ...            torch.ones(1), 0.0, 1e-6)
        tensor([[[3.]]])
    """
    pre = torch.sigmoid(_normalised_flat(streams, norm_eps) @ fn.float().T * scale.float() + base.float()) + hc_eps
    return collapse_streams(streams, pre)
