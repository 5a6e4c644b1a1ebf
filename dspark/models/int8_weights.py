"""CPU drafting with 8-bit weights: a linear layer whose matrix is held as int8, one scale per row.

A drafter's products are small (a block of 4-8 rows) and it runs right after the target's step
has pushed its weights out of the CPU caches, so on a CPU each draft is mostly the time to read
its weights from memory.  Holding them in int8 halves those bytes against bf16.  Measured on the
default model's DSpark head (its 2 draft layers and 8,192 drafted LM-head rows in int8), one
thread, in the compiled engine: a hybrid drafter's ``propose`` 3.06 against 4.08 ms packed in bf16.

The product is torch's dynamic int8 linear (fbgemm / x86 backends): the weight is quantised once,
symmetric per output row; each call quantises one request's input rows to 8 bits with one range
taken from them (a batch of requests is one call per request, so a request's drafts never depend
on its batch), multiplies in integers and rescales to float32.  A draft's logits therefore move a little
from the bf16 head's; verification does not depend on them (the proposal q reported is the one
the drafts were drawn from), so output stays exactly the target's.  What it does to acceptance
is measured in docs/DRAFTER.md.

Only for frozen serving weights on a CPU whose torch has the quantized engine; elsewhere
:func:`int8_supported` is False and callers keep their float layers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

_SUPPORTED: bool | None = None
_FULL_RANGE: bool | None = None


def int8_supported(device: torch.device) -> bool:
    """Whether int8 products run here (a CPU with torch's fbgemm or x86 quantized engine)."""
    global _SUPPORTED
    if device.type != "cpu":
        return False
    if _SUPPORTED is None:
        try:
            probe = Int8Linear.of_matrix(torch.eye(8))
            _SUPPORTED = bool(torch.allclose(probe(torch.eye(8)), torch.eye(8), atol=0.05))
        except Exception:  # no quantized engine in this build, or the ops are gone
            _SUPPORTED = False
    return _SUPPORTED


def full_range_inputs() -> bool:
    """Whether inputs may be quantised to the full 8 bits.  Without VNNI, fbgemm adds pairs of
    8-bit products in 16 bits, which saturate at full range; torch's default there is to quantise
    inputs to 7 bits.  Tried once: inputs and weights at their largest codes, whose pair sums
    (2 x 255 x 127) saturate where that happens."""
    global _FULL_RANGE
    if _FULL_RANGE is None:
        _FULL_RANGE = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ones = torch.quantize_per_channel(torch.ones(8, 64), torch.ones(8, dtype=torch.double) / 127,
                                                  torch.zeros(8, dtype=torch.long), 0, torch.qint8)
                params = torch.ops.quantized.linear_prepack(ones, None)
            y = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), params, False)
            _FULL_RANGE = bool(torch.allclose(y, torch.full_like(y, 64.0), rtol=0.02))
        except Exception:
            pass
    return _FULL_RANGE


class Int8Linear(nn.Module):
    """A bias-free product by a frozen matrix [out, in] held in int8 (symmetric, a scale per row).

    Input: [..., in] in any float dtype; output: [..., out] in the input's dtype.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float().cpu()
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # [out]
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # the quantized tensor constructors warn about their future
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
            self._params = torch.ops.quantized.linear_prepack(qweight, None)
        self._reduce_range = not full_range_inputs()

    @classmethod
    def of_matrix(cls, weight: torch.Tensor) -> "Int8Linear":
        return cls(weight)

    @classmethod
    def of_linear(cls, linear: nn.Module) -> "Int8Linear":
        """From an ``nn.Linear`` without bias."""
        if getattr(linear, "bias", None) is not None:
            raise ValueError("Int8Linear is bias-free")
        return cls(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., rows, in] -> [..., rows, out].  Each [rows, in] slice (one request's block,
        or its context tokens) is quantised with a range of its own, so a request's products do
        not depend on which other requests share the batch: a seeded request drafts, and so
        samples, the same tokens alone or batched."""
        shape = x.shape
        rows = x.reshape(-1, shape[-2] if x.dim() > 1 else 1, shape[-1]).float()  # [groups, rows, in]
        outs = [torch.ops.quantized.linear_dynamic(g, self._params, self._reduce_range) for g in rows]
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


__all__ = ["Int8Linear", "int8_supported"]
