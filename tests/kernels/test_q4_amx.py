"""Our 4-bit AMX kernel (dspark/kernels/q4_amx.cpp), against torch references.

* each value it expands is the bf16 value the dense path holds (``d * q + m`` rounded once),
  read back exactly through a product with the identity, for the default file's matrices too;
* a product equals the fp32 product by those values to fp32 summation order, for row counts
  around every tile and pass boundary and an odd number of 16-output blocks;
* each row's bits do not depend on the rows beside it, nor on the thread count;
* compiled (the op's fake implementation) gives eager's bits;
* a bf16 model on this host multiplies its 4-bit layers with it, and ``$DSPARK_Q4_KERNEL``
  picks torch's kernel instead; bad inputs are refused with a message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dspark.kernels.native import amx_usable, cpu_has_amx, load_q4_amx
from dspark.models.q4 import GROUP, KERNEL_ENV, Q4Blocks, Q4Linear, q4_kernel

# Skipped only where the CPU lacks the tiles: on a CPU with them, a kernel that no longer builds
# or runs fails here instead of quietly handing the layers to torch's kernel.
pytestmark = pytest.mark.skipif(not cpu_has_amx(), reason="this CPU has no AMX tiles")


@pytest.fixture(autouse=True, scope="module")
def _kernel_builds_and_runs():
    load_q4_amx()
    assert amx_usable()


def _blocks(out: int, inp: int, seed: int = 0) -> Q4Blocks:
    """Random Q4_1-like blocks whose m is an fp16 number (as a file's is)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    d = (torch.rand(out, inp // GROUP, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(out, inp // GROUP, generator=g) * 0.1).half().float()
    return Q4Blocks(codes, d, m + 8 * d)


def _pack(b: Q4Blocks) -> torch.Tensor:
    return torch.ops.dspark_q4.amx_pack(b.codes, b.scale.half(), (b.zero - 8 * b.scale).half())


def _mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.ops.dspark_q4.amx_mm(x, packed, n)


def _dense_bf16(b: Q4Blocks) -> torch.Tensor:
    """The dense path's values: gguf's fp32 value d * q + m, rounded to bf16 once."""
    d = b.scale.repeat_interleave(GROUP, dim=1)
    m = (b.zero - 8 * b.scale).repeat_interleave(GROUP, dim=1)
    return (b.codes.float() * d + m).bfloat16()


@pytest.mark.parametrize("shape", [(48, 64), (160, 96)])
def test_expanded_values_are_the_dense_bf16_values(shape):
    b = _blocks(*shape)
    n, k = shape
    eye = torch.eye(k, dtype=torch.bfloat16)  # row i picks input i: y = W^T, one product per output
    assert torch.equal(_mm(eye, _pack(b), n), _dense_bf16(b).t())


def test_the_default_files_matrices_expand_exactly():
    from dspark.models.loader import _gguf_q4_layers, default_model_path

    layers = _gguf_q4_layers(default_model_path())
    for key in ("layers.0.attention.wqkv.weight", "layers.0.feed_forward.w2.weight",
                "layers.29.feed_forward.w13.weight", "layers.29.attention.wo.weight"):
        b = layers[key]
        n, k = b.shape
        assert torch.equal(_mm(torch.eye(k, dtype=torch.bfloat16), _pack(b), n), b.dense().bfloat16().t()), key


@pytest.mark.parametrize("rows", [1, 3, 15, 16, 17, 31, 32, 33, 48, 64, 100])
def test_product_matches_the_fp32_product_and_is_row_invariant(rows):
    b = _blocks(48, 1536, seed=rows)  # three blocks of 16 outputs: a pair and a single one
    p = _pack(b)
    x = torch.randn(rows, 1536, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = _mm(x, p, 48)
    ref = x.float() @ _dense_bf16(b).float().t()
    # Only the order of the fp32 sums differs from the reference, then one rounding to bf16.
    torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=1e-3 * ref.abs().max().item())
    for i in {0, rows // 2, rows - 1}:
        assert torch.equal(_mm(x[i:i + 1], p, 48), y[i:i + 1]), i
    if rows > 2:
        assert torch.equal(_mm(x[1:], p, 48), y[1:])


def test_rows_do_not_depend_on_the_thread_count():
    b = _blocks(192, 576)
    p = _pack(b)
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mm(x, p, 192)
        torch.set_num_threads(2)
        two = _mm(x, p, 192)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_compiled_gives_eager_bits():
    layer = Q4Linear(_blocks(64, 128), None, torch.bfloat16)
    assert layer.kernel == "amx"
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    for rows in (1, 7, 40):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).bfloat16()
        assert torch.equal(compiled(x), layer(x)), rows


def test_the_kernel_is_chosen_per_process(monkeypatch):
    from dspark.models.loader import load_model

    model = load_model(dtype="bf16", progress=False, weights="q4").model
    kernels = {m.kernel for m in model.modules() if isinstance(m, Q4Linear)}
    assert kernels == {"amx"}
    assert q4_kernel(torch.float32) == "int4"  # AMX multiplies bf16 only
    monkeypatch.setenv(KERNEL_ENV, "int4")
    assert Q4Linear(_blocks(32, 64), None, torch.bfloat16).kernel == "int4"
    monkeypatch.setenv(KERNEL_ENV, "gpu")
    with pytest.raises(ValueError, match=KERNEL_ENV):
        q4_kernel(torch.bfloat16)
    monkeypatch.setenv(KERNEL_ENV, "amx")
    with pytest.raises(ValueError, match="bf16"):
        q4_kernel(torch.float32)


def test_bad_inputs_are_refused():
    b = _blocks(32, 64)
    p = _pack(b)
    with pytest.raises(RuntimeError, match="bf16"):
        _mm(torch.randn(2, 64), p, 32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        _mm(torch.randn(2, 48).bfloat16(), p, 32)
    empty = torch.full((4096,), 0x77, dtype=torch.uint8)[:0]  # no inputs: refused, nothing read
    with pytest.raises(RuntimeError, match="positive multiple of 32"):
        _mm(torch.randn(3, 0).bfloat16(), empty, 32)
    with pytest.raises(RuntimeError, match="fp16"):
        torch.ops.dspark_q4.amx_pack(b.codes, b.scale.half()[..., None], b.scale.half()[..., None])
    with pytest.raises(RuntimeError, match="size"):
        _mm(torch.randn(2, 64).bfloat16(), p, 48)
    bad = b.codes.clone()
    bad[0, 0] = 16
    with pytest.raises(RuntimeError, match="0..15"):
        torch.ops.dspark_q4.amx_pack(bad, b.scale.half(), b.scale.half())
    assert _mm(torch.empty(0, 64, dtype=torch.bfloat16), p, 32).shape == (0, 32)


# -- the 8-bit LM head (Q8Head, torch.ops.dspark_q4.amx_mm8) ---------------------------------


def _q8(out: int, inp: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (out, inp), generator=g, dtype=torch.int8)
    return codes, (torch.rand(out, inp // GROUP, generator=g) * 0.01 + 1e-4).half()


def _q8_dense(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return (codes.float() * d.float().repeat_interleave(GROUP, dim=1)).bfloat16()


def test_8bit_values_products_and_rows():
    """Each value is d * q rounded once to bf16; a product equals the fp32 product by those
    values to summation order; every row's bits are its own, on any thread count."""
    codes, d = _q8(48, 96)
    p = torch.ops.dspark_q4.amx_pack8(codes, d)
    assert torch.equal(torch.ops.dspark_q4.amx_mm8(torch.eye(96, dtype=torch.bfloat16), p, 48), _q8_dense(codes, d).t())
    codes, d = _q8(80, 1536, seed=1)
    p = torch.ops.dspark_q4.amx_pack8(codes, d)
    x = torch.randn(40, 1536, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = torch.ops.dspark_q4.amx_mm8(x, p, 80)
    ref = x.float() @ _q8_dense(codes, d).float().t()
    torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=1e-3 * ref.abs().max().item())
    for rows in (x[:1], x[5:13], x[7:40]):
        start = int((rows.data_ptr() - x.data_ptr()) // x.stride(0) // x.element_size())
        assert torch.equal(torch.ops.dspark_q4.amx_mm8(rows, p, 80), y[start:start + rows.shape[0]])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.dspark_q4.amx_mm8(x, p, 80), y)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.dspark_q4.amx_pack8(codes.to(torch.uint8), d)
    with pytest.raises(RuntimeError, match="size"):
        torch.ops.dspark_q4.amx_mm8(x, p, 96)


def test_the_q4_model_multiplies_its_head_from_the_files_8bit_blocks(monkeypatch):
    """With our kernel the LM head is the file's Q8_0 blocks and holds no dense copy: its values
    (read back through the identity), the rows the drafters read and the tied embedding's rows
    are all the dense model's bf16 embedding; its product is the kernel's, whatever the leading
    dimensions; torch's int4 kernel keeps the dense head."""
    from dspark.models.loader import load_model
    from dspark.models.packing import PackedEmbedding, matrix_rows
    from dspark.models.q4 import Q8Head

    dense = load_model(dtype="bf16", progress=False).model.tok_embeddings.weight.detach()
    model = load_model(dtype="bf16", progress=False, weights="q4").model
    head = model.output
    assert isinstance(head, Q8Head) and head.weight is None and isinstance(model.tok_embeddings, PackedEmbedding)
    vocab, dim = dense.shape
    assert torch.equal(torch.ops.dspark_q4.amx_mm8(torch.eye(dim, dtype=torch.bfloat16), head.packed, vocab).t(), dense)
    assert torch.equal(head.rows(torch.arange(vocab)), dense)
    ids = torch.tensor([[0, 2, 49151], [17, 16, 15]])
    assert torch.equal(matrix_rows(head, ids), dense[ids]) and torch.equal(model.tok_embeddings(ids), dense[ids])
    assert model.dtype == torch.bfloat16
    x = torch.randn(2, 3, dim, generator=torch.Generator().manual_seed(4)).bfloat16()
    assert torch.equal(head(x), torch.ops.dspark_q4.amx_mm8(x.reshape(6, dim), head.packed, vocab).reshape(2, 3, vocab))
    monkeypatch.setenv(KERNEL_ENV, "int4")
    assert not isinstance(load_model(dtype="bf16", progress=False, weights="q4").model.output, Q8Head)


def test_a_head_stored_otherwise_stays_dense(tmp_path):
    """Only a Q8_0 head whose rows fit the kernel's blocks (a multiple of 16) is kept as 8-bit blocks."""
    from gguf import GGUFWriter

    from dspark.models.loader import _gguf_q8_head

    for name, rows, kind in (("f16", 32, "F16"), ("odd", 40, "Q8_0"), ("fits", 32, "Q8_0")):
        path = tmp_path / f"{name}.gguf"
        w = GGUFWriter(str(path), "llama")
        w.add_block_count(0)
        data = np.zeros((rows, 64), dtype=np.float16)
        if kind == "Q8_0":
            from gguf import GGMLQuantizationType, quants

            w.add_tensor("token_embd.weight", quants.quantize(data.astype(np.float32), GGMLQuantizationType.Q8_0),
                         raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor("token_embd.weight", data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        head = _gguf_q8_head(path)
        if name == "fits":
            assert head is not None and head[0].shape == (32, 64) and head[1].shape == (32, 2)
        else:
            assert head is None, name
