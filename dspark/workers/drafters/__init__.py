"""Drafters: one protocol (``base.Drafter``), one module per method."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dspark.workers.drafters.base import DraftBlock, Drafter, proposal_top_k

if TYPE_CHECKING:
    from dspark.models.loader import LoadedModel
    from dspark.workers.factory import EngineSpec


def make_drafter(kind: str, loaded: "LoadedModel", target_runner, spec: "EngineSpec") -> Drafter:
    """Build the drafter ``kind`` for a target (options come from ``spec.draft_options``)."""
    opts = dict(spec.draft_options)
    if kind == "ngram":
        from dspark.workers.drafters.ngram import NgramDrafter

        return NgramDrafter(max_ngram=int(opts.get("max_ngram", 4)), min_ngram=int(opts.get("min_ngram", 1)))
    if kind == "layerskip":
        from dspark.workers.drafters.autoregressive import LayerSkipDrafter

        n_layers = int(opts.get("layers", max(1, loaded.args.n_layers // 2)))
        return LayerSkipDrafter(target_runner, n_layers, proposal_top_k=proposal_top_k(opts))
    if kind == "draft_model":
        from dspark.models.loader import load_model
        from dspark.workers.drafters.autoregressive import DraftModelDrafter
        from dspark.workers.runner import LocalRunner

        path = opts.get("draft_model") or spec.model
        draft = load_model(path, dtype=spec.dtype, device=target_runner.device, progress=False)
        if draft.tokenizer.vocab_size != loaded.tokenizer.vocab_size:
            raise ValueError("the draft model must share the target's tokenizer")
        n_layers = opts.get("draft_layers")
        if n_layers:  # a smaller independent model: keep only the first layers
            draft.model.layers = draft.model.layers[: int(n_layers)]
        return DraftModelDrafter(LocalRunner(draft.model, spec.runner), proposal_top_k=proposal_top_k(opts))
    if kind == "dspark":
        from dspark.workers.drafters.dspark import make_dspark_drafter

        return make_dspark_drafter(loaded, opts, spec)
    raise ValueError(f"unknown drafter {kind!r}")


__all__ = ["DraftBlock", "Drafter", "make_drafter"]
