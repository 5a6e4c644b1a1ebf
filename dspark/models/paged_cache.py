"""Paged KV cache: fixed-size blocks from one pool, a block table per request.

The slot layout (:mod:`dspark.models.kv_cache`) gives every request one contiguous region as
long as the longest request; here a request holds ``ceil(length / block)`` blocks of ``block``
positions, taken from a pool as it grows and given back as it shrinks, so memory follows the
tokens actually held:

* a step that appends tokens takes the blocks they need (:meth:`PagedKVCache.make_batch`);
* moving a request's length back (rejected draft tokens, at its next step) releases the blocks
  past it (:meth:`PagedKVCache.set_length`), and :meth:`PagedKVCache.release` all of them;
* the pool itself starts at ``GROW_FROM`` blocks and grows by a quarter at least, up to what
  ``n_slots`` requests of ``max_seq`` positions could hold; it never shrinks.

Blocks are shared by reference count.  A full block can be *named* by the chained hash of the
tokens up to its end (:func:`dspark.workers.prefix_cache.block_hashes`); a new request whose
prompt starts with named blocks points its table at them (:meth:`PagedKVCache.reuse`) instead
of computing them, once each hit is confirmed on the block's own tokens and its parent's name
(a 64-bit name can be shared by two prefixes), and :meth:`PagedKVCache.share_prefix` points one request's table at
another's blocks (the n > 1 followers of a prompt).  A partly filled last block is copied
(copy-on-write at share time), and a step that would write into a block others hold copies
it first, so a shared block never changes.  A named block that no table holds any more stays
*cached* (its keys are kept) until the pool runs short: a block is then taken from the free
ones first, then from the cached ones (least recently released first), and only then does the
pool grow.

Tensor parallelism: every operation here is a deterministic function of the calls made, so the
ranks of a group, given the same calls in the same order (the runner broadcasts them), hold the
same block tables.

Layout: ``k``/``v`` are [n_layers, n_kv, n_blocks, block, hd]; layer ``i``'s pool is
``k[i]``, [n_kv, n_blocks, block, hd] (read by :mod:`dspark.kernels.paged_attention`).  They
are replaced when the pool grows: read them from the cache at the time of use.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from dspark.kernels.attention import AttentionPlan, build_plan
from dspark.kernels.paged_attention import build_paged_plan
from dspark.kernels.short_attention import cache_kernel
from dspark.models.kv_cache import (CacheFullError, SlotTable, VarlenBatch, _owns_storage, _release_pages, copy_held, lazy_zeros,
                                    step_starts)


class PagedKVCache(SlotTable):
    """Keys and values of up to ``n_slots`` requests (block tables) of up to ``max_seq`` tokens."""

    GROW_FROM = 16  # blocks in the pool at first (256 positions at the default block)

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_kv_heads: int,
        max_seq: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        block: int = 16,
        initial_blocks: int | None = None,
    ) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        super().__init__(n_slots, max_seq)  # slots and lengths (SlotTable)
        self.block = block
        self.max_blocks = n_slots * -(-max_seq // block)  # n_slots requests of max_seq positions
        n = min(self.max_blocks, self.GROW_FROM if initial_blocks is None else initial_blocks)
        # zeros, not empty: masked keys past a request's length must still be finite numbers.
        shape = (n_layers, n_kv_heads, n, block, head_dim)
        self.k = lazy_zeros(shape, dtype, device)  # pages taken as blocks are written
        self.v = lazy_zeros(shape, dtype, device)
        self.tables: list[list[int]] = [[] for _ in range(n_slots)]
        self.refs = [0] * n  # tables holding each block
        self._free_blocks = list(range(n - 1, -1, -1))  # unnamed, unreferenced; pop() -> lowest first
        self._cached: OrderedDict[int, None] = OrderedDict()  # named, unreferenced; oldest first
        self._block_of: dict[int, int] = {}  # name (chained hash) -> block
        self._name_of: dict[int, int] = {}  # block -> name
        self._key_of: dict[int, tuple] = {}  # block -> what its name stands for (prefix_cache.block_keys)
        self.evictions = 0  # cached blocks taken back for new content

    # -- pool -------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return self.k.shape[2]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def _grow(self, need: int) -> None:
        new = min(self.max_blocks, max(self.n_blocks + need, self.n_blocks + self.n_blocks // 4))
        if new < self.n_blocks + need:
            raise CacheFullError(f"the KV pool is full ({self.max_blocks} blocks of {self.block})")
        old_n = self.n_blocks
        for name in ("k", "v"):
            old = getattr(self, name)
            L, H, _, B, D = old.shape
            grown = lazy_zeros((L, H, new, B, D), old.dtype, old.device)
            if grown.device.type == "cpu":  # blocks are taken lowest first: copy each row's held part
                owned = _owns_storage(old)
                for dst, src in zip(grown, old):  # a layer at a time: [H, blocks * B, D]
                    copy_held(dst.view(H, new * B, D), src.view(H, old_n * B, D))
                    if owned:  # the copied layer's memory goes back at once (read k, v at use only)
                        _release_pages(src)
            else:
                grown[:, :, :old_n] = old
            del old
            setattr(self, name, grown)  # the old tensor goes before the next one is allocated
        self.refs += [0] * (new - old_n)
        self._free_blocks = list(range(new - 1, old_n - 1, -1)) + self._free_blocks

    def _take(self) -> int:
        """A block for new content, with one reference: free, else the oldest cached, else grown."""
        if not self._free_blocks:
            if self._cached:
                b, _ = self._cached.popitem(last=False)
                self._unname(b)
                self.evictions += 1
                self._free_blocks.append(b)
            else:
                self._grow(1)
        b = self._free_blocks.pop()
        self.refs[b] = 1
        return b

    def _hold(self, b: int) -> None:
        if self.refs[b] == 0:
            self._cached.pop(b)  # only named blocks are found while unreferenced
        self.refs[b] += 1

    def _drop(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0:
            if b in self._name_of:
                self._cached[b] = None
            else:
                self._free_blocks.append(b)

    def _copy_block(self, src: int) -> int:
        dst = self._take()
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]
        return dst

    # -- requests ---------------------------------------------------------------------------
    def set_length(self, slot: int, length: int) -> None:
        """Make ``slot`` hold its first ``length`` positions and release the blocks past them."""
        table = self.tables[slot]
        if not 0 <= length <= len(table) * self.block:
            raise ValueError(f"slot {slot} holds {len(table) * self.block} positions, not {length}")
        keep = -(-length // self.block)
        for b in table[keep:]:
            self._drop(b)
        del table[keep:]
        self.lengths[slot] = length

    def truncate(self, slot: int, length: int) -> None:
        """Forget every position >= length (e.g. rejected draft tokens)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.set_length(slot, length)

    def release(self, slot: int) -> None:
        """The slot's request ended: drop its references (named blocks stay cached)."""
        self.set_length(slot, 0)

    # Slots are handed out by SlotTable (for users that keep no slot list of their own: a draft
    # model's runner; the engine's prefix cache hands out the target's slots itself).
    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self.release(slot)
        super().free(slot)

    def _extend(self, slot: int, positions: int) -> None:
        """Give ``slot`` the blocks to hold ``positions``, the block of its next write its own."""
        table = self.tables[slot]
        first = self.lengths[slot] // self.block
        if first < len(table):  # the partly filled last block: copy it if others hold it
            b = table[first]
            if self.refs[b] > 1:
                table[first] = self._copy_block(b)
                self._drop(b)
            elif b in self._name_of:  # its content changes: the name no longer describes it
                self._unname(b)
        while len(table) * self.block < positions:
            table.append(self._take())

    def share_prefix(self, src: int, dst: int, n: int) -> None:
        """Point empty slot ``dst`` at the first ``n`` positions of slot ``src``: its full blocks
        by reference, a partly filled last one copied."""
        if self.tables[dst]:
            raise ValueError(f"slot {dst} is not empty")
        if n > self.lengths[src]:
            raise ValueError(f"slot {src} holds {self.lengths[src]} positions, not {n}")
        full, rest = divmod(n, self.block)
        for b in self.tables[src][:full]:
            self._hold(b)
        self.tables[dst] = self.tables[src][:full]
        if rest:
            self.tables[dst].append(self._copy_block(self.tables[src][full]))
        self.lengths[dst] = n

    copy_prefix = share_prefix  # the slot layout's name for the same request

    def _unname(self, b: int) -> None:
        del self._block_of[self._name_of.pop(b)]
        self._key_of.pop(b, None)

    def name(self, slot: int, names: list[int], keys: list[tuple] | None = None) -> None:
        """Name the first ``len(names)`` blocks of ``slot`` (full ones) for reuse by others.

        ``keys`` (:func:`dspark.workers.prefix_cache.block_keys`), when given, are kept with the
        names so that a later :meth:`reuse` with keys confirms each hit on the tokens; a rank
        that only mirrors rank 0's reuse decisions needs none.  A name already given to another
        block keeps that block (same tokens computed twice, or a collision: either way the
        first stays).
        """
        if len(names) * self.block > self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions, not {len(names)} full blocks")
        for i, (b, h) in enumerate(zip(self.tables[slot], names)):
            if h not in self._block_of and b not in self._name_of:
                self._block_of[h] = b
                self._name_of[b] = h
                if keys is not None:
                    self._key_of[b] = keys[i]

    def matching(self, names: list[int], keys: list[tuple]) -> int:
        """How many leading ``names`` are held by blocks whose keys equal ``keys``: the blocks
        that truly hold that prefix (a name shared by other tokens stops the count)."""
        n = 0
        for h, key in zip(names, keys):
            b = self._block_of.get(h)
            if b is None or self._key_of.get(b) != key:
                break
            n += 1
        return n

    def reuse(self, slot: int, names: list[int], keys: list[tuple] | None = None) -> int:
        """Point empty ``slot`` at the named blocks of the longest prefix of ``names`` found
        (with ``keys``: whose keys match too, see :meth:`matching`); returns how many blocks
        (its length becomes that many blocks' positions)."""
        if self.tables[slot]:
            raise ValueError(f"slot {slot} is not empty")
        if keys is not None:
            names = names[: self.matching(names, keys)]
        for h in names:
            b = self._block_of.get(h)
            if b is None:
                break
            self._hold(b)
            self.tables[slot].append(b)
        self.lengths[slot] = len(self.tables[slot]) * self.block
        return len(self.tables[slot])

    # -- accounting -------------------------------------------------------------------------
    @property
    def blocks_in_use(self) -> int:
        """Blocks some table holds."""
        return self.n_blocks - len(self._free_blocks) - len(self._cached)

    def stats(self) -> dict:
        """Occupancy: blocks in use, cached (named, evictable) and in the pool, of at most ``max_blocks``."""
        return {"kv_cache_blocks_in_use": self.blocks_in_use, "kv_cache_blocks_cached": len(self._cached),
                "kv_cache_blocks_total": self.n_blocks, "kv_cache_blocks_max": self.max_blocks,
                "kv_cache_block_evictions": self.evictions}

    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()

    # -- steps ------------------------------------------------------------------------------
    def make_batch(self, slots: list[int], q_lens: list[int], n_rep: int, row_invariant: bool = False) -> VarlenBatch:
        """Describe a step that appends ``q_lens[i]`` tokens to ``slots[i]``: take the blocks
        they need and advance the lengths (see :func:`dspark.models.kv_cache.make_batch`).
        ``row_invariant``: the deterministic mode's tiles, reading whole key blocks of 64."""
        starts = step_starts(self, slots, q_lens)
        for s, st, q in zip(slots, starts, q_lens):
            self._extend(s, st + q)
            self.lengths[s] = st + q
        device = self.device
        tables = [self.tables[s] for s in slots]
        kernel = cache_kernel(self)
        if row_invariant and not kernel:
            plan = build_plan(slots, starts, q_lens, n_rep, device, row_invariant=True, max_keys=self.max_seq)
            paged = build_paged_plan(tables, starts, q_lens, n_rep, self.block, device, tiles=plan.tiles, slots=slots)
        else:  # with the kernel, the deterministic mode's every query goes to it (no torch calls planned)
            cu = [0]
            for q in q_lens:
                cu.append(cu[-1] + q)
            plan = AttentionPlan(list(slots), starts, list(q_lens), cu, n_rep, masks=[], kernel=kernel,
                                 row_invariant=row_invariant)
            paged = build_paged_plan(tables, starts, q_lens, n_rep, self.block, device, long_only=kernel)
            if kernel and row_invariant:
                paged.groups = []
        pos = [p for st, q in zip(starts, q_lens) for p in range(st, st + q)]
        tok_slots = [s for s, q in zip(slots, q_lens) for _ in range(q)]
        return VarlenBatch(
            slots=list(slots),
            starts=starts,
            q_lens=list(q_lens),
            positions=torch.tensor(pos, dtype=torch.long, device=device),
            token_slots=torch.tensor(tok_slots, dtype=torch.long, device=device),
            plan=plan,
            paged=paged,
        )
