"""The DSpark training objective (paper, section 3.3), as pure functions of tensors.

    L = a_ce * CE + a_l1 * ||p_d - p_t||_1 + a_conf * BCE(c, 1 - TV(p_d, p_t)),

each term averaged over block positions with weights w_k = exp(-k / decay) (k 0-based), which
favour early positions: they matter most under prefix verification.  p_d is the drafter's *final*
distribution at position k (base logits + Markov bias given the true previous token: teacher
forcing); the confidence label 1 - TV is the probability that a token sampled from p_d survives
verification against p_t (Leviathan et al.), and is not differentiated through.
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
) -> LossParts:
    """Loss over R valid block positions.

    draft_logits: [R, V] final draft logits (Markov bias included); conf_logits: [R] (c = sigmoid);
    target_probs: [R, V] target distribution at the same positions; target_ids: [R] the token the
    target actually produced there (self-distillation label); positions: [R] k within the block.
    """
    w = position_weights(positions, cfg.decay)  # [R]
    wsum = w.sum().clamp_min(1e-8)
    logp = torch.log_softmax(draft_logits.float(), dim=-1)  # [R, V]
    p = logp.exp()
    ce = -logp.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # [R]
    l1 = (p - target_probs).abs().sum(-1)  # [R] = 2 TV
    accept = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)
    bce = F.binary_cross_entropy_with_logits(conf_logits.float(), accept, reduction="none")  # [R]
    ce_m, l1_m, conf_m = (w * ce).sum() / wsum, (w * l1).sum() / wsum, (w * bce).sum() / wsum
    total = cfg.ce_weight * ce_m + cfg.l1_weight * l1_m + cfg.conf_weight * conf_m
    return LossParts(total=total, ce=ce_m.detach(), l1=l1_m.detach(), conf=conf_m.detach(), accept=accept)


__all__ = ["LossParts", "dspark_loss", "confidence_target", "position_weights"]
