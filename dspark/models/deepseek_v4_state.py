"""Per-request state of a DeepSeek-V4 decoder, indexed by absolute position so rollback is free.

One V4 request needs more than keys and values: per attention layer

- the rotated shared key/value head of the last ``W - 1`` positions (sliding window);
- for CSA / HCA layers, the compressor's raw projections (kv and gate, before the position
  bias) of the positions its next window needs: the open window, and for CSA the window before
  it too (its series a overlaps the next entry);
- the same for the CSA layer's Lightning Indexer, at the indexer's width;
- the compressed entries closed so far (and the indexer's keys for CSA).

Everything lives at a place fixed by position: token projections in rings at ``p mod R``,
entries at their entry number.  So the committed length ``L`` of a request determines the
whole live state (sliding keys ``[L - W + 1, L)``, open window ``[m * floor(L/m), L)``, CSA
overlap ``[m * (floor(L/m) - 1), m * floor(L/m))``, entries ``[0, floor(L/m))``), and dropping
rejected draft tokens is moving ``L`` back.  Whatever a rejected token wrote (ring rows,
entries of windows it closed) is outside the live range of the shorter length and is written
again when the real token arrives: an entry that a rejected token closed is recomputed from
the accepted tokens' projections, which are still in the ring.

Rings have ``R = need + slack`` rows, where ``need`` is how far back the layer reads (W - 1,
2m - 1 or m - 1) and ``slack`` the largest block that may be rolled back (drafts + 1).  A step
that writes positions up to P overwrites the rows of positions <= P - R; to keep that from
touching a live row of any length the request may roll back to, rollback is only allowed to
lengths >= P + 1 - slack (the ``floor``, checked, refused below it).  ``slack=None`` sizes every
ring to ``max_seq`` (nothing is ever overwritten; any rollback and any prefix copy is exact),
which is the default because the engine's prefix cache may copy a short prefix out of a
request that has moved far beyond it.

The object also carries the slot bookkeeping of :class:`dspark.models.kv_cache.KVCache`
(``lengths``, ``reserve``, ``truncate``, ``copy_prefix``, ...), so the runner, ``make_batch``
and the engine drive it as they drive a KV cache.

Shapes: S slots, D head_dim, c indexer head width, m compression ratio, E entry capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.models.deepseek_v4_config import CSA, SLIDING, DeepseekV4Config
from dspark.models.kv_cache import CacheFullError, SlotTable


class Ring:
    """Rows of one quantity per slot at ``position mod size``: [S, size, width]."""

    def __init__(self, n_slots: int, size: int, width: int, dtype: torch.dtype, device) -> None:
        self.size = size
        self.data = torch.zeros(n_slots, size, width, dtype=dtype, device=device)

    def read(self, slot: int, start: int, stop: int) -> torch.Tensor:
        """Rows of positions [start, stop): [stop - start, width] (stop - start <= size)."""
        idx = torch.arange(start, stop, device=self.data.device) % self.size
        return self.data[slot, idx]

    def write(self, slot: int, start: int, rows: torch.Tensor) -> None:
        """Store rows [n, width] for positions start..start+n-1 (only the last ``size`` land)."""
        n = rows.shape[0]
        skip = max(0, n - self.size)
        idx = torch.arange(start + skip, start + n, device=self.data.device) % self.size
        self.data[slot, idx] = rows[skip:].to(self.data.dtype)


@dataclass
class Compression:
    """One compressor's state in one layer: token projections (ring) and closed entries."""

    ratio: int  # m: tokens per window
    overlap: bool  # CSA: entry w also pools window w-1's series a
    kv: Ring  # raw kv projections [S, R, width]
    gate: Ring  # raw gate projections (no position bias) [S, R, width]
    entries: torch.Tensor  # [S, E, d] compressed entries (rotated), valid below floor(L/m)

    @property
    def need(self) -> int:
        """How many positions before L the next window may still read."""
        return (2 if self.overlap else 1) * self.ratio - 1


@dataclass
class LayerState:
    """Everything one attention layer keeps per slot."""

    kind: str  # SLIDING / CSA / HCA
    keys: Ring  # rotated shared key/value head [S, R, D]
    compressor: Compression | None  # CSA / HCA
    indexer: Compression | None  # CSA: the Lightning Indexer's own compressor (its keys)


class DeepseekV4State(SlotTable):
    """All layers' state for ``n_slots`` requests of up to ``max_seq`` tokens; the slot bookkeeping
    is the shared :class:`~dspark.models.kv_cache.SlotTable`'s (truncation also checks the floor)."""

    def __init__(
        self,
        cfg: DeepseekV4Config,
        n_slots: int,
        max_seq: int,
        dtype: torch.dtype,
        device: torch.device | str,
        slack: int | None = None,
    ) -> None:
        if slack is not None and slack < 1:
            raise ValueError(f"ring slack must be >= 1 (or None for full-length rings), got {slack}")
        super().__init__(n_slots, max_seq)
        self.slack = slack
        self.window = cfg.sliding_window
        self.floor = [0] * n_slots  # shortest length a slot may still roll back to
        self.written = [0] * n_slots  # positions [0, written) hold this request's data
        d, c = cfg.head_dim, cfg.index_head_dim

        def ring(need: int, width: int) -> Ring:
            size = max_seq if slack is None else min(max_seq, need + slack)
            return Ring(n_slots, size, width, dtype, device)

        def compression(m: int, overlap: bool, width: int) -> Compression:
            proj = (2 if overlap else 1) * width
            need = (2 if overlap else 1) * m - 1
            return Compression(m, overlap, ring(need, proj), ring(need, proj),
                               torch.zeros(n_slots, max_seq // m, width, dtype=dtype, device=device))

        self.layers: list[LayerState] = []
        for kind, m in zip(cfg.layer_types, cfg.compress_ratio_by_layer):
            keys = ring(cfg.sliding_window - 1, d)
            comp = None if kind == SLIDING else compression(m, kind == CSA, d)
            index = compression(m, True, c) if kind == CSA else None
            self.layers.append(LayerState(kind, keys, comp, index))

    # -- positions ---------------------------------------------------------------------------
    def begin(self, slot: int, start: int, n: int) -> None:
        """Check that a step may write positions [start, start + n) of ``slot`` and record it.

        The step rolls the request back to ``start`` first (the runner passes each request's
        committed length), so ``start`` must not be below the slot's floor nor beyond its data.
        """
        if start > self.written[slot]:
            raise ValueError(f"slot {slot}: step starts at {start} but only {self.written[slot]} positions exist")
        if start < self.floor[slot]:
            raise ValueError(
                f"slot {slot}: cannot roll back to {start}: the state rings (slack {self.slack}) only "
                f"restore lengths >= {self.floor[slot]}"
            )
        end = start + n
        if self.slack is not None:  # rows of positions <= end - 1 - R are gone: see the module doc
            self.floor[slot] = max(self.floor[slot], end - self.slack)
        self.written[slot] = end

    # -- the KVCache slot interface ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.layers[0].keys.data.device

    def reserve(self, positions: int) -> None:
        """Everything is allocated up front; only the bound is checked."""
        if positions > self.max_seq:
            raise CacheFullError(f"{positions} positions > max_seq {self.max_seq}")

    def truncate(self, slot: int, length: int) -> None:
        """Forget every position >= length (rejected draft tokens): one integer."""
        if not max(0, self.floor[slot]) <= length <= self.lengths[slot]:
            raise ValueError(
                f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length} (floor {self.floor[slot]})"
            )
        self.lengths[slot] = length

    def set_length(self, slot: int, length: int) -> None:
        """The step's start (the runner's truncation): one integer; the next step's ``begin``
        checks it against the floor and the written positions."""
        self.lengths[slot] = length

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` hold the first ``n`` positions of ``src`` (prefix reuse)."""
        if not self.floor[src] <= n <= self.written[src]:
            raise ValueError(
                f"cannot copy {n} positions of slot {src}: its rings restore lengths "
                f"{self.floor[src]}..{self.written[src]} (use full-length rings, slack None)"
            )
        for layer in self.layers:
            tensors = [layer.keys.data]
            for comp in (layer.compressor, layer.indexer):
                if comp is not None:
                    tensors += [comp.kv.data, comp.gate.data, comp.entries]
            for t in tensors:
                t[dst] = t[src]
        self.floor[dst], self.written[dst], self.lengths[dst] = self.floor[src], n, n

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            total += layer.keys.data.numel() * layer.keys.data.element_size()
            for comp in (layer.compressor, layer.indexer):
                if comp is not None:
                    for t in (comp.kv.data, comp.gate.data, comp.entries):
                        total += t.numel() * t.element_size()
        return total

    # -- inspection ----------------------------------------------------------------------------
    def live(self, slot: int, length: int | None = None) -> dict[str, torch.Tensor]:
        """The state a request of ``length`` (default: its length) still reads, by name.

        Two histories that leave the same live state decode identically from here on; the tests
        compare a verify-and-rollback history with token-by-token decoding through this.
        """
        L = self.lengths[slot] if length is None else length
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            out[f"{i}.keys"] = layer.keys.read(slot, max(0, L - (self.window - 1)), L)
            for name, comp in (("compressor", layer.compressor), ("indexer", layer.indexer)):
                if comp is None:
                    continue
                e = L // comp.ratio
                first = max(0, (e - 1 if comp.overlap else e) * comp.ratio)
                out[f"{i}.{name}.kv"] = comp.kv.read(slot, first, L)
                out[f"{i}.{name}.gate"] = comp.gate.read(slot, first, L)
                out[f"{i}.{name}.entries"] = comp.entries[slot, :e]
        return out
