"""Slot-based KV cache shared by many concurrent requests.

Each request owns one slot: a contiguous [n_kv, capacity, hd] region per layer (capacity grows
with the longest request, up to max_seq).  The cache tracks
how many positions of each slot are valid; truncating a request (dropping rejected draft tokens)
only moves that length back, and the next write overwrites the stale entries.

A step is described by a :class:`VarlenBatch`: for every request its slot and how many new tokens
it feeds.  Prefill chunks, decode steps and verification blocks all use the same description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dspark.kernels.attention import AttentionPlan, build_plan, padded_keys
from dspark.kernels.paged_attention import PagedPlan
from dspark.kernels.short_attention import ShortPlan, cache_kernel


def _owns_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is contiguous and spans its whole storage (no other tensor shares it)."""
    st = t.untyped_storage()
    return t.is_contiguous() and t.data_ptr() == st.data_ptr() and t.numel() * t.element_size() == st.nbytes()


def _release_pages(t: torch.Tensor) -> None:
    """Hand the whole memory pages inside CPU tensor ``t`` back to the system (Linux
    ``madvise(MADV_DONTNEED)``; elsewhere nothing).  Its contents are lost: only for a
    tensor about to be freed.  Large tensors are mapped memory, so its pages count in the
    process's resident memory until freed; this frees them part by part."""
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start:
        return
    try:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


# Below this size a cache tensor is plain ``torch.zeros`` (a mapping per small tensor is not worth it).
LAZY_ZEROS_MIN_BYTES = 1 << 20


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor whose memory pages are taken from the system only when first written.

    On a Linux CPU the memory is a fresh anonymous mapping: the kernel hands out zero pages on
    first touch, so resident memory follows the positions a cache actually holds instead of its
    capacity (``torch.zeros`` writes, and so keeps, every page).  Transparent huge pages are
    refused for it, or one written key would take 2 MB.  Elsewhere, or for a small tensor,
    ``torch.zeros``.
    """
    import mmap
    import sys

    dev = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if dev.type != "cpu" or not sys.platform.startswith("linux") or nbytes < LAZY_ZEROS_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=dev)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(region, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


def copy_held(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy rows ``src`` [R, n, hd] into the zeroed ``dst`` [R, >= n, hd] up to each row's last
    position that is not all zeros: the zeros past it are already there, and copying them would
    write (and so take) pages of a lazily zeroed ``dst`` that nothing uses."""
    n = src.shape[1]
    bits = src.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[src.element_size()])
    held = bits.ne(0).any(-1)  # [R, n]; compared as bits, so a stored -0.0 is copied too
    extent = (held * torch.arange(1, n + 1, device=src.device)).amax(-1).tolist()  # [R] last held + 1
    for r, e in enumerate(extent):
        if e:
            dst[r, :e] = src[r, :e]


class CacheFullError(RuntimeError):
    """No free slot, or a request would grow past ``max_seq``."""


class SlotTable:
    """Which of ``n_slots`` request slots are in use and how many positions each holds (up to
    ``max_seq``): the bookkeeping every target cache shares (this slot cache, DeepSeek-V4's state).
    ``allocate`` hands out the lowest free slot; truncation only moves a length back.
    """

    def __init__(self, n_slots: int, max_seq: int) -> None:
        self.n_slots = n_slots
        self.max_seq = max_seq
        self.lengths = [0] * n_slots
        self._free = list(range(n_slots - 1, -1, -1))  # pop() hands out the lowest slot first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.n_slots} cache slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self.lengths[slot] = 0
        self._free.append(slot)
        self._free.sort(reverse=True)

    def truncate(self, slot: int, length: int) -> None:
        """Forget every position >= length (e.g. rejected draft tokens)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def release(self, slot: int) -> None:
        """The slot's request ended: forget its positions (the paged cache also returns its blocks)."""
        self.lengths[slot] = 0


class KVCache(SlotTable):
    """Keys and values for ``n_slots`` requests of up to ``max_seq`` tokens each.

    Memory follows use, twice over.  On a Linux CPU the tensors are lazily zeroed
    (:func:`lazy_zeros`): only the pages of positions written are resident.  And every slot
    holds ``capacity`` positions, ``initial_seq`` at first (default ``GROW_FROM``, at most
    ``max_seq``); the cache grows (by at least a quarter, in whole key blocks, up to
    ``max_seq``) when a step needs more (:meth:`reserve`, called by :func:`make_batch`), so a
    batch of short requests does not pay for the longest one allowed (on a GPU, where nothing
    is lazily zeroed, this is what keeps memory down).  ``initial_seq=max_seq`` allocates
    everything up front.  ``k`` and ``v`` are replaced when the cache grows: read them from
    the cache at the time of use, never keep them across steps.

    ``layer_shapes`` gives each layer its own (n_kv_heads, head_dim) for decoders whose layers
    differ (Gemma 4: sliding and full layers).  Then ``k`` and ``v`` are lists of per-layer
    [S, n_kv, capacity, hd] tensors instead of one [L, S, n_kv, capacity, hd] tensor; both
    are read per layer as ``k[layer]``.
    """

    GROW_FROM = 256

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        max_seq: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        initial_seq: int | None = None,
        layer_shapes: list[tuple[int, int]] | None = None,
    ) -> None:
        self.capacity = min(max_seq, self.GROW_FROM if initial_seq is None else initial_seq)
        if self.capacity < 1:
            raise ValueError(f"initial_seq must be >= 1, got {initial_seq}")
        if layer_shapes is not None and len(layer_shapes) != n_layers:
            raise ValueError(f"layer_shapes has {len(layer_shapes)} entries for {n_layers} layers")
        # zeros, not empty: masked-out stale entries must still be finite numbers.
        self.k: torch.Tensor | list[torch.Tensor]
        self.v: torch.Tensor | list[torch.Tensor]
        if layer_shapes is None or len(set(layer_shapes)) == 1:
            if layer_shapes is not None:
                n_kv_heads, head_dim = layer_shapes[0]
            shape = (n_layers, n_slots, n_kv_heads, self.capacity, head_dim)
            self.k = lazy_zeros(shape, dtype, device)  # [L, S, n_kv, capacity, hd]
            self.v = lazy_zeros(shape, dtype, device)
        else:  # per layer: [S, n_kv_l, capacity, hd_l]
            self.k = [lazy_zeros((n_slots, kv, self.capacity, hd), dtype, device) for kv, hd in layer_shapes]
            self.v = [lazy_zeros(t.shape, dtype, device) for t in self.k]
        super().__init__(n_slots, max_seq)

    def reserve(self, positions: int) -> None:
        """Make every slot hold at least ``positions`` positions (<= ``max_seq``)."""
        if positions <= self.capacity:
            return
        if positions > self.max_seq:
            raise CacheFullError(f"{positions} positions > max_seq {self.max_seq}")
        # A quarter more at least (a few copies over a request's life), in whole key blocks.
        new = padded_keys(max(positions, self.capacity + self.capacity // 4), self.max_seq)
        for name in ("k", "v"):
            old = getattr(self, name)
            if isinstance(old, list):
                for i, t in enumerate(old):
                    old[i] = self._grown(t, new)
            else:
                setattr(self, name, self._grown(old, new))
            del old  # the old half is freed before the next one is allocated
        self.capacity = new

    def _grown(self, old: torch.Tensor, new: int) -> torch.Tensor:
        """``old`` ([..., capacity, hd]) copied into a zeroed [..., new, hd] tensor.

        On the CPU the copy goes one leading index (a layer) at a time into pages not yet
        touched, and each copied part of ``old`` is handed back to the system at once, so
        growing costs one layer's worth of memory beyond the grown cache instead of the whole
        new tensor beside the old one (about 90 MB at 32 slots of the default model: the
        peak of a batch-32 run of ``bench engine``).  ``old`` is never read again (see the class
        docstring).  The new tensor is lazily zeroed (:func:`lazy_zeros`) and each row is copied
        only up to its last position that is not zero, so growing takes no pages for positions
        no request ever wrote."""
        if old.device.type != "cpu" or not _owns_storage(old):
            grown = old.new_zeros(*old.shape[:-2], new, old.shape[-1])
            grown[..., : self.capacity, :] = old
            return grown
        grown = lazy_zeros((*old.shape[:-2], new, old.shape[-1]), old.dtype, old.device)
        for dst, src in zip(grown, old):  # [..., new, hd] <- [..., capacity, hd]
            copy_held(dst.reshape(-1, new, old.shape[-1]), src.reshape(-1, *old.shape[-2:]))
            _release_pages(src)
        return grown

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` positions of slot ``src`` into slot ``dst``, every layer."""
        if isinstance(self.k, list):
            for k, v in zip(self.k, self.v):
                k[dst, :, :n] = k[src, :, :n]
                v[dst, :, :n] = v[src, :, :n]
        else:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    def add_scratch_slot(self) -> int:
        """One more slot row in the tensors, never handed to a request; returns its index.

        The graph-safe step (:mod:`dspark.models.graph_step`) pads a step to a fixed token count
        and writes the padding tokens' keys and values here, where no request reads.
        """
        if isinstance(self.k, list):
            raise ValueError("a scratch slot needs one cache tensor for all layers (not per-layer shapes)")
        self.k = torch.cat((self.k, self.k.new_zeros(self.k.shape[0], 1, *self.k.shape[2:])), dim=1)
        self.v = torch.cat((self.v, self.v.new_zeros(self.v.shape[0], 1, *self.v.shape[2:])), dim=1)
        return self.k.shape[1] - 1

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def nbytes(self) -> int:
        layers = self.k if isinstance(self.k, list) else [self.k]
        return sum(t.numel() * t.element_size() for t in layers) * 2


@dataclass
class VarlenBatch:
    """A flattened variable-length step: request i feeds ``q_lens[i]`` tokens into ``slots[i]``.

    positions: [T] absolute positions of the new tokens; token_slots: [T] their slots.
    paged: where the step writes and reads on a paged cache (dspark/models/paged_cache.py);
    None on the slot layout.  short: the attention kernel's plan of the step, built by its
    first layer (:func:`dspark.kernels.short_attention.short_plan`).
    """

    slots: list[int]
    starts: list[int]
    q_lens: list[int]
    positions: torch.Tensor
    token_slots: torch.Tensor
    plan: AttentionPlan
    paged: PagedPlan | None = None
    short: "ShortPlan | None" = None

    @property
    def num_tokens(self) -> int:
        return self.plan.cu_q[-1]

    @property
    def cu_q(self) -> list[int]:
        return self.plan.cu_q

    def last_token_index(self) -> torch.Tensor:
        """[B] flat index of each request's last new token (where prefill logits are read)."""
        return torch.tensor([c - 1 for c in self.plan.cu_q[1:]], device=self.positions.device)


@dataclass
class StaticBatch:
    """A decode or verification step as fixed-shape device tensors (the graph-safe step).

    slots/positions: [T] each token's cache slot and absolute position, T a token bucket;
    padding tokens sit in the scratch slot at position 0.  visible: [T, K] bool, which of the
    first K positions (the key bucket) each token attends, computed on the device from
    ``positions``.  Nothing here is a host value, so a captured CUDA graph serves every step
    of the same (T, K).
    """

    slots: torch.Tensor
    positions: torch.Tensor
    visible: torch.Tensor
    n_rep: int

    @property
    def num_tokens(self) -> int:
        return self.slots.shape[0]


def step_starts(cache, slots: list[int], q_lens: list[int]) -> list[int]:
    """Each request's start (its cache length) for a step that appends ``q_lens[i]`` tokens to
    ``slots[i]``, after checking the step is well formed (any cache with ``lengths``/``max_seq``)."""
    if len(slots) != len(q_lens) or not slots:
        raise ValueError("need one q_len per slot and at least one request")
    if len(set(slots)) != len(slots):
        raise ValueError("a slot appears twice in one batch")
    starts = [cache.lengths[s] for s in slots]
    for s, st, q in zip(slots, starts, q_lens):
        if q < 1:
            raise ValueError("every request feeds at least one token")
        if st + q > cache.max_seq:
            raise CacheFullError(f"slot {s} would grow to {st + q} > max_seq {cache.max_seq}")
    return starts


def make_batch(
    cache: KVCache,
    slots: list[int],
    q_lens: list[int],
    n_rep: int,
    padded: bool | None = None,
    row_invariant: bool = False,
) -> VarlenBatch:
    """Describe a step that appends ``q_lens[i]`` tokens to ``slots[i]`` and advance lengths.

    ``row_invariant`` selects the attention of the deterministic mode (see
    :func:`dspark.kernels.attention.row_invariant_attention`).

    The lengths move forward immediately: the caller runs the forward pass next, and rolls back
    with :meth:`KVCache.truncate` what verification rejects.

    A paged cache (:class:`dspark.models.paged_cache.PagedKVCache`) describes the step itself
    (no padded attention there).
    """
    from dspark.models.paged_cache import PagedKVCache  # here: that module imports this one

    if isinstance(cache, PagedKVCache):
        if padded:
            raise ValueError("the paged KV cache has no padded attention")
        return cache.make_batch(slots, q_lens, n_rep, row_invariant=row_invariant)
    starts = step_starts(cache, slots, q_lens)
    device = cache.device
    if padded is None:
        padded = device.type != "cpu"
    pos = [p for st, q in zip(starts, q_lens) for p in range(st, st + q)]
    tok_slots = [s for s, q in zip(slots, q_lens) for _ in range(q)]
    # Attention may read keys up to the next key block (row-invariant tiles): room for those too.
    cache.reserve(max(padded_keys(st + q, cache.max_seq) for st, q in zip(starts, q_lens)))
    for s, st, q in zip(slots, starts, q_lens):
        cache.lengths[s] = st + q
    return VarlenBatch(
        slots=list(slots),
        starts=starts,
        q_lens=list(q_lens),
        positions=torch.tensor(pos, dtype=torch.long, device=device),
        token_slots=torch.tensor(tok_slots, dtype=torch.long, device=device),
        plan=build_plan(slots, starts, q_lens, n_rep, device, padded=padded, row_invariant=row_invariant,
                        max_keys=cache.max_seq, kernel=not padded and cache_kernel(cache)),
    )
