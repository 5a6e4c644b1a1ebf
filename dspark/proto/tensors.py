"""Dense tensors <-> raw bytes for protobuf messages (never pickle).

The wire format is the `dspark.v1.Tensor` message: a dtype from a short
whitelist, a shape, and the row-major elements as little-endian bytes. The
receiving side validates everything before it builds a tensor, so a
malformed or hostile message can only raise ValueError.

Example:

    >>> import torch
    >>> x = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    >>> data, dtype, shape = tensor_to_proto_bytes(x)
    >>> (len(data), dtype, shape)
    (12, 'float16', (2, 3))
    >>> torch.equal(tensor_from_proto_bytes(data, dtype, shape), x)
    True
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dspark.proto.dspark.v1 import draft_pb2

# Wire name -> torch dtype. Only these travel; anything else is a ValueError.
_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
SUPPORTED_DTYPES: tuple[str, ...] = tuple(_DTYPES)

# Rank limit: features are [num_tokens, feature_dim]; a generous cap keeps a
# malformed shape from describing something absurd.
MAX_NDIM = 8


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _NAMES:
            raise ValueError(f"unsupported tensor dtype {dtype}; allowed: {', '.join(SUPPORTED_DTYPES)}")
        return _NAMES[dtype]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype!r}; allowed: {', '.join(SUPPORTED_DTYPES)}")
    return dtype


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)):
        raise ValueError(f"shape must be a sequence of ints, got {shape!r}")
    dims = tuple(shape)
    if len(dims) > MAX_NDIM:
        raise ValueError(f"tensor rank {len(dims)} exceeds {MAX_NDIM}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"shape entries must be non-negative ints, got {dims!r}")
    return dims


def _swap_bytes(t: torch.Tensor) -> torch.Tensor:
    """Reverse the byte order of every element (only used on big-endian hosts)."""
    # t: [...] -> bytes [numel, itemsize], reversed along the last axis.
    raw = t.contiguous().view(torch.uint8).reshape(-1, t.element_size()).flip(-1)
    return raw.contiguous().view(t.dtype).reshape(t.shape)


def tensor_to_proto_bytes(tensor: torch.Tensor) -> tuple[bytes, str, tuple[int, ...]]:
    """Pack a tensor as (little-endian bytes, dtype name, shape).

    The tensor is detached, moved to the CPU and made contiguous; its dtype
    must be one of SUPPORTED_DTYPES (convert before sending, e.g. `.half()`).

    Example: a [2, 3] float32 tensor gives 24 bytes, "float32", (2, 3).
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    name = _dtype_name(tensor.dtype)
    t = tensor.detach().to("cpu").contiguous()
    if sys.byteorder != "little":
        t = _swap_bytes(t)
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return data, name, tuple(int(d) for d in t.shape)


def tensor_from_proto_bytes(
    data: bytes,
    dtype: str | torch.dtype,
    shape: Sequence[int],
    *,
    ndim: int | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """Rebuild a CPU tensor from (bytes, dtype, shape), validating all three.

    Raises ValueError when the dtype is not whitelisted, the shape is not a
    sequence of non-negative ints (or not of rank `ndim`, if given), or
    len(data) != prod(shape) * itemsize (or exceeds `max_bytes`, if given).
    The result owns its memory (the input buffer is copied).

    Example: tensor_from_proto_bytes(b"\\x00\\x3c" * 2, "float16", [2]) is
    tensor([1., 1.], dtype=torch.float16).
    """
    name = _dtype_name(dtype)
    dims = _check_shape(shape)
    if ndim is not None and len(dims) != ndim:
        raise ValueError(f"expected a rank-{ndim} tensor, got shape {dims}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"tensor data must be bytes, got {type(data).__name__}")
    torch_dtype = _DTYPES[name]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected = math.prod(dims) * itemsize
    if max_bytes is not None and expected > max_bytes:
        raise ValueError(f"tensor of shape {dims} ({expected} bytes) exceeds the {max_bytes}-byte limit")
    if len(data) != expected:
        raise ValueError(
            f"tensor data has {len(data)} bytes; shape {dims} of {name} needs {expected}"
        )
    if expected == 0:
        return torch.empty(dims, dtype=torch_dtype)
    # bytearray: a private writable copy, so the tensor never aliases the message.
    t = torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(dims)
    if sys.byteorder != "little":
        t = _swap_bytes(t)
    return t


def tensor_to_proto(tensor: torch.Tensor) -> "draft_pb2.Tensor":
    """Pack a tensor into a `dspark.v1.Tensor` message."""
    from dspark.proto.dspark.v1 import draft_pb2

    data, name, shape = tensor_to_proto_bytes(tensor)
    # Wire names map onto draft.proto's enum: "bfloat16" <-> DTYPE_BFLOAT16.
    return draft_pb2.Tensor(dtype=draft_pb2.DType.Value("DTYPE_" + name.upper()), shape=shape, data=data)


def tensor_from_proto(
    msg: "draft_pb2.Tensor", *, ndim: int | None = None, max_bytes: int | None = None
) -> torch.Tensor:
    """Rebuild a tensor from a `dspark.v1.Tensor` message (see tensor_from_proto_bytes)."""
    from dspark.proto.dspark.v1 import draft_pb2

    enum_names = {v: k for k, v in draft_pb2.DType.items()}
    name = enum_names.get(int(msg.dtype), "DTYPE_UNSPECIFIED").removeprefix("DTYPE_").lower()
    if name not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype enum {int(msg.dtype)}")
    return tensor_from_proto_bytes(msg.data, name, list(msg.shape), ndim=ndim, max_bytes=max_bytes)
