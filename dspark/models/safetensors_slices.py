"""Tensors, or row / column ranges of them, read from a folder's safetensors files on demand.

A rank of a tensor / expert parallel group needs a small part of a large checkpoint: its own
experts and its rows or columns of the head-sharded matrices.  :class:`SafetensorsFolder` reads
the files' headers once (name -> file, dtype, shape, byte offsets) and then each request with
plain positioned reads, so only the bytes asked for are read and nothing stays mapped: the pages
of a memory-mapped file count as the process's resident memory for as long as the file is
mapped, which would make every rank's peak follow the checkpoint's size rather than its share.

A range is ``(dim, start, stop)`` along dim 0 (one contiguous read) or dim 1 of a 2-D tensor (one
read per row).  Example, for a [4, 6] float32 tensor ``w`` in the folder::

    folder.read("w", (1, 2, 4))   # w[:, 2:4], 4 reads of 8 bytes; folder.bytes_read grows by 32
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

Range = tuple[int, int, int]  # (dim, start, stop)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}  # fmt: skip


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


class SafetensorsFolder:
    """The tensors of every ``*.safetensors`` file in ``path`` (see the module docstring).

    Raises FileNotFoundError without files, ValueError naming a file with a damaged header, a
    tensor stored twice or a dtype this reader does not know.
    """

    def __init__(self, path: Path) -> None:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} has no *.safetensors files")
        self.entries: dict[str, _Entry] = {}
        self.bytes_read = 0  # tensor bytes read so far
        for f in files:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                try:
                    header = json.loads(fh.read(size))
                except ValueError:
                    raise ValueError(f"{f.name}: not a safetensors file (damaged header)") from None
            header.pop("__metadata__", None)
            for name, h in header.items():
                if h["dtype"] not in _DTYPES:
                    raise ValueError(f"tensor {name} in {f.name}: dtype {h['dtype']} is not read by this engine")
                if name in self.entries:
                    raise ValueError(f"tensor {name} is stored twice ({self.entries[name].file.name}, {f.name})")
                a, b = h["data_offsets"]
                self.entries[name] = _Entry(f, _DTYPES[h["dtype"]], tuple(h["shape"]), 8 + size + a, b - a)
        self._handles: dict[Path, int] = {}

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the folder."""
        return sum(e.nbytes for e in self.entries.values())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str, rng: Range | None = None) -> torch.Tensor:
        """Tensor ``name`` whole (``rng`` None) or its ``rng`` range, as a new CPU tensor."""
        e = self.entries[name]
        if rng is None:
            out = torch.empty(e.shape, dtype=e.dtype)
            self._read_into(e, out, e.start)
            return out
        dim, a, b = rng
        if not 0 <= a <= b <= e.shape[dim] or dim not in (0, 1) or (dim == 1 and len(e.shape) != 2):
            raise ValueError(f"tensor {name} {list(e.shape)}: no range {a}:{b} along dim {dim}")
        row = e.nbytes // e.shape[0] if e.shape[0] else 0  # bytes of one index along dim 0
        if dim == 0:
            out = torch.empty((b - a, *e.shape[1:]), dtype=e.dtype)
            self._read_into(e, out, e.start + a * row)
            return out
        rows, item = e.shape[0], e.dtype.itemsize
        out = torch.empty((rows, b - a), dtype=e.dtype)
        for r in range(rows):  # one positioned read per row: [r, a:b] is contiguous
            self._read_into(e, out[r], e.start + r * row + a * item)
        return out

    def _read_into(self, e: _Entry, out: torch.Tensor, offset: int) -> None:
        n = out.numel() * out.element_size()
        if not n:
            return
        fd = self._handles.get(e.file)
        if fd is None:
            fd = self._handles[e.file] = os.open(e.file, os.O_RDONLY)
        # The tensor's own bytes as a writable buffer (ctypes: no numpy import for this).
        view = memoryview((ctypes.c_char * n).from_address(out.data_ptr())).cast("B")
        done = 0
        while done < n:  # pread may return fewer bytes than asked
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"{e.file.name}: truncated tensor data")
            done += got
        self.bytes_read += n

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
