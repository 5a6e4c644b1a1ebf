"""Prefix reuse: which token prefixes the target's cache slots hold, so a new request that shares
one (a system prompt, the earlier turns of a conversation) copies its keys and values instead of
computing them again.

Slots hold their content in hash-addressed blocks of ``BLOCK`` tokens: block i of a token list
is named by a hash chained over blocks 0..i.  A name is only an address: names are 64-bit, and
Python's hash of integers is neither random nor cryptographic, so two different prefixes can
share a name (by chance, or because a client crafted its prompt to).  Every hit is therefore
confirmed on the tokens themselves before anything is reused: the slot layout compares the
slot's indexed tokens with the prompt, the paged layout compares each named block's own tokens
and its parent's name (so, block by block from the first, the whole prefix).  A collision costs
a miss, never another request's keys and values.  A slot is
indexed

* while live, once its prompt is in the cache (the prompt's positions never change after that:
  rejected drafts are dropped only past the verified tokens);
* after its request finished, with every token it kept (prompt and output): the slot is free
  but *retained*, until a new request needs it and no empty slot is left (least recently
  released first).

A new request reuses the longest indexed prefix of its prompt, in whole blocks, always leaving
its last prompt token to compute (its logits give the first output token).  When the longest
match sits in a retained slot, the request takes that slot itself and nothing is copied;
otherwise the engine copies the prefix from the slot that holds it (live or retained) into the
request's slot.  Keys and values depend only on the tokens before them, so a copied prefix is
what prefilling it would write (bit for bit in the deterministic mode, whose kernels are
row-invariant; elsewhere, within the rounding by which any two batchings differ).

Drafters that read the target's hidden states (DSpark, hybrid) need them for every context
token, and a reused prefix has none; a remote drafter rebuilds its context from the tokens
``observe()`` streams to it.  The engine reuses prefixes only with drafters that declare
``prefix_reuse`` (n-gram, layer-skip, draft model: they read ``seq.all_ids`` or a cache) and
without a drafter (see ``Engine.__init__``).

On the paged layout (:mod:`dspark.models.paged_cache`) the unit is the block, not the slot:
:class:`BlockPrefixCache` names a request's full blocks by the same chained hashes, and a new
request's table points at the named blocks of its prompt (shared by reference count, nothing
copied); a finished request's named blocks stay cached until the pool needs them back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

BLOCK = 16


def chain_hash(parent: int, block_tokens: tuple[int, ...]) -> int:
    """The name of a block whose predecessor is named ``parent`` (0 for the first block)."""
    return hash((parent, block_tokens))


def block_keys(
    tokens: list[int], block: int = BLOCK, names: list[int] | None = None
) -> list[tuple[int, tuple[int, ...]]]:
    """What each full block's name stands for: (its parent's name, its own tokens).

    A named block whose key equals a prompt's block i key, for every i from 0, holds exactly
    that prompt's prefix (by induction over the parents).
    """
    names = block_hashes(tokens, block) if names is None else names  # the caller's, when it has them
    return [(names[i - 1] if i else 0, tuple(tokens[i * block : (i + 1) * block])) for i in range(len(names))]


def block_hashes(tokens: list[int], block: int = BLOCK) -> list[int]:
    """Chained hashes of the full blocks of ``tokens``: [h_0, h_1, ...], h_i covers blocks 0..i.

    >>> a, b = block_hashes(list(range(40)), 16), block_hashes(list(range(32)) + [7] * 8, 16)
    >>> len(a), a == b, block_hashes([1, 2], 16)
    (2, True, [])
    """
    out, h = [], 0
    for i in range(0, len(tokens) - block + 1, block):
        h = chain_hash(h, tuple(tokens[i : i + block]))
        out.append(h)
    return out


@dataclass
class Reuse:
    """Where a new request goes: its ``slot``, and the first ``tokens`` of its prompt to copy
    from ``source`` (``source == slot``: already in place; ``tokens == 0``: nothing reused)."""

    slot: int
    source: int
    tokens: int


class PrefixCache:
    """Free-slot allocation that remembers and reuses the slots' token prefixes."""

    def __init__(self, n_slots: int, enabled: bool = True, block: int = BLOCK) -> None:
        self.n_slots = n_slots
        self.enabled = enabled
        self.block = block
        self._empty = list(range(n_slots - 1, -1, -1))  # free, nothing worth keeping; pop() -> lowest
        self._retained: OrderedDict[int, None] = OrderedDict()  # free but indexed, oldest first
        self._hashes: dict[int, list[int]] = {}  # slot -> its indexed block chain
        self._tokens: dict[int, list[int]] = {}  # slot -> the tokens that chain names (hits are confirmed on them)
        self._where: dict[int, set[int]] = {}  # block hash -> slots holding that prefix
        self.queried_tokens = 0  # prompt tokens that could have been reused (all but the last)
        self.hit_tokens = 0  # prompt tokens that were reused

    # -- index ------------------------------------------------------------------------------
    def _forget(self, slot: int) -> None:
        self._tokens.pop(slot, None)
        for h in self._hashes.pop(slot, ()):
            holders = self._where.get(h)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self._where[h]

    def index(self, slot: int, tokens: list[int]) -> None:
        """Record that ``slot`` holds the keys and values of ``tokens`` (from position 0)."""
        self._forget(slot)
        if not self.enabled:
            return
        hashes = block_hashes(tokens, self.block)
        self._hashes[slot] = hashes
        self._tokens[slot] = list(tokens[: len(hashes) * self.block])
        for h in hashes:
            self._where.setdefault(h, set()).add(slot)

    # -- allocation -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._empty) + len(self._retained)

    def allocate(self, prompt: list[int]) -> Reuse:
        """A free slot for a request with this prompt, and what of the prompt it can reuse."""
        if not self.num_free:
            raise RuntimeError("no free cache slot")
        usable = prompt[:-1]
        self.queried_tokens += len(usable) // self.block * self.block
        depth, holders = 0, set()
        if self.enabled:
            b = self.block
            for i, h in enumerate(block_hashes(usable, b)):
                # Holders of block i's name that held blocks 0..i-1 too and whose block i has
                # the prompt's tokens: a name shared by another prefix is not a hit.
                want = usable[i * b : (i + 1) * b]
                found = {
                    s for s in self._where.get(h, ())
                    if (i == 0 or s in holders) and self._tokens[s][i * b : (i + 1) * b] == want
                }
                if not found:
                    break
                depth, holders = i + 1, found
        tokens = depth * self.block
        in_place = [s for s in holders if s in self._retained]
        if in_place:  # the retained slot that holds the prefix becomes the request's slot
            slot = source = in_place[0]
            del self._retained[slot]
        else:
            # An empty slot, else the least recently released one (no retained slot holds the
            # prefix here, so the source, if any, is a live request's slot).
            slot = self._empty.pop() if self._empty else self._retained.popitem(last=False)[0]
            source = min(holders) if tokens else slot
        self._forget(slot)
        if tokens and source == slot:
            self.index(slot, prompt[:tokens])  # what stays valid of its old content
        self.hit_tokens += tokens
        return Reuse(slot=slot, source=source, tokens=tokens)

    def release(self, slot: int, tokens: list[int]) -> None:
        """The slot's request ended; ``tokens`` are the positions its cache holds."""
        if self.enabled and len(tokens) >= self.block:
            self.index(slot, tokens)
            self._retained[slot] = None
        else:
            self._forget(slot)
            self._empty.append(slot)
            self._empty.sort(reverse=True)

    def stats(self) -> dict:
        """Hit rate over the prompt tokens that could have been reused, and slots retained."""
        return {
            "prefix_cache_queried_tokens": self.queried_tokens,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_hit_rate": self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0,
            "prefix_cache_retained_slots": len(self._retained),
        }


class BlockStore(Protocol):
    """The block operations of a runner whose target cache is paged; a tensor-parallel driver
    sends each to every rank, so all hold the same tables."""

    def reuse_blocks(self, slot: int, names: list[int], keys: list[tuple] | None = None) -> int: ...

    def name_blocks(self, slot: int, names: list[int], keys: list[tuple] | None = None) -> None: ...

    def release_slot(self, slot: int) -> None: ...

    def block_stats(self) -> dict: ...


class BlockPrefixCache:
    """:class:`PrefixCache`'s interface over a paged cache: slots are block tables, reuse is by
    block.

    A slot is free as soon as its request ends (its blocks, not the slot, keep what is worth
    keeping), so a request never waits for a retained slot and ``Reuse.source`` is always the
    request's own slot: the blocks are in place.
    """

    def __init__(self, store: BlockStore, n_slots: int, block: int, enabled: bool = True) -> None:
        self.store = store
        self.n_slots = n_slots
        self.block = block
        self.enabled = enabled
        self._free = list(range(n_slots - 1, -1, -1))  # pop() -> lowest
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, prompt: list[int]) -> Reuse:
        """A slot for a request with this prompt, its table pointed at the prompt's cached blocks."""
        if not self._free:
            raise RuntimeError("no free cache slot")
        slot = self._free.pop()
        usable = prompt[:-1]  # the last prompt token is always computed: its logits are sampled
        self.queried_tokens += len(usable) // self.block * self.block
        tokens = 0
        if self.enabled and len(usable) >= self.block:
            names = block_hashes(usable, self.block)
            keys = block_keys(usable, self.block, names)  # each hit is confirmed on its tokens
            tokens = self.store.reuse_blocks(slot, names, keys) * self.block
        self.hit_tokens += tokens
        return Reuse(slot=slot, source=slot, tokens=tokens)

    def index(self, slot: int, tokens: list[int]) -> None:
        """``slot`` holds the keys and values of ``tokens``: name its full blocks."""
        if self.enabled and len(tokens) >= self.block:
            names = block_hashes(tokens, self.block)
            self.store.name_blocks(slot, names, block_keys(tokens, self.block, names))

    def release(self, slot: int, tokens: list[int]) -> None:
        """The slot's request ended holding ``tokens``: name them, drop the table, free the slot."""
        self.index(slot, tokens)
        self.store.release_slot(slot)
        self._free.append(slot)
        self._free.sort(reverse=True)

    def stats(self) -> dict:
        """Hit rate over the prompt tokens that could have been reused, and the pool's occupancy."""
        blocks = self.store.block_stats()
        return {
            "prefix_cache_queried_tokens": self.queried_tokens,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_hit_rate": self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0,
            **blocks,
            "kv_cache_block_usage": blocks["kv_cache_blocks_in_use"] / blocks["kv_cache_blocks_total"],
        }


def prefix_cache_for(runner, n_slots: int, enabled: bool) -> PrefixCache | BlockPrefixCache:
    """The prefix cache of an engine over ``runner``: by block on a paged target cache, by slot
    otherwise."""
    from dspark.models.paged_cache import PagedKVCache

    if isinstance(runner.cache, PagedKVCache):
        return BlockPrefixCache(runner, n_slots, runner.cache.block, enabled=enabled)
    return PrefixCache(n_slots, enabled=enabled)
