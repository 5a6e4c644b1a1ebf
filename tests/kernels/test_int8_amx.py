"""Our AMX int8 product (q4_amx.cpp ``i8_amx_mm``) and the drafter layers built on it.

A drafter on it projects several requests' context in one pass and multiplies a batch's blocks
in one call, which is right only because a row's result does not depend on the rows beside it:
checked bit for bit here, down to the drafter's context cache.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark.kernels.native import amx_int8_usable, cpu_has_amx_int8
from dspark.models.int8_weights import KERNEL_ENV, BlockInt8Linear, Int8Linear, int8_kernel, int8_supported

needs_amx = pytest.mark.skipif(not amx_int8_usable(), reason="no AMX int8 tiles here")


def _reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in torch: per row, codes over its own range, exact integer sums."""
    x = x.float()
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    s = (hi - lo) / 255.0
    c = torch.round((x - lo) * (1.0 / s)).clamp(0, 255)
    acc = (c.double() @ codes.double().t()).float()  # exact
    wsum = codes.sum(dim=1).float()
    return (acc * s + wsum * lo) * scale


@needs_amx
@pytest.mark.parametrize("m", [1, 7, 16, 17, 40])
@pytest.mark.parametrize("n,k", [(16, 64), (48, 128), (384, 576), (576, 1536)])
def test_products_follow_the_per_row_arithmetic(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    packed = torch.ops.dspark_q4.i8_amx_pack(codes)
    wsum = codes.sum(dim=1, dtype=torch.int32).float()
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m).view(m, 1)
    x[0, 3] = 50.0  # one large feature: the row's range, not the batch's
    y = torch.ops.dspark_q4.i8_amx_mm(x, packed, scale, wsum)
    want = _reference(x, codes, scale)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    yb = torch.ops.dspark_q4.i8_amx_mm(x.bfloat16(), packed, scale, wsum)  # bf16 in, bf16 out
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), _reference(x.bfloat16(), codes, scale), rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@needs_amx
def test_a_rows_result_does_not_depend_on_its_batch_or_the_threads():
    g = torch.Generator().manual_seed(5)
    layer = Int8Linear.of_matrix(torch.randn(3072, 576, generator=g))
    assert layer.kernel == "amx" and layer.row_invariant
    x = (torch.randn(37, 576, generator=g) * torch.logspace(-3, 3, 37).view(37, 1)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = layer(x)
        torch.set_num_threads(1)
        single = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch, single)
    for i in (0, 15, 16, 36):
        assert torch.equal(layer(x[i : i + 1]), batch[i : i + 1])
    assert torch.equal(layer(x[5:30]), batch[5:30])
    assert torch.equal(layer(x.view(1, 37, 576))[0], batch)  # any leading shape


@needs_amx
def test_a_constant_row_and_a_zero_row_are_exact():
    codes = torch.randint(-127, 128, (32, 64), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    scale = torch.full((32,), 0.5)
    x = torch.stack([torch.zeros(64), torch.full((64,), 3.0)])
    y = torch.ops.dspark_q4.i8_amx_mm(x, torch.ops.dspark_q4.i8_amx_pack(codes), scale, codes.sum(1).float())
    assert torch.equal(y[0], torch.zeros(32))
    assert torch.equal(y[1], codes.sum(1).float() * 3.0 * 0.5)


@needs_amx
def test_a_row_with_an_inf_or_a_nan_anywhere_gives_nan_and_leaves_the_others_alone():
    codes = torch.randint(-127, 128, (16, 128), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    packed, scale, wsum = torch.ops.dspark_q4.i8_amx_pack(codes), torch.full((16,), 0.1), codes.sum(1).float()
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(5))
    clean = torch.ops.dspark_q4.i8_amx_mm(x, packed, scale, wsum)
    x[1, 77], x[2, 0] = float("nan"), float("inf")
    y = torch.ops.dspark_q4.i8_amx_mm(x, packed, scale, wsum)
    assert y[1].isnan().all() and y[2].isnan().all()
    assert torch.equal(y[0], clean[0]) and torch.equal(y[3], clean[3])


@needs_amx
def test_bad_inputs_are_refused():
    codes = torch.zeros(16, 64, dtype=torch.int8)
    packed, ones = torch.ops.dspark_q4.i8_amx_pack(codes), torch.ones(16)
    op = torch.ops.dspark_q4.i8_amx_mm
    with pytest.raises(RuntimeError, match="multiple of 64"):
        op(torch.zeros(1, 32), packed, ones, ones)
    with pytest.raises(RuntimeError, match="packed size"):
        op(torch.zeros(1, 128), packed, ones, ones)
    with pytest.raises(RuntimeError, match="bf16 or float32"):
        op(torch.zeros(1, 64, dtype=torch.float64), packed, ones, ones)
    with pytest.raises(RuntimeError, match="scale and wsum"):
        op(torch.zeros(1, 64), packed, ones, torch.ones(8))
    with pytest.raises(RuntimeError, match="multiple of 64 and N of 16"):
        torch.ops.dspark_q4.i8_amx_pack(torch.zeros(16, 32, dtype=torch.int8))


@pytest.mark.skipif(not int8_supported(torch.device("cpu")), reason="no int8 products in this torch build")
def test_the_kernel_choice(monkeypatch):
    assert amx_int8_usable() == cpu_has_amx_int8()  # a CPU with the tiles that fails to use them would lose them silently
    monkeypatch.setenv(KERNEL_ENV, "fbgemm")
    assert int8_kernel() == "fbgemm" and not Int8Linear.of_matrix(torch.randn(16, 64)).row_invariant
    assert not BlockInt8Linear.fits(nn.Linear(64, 16, bias=False))
    monkeypatch.setenv(KERNEL_ENV, "tiles")
    with pytest.raises(ValueError, match="expected amx or fbgemm"):
        int8_kernel()
    monkeypatch.setenv(KERNEL_ENV, "amx")
    if amx_int8_usable():
        assert Int8Linear.of_matrix(torch.randn(16, 64)).kernel == "amx"
        assert Int8Linear.of_matrix(torch.randn(16, 48)).kernel == "fbgemm"  # inputs not a multiple of 64
        assert Int8Linear.of_matrix(torch.randn(8, 64)).kernel == "fbgemm"  # outputs not a multiple of 16
    else:
        with pytest.raises(ValueError, match="no AMX int8 tiles"):
            int8_kernel()
    monkeypatch.delenv(KERNEL_ENV)
    assert int8_kernel() == ("amx" if amx_int8_usable() else "fbgemm")


@needs_amx
def test_block_int8_layer_keeps_its_input_and_rows_apart():
    """The context projection: 8-bit weight blocks of 32, the bf16 input as it is (a feature of
    100 is not crushed), row-invariant."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(2880, 576, bias=False).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(576, 2880, generator=g) * 0.02)
    layer = BlockInt8Linear(lin)
    x = (torch.randn(9, 2880, generator=g)).bfloat16()
    x[:, 7] = 100.0
    y = layer(x)
    want = x.float() @ lin.weight.detach().float().t()
    assert y.dtype == torch.bfloat16 and layer.weight is lin.weight
    assert float((y.float() - want).norm() / want.norm()) < 0.01
    for i in range(9):
        assert torch.equal(layer(x[i : i + 1]), y[i : i + 1])
    with pytest.raises(ValueError, match="bias-free"):
        BlockInt8Linear(nn.Linear(64, 16))


@needs_amx
def test_the_drafter_projects_requests_together_to_the_bits_it_projects_them_alone():
    """With every context product row-invariant the drafter projects all its requests' new
    features in one pass; their keys and values are the bits of one pass per request."""
    from dspark.train.features import target_features
    from dspark.workers.drafters.dspark import DSparkDrafter
    from helpers.engines import shipped_serving_head
    from helpers.tiny_models import make_seq

    loaded, head = shipped_serving_head()
    assert head.rows_independent and isinstance(head.fc, BlockInt8Linear)
    texts = ["def add(a, b):\n    return a + b\n", "The capital of France is Paris.", "Once upon a time there was"]
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    feats = [next(iter(target_features(loaded.model, [p], head.cfg.feature_layers)))[0] for p in prompts]
    caches = []
    for together in (True, False):
        drafter = DSparkDrafter(head, n_slots=3, max_seq=64)
        seqs = [make_seq(f"r{i}", p[:-1], anchor=p[-1]) for i, p in enumerate(prompts)]
        with torch.inference_mode():
            for s, f in zip(seqs, feats):
                drafter.observe(s, s.prompt_ids, f[:-1])
            if together:
                drafter.flush_context(seqs)
            else:
                for s in seqs:
                    drafter.flush_context([s])
        slots = [drafter._slot[s.request_id] for s in seqs]
        caches.append([(drafter.cache.k[:, sl, :, : len(p) - 1].clone(), drafter.cache.v[:, sl, :, : len(p) - 1].clone())
                       for sl, p in zip(slots, prompts)])
    for (k1, v1), (k2, v2) in zip(*caches):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # The blocks of requests whose contexts differ in length: batched, each attends alone, so a
    # request's hidden states and logits are the bits it gets drafting alone (a masked batch
    # rounded otherwise).
    anchors = torch.tensor([p[-1] for p in prompts])
    with torch.inference_mode():
        h, base = drafter.block_logits(seqs, anchors, 7)
        for i, s in enumerate(seqs):
            h1, base1 = drafter.block_logits([s], anchors[i : i + 1], 7)
            assert torch.equal(h1[0], h[i]) and torch.equal(base1[0], base[i])


@needs_amx
def test_the_drafters_blocks_attend_in_place_as_torch_attends_them():
    """The serving head's blocks attend in our kernel, written after each request's context in
    its own slot: hidden states as torch's attention of the same keys gives them (to bf16's
    rounding), and the block's keys left in the slot change nothing later: a request that
    drafted, then heard more tokens, drafts the bits of one that heard them all without drafting;
    a request near the drafter's max_seq does not change how its batch-mates attend."""
    from dspark.kernels.short_attention import kernel_chosen
    from dspark.train.features import target_features
    from dspark.workers.drafters.dspark import DSparkDrafter
    from helpers.engines import shipped_serving_head
    from helpers.tiny_models import make_seq

    if not kernel_chosen():
        pytest.skip("torch's attention chosen for this process")
    loaded, head = shipped_serving_head()
    texts = ["def add(a, b):\n    return a + b\n", "The capital of France is Paris.", "Once upon a time there was"]
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    feats = [next(iter(target_features(loaded.model, [p], head.cfg.feature_layers)))[0] for p in prompts]
    anchors = torch.tensor([p[-1] for p in prompts])

    def drafter_at(cut: int, in_place: bool) -> tuple[DSparkDrafter, list]:
        d = DSparkDrafter(head, n_slots=3, max_seq=64)
        d._kernel = in_place
        seqs = [make_seq(f"r{i}", p[: cut - 1 if cut < 0 else -1], anchor=p[cut - 1 if cut < 0 else -1])
                for i, p in enumerate(prompts)]
        with torch.inference_mode():
            for s, f in zip(seqs, feats):
                d.observe(s, s.prompt_ids, f[: len(s.prompt_ids)])
        return d, seqs

    with torch.inference_mode():
        d, seqs = drafter_at(0, True)
        h, base = d.block_logits(seqs, anchors, 7)
        d_torch, seqs_torch = drafter_at(0, False)
        h_torch, base_torch = d_torch.block_logits(seqs_torch, anchors, 7)
        # Hidden states reach a few hundred inside the layers, where bf16's spacing is 1 or 2.
        cos = torch.nn.functional.cosine_similarity(h.float(), h_torch.float(), dim=-1)
        assert cos.min() > 0.998 and (h.float() - h_torch.float()).norm() < 0.05 * h_torch.float().norm()
        assert torch.nn.functional.cosine_similarity(base, base_torch, dim=-1).min() > 0.998
        # Drafted three tokens early, then heard them: the bits of never having drafted early.
        early, seqs_e = drafter_at(-3, True)
        early.block_logits(seqs_e, torch.tensor([p[-4] for p in prompts]), 7)
        for s, p, f in zip(seqs_e, prompts, feats):
            s.prompt_ids, s.num_cached = list(p[:-1]), len(p) - 1
            early.observe(s, p[-4:-1], f[len(p) - 4 : len(p) - 1])
        h_late, base_late = early.block_logits(seqs_e, anchors, 7)
        assert torch.equal(h_late, h) and torch.equal(base_late, base)
        # The longest request four positions short of the drafter's max_seq, asked a block of 4
        # (the head runs its trained 7): batched, every request gets the bits it gets alone.
        near = DSparkDrafter(head, n_slots=3, max_seq=max(len(p) for p in prompts) - 1 + 4)
        seqs_n = [make_seq(f"r{i}", p[:-1], anchor=p[-1]) for i, p in enumerate(prompts)]
        for s, f in zip(seqs_n, feats):
            near.observe(s, s.prompt_ids, f[: len(s.prompt_ids)])
        h4, base4 = near.block_logits(seqs_n, anchors, 4)
        for i, s in enumerate(seqs_n):
            h1, base1 = near.block_logits([s], anchors[i : i + 1], 4)
            assert torch.equal(h1[0], h4[i]) and torch.equal(base1[0], base4[i]), i


def test_commands_refuse_a_bad_int8_kernel_choice_in_one_line(monkeypatch):
    """`generate` as a usage error, `serve` / `demo` before Ray starts."""
    import click
    from click.testing import CliRunner

    from dspark.cli import main
    from dspark.cluster.commands import make_config
    from dspark.models.int8_weights import int8_refusal

    monkeypatch.setenv(KERNEL_ENV, "vnni")
    assert KERNEL_ENV in int8_refusal()
    res = CliRunner().invoke(main, ["generate", "Hi.", "--max-tokens", "2"])
    assert res.exit_code == 2 and KERNEL_ENV in res.output and "Traceback" not in res.output
    with pytest.raises(click.UsageError, match=KERNEL_ENV):
        make_config(None, "bf16", "cpu", 1, 1, "ngram", 4, "adaptive", 4)
    monkeypatch.setenv(KERNEL_ENV, "fbgemm")
    assert int8_refusal() is None
    assert make_config(None, "bf16", "cpu", 1, 1, "ngram", 4, "adaptive", 4).dtype == "bf16"
