"""CPU fast path: bf16 linear layers with weights pre-packed for oneDNN.

On x86 CPUs with AVX512-BF16, ``torch.nn.functional.linear`` on bf16 re-lays out the weight on
every call; packing it once into oneDNN's blocked format halves the time of the small GEMMs
that dominate decoding (measured here: 576x3072 at batch 1, 298 -> 192 us; the 49152-row LM
head, 6.2 -> 3.4 ms) and gives bit-identical results.  Applied after tensor parallelism, only on
CPU and only in bf16; everywhere else the model runs unchanged.  Products of one or two rows run
as three rows (:data:`MIN_ROWS`), so they take the kernel of the larger products.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available():
        return False
    try:  # the op exists but the CPU may lack bf16 support
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), None)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), w, None, "none", [], "")
        return True
    except Exception:
        return False


class PackedLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` whose weight is frozen and packed for oneDNN."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, None), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach()
        # Kept only where other code reads the matrix (the LM head shared with drafters).
        self.weight = w if keep_weight else None

    @classmethod
    def of_matrix(cls, weight: torch.Tensor) -> "PackedLinear":
        """A bias-free packed product by ``weight`` [out, in] that no ``nn.Linear`` holds (e.g.
        some rows of another layer's matrix)."""
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        return cls(linear)

    def forward(self, x: torch.Tensor, row_block: int = 0) -> torch.Tensor:
        """``row_block`` > 0: products of at most that many rows (see :func:`packed_product`)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if torch.compiler.is_compiling():  # an opaque op for inductor (dspark/models/compiled.py)
            y = torch.ops.dspark.packed_linear(x2, self.packed, self.bias, self.out_features, row_block)
        else:
            y = packed_product(x2, self.packed, self.bias, row_block)
        return y.reshape(*shape[:-1], self.out_features)


# Products of one or two rows run as three (the extra rows repeat the last one and are dropped).
# Measured on bf16 oneDNN with AMX over 30 layers' distinct weights (memory-bound, as a decode
# step is): one thread 17.1 / 18.8 ms at 1 / 2 rows against 15.8 at 3; two threads 13.2 / 13.6
# against 12.2.  Rows of 2..32 round alike there (see ``dspark.models.llama.Numerics``), so the
# deterministic mode's two-row products keep their bits.
MIN_ROWS = 3


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, row_block: int = 0) -> torch.Tensor:
    """x [M, in] times a packed weight; with ``row_block`` > 0, in products of at most that
    many rows, so each row's bits do not depend on M (the deterministic mode; see
    ``dspark.models.llama.Numerics``)."""
    if row_block and x.shape[0] > row_block:
        return torch.cat([packed_product(c, packed, bias) for c in x.split(row_block)])
    m = x.shape[0]
    if 0 < m < MIN_ROWS:  # oneDNN's kernel for one or two rows reads the weights slower (see MIN_ROWS)
        x = torch.cat((x, x[-1:].expand(MIN_ROWS - m, -1)))
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")[:m]
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_linears(model: nn.Module, keep_weight: frozenset[str] = frozenset({"output"})) -> int:
    """Replace every ``nn.Linear`` of ``model`` in place; returns how many were packed.
    Layers named in ``keep_weight`` keep their matrix readable (``.weight``) for other code."""
    first = next(model.parameters(), None)
    if first is None or not packing_supported(first.device, first.dtype):
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, keep_weight=name in keep_weight))
                count += 1
    return count


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim``; a
    no-op elsewhere).  Packing frees every original weight, but at a few MB each they came from
    the heap, whose free pages glibc keeps: 200 MB of the default model's resident memory until
    this is called once after packing."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library (musl): nothing to trim
        pass
