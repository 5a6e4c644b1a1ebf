"""What the rest of the engine uses of a target decoder, whatever its family.

The Llama family (:class:`dspark.models.llama.Transformer`), Gemma 4
(:class:`dspark.models.gemma.Gemma4Transformer`) and DeepSeek-V4
(:class:`dspark.models.deepseek_v4.DeepseekV4Transformer`) are separate classes with one
interface: the runner builds their cache and runs their varlen steps, tensor parallelism sets
their collectives, and the drafters that reuse the target read its embedding and LM head.  That
interface is :class:`TargetModel`; :class:`TargetCache` is what a model's cache shares (slot
bookkeeping), whichever layout holds the keys and values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from dspark.models.config import ModelArgs
    from dspark.models.kv_cache import VarlenBatch
    from dspark.models.llama import ForwardOutput, Numerics, TPHooks


@runtime_checkable
class TargetCache(Protocol):
    """Per-request state of a target: a slot per request, its valid length, rollback by length."""

    n_slots: int
    max_seq: int
    lengths: list[int]

    def allocate(self) -> int: ...

    def free(self, slot: int) -> None: ...

    def truncate(self, slot: int, length: int) -> None: ...


@runtime_checkable
class TargetModel(Protocol):
    """A target decoder as the runner, tensor parallelism and the drafters use it."""

    args: "ModelArgs"  # the architecture record (vocabulary, layers, heads, feature width)
    num: "Numerics"  # how products and attention run (packed, compiled, row-invariant)
    tp: "TPHooks"  # collectives: identities on one device, set by tensor parallelism

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def make_cache(self, n_slots: int, max_seq: int) -> TargetCache:
        """The model's own per-request state for ``n_slots`` requests of up to ``max_seq`` tokens."""
        ...

    def enable_compile(self) -> None:
        """Run the step through ``torch.compile``; a model that cannot refuses with ValueError."""
        ...

    def forward(
        self,
        tokens: torch.Tensor,
        cache: TargetCache,
        batch: "VarlenBatch",
        logits_index: torch.Tensor | None = None,
        feature_layers: tuple[int, ...] = (),
        n_layers: int | None = None,
        return_hidden: bool = False,
    ) -> "ForwardOutput":
        """One varlen step: tokens [T] in the batch's request order; logits of the rows in
        ``logits_index`` (None: all); the outputs of ``feature_layers`` (the drafters' features,
        ``args.feature_width`` wide each); ``n_layers``: early exit (refused where unsupported)."""
        ...
