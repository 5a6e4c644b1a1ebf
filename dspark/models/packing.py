"""CPU fast path: bf16 linear layers with weights pre-packed for oneDNN.

On x86 CPUs with AVX512-BF16, ``torch.nn.functional.linear`` on bf16 re-lays out the weight on
every call; packing it once into oneDNN's blocked format halves the time of the small GEMMs
that dominate decoding (measured here: 576x3072 at batch 1, 298 -> 192 us; the 49152-row LM
head, 6.2 -> 3.4 ms) and gives bit-identical results.  Applied after tensor parallelism, only on
CPU and only in bf16; everywhere else the model runs unchanged.  Products of one or two rows run
as three rows (:data:`MIN_ROWS`), so they take the kernel of the larger products.
"""

from __future__ import annotations

import ctypes
import math

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
        # Kept only where other code reads the matrix (the LM head shared with drafters), until
        # serve_rows() reads its rows out of the packed buffer instead.
        self.weight = w if keep_weight else None
        self._buffer: torch.Tensor | None = None  # serve_rows(): the packed buffer as int16, no copy
        self._buffer_of: torch.Tensor | None = None  # the packed tensor whose memory _buffer reads
        self._row_at: torch.Tensor | None = None  # [out] offset of each row's first element in it
        self._col_at: torch.Tensor | None = None  # [in] offset of each column from its row's first

    @classmethod
    def of_matrix(cls, weight: torch.Tensor) -> "PackedLinear":
        """A bias-free packed product by ``weight`` [out, in] that no ``nn.Linear`` holds (e.g.
        some rows of another layer's matrix)."""
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        return cls(linear)

    def serve_rows(self) -> bool:
        """Read rows of the matrix (:meth:`rows`) out of the packed buffer from now on and drop the
        plain copy kept in ``weight``: True when done.  Where packing lays the elements out is
        found by packing probe matrices of the same shape (:func:`_element_offsets`), then every
        row read that way is compared bit for bit with the plain matrix; on any difference (a
        layout that is not one offset per row plus one per column) nothing changes and this
        returns False."""
        w = self.weight
        if w is None or w.dtype != torch.bfloat16:
            return self._buffer is not None
        try:
            rows, cols = _element_offsets(tuple(w.shape), 0), _element_offsets(tuple(w.shape), 1)
        except (RuntimeError, AttributeError):  # a torch without these mkldnn ops: keep the matrix
            return False
        if rows is None or cols is None:
            return False
        buffer, cols = _as_int16(self.packed), cols - cols[0]
        plain = w.view(torch.int16)
        for start in range(0, w.shape[0], 4096):
            chunk = rows[start : start + 4096]
            if not torch.equal(buffer[chunk.unsqueeze(1) + cols], plain[start : start + 4096]):
                return False
        self._buffer, self._buffer_of, self._row_at, self._col_at = buffer, self.packed, rows, cols
        self.weight = None
        return True

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the matrix: [*ids.shape, in_features] (after :meth:`serve_rows`)."""
        if self._buffer is None:
            raise RuntimeError("rows() reads the packed buffer: call serve_rows() first")
        if self.packed is not self._buffer_of:  # _buffer would read memory ``packed`` no longer owns
            raise RuntimeError("the packed weight was replaced after serve_rows()")
        at = self._row_at[ids.reshape(-1)].unsqueeze(1) + self._col_at  # [n, in]
        return self._buffer[at].view(torch.bfloat16).reshape(*ids.shape, self.in_features)

    def forward(self, x: torch.Tensor, row_block: int = 0) -> torch.Tensor:
        """``row_block`` > 0: products of at most that many rows (see :func:`packed_product`)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if torch.compiler.is_compiling():  # an opaque op for inductor (dspark/models/compiled.py)
            y = torch.ops.dspark.packed_linear(x2, self.packed, self.bias, self.out_features, row_block)
        else:
            y = packed_product(x2, self.packed, self.bias, row_block)
        return y.reshape(*shape[:-1], self.out_features)


def _as_int16(packed: torch.Tensor) -> torch.Tensor:
    """The memory of a packed weight as a flat int16 tensor, without a copy; it reads that
    memory only while ``packed`` lives, so keep the two together."""
    nbytes = torch.ops.mkldnn._nbytes(packed)
    memory = (ctypes.c_uint8 * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(memory, dtype=torch.int16)


# Probe digits: bf16 bit patterns of positive normal numbers (never 0, a subnormal, inf or NaN).
_FIRST_CODE = 0x0080
_CODES = 0x7F80 - _FIRST_CODE


def _element_offsets(shape: tuple[int, int], axis: int) -> torch.Tensor | None:
    """Where oneDNN's packing of a bf16 [out, in] matrix puts element (i, 0) (``axis`` 0) or
    (0, i) (``axis`` 1), for every i: [shape[axis]] int64 offsets into the packed buffer.

    Each probe is a matrix of zeros but for that one line, which holds i's digits in base
    ``_CODES``, one digit per probe; the non-zero elements of the packed probe are the line's,
    and their values say which i sits where.  None if the probes disagree (a layout that does
    not simply move elements)."""
    n = shape[axis]
    digits = max(1, math.ceil(math.log(n) / math.log(_CODES))) if n > 1 else 1
    where, index = None, torch.zeros(n, dtype=torch.long)
    for d in range(digits):
        probe = torch.zeros(shape, dtype=torch.bfloat16)
        line = probe[:, 0] if axis == 0 else probe[0]
        line.copy_((torch.arange(n) // _CODES**d % _CODES + _FIRST_CODE).to(torch.int16).view(torch.bfloat16))
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, None)
        del probe
        buffer = _as_int16(packed)
        found = buffer.nonzero().squeeze(1)
        if found.numel() != n or (where is not None and not torch.equal(found, where)):
            return None
        where = found
        index += (buffer[found].long() - _FIRST_CODE) * _CODES**d
        del buffer, packed
    if not torch.equal(torch.sort(index).values, torch.arange(n)):
        return None
    offsets = torch.empty(n, dtype=torch.long)
    offsets[index] = where
    return offsets


class PackedEmbedding(nn.Module):
    """A token embedding that reads its rows out of the packed LM head it is tied to (see
    :func:`share_tied_matrix`; or the 8-bit head of ``dspark.models.q4.Q8Head``), so the
    process holds one copy of the [vocab, dim] matrix."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self._head = [head]  # not a submodule: the model owns it as ``output``
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.weight = None  # no plain matrix: read rows with matrix_rows()

    @property
    def device(self) -> torch.device:
        return self._head[0].packed.device

    @property
    def dtype(self) -> torch.dtype:
        return matrix_dtype(self._head[0])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._head[0].rows(ids)

    forward = rows


def share_tied_matrix(model: nn.Module) -> bool:
    """A model whose token embedding is tied to its packed LM head (``tok_embeddings`` and
    ``output`` sharing one matrix) keeps two copies of it: the plain one for the embedding and
    the packed one for the head (54 MB each for the default model).  Serve the embedding's rows
    from the packed head and drop the plain copy; True when done.  Call after
    :func:`pack_linears`, then :func:`return_freed_memory`."""
    emb, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    if type(emb) is not nn.Embedding or not isinstance(head, PackedLinear) or head.weight is None:
        return False
    if head.weight.data_ptr() != emb.weight.data_ptr() or head.weight.shape != emb.weight.shape:
        return False  # not tied
    if not head.serve_rows():
        return False
    model.tok_embeddings = PackedEmbedding(head)
    return True


def matrix_rows(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the matrix of an embedding or linear layer, however it is held: plain
    (``weight``) or only packed (:meth:`PackedLinear.serve_rows`)."""
    if getattr(layer, "weight", None) is None:
        return layer.rows(ids)
    return layer.weight.detach()[ids.to(layer.weight.device)]


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """[rows, cols] of that matrix: (vocab, dim) for an embedding, (out, in) for a linear layer."""
    if getattr(layer, "weight", None) is not None:
        return tuple(layer.weight.shape)
    if isinstance(layer, PackedEmbedding):
        return layer.num_embeddings, layer.embedding_dim
    return layer.out_features, layer.in_features


def matrix_dtype(layer: nn.Module) -> torch.dtype:
    w = getattr(layer, "weight", None)
    if w is not None:
        return w.dtype
    return layer.packed.dtype if isinstance(layer, PackedLinear) else layer.dtype


def whole_matrix(layer: nn.Module) -> torch.Tensor:
    """The whole matrix: ``weight`` itself, or a copy read out of the packed buffer when that is
    all there is (for exporting a drafter, never for a step)."""
    if getattr(layer, "weight", None) is not None:
        return layer.weight
    ids = torch.arange(matrix_shape(layer)[0])
    return torch.cat([matrix_rows(layer, chunk) for chunk in ids.split(4096)])


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
