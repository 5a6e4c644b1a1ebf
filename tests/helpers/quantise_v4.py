"""Write a float V4 folder again in the released checkpoints' quantised layout.

What DeepSeek-V4-Flash / -Pro ship: the attention projections (``wq_a``, ``wq_b``, ``wkv``,
``wo_a``, ``wo_b``, the indexer's ``wq_b``), the shared expert and the MTP layer's ``e_proj`` /
``h_proj`` in FP8 e4m3 with one e8m0 scale per ``block`` (``<m>.scale``); the routed experts in
FP4 e2m1, two values per byte along a row (low nibble first), one e8m0 scale per 32 values of a
row; everything else (embedding, head, norms, router, hyper-connections, the compressors' and
the indexer's own projections) as it was.  Scales are powers of two that fit each block's
largest magnitude into the format's range (448 for e4m3, 6 for e2m1), as the reference rounds
them.  The scales go to a shard of their own, so a loader must pair tensors across files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

FP8_MAX, FP4_MAX = 448.0, 6.0
E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP8_NAMES = re.compile(r"(attn\.(indexer\.)?(wq_a|wq_b|wkv|wo_a|wo_b)|ffn\.shared_experts\.w[123]|[eh]_proj)\.weight$")
FP4_NAMES = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")
RELEASE_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0"}


def _pow2_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / top)))


def quantise_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (e4m3 [out, in], e8m0 scales [ceil(out/b0), ceil(in/b1)])."""
    rows, cols = w.shape
    b0, b1 = block
    nr, nc = -(-rows // b0), -(-cols // b1)
    padded = torch.zeros(nr * b0, nc * b1)
    padded[:rows, :cols] = w
    amax = padded.view(nr, b0, nc, b1).abs().amax(dim=(1, 3))  # [nr, nc]
    scale = _pow2_scale(amax, FP8_MAX)
    full = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:rows, :cols]
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


def quantise_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (packed int8 [out, in/2], e8m0 scales [out, in/32]); nearest e2m1 value."""
    rows, cols = w.shape
    scale = _pow2_scale(w.view(rows, cols // 32, 32).abs().amax(-1), FP4_MAX)  # [out, in/32]
    v = (w / scale.repeat_interleave(32, 1)).clamp(-FP4_MAX, FP4_MAX)
    magnitude = (v.abs().unsqueeze(-1) - E2M1_MAGNITUDES).abs().argmin(-1)  # code 0..7
    codes = (magnitude | ((v < 0).long() << 3)).to(torch.uint8)  # [out, in]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), scale.to(torch.float8_e8m0fnu)


def quantise_folder(src, dst, block: tuple[int, int]) -> list[str]:
    """Copy V4 folder ``src`` to ``dst`` in the released layout; returns the quantised weights' names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    scales, names = {}, []
    for f in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                t = fh.get_tensor(key)
                if FP4_NAMES.search(key):
                    out[key], scales[key.removesuffix(".weight") + ".scale"] = quantise_fp4(t.float())
                elif FP8_NAMES.search(key):
                    out[key], scales[key.removesuffix(".weight") + ".scale"] = quantise_fp8(t.float(), block)
                else:
                    out[key] = t
                    continue
                names.append(key)
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
    save_file(scales, str(dst / "scales.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {**RELEASE_QUANT, "weight_block_size": list(block)}
    cfg["expert_dtype"] = "fp4"
    (dst / "config.json").write_text(json.dumps(cfg))
    return names
