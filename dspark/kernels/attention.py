"""Attention over a flattened variable-length batch against a slot-based KV cache.

Every request in a step contributes ``q_len >= 1`` new tokens (a prefill chunk, a decode token or
a verification block) that sit at cache positions ``start .. start + q_len - 1`` of its slot.
A new token at position ``start + i`` sees every cached position ``<= start + i``: a causal mask
aligned to the bottom-right corner of the [q_len, start + q_len] score matrix.  With a sliding
``window`` W it sees only positions ``> start + i - W`` (the W most recent, itself included);
the cache keeps every position and the mask limits what is read.  Scores are scaled by
``scale`` (``hd ** -0.5`` unless the plan says otherwise).

Implementations with the same result:
  * ``loop``: one SDPA call per request on views of the cache (no copies);
  * ``span`` (CPU default for the short queries of a step: decode tokens, verification blocks):
    one SDPA call for all of them, on a strided view of the cache over the slots from the
    lowest to the highest they use (no copies).  Queries are padded to the longest short query
    and keys to the longest context; padding rows attend to position 0 only.  A step's long
    queries (prefill chunks) still take the loop.  Measured at batch 32 decode (bf16, 2 cores),
    30 per-request calls per layer cost more than the padding (docs/BENCHMARKS.md, bench engine);
  * ``padded``: gather all requests' keys/values into one padded batch and make one SDPA call
    (best on GPU where launches dominate and bandwidth is plentiful).

A third, ``row_invariant`` (the deterministic mode), trades speed for bitwise reproducibility: a
query's output does not depend on how many other queries its request or the step carries.  SDPA
does not give that: its CPU kernel picks its query and key blocking from the call's shape, so a
verification block of k tokens rounds differently from k one-token decode steps (measured: 1 in 3
outputs of a 2..16-token block differ in some element from the same query alone).

Grouped-query attention is handled without repeating keys/values: the ``n_rep`` query heads that
share a key/value head are folded into the query-length axis, so each KV head is read once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionPlan:
    """Per-step description of a varlen batch, built once and shared by all layers.

    slots/starts/q_lens: per request (host ints). cu_q: [B+1] prefix sums of q_lens.
    masks: per request, None for single-token queries, else a bool [n_rep * q_len, L] mask
    (True = attend) where L = start + q_len.  For the padded path: ``gather_*`` tensors.
    """

    slots: list[int]
    starts: list[int]
    q_lens: list[int]
    cu_q: list[int]
    n_rep: int
    masks: list[torch.Tensor | None]
    padded: bool = False
    pad_mask: torch.Tensor | None = None  # [B, 1, n_rep * max_q, max_L] bool
    slot_index: torch.Tensor | None = None  # [B] long
    pad_batch: torch.Tensor | None = None  # [T] request index of each flat token
    pad_rows: torch.Tensor | None = None  # [T] position of each flat token within its request
    max_q: int = 0
    max_len: int = 0
    row_invariant: bool = False
    # Row-invariant path: (slot, first flat token, tokens, key length, bool mask or None) per tile.
    tiles: list[tuple[int, int, int, int, torch.Tensor | None]] | None = None
    # The same tiles grouped by (tokens, key length, masked or not): what one batched call computes.
    tile_groups: "list[TileGroup] | None" = None
    span: "SpanPlan | None" = None  # the short queries' one call (loop path); their masks are None
    window: int | None = None  # sliding window: each query reads its ``window`` latest positions
    scale: float | None = None  # score scale; None: hd ** -0.5
    kernel: bool = False  # short queries through our kernel (dspark.kernels.short_attention): no span, no masks


@dataclass
class SpanPlan:
    """One SDPA call over cache slots ``lo .. lo + n_slots - 1`` for a step's short queries.

    tokens: [Ts] flat indices of the queries it covers; rows: [Ts] their padded row index in
    the [n_slots * max_q] query grid; mask: [n_slots, 1, n_rep * max_q, max_len] bool.
    """

    lo: int
    n_slots: int
    max_q: int
    max_len: int
    tokens: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor


@dataclass
class TileGroup:
    """Row-invariant tiles of ``n`` tokens and ``keys`` padded keys each, one batched call.

    slots: [G] long, sorted; rows: [G * n] long, the tiles' flat token rows in slot order;
    masks: [G, n_rep * n, keys] bool, or None when every tile sees all its keys.  ``lo`` is
    set when the tiles read the cache in place: the call covers slots ``lo .. lo + width - 1``
    (a view, no copies; slots of the span outside the group compute rows nobody reads) and
    ``at`` [G * n] gives each tile row's place in that span.  Otherwise (``lo`` None) the
    call reads gathered copies of the group's slots.
    """

    slots: torch.Tensor
    rows: torch.Tensor
    n: int
    keys: int
    masks: torch.Tensor | None
    lo: int | None = None
    width: int = 0
    at: torch.Tensor | None = None


# A tile group reads the cache in place when its slots span at most this many times their
# number: the in-place call reads the span once, a gathered copy reads and writes the group's
# keys and values before the call reads them again.
VIEW_SPREAD = 2


# Queries of at most this many tokens per request join the step's one span call (a verification
# block of the default drafters is 8 or fewer); longer ones (prefill chunks) take the loop.
SPAN_MAX_Q = 16


# Row-invariant attention reads keys in multiples of this many positions (masked past the
# query's own), so a query's reductions have the same length whatever tile it is in: measured
# with AMX, P @ V over L keys and over L plus a few zero-probability keys round differently for
# some L (3 of 400 tried: 133, 192, 233), and a float32 softmax's tail handling depends on L.
KEY_BLOCK = 64


def padded_keys(length: int, max_keys: int) -> int:
    """``length`` rounded up to a multiple of ``KEY_BLOCK``, at most ``max_keys`` (the cache's).

    >>> padded_keys(1, 2048), padded_keys(64, 2048), padded_keys(65, 2048), padded_keys(65, 100)
    (64, 64, 128, 100)
    """
    return min(-(-length // KEY_BLOCK) * KEY_BLOCK, max_keys)


# Most queries one row-invariant tile holds.  A verification block (block length + 1 <= 8 by
# default) is one tile.  Measured on oneDNN bf16: products with up to 16 queries x 3 folded heads
# give every row the same bits as one query alone; at 32 queries (96 rows) and ~1,000 keys the
# P @ V product switches blocking and some rows change.
ROW_TILE = 8


def visible(k_pos: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys a query sees: causal, and within the last ``window`` positions when set.

    Broadcasts k_pos against q_pos.  Example, window 2: the query at 3 sees keys 2 and 3.
        >>> visible(torch.arange(4), torch.tensor(3), 2).tolist()
        [False, False, True, True]
    """
    seen = k_pos <= q_pos
    if window is not None:
        seen = seen & (k_pos > q_pos - window)
    return seen


def causal_mask(start: int, q_len: int, n_rep: int, device: torch.device | str, window: int | None = None) -> torch.Tensor:
    """Bottom-right aligned causal mask (sliding when ``window`` is set), tiled over the folded
    query heads.

    Returns bool [n_rep * q_len, start + q_len].  Example, start=1, q_len=2, n_rep=1:
        [[True, True, False],
         [True, True, True ]]
    and with window=2 the second row reads [False, True, True].
    """
    total = start + q_len
    q_pos = torch.arange(start, total, device=device).unsqueeze(1)  # [q_len, 1]
    k_pos = torch.arange(total, device=device).unsqueeze(0)  # [1, L]
    return visible(k_pos, q_pos, window).repeat(n_rep, 1)


def build_plan(
    slots: list[int],
    starts: list[int],
    q_lens: list[int],
    n_rep: int,
    device: torch.device | str,
    padded: bool = False,
    row_invariant: bool = False,
    span: bool = True,
    max_keys: int | None = None,
    window: int | None = None,
    scale: float | None = None,
    kernel: bool = False,
) -> AttentionPlan:
    """The attention plan of one step (see the module docstring for the paths).

    ``span=False`` keeps every request on the per-request loop (the reference in tests).
    ``kernel``: the short queries (with ``row_invariant``, all of them) go to our attention
    kernel (:mod:`dspark.kernels.short_attention`), so only the others get masks here.
    ``max_keys``: the cache's positions per slot (row-invariant tiles never read past it).
    ``window``: sliding-window attention over the ``window`` latest positions (None: all).
    ``scale``: the score scale (None: hd ** -0.5).
    """
    if row_invariant and max_keys is None and not kernel:  # a cap taken from the step would make tiles depend on it
        raise ValueError("row-invariant plans need max_keys (the cache's positions per slot)")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    plan = AttentionPlan(slots, starts, q_lens, cu, n_rep, masks=[], padded=padded, row_invariant=row_invariant,
                         window=window, scale=scale)
    if kernel and not padded:
        # The kernel computes every row on its own: it serves the deterministic mode's every
        # query (prefill chunks too), and the default mode's short ones (SDPA's blocked
        # products are quicker on a long chunk, which alone gets a mask).
        plan.kernel = True
        plan.masks = [None if q <= SPAN_MAX_Q or row_invariant else causal_mask(s, q, n_rep, device, window)
                      for s, q in zip(starts, q_lens)]
        return plan
    if row_invariant:
        plan.tiles = []
        for slot, start, a, q_len in zip(slots, starts, cu, q_lens):
            t = 0
            while t < q_len:
                # Tokens t.. see start + t + 1.. keys; a tile holds those with one padded key count.
                keys = padded_keys(start + t + 1, max_keys)
                n = min(ROW_TILE, q_len - t)
                while n > 1 and padded_keys(start + t + n, max_keys) != keys:
                    n -= 1
                q_pos = torch.arange(start + t, start + t + n, device=device).unsqueeze(1)
                mask = visible(torch.arange(keys, device=device).unsqueeze(0), q_pos, window)  # [n, keys]
                plan.tiles.append((slot, a + t, n, keys, mask.repeat(n_rep, 1)))
                t += n
        plan.tile_groups = _group_tiles(plan.tiles, device)
        return plan
    if not padded:
        short = [i for i, q in enumerate(q_lens) if q <= SPAN_MAX_Q]
        if span and len(short) >= 2:
            plan.span = _span_plan(short, slots, starts, q_lens, cu, n_rep, device, window)
        in_span = set(short) if plan.span is not None else set()
        # A one-token query needs no mask unless the window hides some of its past.
        plan.masks = [None if i in in_span or (q == 1 and (window is None or s < window))
                      else causal_mask(s, q, n_rep, device, window)
                      for i, (s, q) in enumerate(zip(starts, q_lens))]
        return plan
    max_q = max(q_lens)
    max_len = max(s + q for s, q in zip(starts, q_lens))
    # Padded query row j of request b is query index j % max_q of head-group row j // max_q.
    q_pos = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(max_q, device=device)  # [B, max_q]
    valid_q = torch.arange(max_q, device=device).unsqueeze(0) < torch.tensor(q_lens, device=device).unsqueeze(1)
    k_pos = torch.arange(max_len, device=device)
    mask = visible(k_pos.view(1, 1, -1), q_pos.unsqueeze(-1), window)  # [B, max_q, max_len]
    # Padding query rows attend to position 0 only, so their softmax stays finite.
    mask = torch.where(valid_q.unsqueeze(-1), mask, k_pos.view(1, 1, -1) == 0)
    plan.pad_mask = mask.repeat(1, n_rep, 1).unsqueeze(1)  # [B, 1, n_rep*max_q, max_len]
    plan.slot_index = torch.tensor(slots, device=device, dtype=torch.long)
    # Flat token -> (request, row) maps, built once per step on the host (no per-layer copies).
    plan.pad_batch = torch.tensor([b for b, n in enumerate(q_lens) for _ in range(n)], device=device)
    plan.pad_rows = torch.tensor([i for n in q_lens for i in range(n)], device=device)
    plan.max_q, plan.max_len = max_q, max_len
    return plan


def _span_plan(short, slots, starts, q_lens, cu, n_rep, device, window: int | None) -> SpanPlan:
    lo = min(slots[i] for i in short)
    n_slots = max(slots[i] for i in short) - lo + 1
    max_q = max(q_lens[i] for i in short)
    max_len = max(starts[i] + q_lens[i] for i in short)
    pos = [[0] * max_q for _ in range(n_slots)]  # padding rows: position 0, key 0 only
    tokens, rows = [], []
    for i in short:  # host lists, one tensor at the end: this runs every step
        b = slots[i] - lo
        pos[b][: q_lens[i]] = range(starts[i], starts[i] + q_lens[i])
        tokens.extend(range(cu[i], cu[i + 1]))
        rows.extend(range(b * max_q, b * max_q + q_lens[i]))
    q_pos = torch.tensor(pos)
    mask = visible(torch.arange(max_len).view(1, 1, -1), q_pos.unsqueeze(-1), window)  # [n_slots, max_q, max_len]
    mask = mask.repeat(1, n_rep, 1).unsqueeze(1)  # rows are (head-group, query) like the queries
    return SpanPlan(lo, n_slots, max_q, max_len, torch.tensor(tokens, device=device),
                    torch.tensor(rows, device=device), mask.to(device))


def _span_attention(q, k_cache, v_cache, span: SpanPlan, n_rep: int, scale: float | None, out: torch.Tensor) -> None:
    """The span's queries in one SDPA call; writes their rows of ``out``."""
    T, n_heads, hd = q.shape
    n_kv = n_heads // n_rep
    grid = q.new_zeros(span.n_slots * span.max_q, n_heads, hd)
    grid[span.rows] = q[span.tokens]
    # [n_slots, max_q, n_kv, rep, hd] -> [n_slots, n_kv, rep * max_q, hd]: GQA groups folded into rows
    qb = grid.view(span.n_slots, span.max_q, n_kv, n_rep, hd).permute(0, 2, 3, 1, 4)
    qb = qb.reshape(span.n_slots, n_kv, n_rep * span.max_q, hd)
    kb = k_cache[span.lo : span.lo + span.n_slots, :, : span.max_len]  # a strided view, no copy
    vb = v_cache[span.lo : span.lo + span.n_slots, :, : span.max_len]
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=span.mask, scale=scale)
    ob = ob.view(span.n_slots, n_kv, n_rep, span.max_q, hd).permute(0, 3, 1, 2, 4).reshape(-1, n_heads, hd)
    out[span.tokens] = ob[span.rows]


def varlen_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """Attention of new queries against their requests' cached keys/values.

    q: [T, n_heads, hd] (T = sum of q_lens); k_cache/v_cache: [S, n_kv, max_seq, hd] for one
    layer, already holding this step's keys/values.  Returns [T, n_heads, hd].
    """
    if plan.kernel:  # its short queries have no masks: only the kernel may read this plan
        raise ValueError("a plan for the attention kernel (dspark.kernels.short_attention.attend)")
    if plan.row_invariant:
        return row_invariant_attention(q, k_cache, v_cache, plan)
    if plan.padded:
        return _padded_attention(q, k_cache, v_cache, plan)
    out = torch.empty_like(q)
    if plan.span is not None:
        _span_attention(q, k_cache, v_cache, plan.span, plan.n_rep, plan.scale, out)
    loop_attention(q, k_cache, v_cache, plan, out, long_only=plan.span is not None)
    return out


def loop_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan, out: torch.Tensor,
    long_only: bool = False,
) -> None:  # fmt: skip
    """One SDPA call per request on views of its slot, into ``out``; with ``long_only`` only for
    the requests of more than ``SPAN_MAX_Q`` tokens (prefill chunks: the short ones are done)."""
    T, n_heads, hd = q.shape
    n_kv = n_heads // plan.n_rep
    for i, slot in enumerate(plan.slots):
        a, b = plan.cu_q[i], plan.cu_q[i + 1]
        if long_only and b - a <= SPAN_MAX_Q:
            continue
        q_len = b - a
        total = plan.starts[i] + q_len
        # [q_len, n_kv, rep, hd] -> [1, n_kv, rep * q_len, hd]: GQA groups folded into rows
        qi = q[a:b].view(q_len, n_kv, plan.n_rep, hd).permute(1, 2, 0, 3).reshape(1, n_kv, plan.n_rep * q_len, hd)
        ki = k_cache[slot, :, :total].unsqueeze(0)  # [1, n_kv, L, hd]
        vi = v_cache[slot, :, :total].unsqueeze(0)
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=plan.masks[i], scale=plan.scale)
        out[a:b] = oi.view(n_kv, plan.n_rep, q_len, hd).permute(2, 0, 1, 3).reshape(q_len, n_heads, hd)


def static_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    visible_keys: torch.Tensor,
    n_rep: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention with every input a fixed-shape device tensor (what a CUDA graph can hold).

    q: [T, n_heads, hd]; k_cache/v_cache: [S, n_kv, capacity, hd], already holding this step's
    keys/values; slots: [T] each token's slot; visible_keys: [T, K] bool (K <= capacity, the
    key bucket), True where the token attends.  Each token reads the first K positions of its
    own slot (a gather: a verification block reads its slot once per token) with the heads
    sharing a KV head as its query rows.  Returns [T, n_heads, hd].

    Example: a token at position 2 with K = 4 attends keys 0..2 of its slot, as
    ``visible(torch.arange(4), torch.tensor(2), None)`` says.
    """
    T, n_heads, hd = q.shape
    n_kv, K = n_heads // n_rep, visible_keys.shape[1]
    kb = k_cache[:, :, :K][slots]  # [T, n_kv, K, hd]
    vb = v_cache[:, :, :K][slots]
    qb = q.view(T, n_kv, n_rep, hd)  # the query heads of a KV head as its rows
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=visible_keys[:, None, None, :], scale=scale)
    return ob.reshape(T, n_heads, hd)


def _padded_attention(q, k_cache, v_cache, plan: AttentionPlan) -> torch.Tensor:
    T, n_heads, hd = q.shape
    n_kv = n_heads // plan.n_rep
    B, max_q = len(plan.slots), plan.max_q
    # Scatter the flat queries into a padded [B, max_q, n_heads, hd] block.
    q_pad = q.new_zeros(B, max_q, n_heads, hd)
    batch, rows = plan.pad_batch, plan.pad_rows
    q_pad[batch, rows] = q
    qb = q_pad.view(B, max_q, n_kv, plan.n_rep, hd).permute(0, 2, 3, 1, 4).reshape(B, n_kv, plan.n_rep * max_q, hd)
    kb = k_cache[plan.slot_index, :, : plan.max_len]  # [B, n_kv, max_len, hd]
    vb = v_cache[plan.slot_index, :, : plan.max_len]
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=plan.pad_mask, scale=plan.scale)
    ob = ob.view(B, n_kv, plan.n_rep, max_q, hd).permute(0, 3, 1, 2, 4).reshape(B, max_q, n_heads, hd)
    return ob[batch, rows]


def _group_tiles(tiles, device) -> list[TileGroup]:
    """Tiles of equal token count and key length, stacked for one batched call each."""
    groups: dict[tuple[int, int, bool], list] = {}
    for tile in tiles:  # a tile without a mask sees every key: grouped apart
        groups.setdefault((tile[2], tile[3], tile[4] is None), []).append(tile)
    out = []
    for (n, keys, unmasked), members in groups.items():
        members.sort(key=lambda m: m[0])
        slots = [m[0] for m in members]
        rows = torch.tensor([m[1] + i for m in members for i in range(n)], dtype=torch.long, device=device)
        masks = None if unmasked else torch.stack([m[4] for m in members])
        group = TileGroup(torch.tensor(slots, dtype=torch.long, device=device), rows, n, keys, masks)
        width = slots[-1] - slots[0] + 1
        if width <= VIEW_SPREAD * len(slots) and len(set(slots)) == len(slots):
            group.lo, group.width = slots[0], width
            group.at = torch.tensor([(s - slots[0]) * n + i for s in slots for i in range(n)], dtype=torch.long,
                                    device=device)
            if masks is not None and width > len(slots):  # slots outside the group: any mask will do
                full = masks.new_ones(width, *masks.shape[1:])
                full[torch.tensor(slots, device=device) - slots[0]] = masks
                group.masks = full
        out.append(group)
    return out


def row_invariant_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """Attention whose every query row rounds the same whatever else the step carries.

    Same arguments and result shape as :func:`varlen_attention`.  Queries run in tiles of at most
    ``ROW_TILE`` tokens of one request, computed like the reference implementation's eager
    attention: scaled scores in the cache dtype, softmax in float32 (masked keys at -inf add exact
    zeros), probabilities back in the cache dtype times values.  Every product stays in the shape
    range where the matmul kernel's per-row reduction order is fixed, keys are read in multiples
    of ``KEY_BLOCK`` positions (masked past each query's own), so every reduction of a query has
    the same length in a tile as alone, and a lone decode token takes the same operations as a
    row of a verification tile.  Example: a 5-token verification block gives bit for bit the
    rows of 5 successive one-token decode steps.

    Tiles of the same token count and key length run as one batched call
    (:func:`row_invariant_tiles`): each tile is one entry of the batched products, which give
    every entry the bits it gets alone (a test checks it against the tile-by-tile loop), and a
    step of 64 decoding requests takes a few calls per layer instead of 64.  A group whose slots
    lie close together reads the cache in place over their span (:class:`TileGroup`); a
    scattered one reads gathered copies.  Both give the same bits (tested).
    """
    out = torch.empty_like(q)
    groups = plan.tile_groups
    if groups is None:  # a plan built by hand with tiles only
        groups = _group_tiles(plan.tiles, q.device)
    for g in groups:
        if g.lo is None:
            # Gathered copies: bmm on strided views of scattered slots is slower than copy + bmm.
            kg = k_cache[g.slots, :, : g.keys]  # [G, n_kv, L, hd]
            vg = v_cache[g.slots, :, : g.keys]
            out[g.rows] = row_invariant_tiles(q[g.rows], kg, vg, g.masks, g.n, plan.n_rep, plan.scale)
            continue
        kg = k_cache[g.lo : g.lo + g.width, :, : g.keys]  # a view of the span, read in place
        vg = v_cache[g.lo : g.lo + g.width, :, : g.keys]
        if g.width == len(g.slots):  # the span is the group: its rows in order
            out[g.rows] = row_invariant_tiles(q[g.rows], kg, vg, g.masks, g.n, plan.n_rep, plan.scale)
            continue
        qg = q.new_zeros(g.width * g.n, *q.shape[1:])
        qg[g.at] = q[g.rows]
        out[g.rows] = row_invariant_tiles(qg, kg, vg, g.masks, g.n, plan.n_rep, plan.scale)[g.at]
    return out


def row_invariant_tiles(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor | None, n: int, n_rep: int,
    scale: float | None,
) -> torch.Tensor:  # fmt: skip
    """G tiles of :func:`row_invariant_tile` at once: q [G * n, n_heads, hd] (tile g's tokens at
    rows g * n ...), k/v [G, n_kv, L, hd], masks [G, n_rep * n, L] or None.  Returns
    [G * n, n_heads, hd], each tile's rows bit for bit what the tile gives alone."""
    G, n_kv, L, hd = k.shape
    n_heads = q.shape[1]
    scale = hd**-0.5 if scale is None else scale
    # [G, n, n_kv, rep, hd] -> [G * n_kv, rep * n, hd]: as in one tile, with the tiles stacked
    qi = q.view(G, n, n_kv, n_rep, hd).permute(0, 2, 3, 1, 4).reshape(G * n_kv, n_rep * n, hd)
    s = torch.bmm(qi, k.reshape(G * n_kv, L, hd).transpose(1, 2)) * scale  # [G * n_kv, rep * n, L]
    if masks is not None:
        s = s.view(G, n_kv, n_rep * n, L).masked_fill(~masks[:, None], float("-inf")).view(G * n_kv, n_rep * n, L)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    oi = torch.bmm(p, v.reshape(G * n_kv, L, hd))  # [G * n_kv, rep * n, hd]
    return oi.view(G, n_kv, n_rep, n, hd).permute(0, 3, 1, 2, 4).reshape(G * n, n_heads, hd)


def row_invariant_tile(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, n_rep: int, scale: float | None
) -> torch.Tensor:
    """One tile of :func:`row_invariant_attention`: q [n, n_heads, hd] against contiguous keys
    and values k/v [n_kv, L, hd] (L: the tile's padded key count), mask [n_rep * n, L] or None.
    Returns [n, n_heads, hd]: the batched computation with one tile."""
    return row_invariant_tiles(q, k[None], v[None], None if mask is None else mask[None], q.shape[0], n_rep, scale)
