"""DeepSeek-V4 mixture-of-experts routing and experts, as pure tensor functions.

Per token, router logits [E] are turned into scores (:func:`router_scores`; V4 uses
sqrt(softplus(x))), the experts are chosen either by top-k of score + a per-expert correction
bias (:func:`route_topk`) or, in the first hash-routed layers, by a fixed token-id -> experts
table (:func:`route_hash`).  The chosen scores are renormalised to sum to one and multiplied
by the routed scaling factor.  Each expert is a SwiGLU whose gate is clipped from above and
whose up projection is clipped on both sides (:func:`clipped_swiglu`); :func:`moe_experts`
sums the weighted experts and :func:`swiglu_mlp` is the always-on shared expert.

T tokens, E experts, k experts per token, D hidden, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["clipped_swiglu", "moe_experts", "route_hash", "route_topk", "router_scores", "swiglu_mlp"]

# Added to the sum of the selected scores, so a token whose scores all underflow stays finite.
_NORM_FLOOR = 1e-20


def router_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Expert scores from router logits [T, E]: sqrtsoftplus, softmax (over E) or sigmoid.

    Example:
        >>> router_scores(torch.tensor([[0.0]]), "sqrtsoftplus")  # sqrt(log 2)
        tensor([[0.8326]])
    """
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"scoring_func {scoring_func!r} is not supported (sqrtsoftplus, softmax or sigmoid)")


def _normalised(scores: torch.Tensor, experts: torch.Tensor, routed_scaling_factor: float) -> torch.Tensor:
    w = scores.gather(-1, experts)  # [T, k]
    return w / (w.sum(dim=-1, keepdim=True) + _NORM_FLOOR) * routed_scaling_factor


def route_topk(
    scores: torch.Tensor, correction_bias: torch.Tensor, top_k: int, routed_scaling_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], experts [T, k] int64) by top-k of scores + correction_bias.

    scores: [T, E]; correction_bias: [E] steers *which* experts win (load balancing) but the
    weights come from the unbiased scores, renormalised over the k and scaled.  Experts are in
    descending order of biased score.

    Example:
        >>> w, e = route_topk(torch.tensor([[0.1, 0.3, 0.2]]), torch.tensor([0.0, 0.0, 0.5]), 2, 1.0)
        >>> e, w
        (tensor([[2, 1]]), tensor([[0.4000, 0.6000]]))
    """
    experts = torch.topk(scores + correction_bias, top_k, dim=-1).indices  # [T, k]
    return _normalised(scores, experts, routed_scaling_factor), experts


def route_hash(
    scores: torch.Tensor, token_ids: torch.Tensor, tid2eid: torch.Tensor, routed_scaling_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], experts [T, k] int64) with experts looked up by token id.

    scores: [T, E]; token_ids: [T]; tid2eid: [vocab, k] fixed table from the checkpoint.  Only
    the choice is static; the weights are the chosen scores, renormalised and scaled.

    Example:
        >>> w, e = route_hash(torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([1]),
        ...                   torch.tensor([[0, 1], [1, 2]]), 2.0)
        >>> e, w
        (tensor([[1, 2]]), tensor([[1.3333, 0.6667]]))
    """
    experts = tid2eid[token_ids].long()  # [T, k]
    return _normalised(scores, experts, routed_scaling_factor), experts


def clipped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit): V4's bounded expert activation.

    Example:
        >>> clipped_swiglu(torch.tensor([20.0]), torch.tensor([-30.0]), 10.0)
        tensor([-99.9955])
    """
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def swiglu_mlp(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, limit: float
) -> torch.Tensor:
    """One clipped SwiGLU (the shared expert): x [T, D] -> [T, D].

    w_gate, w_up: [I, D]; w_down: [D, I].

    Example:
        >>> swiglu_mlp(torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1), 10.0)
        tensor([[0.7311]])
    """
    return clipped_swiglu(x @ w_gate.T, x @ w_up.T, limit) @ w_down.T


def moe_experts(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    limit: float,
    first_expert: int = 0,
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for each token: [T, D].

    x: [T, D]; experts, weights: [T, k]; w_gate_up: [E', 2I, D] (gate rows then up rows);
    w_down: [E', D, I], the weights of experts ``first_expert .. first_expert + E' - 1``.  A
    choice of any other expert adds nothing here: under expert parallelism each rank holds a
    contiguous range of experts, computes their share and an all-reduce sums the ranks.  The
    weighted sum accumulates in fp32 and is rounded to x's dtype once.  Loops over the experts
    that received tokens (a reference, not a grouped GEMM).

    Example:
        >>> gu = torch.ones(2, 2, 1); down = torch.ones(2, 1, 1) * torch.tensor([1.0, 2.0]).view(2, 1, 1)
        >>> moe_experts(torch.ones(1, 1), torch.tensor([[1]]), torch.tensor([[0.5]]), gu, down, 10.0)
        tensor([[0.7311]])
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
    held = range(first_expert, first_expert + w_gate_up.shape[0])
    for e in experts.unique().tolist():
        if e not in held:  # another rank's expert
            continue
        token, slot = (experts == e).nonzero(as_tuple=True)  # tokens routed to e, and where
        gate, up = (x[token] @ w_gate_up[e - first_expert].T).chunk(2, dim=-1)  # [t, I] each
        y = clipped_swiglu(gate, up, limit) @ w_down[e - first_expert].T  # [t, D]
        out.index_add_(0, token, y.float() * weights[token, slot].float().unsqueeze(-1))
    return out.to(x.dtype)
