"""Packed bf16 products: small row counts run padded and give the same rows back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark.models.llama import Numerics
from dspark.models.kv_cache import make_batch
from dspark.models.packing import PackedLinear, matrix_rows, matrix_shape, packed_product, packing_supported

pytestmark = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.bfloat16),
                                reason="no oneDNN bf16 products on this CPU")


def _layer(seed: int = 0, out: int = 384, inp: int = 256) -> tuple[nn.Linear, PackedLinear]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g) / inp**0.5)
        lin.bias.copy_(torch.randn(out, generator=g))
    return lin, PackedLinear(lin)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_small_products_return_their_own_rows(m):
    """One and two rows run as MIN_ROWS rows; the caller gets exactly its rows, with the bias."""
    lin, packed = _layer()
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    y = packed(x)
    assert y.shape == (m, 384)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()
    # Each row is the product of that row, not of a padding row: rows computed alone agree.
    for i in range(m):
        assert torch.allclose(packed(x[i : i + 1]).float(), y[i : i + 1].float(), atol=0.05, rtol=0.02)


def test_padding_keeps_the_deterministic_modes_bits():
    """The deterministic mode promises that a row's bits do not depend on how many rows the step
    carries.  A packed one-row product is left to the padding (Numerics does not double it), so
    the padding is what keeps a row alone equal to the same row among others.  The shape is the
    default model's down projection, where oneDNN's one-row kernel rounds differently (2 rows in
    32 here without the padding)."""
    _, packed = _layer(1, out=576, inp=1536)
    num = Numerics(row_invariant=True)
    x = torch.randn(32, 1536, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    together = num.linear(packed, x)
    for i in range(32):
        assert torch.equal(num.linear(packed, x[i : i + 1]), together[i : i + 1]), i


def test_padding_leaves_the_input_alone():
    _, packed = _layer(2)
    x = torch.randn(1, 256).to(torch.bfloat16)
    before = x.clone()
    packed_product(x, packed.packed, packed.bias)
    assert torch.equal(x, before) and x.shape == (1, 256)


# -- rows read out of the packed buffer (a tied embedding served by the packed LM head) --------
@pytest.mark.parametrize("shape", [(7, 5), (384, 256), (1000, 96), (40_000, 64)])
def test_rows_read_from_the_packed_buffer_are_the_matrix_rows(shape):
    """Any shape, including one whose row index needs two probe digits (40,000 > 32,512 codes):
    every row read from the packed buffer is bit for bit the plain row, and the plain copy goes."""
    g = torch.Generator().manual_seed(shape[0])
    lin = nn.Linear(shape[1], shape[0], bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(shape, generator=g))
    plain = lin.weight.detach().clone()
    packed = PackedLinear(lin, keep_weight=True)
    assert packed.serve_rows() and packed.weight is None
    ids = torch.randint(0, shape[0], (3, 11), generator=g)
    assert torch.equal(packed.rows(ids).view(torch.int16), plain[ids].view(torch.int16))
    assert torch.equal(matrix_rows(packed, torch.arange(shape[0])).view(torch.int16), plain.view(torch.int16))
    x = torch.randn(4, shape[1], generator=g).to(torch.bfloat16)
    assert packed(x).shape == (4, shape[0])  # the product still reads the same buffer


def test_a_layout_that_does_not_read_back_keeps_the_plain_matrix(monkeypatch):
    """Every row is compared with the plain matrix before it is dropped: offsets that put one
    row's elements in the wrong place (here two rows swapped) leave the layer as it was."""
    import dspark.models.packing as packing

    found = packing._element_offsets

    def swapped(shape, axis):
        at = found(shape, axis)
        if axis == 0:
            at[[3, 4]] = at[[4, 3]]
        return at

    monkeypatch.setattr(packing, "_element_offsets", swapped)
    lin, packed = _layer(3)
    packed.weight = lin.weight.detach()
    assert not packed.serve_rows()
    assert packed.weight is not None and packed._buffer is None
    with pytest.raises(RuntimeError, match="serve_rows"):
        packed.rows(torch.tensor([0]))


def test_a_tied_embedding_is_served_by_the_packed_head():
    """The default model in bf16, as the runner builds it: one copy of the [vocab, dim] matrix,
    the embedding's rows bit for bit the checkpoint's, a greedy step's logits unchanged."""
    from dspark.models.loader import load_model
    from dspark.models.packing import PackedEmbedding, pack_linears, share_tied_matrix

    ref = load_model(None, dtype=torch.bfloat16, progress=False).model
    model = load_model(None, dtype=torch.bfloat16, progress=False).model
    plain = model.tok_embeddings.weight.detach().clone()
    assert pack_linears(model) and share_tied_matrix(model)
    assert isinstance(model.tok_embeddings, PackedEmbedding) and model.output.weight is None
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert matrix_shape(model.tok_embeddings) == tuple(plain.shape)
    assert torch.equal(matrix_rows(model.tok_embeddings, torch.arange(plain.shape[0])).view(torch.int16),
                       plain.view(torch.int16))
    assert not share_tied_matrix(model)  # once is all
    pack_linears(ref)  # the same packed products, the plain embedding kept
    tokens = torch.tensor([1, 9038, 2088, 30, 2])
    ref_cache, cache = ref.make_cache(1, 16), model.make_cache(1, 16)
    batch = make_batch(cache, [0], [5], model.args.n_rep)
    ref_batch = make_batch(ref_cache, [0], [5], ref.args.n_rep)
    with torch.inference_mode():
        assert torch.equal(model(tokens, cache, batch).logits, ref(tokens, ref_cache, ref_batch).logits)


def test_rows_refuse_a_packed_weight_replaced_after_serving():
    """The rows are read from the memory of the packed tensor that was checked; a layer whose
    packed weight was swapped since refuses to read rather than read freed memory."""
    lin, packed = _layer(4)
    packed.weight = lin.weight.detach()
    assert packed.serve_rows()
    packed.packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach().clone(), None)
    with pytest.raises(RuntimeError, match="replaced"):
        packed.rows(torch.tensor([0]))
