"""Attention over a flattened variable-length batch against a paged KV cache.

The paged layout keeps one layer's keys (and values) in a pool of fixed-size blocks,
[n_kv, n_blocks, block, hd]; request i's logical position p lives in block ``tables[i][p //
block]`` at offset ``p % block``.  The attention rule is the slot layout's
(:mod:`dspark.kernels.attention`): a new token at position ``start + j`` sees every cached
position ``<= start + j``.

Reading: each call gathers the blocks of its requests into one contiguous [B, n_kv, L, hd]
buffer (``L`` = the most blocks any of them holds, times ``block``) and makes one SDPA call.
The short queries of a step (decode tokens, verification blocks) share one call, like the slot
layout's span; each long query (a prefill chunk) takes its own.  Keys past a request's length
are masked; they are finite (the pool starts zeroed and only ever holds keys).

Measured against the slot layout's span and against FlexAttention reading the pool in place
(``bench/paged_attention.py``, default model's shapes, bf16, 2 threads): the gather costs
about twice the span at batch 32 decode (1.4 vs 0.74 ms per layer: the copy of every context
key and value), the same at batch 1 (46 vs 39 us) and less for an 8-token verification block
(62 vs 71 us); FlexAttention compiled on CPU was slower than the gather at 16-position blocks
and about equal at 64, and its block mask costs 0.5..2.6 ms per step to build.

Grouped-query attention folds the ``n_rep`` query heads of a KV head into the query axis, as
on the slot layout, so each key is read once per KV head.

The deterministic mode's tiles (:func:`dspark.kernels.attention.row_invariant_attention`) read
the same way: each tile gathers the blocks that cover its padded key count (blocks past the
request's table repeat its first one: finite, and masked), then runs the slot layout's tile
arithmetic, so a query's bits do not depend on the step it is in here either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspark.kernels.attention import SPAN_MAX_Q, AttentionPlan, row_invariant_tile, visible


@dataclass
class PageGroup:
    """Requests attended in one SDPA call.

    pages: [n * max_pages] physical blocks, request-major (short tables padded with block 0,
    masked); tokens: [Tg] the flat indices of the group's queries; rows: [Tg] their rows in
    the padded [n * max_q] query grid; mask: [n, 1, n_rep * max_q, max_pages * block] bool.
    """

    n: int
    max_q: int
    max_pages: int
    pages: torch.Tensor
    tokens: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor


@dataclass
class PagedPlan:
    """Where a step writes its keys and values, and the calls that read them.

    write_blocks/write_offsets: [T] the block and offset of each new token.  groups: the SDPA
    calls; tile_pages: instead, for a row-invariant plan, the blocks each of its tiles reads.
    tables: each request's block table (host lists, what the attention kernel reads through).
    """

    block: int
    write_blocks: torch.Tensor
    write_offsets: torch.Tensor
    groups: list[PageGroup]
    tile_pages: list[torch.Tensor] | None = None
    tables: list[list[int]] | None = None
    long_only: bool = False  # calls for the long queries only: the kernel attends the others


def build_paged_plan(
    tables: list[list[int]],
    starts: list[int],
    q_lens: list[int],
    n_rep: int,
    block: int,
    device: torch.device | str,
    tiles: list[tuple[int, int, int, int, torch.Tensor | None]] | None = None,
    slots: list[int] | None = None,
    long_only: bool = False,
) -> PagedPlan:
    """The paged plan of one step: request i holds blocks ``tables[i]`` and appends ``q_lens[i]``
    tokens at position ``starts[i]`` (its table already covers them).  With ``tiles`` (a
    row-invariant plan's, naming requests by ``slots``), the plan reads by tile instead.
    ``long_only``: calls for the long queries only (our kernel attends the short ones).

    Example, block 4: a request at start 5 feeding 2 tokens with table [7, 2] writes position
    5 to block 2 offset 1 and position 6 to block 2 offset 2.
        >>> p = build_paged_plan([[7, 2]], [5], [2], 1, 4, "cpu")
        >>> p.write_blocks.tolist(), p.write_offsets.tolist()
        ([2, 2], [1, 2])
    """
    blocks, offsets = [], []
    for table, start, q in zip(tables, starts, q_lens):
        if -(-(start + q) // block) > len(table):
            raise ValueError(f"a table of {len(table)} blocks cannot hold {start + q} positions")
        for p in range(start, start + q):
            blocks.append(table[p // block])
            offsets.append(p % block)
    write = (torch.tensor(blocks, device=device), torch.tensor(offsets, device=device))
    if tiles is not None:
        table_of = dict(zip(slots, tables))
        pages = []
        for slot, _, _, keys, _ in tiles:
            t = table_of[slot]
            need = -(-keys // block)
            pages.append(torch.tensor((t + [t[0]] * need)[:need], device=device))
        return PagedPlan(block, *write, groups=[], tile_pages=pages, tables=tables)
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    short = [i for i, q in enumerate(q_lens) if q <= SPAN_MAX_Q]
    groups = [_group(short, tables, starts, q_lens, cu, n_rep, block, device)] if short and not long_only else []
    groups += [_group([i], tables, starts, q_lens, cu, n_rep, block, device)
               for i, q in enumerate(q_lens) if q > SPAN_MAX_Q]
    return PagedPlan(block, *write, groups=groups, tables=tables, long_only=long_only)


def _group(members, tables, starts, q_lens, cu, n_rep, block, device) -> PageGroup:
    n = len(members)
    max_q = max(q_lens[i] for i in members)
    max_pages = max(-(-(starts[i] + q_lens[i]) // block) for i in members)
    pages = [0] * (n * max_pages)
    pos = [[0] * max_q for _ in range(n)]  # padding rows: position 0, key 0 only
    tokens, rows = [], []
    for b, i in enumerate(members):  # host lists, one tensor each at the end: this runs every step
        used = -(-(starts[i] + q_lens[i]) // block)
        pages[b * max_pages : b * max_pages + used] = tables[i][:used]
        pos[b][: q_lens[i]] = range(starts[i], starts[i] + q_lens[i])
        tokens.extend(range(cu[i], cu[i + 1]))
        rows.extend(range(b * max_q, b * max_q + q_lens[i]))
    q_pos = torch.tensor(pos)  # [n, max_q]
    mask = visible(torch.arange(max_pages * block).view(1, 1, -1), q_pos.unsqueeze(-1), None)  # [n, max_q, L]
    mask = mask.repeat(1, n_rep, 1).unsqueeze(1)  # rows are (head-group, query) like the queries
    return PageGroup(n, max_q, max_pages, torch.tensor(pages, device=device), torch.tensor(tokens, device=device),
                     torch.tensor(rows, device=device), mask.to(device))


def paged_write(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PagedPlan) -> None:
    """Store the step's keys/values.  k_pool/v_pool: [n_kv, n_blocks, block, hd]; k/v: [T, n_kv, hd]."""
    k_pool[:, plan.write_blocks, plan.write_offsets] = k.transpose(0, 1)
    v_pool[:, plan.write_blocks, plan.write_offsets] = v.transpose(0, 1)


def paged_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: PagedPlan, n_rep: int, scale: float | None = None,
    out: torch.Tensor | None = None, long_only: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Attention of new queries against their requests' blocks.

    q: [T, n_heads, hd]; k_pool/v_pool: [n_kv, n_blocks, block, hd] for one layer, already
    holding this step's keys/values (:func:`paged_write`).  Returns [T, n_heads, hd], equal
    (up to rounding) to :func:`dspark.kernels.attention.varlen_attention` on a slot cache that
    holds the same keys at the same positions.  ``long_only``: only the long queries' calls,
    into ``out`` (the attention kernel has done the short ones).
    """
    if plan.long_only and not long_only:  # the short queries have no call here: their rows would be garbage
        raise ValueError("a plan for the attention kernel (dspark.kernels.short_attention.attend)")
    T, n_heads, hd = q.shape
    n_kv = n_heads // n_rep
    out = torch.empty_like(q) if out is None else out
    for g in plan.groups:
        if long_only and g.max_q <= SPAN_MAX_Q:
            continue
        L = g.max_pages * plan.block
        # [n_kv, n * max_pages, block, hd] -> [n, n_kv, L, hd]: a view of the gathered copy
        kb = k_pool.index_select(1, g.pages).view(n_kv, g.n, L, hd).transpose(0, 1)
        vb = v_pool.index_select(1, g.pages).view(n_kv, g.n, L, hd).transpose(0, 1)
        grid = q.new_zeros(g.n * g.max_q, n_heads, hd)
        grid[g.rows] = q[g.tokens]
        # [n, max_q, n_kv, rep, hd] -> [n, n_kv, rep * max_q, hd]: GQA groups folded into rows
        qb = grid.view(g.n, g.max_q, n_kv, n_rep, hd).permute(0, 2, 3, 1, 4).reshape(g.n, n_kv, n_rep * g.max_q, hd)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=g.mask, scale=scale)
        ob = ob.view(g.n, n_kv, n_rep, g.max_q, hd).permute(0, 3, 1, 2, 4).reshape(-1, n_heads, hd)
        out[g.tokens] = ob[g.rows]
    return out


def paged_row_invariant_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan, paged: PagedPlan
) -> torch.Tensor:
    """:func:`dspark.kernels.attention.row_invariant_attention` on a paged cache: the same tiles
    and arithmetic, each tile's keys gathered from its blocks.  Same shapes as
    :func:`paged_attention`."""
    n_kv, hd = k_pool.shape[0], k_pool.shape[-1]
    out = torch.empty_like(q)
    for (_, a, n, total, mask), pages in zip(plan.tiles, paged.tile_pages):
        ki = k_pool.index_select(1, pages).view(n_kv, -1, hd)[:, :total].contiguous()  # [n_kv, L, hd]
        vi = v_pool.index_select(1, pages).view(n_kv, -1, hd)[:, :total].contiguous()
        out[a : a + n] = row_invariant_tile(q[a : a + n], ki, vi, mask, plan.n_rep, plan.scale)
    return out
