"""The DSpark training objective (paper, section 3.3), as pure functions of tensors.

    L = a_ce * CE + a_l1 * ||p_d - p_t||_1 + a_conf * BCE(c, 1 - TV(p_d, p_t)),

each term averaged over block positions with weights w_k = exp(-k / decay) (k 0-based), which
favour early positions: they matter most under prefix verification.  p_d is the drafter's *final*
distribution at position k (base logits + Markov bias given the true previous token: teacher
forcing); the confidence label 1 - TV is the probability that a token sampled from p_d survives
verification against p_t (Leviathan et al.), and is not differentiated through.

Draft vocabulary (a head trained over N ids S of the target's V): p_d lives on S, and the terms
change as follows.  The L1 target is p_t restricted to S and renormalised, p_S = p_t 1_S / p_t(S).
Why: the acceptance probability of any q on S is sum_{v in S} min(q_v, p_t(v)) <= p_t(S), and p_S
attains that bound, so p_S is an acceptance-optimal proposal on S (and keeps the greedy argmax when
the target's argmax is in S).  The L1 distance to the unrestricted p_t is 2 (1 - acceptance): it
has the same optimum value but a whole face of minimisers (any q >= p_t on S) and carries the
constant 1 - p_t(S) that no parameter can move; the distance to p_S is zero exactly at p_S and
keeps the L1 scale of the full-vocabulary head.  The confidence label stays the *real* survival
probability, sum_{v in S} min(p_d(v), p_t(v)), since the confidence head must predict what
verification against the full target does.  CE skips rows whose target token is outside S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspark.train.config import LossConfig


@dataclass
class LossParts:
    total: torch.Tensor  # scalar, differentiable
    ce: torch.Tensor  # weighted mean cross-entropy
    l1: torch.Tensor  # weighted mean ||p_d - p_t||_1
    conf: torch.Tensor  # weighted mean BCE of the confidence head
    accept: torch.Tensor  # [R] 1 - TV per row (detached): expected acceptance at temperature 1


def position_weights(positions: torch.Tensor, decay: float) -> torch.Tensor:
    """w_k = exp(-k / decay).  positions: [R] 0-based block positions -> [R] float32.

    Example:
        >>> position_weights(torch.tensor([0, 4]), 4.0)
        tensor([1.0000, 0.3679])
    """
    return torch.exp(-positions.float() / decay)


def confidence_target(draft_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """1 - TV(p_d, p_t) = sum_v min(p_d(v), p_t(v)), per row.  [R, V] x2 -> [R].

    Example:
        >>> confidence_target(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.7, 0.3]]))
        tensor([0.8000])
    """
    return 1.0 - 0.5 * (draft_probs - target_probs).abs().sum(-1)


def dspark_loss(
    draft_logits: torch.Tensor,
    conf_logits: torch.Tensor,
    target_probs: torch.Tensor,
    target_ids: torch.Tensor,
    positions: torch.Tensor,
    cfg: LossConfig = LossConfig(),
    target_mass: torch.Tensor | None = None,
) -> LossParts:
    """Loss over R valid block positions.

    draft_logits: [R, N] final draft logits (Markov bias included); conf_logits: [R] (c = sigmoid);
    target_probs: [R, N] target distribution at the same positions; target_ids: [R] the token the
    target actually produced there (self-distillation label); positions: [R] k within the block.
    Draft vocabulary (N < V): ``target_probs`` is p_S (restricted to the drafted ids and
    renormalised), ``target_mass`` [R] is p_t(S), and ``target_ids`` holds draft indices, -1 for a
    token outside S (see the module docstring).  Without ``target_mass``, N = V.
    """
    w = position_weights(positions, cfg.decay)  # [R]
    wsum = w.sum().clamp_min(1e-8)
    logp = torch.log_softmax(draft_logits.float(), dim=-1)  # [R, N]
    p = logp.exp()
    l1 = (p - target_probs).abs().sum(-1)  # [R] = 2 TV (to p_S with a draft vocabulary)
    if target_mass is None:
        ce = -logp.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # [R]
        accept = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)
        ce_m = (w * ce).sum() / wsum
    else:
        inside = target_ids >= 0  # [R]
        ce = -logp.gather(-1, target_ids.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        w_ce = w * inside
        ce_m = (w_ce * ce).sum() / w_ce.sum().clamp_min(1e-8)
        # Real survival against the full target: sum over S of min(p_d, p_t) = min(p_d, p_S p_t(S)).
        accept = torch.minimum(p, target_probs * target_mass.unsqueeze(-1)).sum(-1).detach().clamp(0.0, 1.0)
    bce = F.binary_cross_entropy_with_logits(conf_logits.float(), accept, reduction="none")  # [R]
    l1_m, conf_m = (w * l1).sum() / wsum, (w * bce).sum() / wsum
    total = cfg.ce_weight * ce_m + cfg.l1_weight * l1_m + cfg.conf_weight * conf_m
    return LossParts(total=total, ce=ce_m.detach(), l1=l1_m.detach(), conf=conf_m.detach(), accept=accept)


__all__ = ["LossParts", "dspark_loss", "confidence_target", "position_weights"]
