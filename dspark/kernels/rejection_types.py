"""The rejection sampler's contract: its inputs, its output and the placeholder id.

Both backends import this module, the torch reference (``rejection.py``) and the Triton kernel
(``triton_rejection.py``), so neither imports the other; ``rejection.rejection_sample`` picks
one.  The terms (draft, accepted, recovered, bonus tokens) and the flat layout are defined in
``rejection.py``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PLACEHOLDER_TOKEN_ID", "RejectionInputs", "RejectionOutput"]

# Pads output_token_ids past each request's emitted tokens (vLLM's placeholder).
PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True, kw_only=True)
class RejectionInputs:
    """One verification step of B requests with N drafts in all (flat layout).

    draft_token_ids: [N] int64, all requests' drafts back to back.
    cu_num_draft_tokens: [B] int64, inclusive cumsum of draft counts (a count may be 0).
    draft_probs / draft_prob_ids: the proposal q each draft was sampled from, one of
        dense ``[N, V]`` and None; sparse values ``[N, K]`` and ids ``[N, K]`` int64 (ids distinct
        except padding, which has prob 0); None and None = one-hot on the draft (n-gram).
    target_probs: [N + B, V] float32 from ``logits_to_probs``; per request its n_r verify rows
        then its bonus row (greedy requests' rows are one-hot).
    is_greedy: [B] bool.
    uniforms: [N] float in [0, 1), one acceptance draw per draft.
    recovery_noise: [B, V] Exp(1) noise; the recovered/bonus token is argmax(w / noise) with w
        the residual or the bonus row (the exponential race of ``sample_from_probs``).

    Example (one greedy request, V = 3, one draft):
        >>> RejectionInputs(draft_token_ids=torch.tensor([2]), cu_num_draft_tokens=torch.tensor([1]),
        ...     draft_probs=None, draft_prob_ids=None, target_probs=torch.eye(3)[[2, 0]],
        ...     is_greedy=torch.tensor([True]), uniforms=torch.zeros(1),
        ...     recovery_noise=torch.ones(1, 3)).check()
    """

    draft_token_ids: torch.Tensor
    cu_num_draft_tokens: torch.Tensor
    draft_probs: torch.Tensor | None
    draft_prob_ids: torch.Tensor | None
    target_probs: torch.Tensor
    is_greedy: torch.Tensor
    uniforms: torch.Tensor
    recovery_noise: torch.Tensor

    def check(self) -> None:
        """Shape checks shared by both backends (no data-dependent checks: those would sync)."""
        n = self.draft_token_ids.shape[0]
        b = self.cu_num_draft_tokens.shape[0]
        target_probs, draft_probs, draft_prob_ids = self.target_probs, self.draft_probs, self.draft_prob_ids
        if target_probs.dim() != 2 or target_probs.shape[0] != n + b:
            raise ValueError(f"target_probs must be [N+B, V] = [{n + b}, V], got {tuple(target_probs.shape)}")
        v = target_probs.shape[1]
        if draft_prob_ids is not None:
            if draft_probs is None or draft_probs.shape != draft_prob_ids.shape or draft_probs.shape[0] != n:
                raise ValueError("sparse q needs draft_probs and draft_prob_ids both [N, K]")
        elif draft_probs is not None and tuple(draft_probs.shape) != (n, v):
            raise ValueError(f"dense draft_probs must be [N, V] = [{n}, {v}], got {tuple(draft_probs.shape)}")
        if tuple(self.is_greedy.shape) != (b,) or tuple(self.uniforms.shape) != (n,):
            raise ValueError("is_greedy must be [B] and uniforms [N]")
        if tuple(self.recovery_noise.shape) != (b, v):
            raise ValueError(f"recovery_noise must be [B, V] = [{b}, {v}], got {tuple(self.recovery_noise.shape)}")


@dataclass(frozen=True)
class RejectionOutput:
    """Result of one verification step for B requests.

    output_token_ids: [B, max_n + 1] int64, per row the accepted drafts, then one recovered or
        bonus token, then PLACEHOLDER_TOKEN_ID.
    num_accepted: [B] int64, accepted drafts per request (0..n_r).
    num_emitted: [B] int64, num_accepted + 1 (the acceptance length incl. the bonus/recovered).
    """

    output_token_ids: torch.Tensor
    num_accepted: torch.Tensor
    num_emitted: torch.Tensor
