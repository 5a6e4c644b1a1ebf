"""One layer's attention for a step's short queries, read from three cache layouts.

The default model's attention shapes (SmolLM2-135M: 9 query heads over 3 KV heads of width 64,
bf16), decode steps at batch 1, 8 and 32 over contexts of 100..400 positions and an 8-token
verification block at batch 1:

* ``span``: today's path, one SDPA call over a strided view of the slot cache
  (:func:`dspark.kernels.attention.varlen_attention`);
* ``gather``: a paged pool [n_kv, n_blocks, block, hd]; each request's blocks are gathered
  into one contiguous [B, n_kv, L, hd] buffer per step and layer, then one SDPA call;
* ``flex``: torch's FlexAttention, compiled (inductor's C++ template on CPU), reading the
  physical pool in place: one batch row per request, a BlockMask whose KV blocks are the
  request's pages, a mask_mod that maps a physical key to its logical position.

Variants are interleaved (the host is shared) and each figure is the median over rounds of
the mean of ``--calls`` calls, in microseconds per layer (the fastest round in brackets).  The FlexAttention block mask is
built once per step (all layers share it): its cost is printed apart.

``--engine`` instead times whole engine steps of the default model (bf16, eager, greedy) on
the slot and the paged layout, one engine of each in one process, their steps interleaved.

    python -m bench.paged_attention            # about a minute on 2 cores
    python -m bench.paged_attention --engine   # about two minutes
"""

from __future__ import annotations

import os
import statistics
import time

import click

N_HEADS, N_KV, HD = 9, 3, 64


def _contexts(batch: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed + batch)
    return [300] if batch == 1 else [rng.randint(100, 400) for _ in range(batch)]


class Case:
    """One step's queries and the same keys/values in the three layouts."""

    def __init__(self, batch: int, q_len: int, page: int, dtype) -> None:
        import torch

        from dspark.kernels.attention import build_plan

        self.batch, self.q_len, self.page = batch, q_len, page
        ctx = _contexts(batch)  # keys each request holds after this step's tokens
        starts = [c - q_len for c in ctx]
        g = torch.Generator().manual_seed(batch * 100 + q_len)
        self.q = torch.randn(batch * q_len, N_HEADS, HD, generator=g).to(dtype)  # [T, nh, hd]
        cap = 512
        k = torch.randn(batch, N_KV, cap, HD, generator=g).to(dtype)  # slot layout [S, n_kv, cap, hd]
        v = torch.randn(batch, N_KV, cap, HD, generator=g).to(dtype)
        self.k_slot, self.v_slot = k, v
        self.plan = build_plan(list(range(batch)), starts, [q_len] * batch, N_HEADS // N_KV, "cpu")
        # Paged pool with blocks handed out in a shuffled order (a pool after some churn).
        n_pages = [-(-c // page) for c in ctx]
        total = sum(n_pages) + 8
        perm = torch.randperm(total, generator=g)
        self.tables, o = [], 0
        for n in n_pages:
            self.tables.append(perm[o : o + n])
            o += n
        self.k_pool = torch.zeros(N_KV, total, page, HD, dtype=dtype)  # [n_kv, n_blocks, block, hd]
        self.v_pool = torch.zeros_like(self.k_pool)
        for b, (t, c) in enumerate(zip(self.tables, ctx)):
            n = len(t)
            self.k_pool[:, t] = torch.nn.functional.pad(k[b, :, :c], (0, 0, 0, n * page - c)).view(N_KV, n, page, HD)
            self.v_pool[:, t] = torch.nn.functional.pad(v[b, :, :c], (0, 0, 0, n * page - c)).view(N_KV, n, page, HD)
        self.max_pages = max(n_pages)
        self.max_len = self.max_pages * page
        # Gather: one index over every request's pages, padded with page 0 (masked).
        idx = torch.zeros(batch, self.max_pages, dtype=torch.long)
        for b, t in enumerate(self.tables):
            idx[b, : len(t)] = t
        self.gather_index = idx.view(-1)
        q_pos = torch.tensor(starts).view(batch, 1) + torch.arange(q_len)  # [B, q]
        k_pos = torch.arange(self.max_len)
        mask = k_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)  # [B, q, L]
        self.gather_mask = mask.repeat(1, N_HEADS // N_KV, 1).unsqueeze(1)  # [B, 1, rep*q, L]
        self.starts, self.ctx, self.n_blocks = starts, ctx, total

    # -- the three variants -------------------------------------------------------------
    def span(self):
        from dspark.kernels.attention import varlen_attention

        return varlen_attention(self.q, self.k_slot, self.v_slot, self.plan)

    def gather(self):
        import torch.nn.functional as F

        B, q, rep = self.batch, self.q_len, N_HEADS // N_KV
        kb = self.k_pool.index_select(1, self.gather_index).view(N_KV, B, self.max_len, HD).transpose(0, 1)
        vb = self.v_pool.index_select(1, self.gather_index).view(N_KV, B, self.max_len, HD).transpose(0, 1)
        qb = self.q.view(B, q, N_KV, rep, HD).permute(0, 2, 3, 1, 4).reshape(B, N_KV, rep * q, HD)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=self.gather_mask)
        return ob.view(B, N_KV, rep, q, HD).permute(0, 3, 1, 2, 4).reshape(B * q, N_HEADS, HD)

    def flex_setup(self):
        import torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        page, B = self.page, self.batch
        logical = torch.zeros(self.n_blocks, dtype=torch.long)  # physical page -> logical index
        for t in self.tables:
            logical[t] = torch.arange(len(t))
        q_pos = torch.tensor(self.starts).view(B, 1) + torch.arange(self.q_len)

        def mask_mod(b, h, q_idx, kv_idx):
            return logical[kv_idx // page] * page + kv_idx % page <= q_pos[b, q_idx]

        def block_mask():
            n = torch.tensor([len(t) for t in self.tables], dtype=torch.int32).view(B, 1, 1)
            idx = torch.zeros(B, 1, 1, self.n_blocks, dtype=torch.int32)
            for b, t in enumerate(self.tables):
                idx[b, 0, 0, : len(t)] = t.int()
            # Empty "full" blocks: without them inductor's CPU template (torch 2.13) fails to build.
            return BlockMask.from_kv_blocks(n, idx, full_kv_num_blocks=torch.zeros_like(n),
                                            full_kv_indices=torch.zeros_like(idx), BLOCK_SIZE=(self.q_len, page),
                                            mask_mod=mask_mod, seq_lengths=(self.q_len, self.n_blocks * page))

        self.block_mask = block_mask
        self.bm = block_mask()
        self.k_flat = self.k_pool.view(1, N_KV, -1, HD)  # the pool in place: [1, n_kv, P, hd]
        self.v_flat = self.v_pool.view(1, N_KV, -1, HD)
        self.flex_fn = torch.compile(flex_attention, dynamic=False)

    def flex(self):
        B, q = self.batch, self.q_len
        qb = self.q.view(B, q, N_HEADS, HD).transpose(1, 2)  # [B, nh, q, hd]
        ob = self.flex_fn(qb, self.k_flat, self.v_flat, block_mask=self.bm, enable_gqa=True)
        return ob.transpose(1, 2).reshape(B * q, N_HEADS, HD)


def _time(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def engine_steps(batches: list[int], steps: int, threads: int) -> None:
    """Decode step time (ms, median over ``steps`` interleaved steps) of the slot and the paged
    layout at each batch size, after a 64-token warm-up per request."""
    import torch

    from bench.common import chat_prompts
    from dspark.models.loader import load_model
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import LocalRunner, RunnerConfig

    torch.set_num_threads(threads)
    lm = load_model(None, dtype="bf16", progress=False)
    for batch in batches:
        engines = {layout: Engine(LocalRunner(lm.model, RunnerConfig(n_slots=batch, max_seq=1024, kv_layout=layout)),
                                  lm.tokenizer, EngineConfig(max_batch=batch))
                   for layout in ("slot", "paged")}
        params = SamplingParams(max_tokens=1000, ignore_eos=True)  # none finishes while timed
        for eng in engines.values():
            for p in chat_prompts(lm.tokenizer, batch):
                eng.add_request(p, params)
            while eng.waiting or min(len(s.output_ids) for s in eng.running) < 64:
                eng.step()
        times = {layout: [] for layout in engines}
        for _ in range(steps):
            for layout, eng in engines.items():
                t0 = time.perf_counter()
                eng.step()
                times[layout].append(1000 * (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in times.items()}
        ctx = [s.num_cached for s in engines["paged"].running]
        stats = engines["paged"].runner.cache.stats()
        assert all(len(e.running) == batch for e in engines.values())
        print(f"batch {batch:2d} (contexts {min(ctx)}..{max(ctx)}): slot {med['slot']:.1f} ms, paged {med['paged']:.1f} ms "
              f"per step ({med['paged'] / med['slot']:.2f}x); KV bytes slot "
              f"{engines['slot'].runner.cache.nbytes() / 2**20:.1f} MiB, paged "
              f"{engines['paged'].runner.cache.nbytes() / 2**20:.1f} MiB ({stats['kv_cache_blocks_in_use']} of "
              f"{stats['kv_cache_blocks_total']} blocks in use)", flush=True)


@click.command()
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--rounds", type=int, default=15, show_default=True)
@click.option("--calls", type=int, default=10, show_default=True)
@click.option("--pages", default="16,64", show_default=True, help="page sizes to try")
@click.option("--no-flex", is_flag=True, help="skip FlexAttention (its first compile takes ~10 s per shape)")
@click.option("--engine", is_flag=True, help="time engine steps on both layouts instead")
@click.option("--batches", default="1,8,32", show_default=True, help="with --engine")
@click.option("--steps", type=int, default=20, show_default=True, help="with --engine: timed steps per layout")
def main(threads, rounds, calls, pages, no_flex, engine, batches, steps):
    """Per-layer attention time: span over slots vs paged gather vs FlexAttention in place."""
    if engine:
        return engine_steps([int(b) for b in batches.split(",")], steps, threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "dspark", "inductor"))
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16
    configs = [(1, 1), (8, 1), (32, 1), (1, 8)]
    with torch.inference_mode():
        for page in [int(p) for p in pages.split(",")]:
            for batch, q_len in configs:
                case = Case(batch, q_len, page, dtype)
                variants = {"span": case.span, "gather": case.gather}
                ref = case.span().float()
                if not no_flex:
                    case.flex_setup()
                    variants["flex"] = case.flex
                for name, fn in variants.items():  # warm-up (and compile) + check against span
                    err = (fn().float() - ref).abs().max().item()
                    if err > 0.05:
                        raise SystemExit(f"{name} differs from span by {err} at batch {batch}, q {q_len}")
                times = {name: [] for name in variants}
                for _ in range(rounds):  # interleaved rounds: the host's noise hits every variant alike
                    for name, fn in variants.items():
                        times[name].append(_time(fn, calls))
                med = {name: statistics.median(t) for name, t in times.items()}
                best = {name: min(t) for name, t in times.items()}
                line = "  ".join(f"{name} {med[name]:6.0f} ({best[name]:.0f})" for name in variants)
                extra = ""
                if not no_flex:
                    extra = f"  (block mask {_time(case.block_mask, 5):.0f} us per step)"
                print(f"page {page:2d}  batch {batch:2d} x {q_len} queries, contexts {min(case.ctx)}..{max(case.ctx)}: "
                      f"{line} us/layer{extra}", flush=True)


if __name__ == "__main__":
    main()
