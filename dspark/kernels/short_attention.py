"""A step's short queries through our attention kernel (``short_attention.cpp``).

Decode tokens and verification blocks (at most ``SPAN_MAX_Q`` tokens of a request) attend in
one C++ call per layer for the whole batch, reading the keys and values in place from either
cache layout (a slot, or a request's block table) and writing the step's own first.  In the
deterministic mode it takes every query, prefill chunks too (it is row-invariant by
construction, and quicker than that mode's tiles).  The torch paths
(:mod:`dspark.kernels.attention`, :mod:`dspark.kernels.paged_attention`) stay the reference in
tests, serve the default mode's prefill chunks (the kernel computes each query row on its own,
which loses to SDPA's blocked products at hundreds of queries) and every other device.

Why: at batch 1 the torch path is a dozen small ops per layer (index writes, views, SDPA,
scatter), measured at about 200 us a layer on this project's 2-core CPU, 30 layers a step; the
kernel takes tens of microseconds.  Each query row rounds the same whatever shares its step,
so a verification block's rows equal the same tokens decoded one at a time, bit for bit.

Which attention serves the short queries: the kernel on a CPU with AVX-512 where it builds
(bf16 and float32, head sizes 64, 128, 256); ``DSPARK_ATTENTION=torch`` keeps torch's,
``DSPARK_ATTENTION=kernel`` demands ours (a ValueError where it cannot run).

Example, a slot cache of one slot: one token attending to itself returns its value.
    >>> import torch
    >>> from dspark.kernels.attention import build_plan
    >>> from dspark.models.kv_cache import VarlenBatch
    >>> q = torch.ones(1, 1, 64)
    >>> plan = build_plan([0], [0], [1], 1, "cpu", kernel=kernel_for("cpu", q.dtype, 64))
    >>> batch = VarlenBatch([0], [0], [1], torch.tensor([0]), torch.tensor([0]), plan)
    >>> cache = torch.zeros(1, 1, 8, 64)
    >>> out = attend(q, q, 2 * q, cache, cache.clone(), batch) if plan.kernel else 2 * q
    >>> out.flatten()[:3].tolist()
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from dspark.kernels.attention import SPAN_MAX_Q, loop_attention
from dspark.kernels.paged_attention import paged_attention

ENV = "DSPARK_ATTENTION"
CHOICES = ("kernel", "torch")
HEAD_SIZES = (64, 128, 256)
DTYPES = (torch.bfloat16, torch.float32)


@lru_cache(maxsize=None)
def kernel_chosen() -> bool:
    """Whether this process attends short queries with the kernel (decided once, from ``ENV``
    and what the host can run)."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice and choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "torch":
        return False
    from dspark.kernels.native import short_attention_usable

    if choice == "kernel" and not short_attention_usable():
        raise ValueError(f"{ENV}=kernel: the attention kernel needs a CPU with AVX-512 and a C++ compiler")
    return short_attention_usable()


def attention_refusal() -> str | None:
    """The one-line reason this process cannot start with the attention asked for in ``ENV``
    (a bad value, or ``kernel`` where it cannot run); None when it can.  Checked before a
    server starts its roles."""
    if not os.environ.get(ENV, "").strip():
        return None
    try:
        kernel_chosen()
    except ValueError as e:
        return str(e)
    return None


def kernel_for(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel attends the short queries of a cache on ``device`` in ``dtype`` with
    heads of ``head_dim``: a CPU, a dtype and head size it has, and the process's choice.  The
    step's plan records it (``AttentionPlan.kernel``), and builds no masks for those queries."""
    return torch.device(device).type == "cpu" and dtype in DTYPES and head_dim in HEAD_SIZES and kernel_chosen()


def cache_kernel(cache) -> bool:
    """:func:`kernel_for` a slot or paged cache (its first layer's keys: dtype and head size);
    False for a state of its own (DeepSeek-V4's compressed caches attend their own way)."""
    keys = getattr(cache, "k", None)
    if keys is None:
        return False
    k = keys[0]
    return kernel_for(k.device, k.dtype, k.shape[-1])


@dataclass
class ShortPlan:
    """The step's short requests as the kernel reads them, built once per step.

    reqs: [R, 3] long, each request's start, token count and first flat token; tables: [R, P]
    long, its pages (its slot on the slot layout; a paged table padded with its first block).
    has_long: whether the step also carries prefill chunks left to torch's attention (never in
    the deterministic mode, where the kernel takes every query).
    """

    reqs: torch.Tensor
    tables: torch.Tensor
    has_long: bool


def short_plan(batch) -> ShortPlan:
    """``batch``'s plan for the kernel (a :class:`~dspark.models.kv_cache.VarlenBatch`), cached on it."""
    if batch.short is not None:
        return batch.short
    plan = batch.plan
    tables = batch.paged.tables if batch.paged is not None else [[s] for s in batch.slots]
    reqs, rows = [], []
    for i, (start, q) in enumerate(zip(batch.starts, batch.q_lens)):
        if q <= SPAN_MAX_Q or plan.row_invariant:  # the deterministic mode: every query
            reqs.append((start, q, plan.cu_q[i]))
            rows.append(tables[i])
    width = max((len(t) for t in rows), default=1)
    padded = [t + [t[0]] * (width - len(t)) for t in rows]
    batch.short = ShortPlan(torch.tensor(reqs, dtype=torch.long).view(-1, 3),
                            torch.tensor(padded, dtype=torch.long).view(-1, width), len(reqs) < len(batch.q_lens))
    return batch.short


def kernel_step(batch, head_dim: int) -> tuple:
    """What the kernel's ops take about a step, in their order: where its tokens are written
    (page, position), the short requests and their tables, the layout, ``n_rep``, the score
    scale and the window (-1: none)."""
    sp, plan = short_plan(batch), batch.plan
    if batch.paged is not None:
        pages, at = batch.paged.write_blocks, batch.paged.write_offsets
    else:
        pages, at = batch.token_slots, batch.positions
    scale = head_dim**-0.5 if plan.scale is None else plan.scale
    return (pages, at, sp.reqs, sp.tables, batch.paged is not None, plan.n_rep, scale,
            -1 if plan.window is None else plan.window)


@lru_cache(maxsize=None)
def _op():
    from dspark.kernels.native import load_short_attention

    load_short_attention()
    return torch.ops.dspark_attn.short_attention


@dataclass(frozen=True)
class BlockSpans:
    """Draft blocks attending in one kernel call per layer, in place in a slot cache (the DSpark
    drafter's): request b's G block tokens are written after its n_b context positions, and
    every one of them sees the whole context and the whole block (the block attends both ways,
    as the head was trained: a request row of four columns, the last 1).  Rows are computed on
    their own, so a request's bits do not depend on what shares the call.

    write_slots, write_pos: [B G] where each block token's key and value go; reqs: [B, 4];
    tables: [B, 1] (the kernel's request rows and tables, see ``ShortPlan``).
    """

    write_slots: torch.Tensor
    write_pos: torch.Tensor
    reqs: torch.Tensor
    tables: torch.Tensor

    @classmethod
    def of(cls, slots: list[int], context_lens: list[int], block: int) -> "BlockSpans":
        """Blocks of ``block`` tokens after each slot's ``context_lens`` positions."""
        G = block
        lens, sl = torch.tensor(context_lens, dtype=torch.long), torch.tensor(slots, dtype=torch.long)
        j = torch.arange(G)
        write_pos = (lens.unsqueeze(1) + j).flatten()
        first = torch.arange(len(slots), dtype=torch.long) * G
        reqs = torch.stack([lens, torch.full_like(lens, G), first, torch.ones_like(lens)], dim=1)
        return cls(sl.repeat_interleave(G), write_pos, reqs, sl.view(-1, 1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, n_rep: int, scale: float) -> torch.Tensor:
        """q: [B G, heads, hd]; k/v: [B G, kv heads, hd]; caches: one layer, [S, kv heads,
        capacity, hd] with room for every block.  Returns [B G, heads, hd]."""
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        _op()(q, k, v, k_cache, v_cache, self.write_slots, self.write_pos, self.reqs, self.tables, False,
              n_rep, scale, -1, out)
        return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           batch) -> torch.Tensor:  # fmt: skip
    """Write the step's keys/values into one layer's cache and attend: the short queries in the
    kernel, any prefill chunk through torch's attention.  Shapes as
    :func:`dspark.models.compiled.write_and_attend`."""
    sp = short_plan(batch)
    plan = batch.plan
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    _op()(q, k, v, k_cache, v_cache, *kernel_step(batch, q.shape[-1]), out)
    if sp.has_long:
        if batch.paged is not None:
            paged_attention(q, k_cache, v_cache, batch.paged, plan.n_rep, plan.scale, out=out, long_only=True)
        else:
            loop_attention(q, k_cache, v_cache, plan, out, long_only=True)
    return out
