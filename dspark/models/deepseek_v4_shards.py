"""Build a DeepSeek-V4 decoder for one rank of a tensor / expert parallel group from its folder,
reading only what that rank holds (the whole model is rank 0 of 1).

The released checkpoints are mostly routed experts (about 95% of V4-Flash's bytes), stored one
tensor per expert and projection (``layers.N.ffn.experts.E.w{1,2,3}.weight``, FP4 with a
``.scale``).  So a rank of w:

* reads its own E / w consecutive experts whole (and their scales), and not one byte of the
  others': a folder missing the other ranks' expert tensors loads the same;
* reads only its rows or columns of the head-sharded tensors (:func:`deepseek_v4_tp.param_ranges`:
  ``wq_b``, the sinks, ``wo_a`` / ``wo_b``, the shared expert, the LM head).  An FP8 weight's
  range is read with the matching range of its block scales when the range falls on block
  edges (V4-Flash's ranges all do at w = 8); otherwise the weight is read whole, dequantised
  and then cut;
* reads the replicated tensors whole.

Each tensor is dequantised (FP8 / FP4 block scales, :mod:`dspark.models.quantized`), converted
to the dtype it is held in and put on the device before the next is read; the experts are
copied into their stacked parameter as they come.  The model is laid out on the meta device and
cut to the rank's shapes first (:func:`deepseek_v4_tp.shard_in_place`), so peak memory is the
rank's share of the model plus one checkpoint tensor.  Reads are plain positioned reads
(:class:`dspark.models.safetensors_slices.SafetensorsFolder`), never a memory map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dspark.models.config import ModelArgs
from dspark.models.deepseek_v4 import DeepseekV4Transformer, keeps_fp32
from dspark.models.deepseek_v4_config import DeepseekV4Config
from dspark.models.deepseek_v4_loader import EXPERT_NAME, our_name
from dspark.models.deepseek_v4_tp import cut, expert_range, param_ranges, shard_in_place, vocab_rows
from dspark.models.llama import Shard
from dspark.models.quantized import dequantise_tensors
from dspark.models.safetensors_slices import Range, SafetensorsFolder

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SCALE_SUFFIXES = (".scale", ".weight_scale_inv")


@dataclass(frozen=True)
class ReadStats:
    """What loading one rank read of its folder."""

    bytes_read: int  # tensor bytes read from disk
    bytes_total: int  # tensor bytes in the folder's safetensors files


def build_rank_model(
    path: Path, cfg: DeepseekV4Config, args: ModelArgs, dtype: torch.dtype, device, shard: Shard = Shard()
) -> tuple[DeepseekV4Transformer, ReadStats]:
    """The decoder of V4 folder ``path`` holding ``shard``'s weights in ``dtype`` on ``device``
    (parameters :func:`keeps_fp32` names in fp32), and what was read for it.

    Raises ValueError, one line naming the tensor or field: a group size the shapes do not
    allow, a quantised tensor without its scale (or a scale without its weight), a missing
    expert of this rank, or names that do not fit the architecture.
    """
    with torch.device("meta"):
        model = DeepseekV4Transformer(cfg, args)
    if shard.world_size > 1:
        shard_in_place(model, shard)  # shapes only: meta tensors
    with SafetensorsFolder(path) as folder:
        state = _RankReader(folder, cfg, shard, dtype, torch.device(device)).read(model)
        stats = ReadStats(folder.bytes_read, folder.total_bytes)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the DeepSeek-V4 architecture: missing={missing} "
                         f"unexpected={unexpected}")  # fmt: skip
    model.shard = shard
    return model.eval().requires_grad_(False), stats


class _RankReader:
    """One pass over a folder's tensors for one rank (see the module docstring)."""

    def __init__(self, folder: SafetensorsFolder, cfg: DeepseekV4Config, shard: Shard, dtype, device) -> None:
        self.folder, self.cfg, self.shard, self.dtype, self.device = folder, cfg, shard, dtype, device
        self.quant = cfg.weight_quant
        self.scale_of: dict[str, str] = {}  # checkpoint weight name -> its block scale's name
        for name in folder.entries:
            if name.endswith(_SCALE_SUFFIXES) and not name.startswith("mtp."):
                weight = name.removesuffix(".scale").removesuffix(".weight_scale_inv") + ".weight"
                if weight not in folder.entries:
                    raise ValueError(f"tensor {name}: a block scale without its weight {weight}")
                if self.quant is None:
                    raise ValueError(f"tensor {name}: a block scale, but config.json has no quantization_config")
                self.scale_of[weight] = name

    def dtype_of(self, name: str) -> torch.dtype:
        if name.endswith("tid2eid"):
            return torch.long
        return torch.float32 if keeps_fp32(name) else self.dtype

    def read(self, model: DeepseekV4Transformer) -> dict[str, torch.Tensor]:
        """This rank's state dict (our names, experts stacked)."""
        cfg, shard = self.cfg, self.shard
        mine = expert_range(cfg, shard)
        inter = cfg.moe_intermediate_size
        state: dict[str, torch.Tensor] = {}
        seen: dict[str, set[tuple[int, str]]] = {}  # layer prefix -> (expert, w) read
        for name in self.folder.entries:
            if name.startswith("mtp.") or name.endswith(_SCALE_SUFFIXES):  # the MTP drafter's; scales go with weights
                continue
            ours = our_name(name)
            hit = EXPERT_NAME.match(ours)
            if hit is None:
                state[ours] = self._read(name, ours, param_ranges(ours, cfg, shard))
                continue
            prefix, e, w = hit[1], int(hit[2]), hit[3]
            if e >= cfg.n_routed_experts:
                raise ValueError(f"tensor {name}: expert {e} of n_routed_experts={cfg.n_routed_experts}")
            if e not in mine:  # another rank's: never read
                continue
            stacked = f"{prefix}.experts_w2" if w == "w2" else f"{prefix}.experts_w13"
            if stacked not in state:
                meta = model.get_parameter(stacked)
                state[stacked] = torch.empty(meta.shape, dtype=self.dtype_of(stacked), device=self.device)
            rows = {"w1": slice(0, inter), "w3": slice(inter, 2 * inter), "w2": slice(None)}[w]
            state[stacked][e - mine.start, rows] = self._read(name, ours, ())
            seen.setdefault(prefix, set()).add((e, w))
        for prefix, got in seen.items():
            for e in mine:
                for w in ("w1", "w2", "w3"):
                    if (e, w) not in got:
                        raise ValueError(f"tensor {prefix}.experts.{e}.{w}.weight is missing (rank {shard.rank} "
                                         f"of {shard.world_size} holds experts {mine.start}..{mine.stop - 1})")  # fmt: skip
        head = state.get("head.weight")
        if head is not None and shard.world_size > 1:  # zero rows up to the same count on every rank
            pad = vocab_rows(cfg.vocab_size, shard)[2] - head.shape[0]
            state["head.weight"] = torch.cat([head, head.new_zeros(pad, head.shape[1])])
        return state

    def _read(self, name: str, ours: str, ranges: tuple[Range, ...]) -> torch.Tensor:
        """Checkpoint tensor ``name`` cut to ``ranges``, dequantised, in its dtype on the device."""
        scale = self.scale_of.get(name)
        if scale is None:
            t = self._read_ranges(name, ranges)
            if not ours.endswith("tid2eid") and t.dtype not in _FLOAT_DTYPES:
                raise ValueError(f"tensor {ours} has dtype {t.dtype} and no block scale: "
                                 f"not a format this loader reads")  # fmt: skip
            return t.to(device=self.device, dtype=self.dtype_of(ours))
        scale_ranges = self._scale_ranges(name, ranges)
        if scale_ranges is None:  # the range cuts blocks: dequantise the whole weight, then cut
            w, s, after = self.folder.read(name), self.folder.read(scale), ranges
        else:
            w, s, after = self._read_ranges(name, ranges), self._read_ranges(scale, scale_ranges), ()
        real = dequantise_tensors({name: w, scale: s}, self.quant, lambda n: torch.float32)[name]
        return cut(real, after).to(device=self.device, dtype=self.dtype_of(ours))

    def _read_ranges(self, name: str, ranges: tuple[Range, ...]) -> torch.Tensor:
        if not ranges:
            return self.folder.read(name)
        t = self.folder.read(name, ranges[0])
        return cut(t, ranges[1:]).clone() if len(ranges) > 1 else t

    def _scale_ranges(self, name: str, ranges: tuple[Range, ...]) -> tuple[Range, ...] | None:
        """The block-scale ranges that dequantise exactly ``ranges`` of FP8 weight ``name``, or
        None when a range does not fall on block edges (or the weight is not FP8)."""
        if not ranges:
            return ()
        entry = self.folder.entries[name]
        if entry.dtype != torch.float8_e4m3fn:
            return None
        out = []
        for dim, a, b in ranges:
            size, block = entry.shape[dim], self.quant.block[dim]
            if a % block or (b % block and b != size):
                return None
            out.append((dim, a // block, -(-b // block)))
        return tuple(out)
