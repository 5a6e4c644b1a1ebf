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

On a CPU with AMX tiles (``amx_int8`` and our kernel built: ``dspark.kernels.native``) the
product is our kernel's instead (``torch.ops.dspark_q4.i8_amx_mm``, ``q4_amx.cpp``): the same
int8 weights, each input row quantised to 8 bits on its own (unsigned codes over the row's own
range, as fbgemm quantises a whole call), the products summed exactly in int32 by the tile
unit.  A row's result then does not depend on the rows beside it, so a batch of requests is one
call (``row_invariant``).  Measured interleaved at one thread on the default model's DSpark
head's matrices: 0.48-0.63x fbgemm's time for one block of 7 rows, 0.17-0.22x for sixteen
requests' blocks, where fbgemm takes one call per request.
``$DSPARK_INT8_KERNEL`` (``amx`` | ``fbgemm``) picks one; benchmarks compare both.

Only for frozen serving weights on a CPU whose torch has the quantized engine; elsewhere
:func:`int8_supported` is False and callers keep their float layers.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

_SUPPORTED: bool | None = None
_FULL_RANGE: bool | None = None
KERNEL_ENV = "DSPARK_INT8_KERNEL"  # amx | fbgemm: which kernel multiplies the int8 layers


def int8_kernel() -> str:
    """``amx`` (ours) where the CPU has AMX int8 tiles and the kernel runs here, else ``fbgemm``
    (torch's); ``$DSPARK_INT8_KERNEL`` picks one, and asking for ``amx`` where it cannot run is a
    ValueError."""
    from dspark.kernels.native import amx_int8_usable

    want = os.environ.get(KERNEL_ENV, "").strip().lower()
    if want not in ("", "amx", "fbgemm"):
        raise ValueError(f"${KERNEL_ENV}={want!r}: expected amx or fbgemm")
    if want == "fbgemm":
        return "fbgemm"
    if amx_int8_usable():
        return "amx"
    if want == "amx":
        raise ValueError(f"${KERNEL_ENV}=amx: this CPU has no AMX int8 tiles, or the kernel does not run here")
    return "fbgemm"


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


def int8_refusal() -> str | None:
    """Why ``$DSPARK_INT8_KERNEL`` cannot be served here (None: it can), for the commands to
    refuse in one line before anything starts."""
    try:
        int8_kernel()
    except ValueError as e:
        return str(e)
    return None


class Int8Linear(nn.Module):
    """A bias-free product by a frozen matrix [out, in] held in int8 (symmetric, a scale per row).

    Input: [..., in] in any float dtype; output: [..., out] in the input's dtype.
    ``row_invariant``: each row of the input is multiplied on its own (our AMX kernel), so
    callers may put several requests' rows in one call.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float().cpu()
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # [out]
        self.kernel = int8_kernel()
        if self.kernel == "amx" and (self.in_features % 64 or self.out_features % 16):
            self.kernel = "fbgemm"  # the tiles take 64 inputs and 16 outputs at a time
        self.row_invariant = self.kernel == "amx"
        if self.row_invariant:
            codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self._packed = torch.ops.dspark_q4.i8_amx_pack(codes)
            self._scale = scale.float().contiguous()
            self._wsum = codes.sum(dim=1, dtype=torch.int32).float()  # exact: |sum| <= 127 * in
            return
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
        if self.row_invariant:
            flat = x.reshape(-1, shape[-1])
            if flat.dtype not in (torch.bfloat16, torch.float32):
                flat = flat.float()
            y = torch.ops.dspark_q4.i8_amx_mm(flat.contiguous(), self._packed, self._scale, self._wsum)
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        rows = x.reshape(-1, shape[-2] if x.dim() > 1 else 1, shape[-1]).float()  # [groups, rows, in]
        outs = [torch.ops.quantized.linear_dynamic(g, self._params, self._reduce_range) for g in rows]
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class BlockInt8Linear(nn.Module):
    """A bias-free product by a frozen matrix [out, in] held as 8-bit codes in blocks of 32 inputs
    with an fp16 scale each (the GGUF ``Q8_0`` layout), multiplied by our AMX kernel with the
    input as it is, in bf16 (``dspark.models.q4.Q8Head``): for a layer whose input has a few very
    large features, which quantising the input to 8 bits would crush (a drafter's context
    projection).  Row-invariant, like the AMX ``Int8Linear``.  ``weight`` stays, for the layer's
    dtype and device.

    Only where :func:`int8_kernel` is ``amx`` and the shape suits the kernel (``fits``)."""

    row_invariant = True

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        from dspark.models.q4 import Q8Head

        if getattr(linear, "bias", None) is not None:
            raise ValueError("BlockInt8Linear is bias-free")
        self.weight = linear.weight
        w = linear.weight.detach().float().cpu()
        self.out_features, self.in_features = w.shape
        blocks = w.view(self.out_features, -1, 32)
        d = (blocks.abs().amax(-1) / 127.0).half()  # [out, in / 32], as the file format stores it
        d = torch.where(d > 0, d, torch.ones_like(d))
        codes = torch.round(blocks / d.float()[..., None]).clamp(-127, 127).to(torch.int8).view(w.shape)
        self._q8 = Q8Head(codes, d)

    @staticmethod
    def fits(linear: nn.Module) -> bool:
        out, inp = linear.weight.shape
        return int8_kernel() == "amx" and getattr(linear, "bias", None) is None and inp % 32 == 0 and out % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._q8(x.to(torch.bfloat16)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 8-bit blocks of 32, amx kernel"


__all__ = ["BlockInt8Linear", "Int8Linear", "int8_kernel", "int8_refusal", "int8_supported"]
