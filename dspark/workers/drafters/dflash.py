"""The ``dflash`` drafter: DFlash checkpoints, the block drafter without Markov and confidence heads.

DFlash (Chen et al., 2026) drafts a block in one non-causal pass over [anchor, mask, ..., mask]
with target features injected as keys/values: the DSpark backbone alone.  DeepSpec publishes
its DFlash drafters as its DSpark model with ``markov_rank 0`` and ``enable_confidence_head
false`` (same ``config.json`` fields and weight names otherwise); speculators' are
``speculators_model_type "dflash"`` (or ``"dspark"`` with both heads off).  This drafter reads
such a folder into a :class:`DSparkHead` and drafts with :class:`DSparkDrafter`'s machinery, so
each draft x_k is sampled independently from softmax(U_k / T) (top-``proposal_top_k``
truncated, renormalised; greedy: argmax, one-hot q), as DeepSpec's evaluator does without a
Markov head.

Confidences: the checkpoint has no confidence head, and DeepSpec's own evaluation verifies
every block whole.  Our verifier's budget needs a per-position acceptance estimate, so the
drafter keeps the online estimate the n-gram drafter uses (``OnlineConfidence``: per request and
block position, accepted / tried under a Beta prior of mean ``PRIOR_ACCEPT``), updated from what
verification kept.  A constant would tell an adaptive budget that every position survives equally
(it does not: acceptance decays along a DFlash block); the estimate follows the request.  With
the default fixed budget the blocks are verified whole, as in DeepSpec.

A DSpark checkpoint is refused by name (``markov_rank``, ``enable_confidence_head``): serve it with
``--draft dspark`` (``markov=0`` there is the DFlash-style ablation of a DSpark head).

Options: head=PATH (a DFlash folder, required), proposal_top_k=8, grammar_mask=1 (as ``dspark``).
"""

from __future__ import annotations

import torch

from dspark.workers.drafters.base import OnlineConfidence, count_accepted, proposal_top_k
from dspark.workers.drafters.dspark import DSparkDrafter, load_drafter_head, read_drafter_head_config
from dspark.workers.drafters.registry import DrafterKind, DraftOption, flag, proposal_top_k_option, text
from dspark.workers.request import Sequence

PRIOR_ACCEPT = 0.5  # prior mean of each position's acceptance (weight 2 blocks), as the n-gram drafter's


class DFlashDrafter(DSparkDrafter):
    """DSpark's block drafting without the Markov bias, confidences from the online estimate."""

    name = "dflash"

    def __init__(self, head, n_slots: int, max_seq: int, proposal_top_k: int = 8, grammar_mask: bool = True) -> None:
        if head.cfg.markov_rank:
            raise ValueError(f"dflash drafter: the head has markov_rank {head.cfg.markov_rank}; use --draft dspark")
        super().__init__(head, n_slots, max_seq, proposal_top_k, markov=False, calibrated=False, trace=False,
                         grammar_mask=grammar_mask)
        self.conf = OnlineConfidence(prior_accept=PRIOR_ACCEPT)

    def block_confidences(self, batch: list[Sequence], h: torch.Tensor, anchors: torch.Tensor,
                          tokens: list[list[int]], G: int,
                          drafted: torch.Tensor | None = None) -> tuple[list[list[float]], list[list[float]]]:
        confs = [self.conf.confidences(s.request_id, len(t)) for s, t in zip(batch, tokens)]
        return confs, [[] for _ in batch]

    def observe(self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None,
                num_verified: int | None = None) -> None:
        pending = self._pending.get(seq.request_id)
        if pending is not None and num_verified is not None:  # a verified block: what it kept is evidence
            self.conf.update(seq.request_id, num_verified, count_accepted(pending[0], token_ids))
        super().observe(seq, token_ids, features, num_verified)

    def release(self, request_id: str) -> None:
        self.conf.release(request_id)
        super().release(request_id)


def make_dflash_drafter(loaded, opts: dict, spec) -> DFlashDrafter:
    """Build the drafter for ``loaded`` (the target) from ``opts``; ``spec.runner`` sizes its cache."""
    top_k = proposal_top_k(opts)
    if not opts.get("head"):
        raise ValueError("drafter dflash needs --draft-option head=PATH (a DFlash checkpoint folder)")
    head = load_drafter_head(opts["head"], loaded, dflash=True)
    head.pack_for_inference()
    return DFlashDrafter(head, n_slots=spec.runner.n_slots, max_seq=spec.runner.max_seq, proposal_top_k=top_k,
                         grammar_mask=flag(opts.get("grammar_mask", True)))


def _feature_layers(opts: dict, target_name: str) -> tuple[int, ...]:
    if not opts.get("head"):
        raise ValueError("drafter dflash needs --draft-option head=PATH (a DFlash checkpoint folder)")
    return tuple(read_drafter_head_config(opts["head"], dflash=True).feature_layers)


KIND = DrafterKind(
    name="dflash",
    doc="DFlash checkpoints (DeepSpec's or speculators'): block drafting from target features, no Markov head",
    build=lambda ctx, o: make_dflash_drafter(ctx.loaded, o, ctx),
    options=(
        DraftOption("head", text, None, "DFlash checkpoint folder (DeepSpec's or speculators' format)"),
        proposal_top_k_option(),
        DraftOption("grammar_mask", flag, True, "0: under a grammar, draft unconstrained instead of drawing drafts "
                    "among the allowed tokens"),
    ),
    remote=True,
    needs_weights=True,
    feature_layers=_feature_layers,
)


__all__ = ["DFlashDrafter", "PRIOR_ACCEPT", "make_dflash_drafter"]
