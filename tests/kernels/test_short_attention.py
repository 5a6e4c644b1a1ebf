"""dspark/kernels/short_attention.cpp: a step's short queries attended straight from the cache.

Checked against a float64 computation of the attention rule, against torch's attention paths
through whole steps (slot and paged layouts, a prefill chunk beside decode tokens and
verification blocks), and for what verification needs from it: every query row's bits are the
same alone, in a block or beside other requests, on one thread or two.  Skipped only on a CPU
without AVX-512; where the CPU has it, a kernel that no longer builds fails here.
"""

from __future__ import annotations

import pytest
import torch

from dspark.kernels import short_attention as sa
from dspark.kernels.attention import build_plan
from dspark.kernels.native import cpu_has_avx512, short_attention_usable
from dspark.models.compiled import write_and_attend
from dspark.models.kv_cache import KVCache, VarlenBatch, make_batch
from dspark.models.paged_cache import PagedKVCache

pytestmark = pytest.mark.skipif(not cpu_has_avx512(), reason="the attention kernel needs AVX-512")

N_KV, REP = 3, 3


@pytest.fixture(autouse=True)
def _kernel():
    assert short_attention_usable(), "this CPU has AVX-512 but the attention kernel does not build or run"
    assert sa.kernel_chosen(), f"{sa.ENV} keeps torch's attention: these tests would not run the kernel's steps"


def op(*args):
    return sa._op()(*args)


def reference(q, kc, vc, reqs, tables, paged, scale, window):
    """Each short query's attention in float64 over the keys it sees (causal, windowed; a request
    row with a fourth column 1: every query sees the whole request)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for row, table in zip(reqs, tables):
        start, q_len, first = row[:3]
        whole = len(row) == 4 and row[3]
        n = start + q_len
        if paged:
            block = kc.shape[2]
            used = table[: -(-n // block)]
            keys = torch.cat([kc[:, p] for p in used], 1)[:, :n].double()
            vals = torch.cat([vc[:, p] for p in used], 1)[:, :n].double()
        else:
            keys, vals = kc[table[0], :, :n].double(), vc[table[0], :, :n].double()
        for j in range(q_len):
            hi = n if whole else start + j + 1
            lo = max(0, start + j + 1 - window) if window > 0 else 0
            for h in range(q.shape[1]):
                p = torch.softmax(keys[h // REP, lo:hi] @ q[first + j, h].double() * scale, 0)
                out[first + j, h] = p @ vals[h // REP, lo:hi]
    return out


def make_step(dtype, hd, paged, spec=((0, 1), (7, 4), (40, 1), (63, 16), (100, 2)), seed=0):
    """Random caches and a step of short requests ``(start, q_len)``; returns the op's arguments."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(n for _, n in spec)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = rand(T, N_KV * REP, hd), rand(T, N_KV, hd), rand(T, N_KV, hd)
    if paged:
        block, n_blocks = 16, 64
        kc, vc = rand(N_KV, n_blocks, block, hd), rand(N_KV, n_blocks, block, hd)
        perm = torch.randperm(n_blocks, generator=gen).tolist()
        tables = [perm[i * 9 : (i + 1) * 9] for i in range(len(spec))]
    else:
        kc, vc = rand(8, N_KV, 160, hd), rand(8, N_KV, 160, hd)
        tables = [[s] for s in (3, 0, 7, 5, 2, 1, 4, 6)[: len(spec)]]
    reqs, pages, at, first = [], [], [], 0
    for (start, n), table in zip(spec, tables):
        reqs.append((start, n, first))
        first += n
        for p in range(start, start + n):
            pages.append(table[p // 16] if paged else table[0])
            at.append(p % 16 if paged else p)
    return q, k, v, kc, vc, torch.tensor(pages), torch.tensor(at), reqs, tables


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hd", [64, 128, 256])
@pytest.mark.parametrize("paged", [False, True], ids=["slot", "paged"])
@pytest.mark.parametrize("window", [-1, 5], ids=["causal", "window5"])
def test_the_kernel_computes_the_attention_rule(dtype, hd, paged, window):
    """Decode tokens and blocks of 2..16 tokens, contexts from 0 to 100 keys, both layouts: the
    output matches float64 to the output dtype's rounding, and the step's keys and values land
    where the step says."""
    q, k, v, kc, vc, pages, at, reqs, tables = make_step(dtype, hd, paged)
    out = torch.full_like(q, float("nan"))
    scale = hd**-0.5
    op(q, k, v, kc, vc, pages, at, torch.tensor(reqs), torch.tensor(tables), paged, REP, scale, window, out)
    for t in range(q.shape[0]):
        for cache, new in ((kc, k), (vc, v)):
            got = cache[:, pages[t], at[t]] if paged else cache[pages[t], :, at[t]]
            assert torch.equal(got, new[t]), t
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-6
    assert (out.double() - reference(q, kc, vc, reqs, tables, paged, scale, window)).abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("paged", [False, True], ids=["slot", "paged"])
def test_every_row_of_a_whole_request_sees_all_of_it(dtype, paged):
    """Request rows of four columns, the last 1 (a DSpark draft block, which attends both ways):
    every query of the request sees its context and all of its own tokens; rows of three
    columns, or a 0, stay causal.  Each row's bits are the same with the request alone, and
    split into parts on two threads."""
    q, k, v, kc, vc, pages, at, reqs, tables = make_step(dtype, 64, paged)
    rows = [(*r, i % 2) for i, r in enumerate(reqs)]  # (7, 4) and (63, 16) whole, the others causal
    scale = 64**-0.5
    out = torch.full_like(q, float("nan"))
    op(q, k, v, kc, vc, pages, at, torch.tensor(rows), torch.tensor(tables), paged, REP, scale, -1, out)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-6
    assert (out.double() - reference(q, kc, vc, rows, tables, paged, scale, -1)).abs().max() < tol
    causal = reference(q, kc, vc, reqs, tables, paged, scale, -1)
    first, n = rows[1][2], rows[1][1]
    assert (out[first : first + n - 1].double() - causal[first : first + n - 1]).abs().max() > 10 * tol  # not causal
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for row, table in zip(rows, tables):
                alone = torch.full_like(q, float("nan"))
                op(q, k, v, kc, vc, pages, at, torch.tensor([row]), torch.tensor([table]), paged, REP, scale, -1, alone)
                f, n = row[2], row[1]
                assert torch.equal(alone[f : f + n], out[f : f + n]), (t, row)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="reqs"):
        op(q, k, v, kc, vc, pages, at, torch.tensor([(*r, 1, 0) for r in reqs]), torch.tensor(tables), paged, REP,
           scale, -1, out)


@pytest.mark.parametrize("paged", [False, True], ids=["slot", "paged"])
@pytest.mark.parametrize("window", [-1, 5], ids=["causal", "window5"])
@pytest.mark.parametrize("dtype,hd", [(torch.bfloat16, 64), (torch.float32, 128), (torch.bfloat16, 256)])
def test_every_query_row_rounds_the_same_alone_in_a_block_or_beside_others(paged, window, dtype, hd):
    """What lossless greedy verification needs from attention: a token of a verification block
    gets the bits it gets decoded alone, whatever else the step carries.  The step runs on 8
    threads (each request's tokens then split into parts computed apart), each token alone on 1."""
    q, k, v, kc, vc, pages, at, reqs, tables = make_step(dtype, hd, paged)
    together = torch.empty_like(q)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        op(q, k, v, kc, vc, pages, at, torch.tensor(reqs), torch.tensor(tables), paged, REP, 0.125, window, together)
        torch.set_num_threads(1)
        for (start, n, first), table in zip(reqs, tables):
            for j in range(n):
                t = slice(first + j, first + j + 1)
                alone = torch.empty_like(q[t])
                op(q[t], k[t], v[t], kc, vc, pages[t], at[t], torch.tensor([[start + j, 1, 0]]), torch.tensor([table]),
                   paged, REP, 0.125, window, alone)
                assert torch.equal(alone[0], together[first + j]), (start, j)
    finally:
        torch.set_num_threads(threads)


def _cache(layout, dtype):
    if layout == "paged":
        return PagedKVCache(1, 6, N_KV, 512, 64, dtype, "cpu", block=16)
    return KVCache(1, 6, N_KV, 512, 64, dtype, "cpu")


def _torch_batch(batch: VarlenBatch, cache) -> VarlenBatch:
    """The same step planned for torch's attention."""
    from dspark.kernels.paged_attention import build_paged_plan

    plan = build_plan(batch.slots, batch.starts, batch.q_lens, REP, "cpu")
    paged = None
    if batch.paged is not None:
        paged = build_paged_plan(batch.paged.tables, batch.starts, batch.q_lens, REP, cache.block, "cpu")
    return VarlenBatch(batch.slots, batch.starts, batch.q_lens, batch.positions, batch.token_slots, plan, paged)


@pytest.mark.parametrize("layout", ["slot", "paged"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_whole_steps_match_torch_attention(layout, dtype):
    """Steps through a real cache: prefills (one of them a chunk longer than the kernel takes,
    left to torch beside the kernel's queries), then decode tokens and verification blocks.
    The kernel's step and torch's on a copy of the cache agree, and so do the caches."""
    torch.manual_seed(0)
    ours, theirs = _cache(layout, dtype), _cache(layout, dtype)
    steps = [([0, 1], [40, 3]), ([2, 0, 1], [100, 1, 8]), ([0, 1, 2, 3], [5, 1, 1, 30]), ([3, 1], [1, 16])]
    for slots, q_lens in steps:
        batch = make_batch(ours, slots, q_lens, REP)
        assert batch.plan.kernel
        ref = _torch_batch(make_batch(theirs, slots, q_lens, REP), theirs)
        T = sum(q_lens)
        q, k, v = (torch.randn(T, n, 64).to(dtype) for n in (N_KV * REP, N_KV, N_KV))
        got = write_and_attend(q, k, v, ours.k[0], ours.v[0], batch)
        want = write_and_attend(q, k, v, theirs.k[0], theirs.v[0], ref)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert (got.float() - want.float()).abs().max() < tol, (slots, q_lens)
        assert torch.equal(ours.k, theirs.k) and torch.equal(ours.v, theirs.v)


def test_bad_steps_are_refused_not_written_past_the_cache():
    q, k, v, kc, vc, pages, at, reqs, tables = make_step(torch.bfloat16, 64, False)
    out = torch.empty_like(q)
    r, t = torch.tensor(reqs), torch.tensor(tables)
    with pytest.raises(RuntimeError, match="write outside the cache"):
        op(q, k, v, kc, vc, pages, at + 1000, r, t, False, REP, 0.125, -1, out)
    with pytest.raises(RuntimeError, match="past its table"):
        op(q, k, v, kc, vc, pages, at, r + torch.tensor([200, 0, 0]), t, False, REP, 0.125, -1, out)
    with pytest.raises(RuntimeError, match="names no page"):
        op(q, k, v, kc, vc, pages, at, r, t + 100, False, REP, 0.125, -1, out)
    with pytest.raises(RuntimeError, match="outside the step"):
        op(q, k, v, kc, vc, pages, at, r + torch.tensor([0, 0, 50]), t, False, REP, 0.125, -1, out)
    with pytest.raises(RuntimeError, match="dtype"):
        op(q, k.float(), v, kc, vc, pages, at, r, t, False, REP, 0.125, -1, out)
    with pytest.raises(RuntimeError, match="head size"):
        op(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous(), kc[..., :32], vc[..., :32],
           pages, at, r, t, False, REP, 0.125, -1, out[..., :32].contiguous())


def test_the_choice_of_attention(monkeypatch):
    """The environment picks torch's attention or demands ours; a bad value is a one-line error;
    what the kernel does not cover (another device, dtype or head size) stays with torch."""
    try:
        monkeypatch.setenv(sa.ENV, "torch")
        sa.kernel_chosen.cache_clear()
        assert sa.attention_refusal() is None
        assert not sa.kernel_for("cpu", torch.bfloat16, 64)
        assert not make_batch(_cache("slot", torch.bfloat16), [0], [1], REP).plan.kernel
        monkeypatch.setenv(sa.ENV, "kernel")
        sa.kernel_chosen.cache_clear()
        assert sa.kernel_for("cpu", torch.bfloat16, 64)
        assert not sa.kernel_for("cpu", torch.float16, 64) and not sa.kernel_for("cpu", torch.bfloat16, 96)
        assert not sa.kernel_for("meta", torch.bfloat16, 64)
        monkeypatch.setenv(sa.ENV, "fast")
        sa.kernel_chosen.cache_clear()
        with pytest.raises(ValueError, match="DSPARK_ATTENTION must be one of kernel, torch"):
            sa.kernel_for("cpu", torch.bfloat16, 64)
        assert "DSPARK_ATTENTION" in sa.attention_refusal()
    finally:
        monkeypatch.undo()
        sa.kernel_chosen.cache_clear()
    assert sa.kernel_for("cpu", torch.bfloat16, 64)


@pytest.mark.parametrize("layout", ["slot", "paged"])
def test_the_deterministic_mode_sends_every_query_to_the_kernel(layout):
    """Every row is computed on its own, so the kernel serves the deterministic mode too, prefill
    chunks included: a 40-token prompt attended in one pass or in chunks of 10 and 30 gives the
    same bits, and the plan holds no masks and no torch calls."""
    torch.manual_seed(4)
    whole, chunked = _cache(layout, torch.bfloat16), _cache(layout, torch.bfloat16)
    q, k, v = (torch.randn(40, n, 64).to(torch.bfloat16) for n in (N_KV * REP, N_KV, N_KV))
    batch = make_batch(whole, [2], [40], REP, row_invariant=True)
    assert batch.plan.kernel and all(m is None for m in batch.plan.masks) and not sa.short_plan(batch).has_long
    if batch.paged is not None:
        assert batch.paged.groups == [] and batch.paged.tile_pages is None
    one = write_and_attend(q, k, v, whole.k[0], whole.v[0], batch)
    parts = [write_and_attend(q[a:b], k[a:b], v[a:b], chunked.k[0], chunked.v[0],
                              make_batch(chunked, [2], [b - a], REP, row_invariant=True)) for a, b in ((0, 10), (10, 40))]
    assert torch.equal(one, torch.cat(parts))


def test_torch_attention_refuses_a_plan_made_for_the_kernel():
    """Such a plan has no masks for its short queries (nor paged calls for them): torch's paths
    would attend without the causal mask, or leave rows unwritten."""
    from dspark.kernels.attention import varlen_attention
    from dspark.kernels.paged_attention import paged_attention

    for layout in ("slot", "paged"):
        cache = _cache(layout, torch.bfloat16)
        batch = make_batch(cache, [0], [3], REP)
        q = torch.randn(3, N_KV * REP, 64).to(torch.bfloat16)
        with pytest.raises(ValueError, match="attention kernel"):
            if layout == "paged":
                paged_attention(q, cache.k[0], cache.v[0], batch.paged, REP)
            else:
                varlen_attention(q, cache.k[0], cache.v[0], batch.plan)


class _Cache:
    """Every layer's keys and values as one tensor, as the slot cache holds them."""

    def __init__(self, layers, dtype=torch.bfloat16):
        self.k = torch.randn(layers, 4, N_KV, 256, 64).to(dtype)
        self.v = torch.randn(layers, 4, N_KV, 256, 64).to(dtype)
        self.max_seq = 256


@pytest.mark.parametrize("q_lens", [[1, 8, 3], [1, 40]], ids=["short", "with-a-prefill-chunk"])
def test_the_compiled_steps_op_matches_the_python_op(q_lens):
    """``dspark_attn::cache_attention`` (what the compiled step calls on CPU) inside a step
    context: it attends a step of short queries itself, and hands a step with a prefill chunk
    to the Python op; both give the Python op's result and the same caches, layer by layer,
    also for a one-token step padded to two rows."""
    from dspark.models.compiled import step_context

    torch.manual_seed(3)
    ours, theirs = _Cache(3), _Cache(3)
    theirs.k.copy_(ours.k), theirs.v.copy_(ours.v)
    slots, starts = [2, 0, 3][: len(q_lens)], [30, 7, 100][: len(q_lens)]
    for steps in range(2):
        plan = build_plan(slots, starts, q_lens, REP, "cpu", kernel=True)
        pos = torch.tensor([p for s, n in zip(starts, q_lens) for p in range(s, s + n)])
        tok = torch.tensor([s for s, n in zip(slots, q_lens) for _ in range(n)])
        batch = VarlenBatch(slots, starts, q_lens, pos, tok, plan)
        T = sum(q_lens)
        q, k, v = (torch.randn(T, n, 64).to(torch.bfloat16) for n in (N_KV * REP, N_KV, N_KV))
        for layer in range(3):
            with step_context(ours, batch):
                got = torch.ops.dspark_attn.cache_attention(q, k, v, layer)
            with step_context(theirs, batch):
                want = torch.ops.dspark.cache_attention(q, k, v, layer)
            assert torch.equal(got, want), (q_lens, layer)
        assert torch.equal(ours.k, theirs.k) and torch.equal(ours.v, theirs.v)
        starts = [s + n for s, n in zip(starts, q_lens)]
        q_lens = [1] * len(q_lens)
    # one token, two rows: the second repeats the first
    plan = build_plan([1], [5], [1], REP, "cpu", kernel=True)
    batch = VarlenBatch([1], [5], [1], torch.tensor([5]), torch.tensor([1]), plan)
    q, k, v = (torch.randn(1, n, 64).to(torch.bfloat16).expand(2, n, 64).contiguous() for n in (N_KV * REP, N_KV, N_KV))
    with step_context(ours, batch):
        got = torch.ops.dspark_attn.cache_attention(q, k, v, 0)
    assert torch.equal(got[0], got[1])


def test_the_compiled_steps_op_outside_a_step_and_with_nested_steps():
    from dspark.models.compiled import step_context

    q = torch.randn(1, N_KV * REP, 64).to(torch.bfloat16)
    kv = torch.randn(1, N_KV, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="only inside step_context"):
        torch.ops.dspark_attn.cache_attention(q, kv, kv, 0)
    with pytest.raises(RuntimeError, match="no step entered"):
        torch.ops.dspark_attn.leave_step()
    cache, inner = _Cache(1), _Cache(1)
    outer_plan = build_plan([0], [10], [1], REP, "cpu", kernel=True)
    outer = VarlenBatch([0], [10], [1], torch.tensor([10]), torch.tensor([0]), outer_plan)
    long_plan = build_plan([1], [0], [20], REP, "cpu", kernel=True)
    long = VarlenBatch([1], [0], [20], torch.arange(20), torch.ones(20, dtype=torch.long), long_plan)
    k20 = torch.randn(20, N_KV, 64).to(torch.bfloat16)
    with step_context(cache, outer):
        with step_context(inner, long):  # a step the kernel does not serve whole, inside one it does
            torch.ops.dspark_attn.cache_attention(torch.randn(20, N_KV * REP, 64).to(torch.bfloat16), k20, k20, 0)
        torch.ops.dspark_attn.cache_attention(q, kv, kv, 0)  # the outer step again
    assert torch.equal(inner.k[0, 1, :, :20], k20.transpose(0, 1))  # each step wrote its own cache
    assert torch.equal(cache.k[0, 0, :, 10], kv[0])
    with pytest.raises(RuntimeError, match="only inside step_context"):
        torch.ops.dspark_attn.cache_attention(q, kv, kv, 0)


def test_enter_step_refuses_a_plan_that_does_not_fit_the_cache():
    cache = _Cache(1)
    with pytest.raises(RuntimeError, match="write outside the cache"):
        torch.ops.dspark_attn.enter_step(cache.k, cache.v, torch.tensor([9]), torch.tensor([0]),
                                         torch.tensor([[0, 1, 0]]), torch.tensor([[0]]), False, REP, 0.125, -1, 1)
    with pytest.raises(RuntimeError, match="past its table"):
        torch.ops.dspark_attn.enter_step(cache.k, cache.v, torch.tensor([0]), torch.tensor([0]),
                                         torch.tensor([[300, 1, 0]]), torch.tensor([[0]]), False, REP, 0.125, -1, 1)


def test_commands_refuse_a_bad_attention_choice_in_one_line(monkeypatch):
    """`generate` as a usage error, `serve` / `demo` before Ray starts."""
    import click
    from click.testing import CliRunner

    from dspark.cli import main
    from dspark.cluster.commands import make_config

    monkeypatch.setenv(sa.ENV, "flash")
    sa.kernel_chosen.cache_clear()
    try:
        res = CliRunner().invoke(main, ["generate", "Hi.", "--max-tokens", "2"])
        assert res.exit_code == 2 and sa.ENV in res.output and "Traceback" not in res.output
        with pytest.raises(click.UsageError, match=sa.ENV):
            make_config(None, "bf16", "cpu", 1, 1, "ngram", 4, "adaptive", 4)
        monkeypatch.setenv(sa.ENV, "torch")
        sa.kernel_chosen.cache_clear()
        assert make_config(None, "bf16", "cpu", 1, 1, "ngram", 4, "adaptive", 4).dtype == "bf16"
    finally:
        monkeypatch.delenv(sa.ENV)
        sa.kernel_chosen.cache_clear()
