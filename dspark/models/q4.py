"""The GGUF file's own 4-bit weights, multiplied as they are stored (``--weights q4``).

The default model ships as a GGUF file whose 210 layer matrices are ``Q4_1``: every row is cut
into blocks of 32 values, and value j of a block is ``d * q_j + m``, with a 4-bit code q_j and
two fp16 numbers d and m per block (``Q4_0``: ``d * (q_j - 8)``).  Those numbers *are* the
model: the dense path dequantizes them once at load and multiplies in bf16 (which also rounds
each value to 8 significant bits) or fp32.  This path keeps the codes, so that a step reads
about 5 bits per layer weight instead of 16, and expands them while it multiplies, with one of
two kernels, chosen once per process (:func:`q4_kernel`):

* ``amx`` (bf16 on a CPU with AMX tiles): ours, ``dspark/kernels/q4_amx.cpp``.  It expands
  each block once per product, for all of the product's rows, into exactly the bf16 values the
  dense path holds (``d * q + m`` is exact in fp32, then rounded once), and multiplies them on
  the tile unit, accumulating in fp32.  A product of 8 or 32 rows costs little more than one
  of 1 row, which is what a verification step and a batch need.
* ``int4`` (fp32, or a CPU without AMX): torch's ``aten._weight_int4pack_mm_for_cpu``, which
  expands each block again for every four rows.  It computes (q - 8) * scale + zero with one
  (scale, zero) per block in the activations' dtype: a ``Q4_1`` block is scale = d, zero =
  m + 8d; a ``Q4_0`` block is scale = d, zero = 0.  With fp32 activations both are exact (d and
  m are fp16; m + 8d is exact in fp32 unless the two differ by more than 2^13 in magnitude,
  which no block of the default file does), so the fp32 step multiplies by the file's values
  themselves; in bf16 they round to bf16.

With either kernel every row's result is independent of how many rows the product carries and
of the thread count (the order of accumulation per row is fixed), which the deterministic mode
needs and checks at start-up.  The embedding and LM head (``Q8_0`` in the default file) and
the norms stay dense, except that with the ``amx`` kernel the LM head is multiplied from the
file's ``Q8_0`` blocks by the same kernel (:class:`Q8Head`: value ``d * q``, exact in fp32,
rounded once to the bf16 value the dense head holds), which reads 1.06 bytes a weight instead
of 2 and whose rows, like the layers', do not depend on the rows beside them; a tied embedding
then reads its rows out of those blocks (one copy of the matrix).  CPU only, one rank (a
tensor-parallel cut of the codes is not built).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn

__all__ = ["GROUP", "KERNELS", "Q4_ROWS", "Q4Blocks", "Q4Linear", "Q8Head", "q4_blocks", "q4_kernel", "q4_supported",
           "q8_blocks"]

GROUP = 32  # values per block in Q4_0 / Q4_1
Q4_ROWS = 16  # the kernel's packing takes matrices of a multiple of this many rows
_BYTES = {"Q4_0": 18, "Q4_1": 20}  # bytes per block: fp16 d (and fp16 m), then 16 bytes of codes


def q4_supported() -> bool:
    """Whether this torch has the int4 CPU kernel and its weight packing."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class Q4Blocks:
    """One matrix's 4-bit blocks: codes [out, in] in 0..15 (uint8 here: a byte a value while
    loading, not the int32 the packing takes, which for every layer at once would be 424 MB of
    the default model's load), scale and zero [out, in/32] float32, value = (code - 8) * scale
    + zero."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        out, inp = codes.shape
        if inp % GROUP or scale.shape != (out, inp // GROUP) or zero.shape != scale.shape:
            raise ValueError(f"4-bit blocks of shape {tuple(codes.shape)} with scales {tuple(scale.shape)}")
        self.codes, self.scale, self.zero = codes, scale, zero

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dense(self) -> torch.Tensor:
        """The matrix's values in float32, [out, in] (what the dense path multiplies by)."""
        out, inp = self.codes.shape
        q = (self.codes.float() - 8).view(out, inp // GROUP, GROUP)
        return (q * self.scale.unsqueeze(-1) + self.zero.unsqueeze(-1)).view(out, inp)

    def rows(self, index: torch.Tensor) -> "Q4Blocks":
        """The blocks of rows ``index`` (in that order)."""
        return Q4Blocks(self.codes[index], self.scale[index], self.zero[index])

    @staticmethod
    def cat(parts: list["Q4Blocks"]) -> "Q4Blocks":
        """Matrices stacked along the rows (the fused q | k | v and gate | up projections)."""
        return Q4Blocks(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero")))


def q4_blocks(raw: np.ndarray, kind: str) -> Q4Blocks:
    """The blocks of one GGUF tensor of type ``kind`` (``Q4_0`` or ``Q4_1``) from its raw bytes
    ([out, bytes per row] uint8, as the ``gguf`` package reads them).  ggml's layout per block:
    fp16 d, for ``Q4_1`` fp16 m, then 16 bytes whose low nibbles are values 0..15 and high
    nibbles values 16..31.

    Example (one row, one ``Q4_0`` block, d = 0.5, codes 0..15 then 15..0):
        >>> lo, hi = np.arange(16, dtype=np.uint8), np.arange(15, -1, -1, dtype=np.uint8)
        >>> raw = np.concatenate([np.array([0.5], np.float16).view(np.uint8), lo | (hi << 4)])[None]
        >>> b = q4_blocks(raw, "Q4_0")
        >>> b.dense()[0, [0, 8, 15, 16, 31]].tolist()
        [-4.0, 0.0, 3.5, 3.5, -4.0]
    """
    if kind not in _BYTES:
        raise ValueError(f"4-bit weights are read from Q4_0 / Q4_1 tensors, not {kind}")
    size = _BYTES[kind]
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % size:
        raise ValueError(f"{kind} data of shape {raw.shape} and type {raw.dtype}")
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_1":
        m, qs = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32), blocks[..., 4:]
        # (q - 8) d + m + 8d = q d + m.  The sum is exact in float32 unless m and 8d differ by more
        # than 2^13 in magnitude (fp16 has 11 significant bits, fp32 24): so for every block of the
        # default file (tests/models/test_q4.py checks all 210 matrices against gguf's values).
        zero = m + 8 * d
    else:
        qs, zero = blocks[..., 2:], np.zeros_like(d)
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(raw.shape[0], -1)
    return Q4Blocks(torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)), torch.from_numpy(d),
                    torch.from_numpy(zero))


def q8_blocks(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [out, in] int8, d [out, in / 32] fp16) of one GGUF ``Q8_0`` tensor from its raw
    bytes ([out, bytes per row] uint8): per block of 32 values, fp16 d then 32 int8 codes;
    value j is ``d * q_j``.

    Example (one row, one block, d = 0.5, codes -16..15):
        >>> raw = np.concatenate([np.array([0.5], np.float16).view(np.uint8),
        ...                       np.arange(-16, 16, dtype=np.int8).view(np.uint8)])[None]
        >>> codes, d = q8_blocks(raw)
        >>> (codes.float() * d.float())[0, [0, 16, 31]].tolist()
        [-8.0, 0.0, 7.5]
    """
    size = 2 + GROUP
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % size:
        raise ValueError(f"Q8_0 data of shape {raw.shape} and type {raw.dtype}")
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    codes = blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1)
    return torch.from_numpy(codes), torch.from_numpy(np.ascontiguousarray(d))


class Q8Head(nn.Module):
    """The LM head held as a GGUF file's ``Q8_0`` blocks and multiplied by our AMX kernel
    (``torch.ops.dspark_q4.amx_mm8``; bf16 activations, fp32 sums): each value expands to
    ``d * q`` rounded once to bf16, the value the dense head holds, so only the order of the fp32
    sums differs from the dense head, and that order does not depend on the rows beside a row.
    No dense matrix is kept: :meth:`rows` expands the rows other code reads (the drafters, and a
    tied embedding through ``packing.PackedEmbedding``) to those same bf16 values."""

    _BLOCK = 16 * GROUP + 2 * Q4_ROWS  # bytes per 16 outputs x 32 inputs: codes, then d[16] (q4_amx.cpp)

    def __init__(self, codes: torch.Tensor, d: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        packed = torch.ops.dspark_q4.amx_pack8(codes.contiguous(), d.half().contiguous())
        self.register_buffer("packed", packed, persistent=False)
        self.weight = None  # no dense matrix: read rows with rows() (packing.matrix_rows)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the head's matrix [*ids.shape, in] in bf16, read out of the packed blocks."""
        groups = self.in_features // GROUP
        blocks = self.packed.view(self.out_features // Q4_ROWS, groups, self._BLOCK)
        flat = ids.reshape(-1).to(device=self.packed.device, dtype=torch.long)
        sel = blocks[flat // Q4_ROWS]  # [R, groups, bytes]
        n = (flat % Q4_ROWS)[:, None, None]
        codes = sel.gather(2, (GROUP * n + torch.arange(GROUP, device=flat.device)).expand(-1, groups, -1))
        scale = sel.gather(2, (16 * GROUP + 2 * n + torch.arange(2, device=flat.device)).expand(-1, groups, -1))
        values = codes.view(torch.int8).float() * scale.contiguous().view(torch.float16).float()  # exact in fp32
        return values.bfloat16().reshape(*ids.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.dspark_q4.amx_mm8(x.reshape(-1, shape[-1]), self.packed, self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 8-bit blocks of {GROUP}, amx kernel"


KERNELS = ("amx", "int4")
KERNEL_ENV = "DSPARK_Q4_KERNEL"  # amx | int4: which kernel multiplies bf16 (benchmarks compare both)


def q4_kernel(dtype: torch.dtype) -> str:
    """The kernel this process multiplies 4-bit layers with in ``dtype``: ``amx`` (ours,
    :mod:`dspark.kernels.native`) for bf16 where the CPU has AMX tiles, else ``int4`` (torch's).
    ``$DSPARK_Q4_KERNEL`` picks one; asking for ``amx`` where it cannot run is a ValueError."""
    from dspark.kernels.native import amx_usable

    want = os.environ.get(KERNEL_ENV, "").strip().lower()
    if want and want not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={want!r}: choose one of {', '.join(KERNELS)}")
    if want == "int4":
        return "int4"
    usable = dtype == torch.bfloat16 and amx_usable()
    if want == "amx" and not usable:
        raise ValueError(f"{KERNEL_ENV}=amx needs bf16 and a CPU with AMX tiles")
    return "amx" if usable else "int4"


class Q4Linear(nn.Module):
    """A bias-optional linear layer whose matrix is held as 4-bit blocks; activations in
    ``dtype`` (bf16 or fp32), accumulated in fp32, by one of two kernels (:func:`q4_kernel`):

    * ``amx``: the blocks packed for our AMX kernel (``dspark/kernels/q4_amx.cpp``), which
      expands each block once per product, whatever the number of rows, into the bf16 values the
      dense path holds (``d * q + m`` rounded once), and multiplies them on the tile unit;
    * ``int4``: packed for torch's int4 kernel, which expands each block again for every four
      rows (scale and zero rounded to ``dtype``)."""

    def __init__(self, blocks: Q4Blocks, bias: torch.Tensor | None, dtype: torch.dtype,
                 kernel: str | None = None) -> None:
        super().__init__()
        if not q4_supported():
            raise ValueError("this torch has no int4 CPU kernel (aten._weight_int4pack_mm_for_cpu)")
        self.out_features, self.in_features = blocks.shape
        if self.out_features % Q4_ROWS:
            raise ValueError(f"the int4 kernel packs matrices of a multiple of {Q4_ROWS} rows, not {self.out_features}")
        self.kernel = kernel or q4_kernel(dtype)
        if self.kernel not in KERNELS:
            raise ValueError(f"4-bit kernel {self.kernel!r}: choose one of {', '.join(KERNELS)}")
        if self.kernel == "amx":
            from dspark.kernels.native import amx_usable

            if dtype != torch.bfloat16 or not amx_usable():
                raise ValueError("the 4-bit AMX kernel needs bf16 and a CPU with AMX tiles")
        minimum = blocks.zero - 8 * blocks.scale  # the file's m (Q4_1), -8d (Q4_0)
        if self.kernel == "amx" and torch.equal(minimum.half().float(), minimum):
            packed = torch.ops.dspark_q4.amx_pack(blocks.codes.to(torch.uint8).contiguous(), blocks.scale.half(),
                                                  minimum.half())
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales_zeros", torch.empty(0, dtype=dtype), persistent=False)
        else:
            # A block whose m + 8d was rounded (module docstring) cannot give back m: this layer
            # then uses torch's kernel, for every row alike.
            if self.kernel == "amx":
                print(f"dspark: a [{self.out_features}, {self.in_features}] 4-bit layer's block minima are not fp16 "
                      "numbers; it uses torch's int4 kernel", file=sys.stderr)
            self.kernel = "int4"
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.codes.to(torch.int32).contiguous(), 1)
            self.register_buffer("packed", packed, persistent=False)
            # [in / 32, out, 2]: the kernel's layout of (scale, zero) per block.
            sz = torch.stack([blocks.scale.t(), blocks.zero.t()], dim=-1).to(dtype).contiguous()
            self.register_buffer("scales_zeros", sz, persistent=False)
        self._dtype = dtype
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.weight = None  # no dense matrix: nothing reads this layer's values but its product

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.kernel == "amx":
            y = torch.ops.dspark_q4.amx_mm(x.reshape(-1, shape[-1]), self.packed, self.out_features)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]), self.packed, GROUP,
                                                            self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 4-bit blocks of {GROUP}, "
                f"{self.kernel} kernel")
