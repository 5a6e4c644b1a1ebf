"""Block-scaled FP8 / FP4 weights of DeepSeek's published checkpoints, dequantised on load.

The released DeepSeek-V4 folders (V4-Flash, V4-Pro) store most linear weights in FP8 and the
routed experts in FP4, each with block scales, and say so in ``config.json``::

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "expert_dtype": "fp4"          (top level; V4.1 moves it into quantization_config)

The layout, as DeepSeek's reference inference code reads it (and transformers' fine-grained
FP8 integration and the serving engines agree):

- ``<m>.weight`` [out, in] in ``float8_e4m3fn`` with ``<m>.scale`` [ceil(out/128), ceil(in/128)]:
  one scale per 128 x 128 block, real = fp8 * scale (transformers calls the scale
  ``weight_scale_inv``; both names are read);
- routed experts ``layers.N.ffn.experts.E.w{1,2,3}.weight`` [out, in/2] of packed e2m1 (FP4):
  two values per byte along ``in``, the low nibble first (column 2j low, 2j + 1 high), with
  ``<m>.scale`` [out, in/32]: one scale per 32 consecutive values of a row;
- scales are ``float8_e8m0fnu`` (``scale_fmt: ue8m0``: a bare power of two) or fp32;
- tensors without a ``.scale`` companion (embedding, LM head, norms, router, hyper-connection
  mixing, the compressors' and indexer's projections) are stored in bf16 / fp32 and kept.

Both formats times a power of two are exact in bf16 (e4m3 has 3 mantissa bits, e2m1 has 1),
so dequantising to bf16 loses nothing; it does take 2x the FP8 bytes and 4x the FP4 bytes.
Anything else (another ``quant_method`` or ``fmt``, static activation scales, an unknown
``quantization_config`` key, a scale of another shape or dtype) is refused in one line by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FP4_BLOCK", "BlockQuant", "block_quant_from_hf", "dequantise_fp4", "dequantise_fp8",
           "dequantise_tensors", "unpack_fp4"]  # fmt: skip

FP4_BLOCK = 32  # FP4 values per scale along a row (the reference's fixed ``fp4_block_size``)
# e2m1 codes 0..15: bit 3 the sign, bits 2-1 the exponent, bit 0 the mantissa.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP4_STORAGE = (torch.int8, torch.uint8) + ((torch.float4_e2m1fn_x2,) if hasattr(torch, "float4_e2m1fn_x2") else ())
_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.float32, torch.bfloat16, torch.float16)
_SCALE_SUFFIXES = (".scale", ".weight_scale_inv")
_CONFIG_KEYS = {"quant_method", "fmt", "scale_fmt", "activation_scheme", "weight_block_size", "expert_dtype",
                "modules_to_not_convert"}  # fmt: skip


@dataclass(frozen=True)
class BlockQuant:
    """How a checkpoint stores its quantised weights (read from ``quantization_config``)."""

    block: tuple[int, int] = (128, 128)  # weight rows x columns per FP8 scale
    expert_fp4: bool = False  # routed experts packed FP4 (e2m1, FP4_BLOCK values per scale)


def block_quant_from_hf(cfg: dict[str, Any]) -> BlockQuant | None:
    """The weight format a ``config.json`` dict declares; None when its weights are plain floats.

    Raises ValueError, one line naming the field, for any format this module does not dequantise.

    Example:
        >>> block_quant_from_hf({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
        ...     "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}, "expert_dtype": "fp4"})
        BlockQuant(block=(128, 128), expert_fp4=True)
    """
    q = cfg.get("quantization_config")
    expert = cfg.get("expert_dtype")
    if not q:
        if expert not in (None, "bf16", "bfloat16"):
            raise ValueError(f"expert_dtype {expert!r} without a quantization_config is not supported")
        return None
    if not isinstance(q, dict):
        raise ValueError(f"quantization_config {q!r} is not supported (a dict with quant_method 'fp8')")
    unknown = sorted(set(q) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"quantization_config.{unknown[0]}: unknown key (not read by this engine)")
    checks = (("quant_method", ("fp8",)), ("fmt", (None, "e4m3")), ("scale_fmt", (None, "float", "ue8m0")),
              ("activation_scheme", (None, "dynamic")))  # fmt: skip
    for key, allowed in checks:
        if q.get(key) not in allowed:
            raise ValueError(f"quantization_config.{key} {q.get(key)!r} is not supported (only {allowed[-1]!r})")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size {block!r} is not supported (two positive ints)")
    expert = q.get("expert_dtype", expert)
    if expert not in (None, "fp8", "fp4"):
        raise ValueError(f"expert_dtype {expert!r} is not supported (fp8 or fp4)")
    return BlockQuant(block=(block[0], block[1]), expert_fp4=expert == "fp4")


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 [..., K/2] (int8 / uint8 / float4_e2m1fn_x2 bytes) -> float32 [..., K].

    Byte j holds values 2j (low nibble) and 2j + 1 (high nibble).

    Example:
        >>> unpack_fp4(torch.tensor([[0x92, 0x7F]], dtype=torch.uint8))  # codes 2, 9, 15, 7
        tensor([[ 1.0000, -0.5000, -6.0000,  6.0000]])
    """
    nibbles = torch.tensor(_E2M1, dtype=torch.float32, device=packed.device)
    byte = torch.arange(256, device=packed.device)
    pair_of = torch.stack([nibbles[byte & 0xF], nibbles[byte >> 4]], dim=-1)  # [256, 2]: a byte's two values
    codes = packed.contiguous().view(torch.uint8)  # [..., K/2]
    return pair_of[codes.long()].flatten(-2)  # one gather per byte: [..., K/2, 2] -> [..., K]


def _scaled(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """values [rows, cols] float32 times block scales [ceil(rows/b0), ceil(cols/b1)] (edge blocks cut)."""
    rows, cols = values.shape
    (b0, b1), s = block, scale.float()
    if rows % b0 == 0 and cols % b1 == 0:  # whole blocks: broadcast, no per-element scale tensor
        return (values.view(rows // b0, b0, cols // b1, b1) * s[:, None, :, None]).view(rows, cols)
    return values * s.repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]


def dequantise_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 weight [out, in] with block scales [ceil(out/b0), ceil(in/b1)] -> float32 [out, in].

    Example:
        >>> w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).to(torch.float8_e4m3fn)
        >>> dequantise_fp8(w, torch.tensor([[2.0, 0.5]]), (2, 2))
        tensor([[ 2.0000,  4.0000,  1.5000],
                [ 8.0000, 10.0000,  3.0000]])
    """
    rows, cols = weight.shape
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale of shape {tuple(scale.shape)} for an FP8 weight {rows}x{cols} in {block} blocks "
                         f"(expected {want})")  # fmt: skip
    return _scaled(weight.float(), scale, block)


def dequantise_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed FP4 weight [out, in/2] with scales [out, in/FP4_BLOCK] -> float32 [out, in].

    Example:
        >>> packed = torch.full((1, 16), 0x21, dtype=torch.uint8)  # 0.5, 1.0 repeated: in = 32
        >>> dequantise_fp4(packed, torch.tensor([[4.0]]))[0, :4]
        tensor([2., 4., 2., 4.])
    """
    values = unpack_fp4(packed)  # [out, in]
    rows, cols = values.shape
    want = (rows, cols // FP4_BLOCK)
    if cols % FP4_BLOCK or tuple(scale.shape) != want:
        raise ValueError(f"scale of shape {tuple(scale.shape)} for an FP4 weight {rows}x{cols} "
                         f"(expected {want}: one per {FP4_BLOCK} values of a row)")  # fmt: skip
    return _scaled(values, scale, (1, FP4_BLOCK))


def dequantise_tensors(
    tensors: dict[str, torch.Tensor], quant: BlockQuant, dtype_of: Callable[[str], torch.dtype]
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors with every ``<m>.weight`` + ``<m>.scale`` pair replaced by the weight
    dequantised to ``dtype_of(<m>.weight)``; tensors without a scale are passed on unchanged.

    ``tensors`` is emptied as it goes, so that at most one weight exists both quantised and
    dequantised at a time.  Raises ValueError naming the tensor: a scale without its weight, a
    scaled weight of another dtype, FP4 weights in a checkpoint that does not declare them, or
    a scale of the wrong shape or dtype.  A quantised weight without a scale is passed on for
    the model's loader to refuse.
    """
    out: dict[str, torch.Tensor] = {}
    for name in [n for n in tensors if n.endswith(_SCALE_SUFFIXES)]:
        base = name.removesuffix(".scale").removesuffix(".weight_scale_inv")
        scale = tensors.pop(name)
        weight_name = f"{base}.weight"
        if weight_name not in tensors:
            raise ValueError(f"tensor {name}: a block scale without its weight {weight_name}")
        weight = tensors.pop(weight_name)
        if scale.dtype not in _SCALE_DTYPES:
            raise ValueError(f"tensor {name} has dtype {scale.dtype}: block scales must be e8m0 or float")
        try:
            if weight.dtype == torch.float8_e4m3fn:
                real = dequantise_fp8(weight, scale, quant.block)
            elif weight.dtype in _FP4_STORAGE:
                if not quant.expert_fp4:
                    raise ValueError(f"dtype {weight.dtype} (packed FP4) but the config's expert_dtype is not 'fp4'")
                real = dequantise_fp4(weight, scale)
            else:
                raise ValueError(f"dtype {weight.dtype} with a block scale: only FP8 e4m3 and packed FP4 are read")
        except ValueError as err:
            raise ValueError(f"tensor {weight_name}: {err}") from None
        out[weight_name] = real.to(dtype_of(weight_name))
        del weight, scale, real
    out.update(tensors)
    tensors.clear()
    return out
