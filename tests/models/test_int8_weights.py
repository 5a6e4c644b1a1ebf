"""Int8 drafting weights (``dspark/models/int8_weights.py``) and the DSpark head held in them.

The drafts of an int8 head may differ from the float head's (verification keeps the output
exact whatever they are: the losslessness tests run with the default, int8, drafter); what is
checked here is that the products are int8-accurate and that the head still drafts what the
float head drafts almost everywhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dspark.models.int8_weights import Int8Linear, full_range_inputs, int8_supported

pytestmark = pytest.mark.skipif(not int8_supported(torch.device("cpu")), reason="no int8 products in this torch build")


def _row_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """Largest error of y against x @ w.T per output row, over what int8 rounding may move that
    row by (weights to 1/254 of the row's largest entry, inputs to 1/255 of the input's range)."""
    want = x.float() @ w.t()
    err = (y.float() - want).reshape(-1, w.shape[0]).abs().amax(dim=0)
    return float((err / (x.float().abs().max() * w.abs().sum(dim=1))).max())


def test_products_are_within_int8_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    w[:10] *= 100.0  # rows of very different size: each has its own scale
    x = torch.randn(4, 7, 200, generator=g)
    layer = Int8Linear.of_matrix(w)
    y = layer(x)
    assert y.shape == (4, 7, 300) and y.dtype == torch.float32
    assert _row_error(y, x, w) < 0.01
    assert float((y - x @ w.t()).norm() / (x @ w.t()).norm()) < 0.02
    xb = x[0].bfloat16()  # bf16 in, bf16 out; a 2-D input works the same
    yb = layer(xb)
    assert yb.shape == (7, 300) and yb.dtype == torch.bfloat16 and _row_error(yb, xb, w) < 0.01


def test_a_requests_products_do_not_depend_on_its_batch():
    """[requests, rows, in]: each request's rows are quantised with their own range, so its
    products are bit-identical alone and in any batch (a seeded sampled request then drafts,
    and emits, the same tokens whatever else is drafted with it)."""
    g = torch.Generator().manual_seed(1)
    layer = Int8Linear.of_matrix(torch.randn(64, 48, generator=g))
    x = torch.randn(5, 7, 48, generator=g) * torch.tensor([0.1, 1.0, 10.0, 3.0, 100.0]).view(5, 1, 1)
    batch = layer(x)
    for i in range(5):
        assert torch.equal(batch[i], layer(x[i])) and torch.equal(batch[i : i + 1], layer(x[i : i + 1]))
    assert torch.equal(layer(x[1:3]), batch[1:3])


def test_full_range_inputs_are_used_only_where_they_do_not_saturate():
    """The probe's product at the largest codes is exact where full range is chosen."""
    layer = Int8Linear.of_matrix(torch.ones(8, 64))
    y = layer(torch.ones(3, 64))
    assert torch.allclose(y, torch.full_like(y, 64.0), rtol=0.02)
    assert layer._reduce_range == (not full_range_inputs())


def test_refuses_a_bias_and_other_devices():
    with pytest.raises(ValueError, match="bias-free"):
        Int8Linear.of_linear(nn.Linear(4, 4, bias=True))
    assert not int8_supported(torch.device("meta"))


def test_int8_head_drafts_what_the_bf16_head_drafts():
    """The shipped head in int8 against the same head packed in bf16, on three contexts: the
    backbone's logits within a fraction of their spread and the same argmax at most positions."""
    from dspark.models.dspark_head import default_head_path, load_head
    from dspark.models.loader import load_model
    from dspark.train.features import target_features
    from dspark.workers.drafters.dspark import DSparkDrafter
    from helpers.tiny_models import make_seq

    loaded = load_model(None, dtype="bf16", progress=False)
    path = default_head_path(loaded.name)
    if not path.exists():
        pytest.skip("no shipped head")
    heads = {w: load_head(path, loaded.model) for w in ("float", "int8")}
    for w, head in heads.items():
        head.use_draft_vocab(head.cfg.draft_vocab or 8192)
        head.pack_for_inference(weights=w)
    assert isinstance(heads["int8"].layers[0].w13, Int8Linear) and isinstance(heads["int8"]._out_packed, Int8Linear)
    assert not isinstance(heads["int8"].fc, Int8Linear)  # the context projection stays a float product
    texts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "The capital of France is Paris. The capital of Germany is",
             "Once upon a time, in a small village by the sea, there lived"]
    same = total = 0
    for text in texts:
        ids = loaded.tokenizer.encode(text)
        feats, _ = next(iter(target_features(loaded.model, [ids], heads["float"].cfg.feature_layers)))
        base = {}
        for w, head in heads.items():
            drafter = DSparkDrafter(head, n_slots=1, max_seq=128)
            seq = make_seq("r", ids[:-1], anchor=ids[-1], temperature=0.0, seed=3)
            with torch.inference_mode():
                drafter.observe(seq, seq.prompt_ids, feats[:-1])
                base[w] = drafter.block_logits([seq], torch.tensor([ids[-1]]), 7)[1][0]  # [G, N]
        assert float((base["int8"] - base["float"]).abs().max()) < 0.5 * float(base["float"].std())
        same += int((base["int8"].argmax(-1) == base["float"].argmax(-1)).sum())
        total += base["float"].shape[0]
    assert same >= 0.8 * total, (same, total)
