"""Packed bf16 products: small row counts run padded and give the same rows back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark.models.llama import Numerics
from dspark.models.packing import PackedLinear, packed_product, packing_supported

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
