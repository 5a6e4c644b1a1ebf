"""The compiled step (torch.compile over the decoder blocks) against eager, on the real model.

fp32: logits of prefill, decode, verification and mixed varlen steps within 1e-4 of eager, and
greedy output token for token the same, plain and speculative.  bf16 deterministic (the serving
default on CPU): the start-up row-invariance check passes and speculative greedy output equals
plain greedy output bit for bit, both compiled.
"""

from __future__ import annotations

import pytest
import torch

from dspark.models.kv_cache import make_batch
from dspark.models.loader import load_model
from dspark.workers.factory import EngineSpec
from dspark.workers.runner import RunnerConfig
from helpers.engines import greedy_outputs



def _steps(model) -> list[torch.Tensor]:
    """Prefill, decode, a verification block, then a varlen step mixing all three."""
    cache = model.make_cache(3, 128)
    n_rep, logits = model.args.n_rep, []

    def step(slots, q_lens, tokens):
        batch = make_batch(cache, slots, q_lens, n_rep)
        logits.append(model(torch.tensor(tokens), cache, batch).logits)

    step([0], [9], list(range(300, 309)))
    step([0], [1], [42])
    step([0], [5], [7, 8, 9, 10, 11])
    step([1, 0, 2], [6, 1, 4], list(range(500, 506)) + [13] + [21, 22, 23, 24])
    return logits


@torch.inference_mode()
def test_compiled_logits_match_eager_fp32():
    model = load_model(dtype="fp32", progress=False).model
    eager = _steps(model)
    model.enable_compile()
    compiled = _steps(model)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=0)
    assert model.num.compiled


def _texts(tok, spec: EngineSpec, max_tokens: int = 40) -> tuple[list[list[int]], float]:
    return greedy_outputs(tok, spec, lambda engine: engine.runner.compile_s, max_tokens)


def test_compiled_greedy_equals_eager_fp32_plain_and_speculative(model_fp32):
    tok = model_fp32.tokenizer
    eager, _ = _texts(tok, EngineSpec(dtype="fp32", runner=RunnerConfig(n_slots=2, max_seq=512)))
    for draft in ("none", "ngram"):
        spec = EngineSpec(dtype="fp32", draft=draft, runner=RunnerConfig(n_slots=2, max_seq=512, compile=True))
        out, compile_s = _texts(tok, spec)
        assert compile_s > 0  # the graphs were built (or loaded) at start-up
        assert out == eager, draft


@pytest.mark.parametrize("draft", ["ngram"])
def test_compiled_deterministic_bf16_speculative_equals_plain(model_fp32, draft):
    tok = model_fp32.tokenizer
    cfg = RunnerConfig(n_slots=2, max_seq=512, compile=True, deterministic=True)  # the check runs compiled
    plain, _ = _texts(tok, EngineSpec(dtype="bf16", runner=cfg), max_tokens=64)
    spec, _ = _texts(tok, EngineSpec(dtype="bf16", draft=draft, block_len=4, runner=cfg), max_tokens=64)
    assert spec == plain


def test_compiled_code_is_cached_under_the_project_cache(tmp_path, monkeypatch):
    from dspark.models import compiled

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    assert compiled.use_disk_cache() == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")  # an operator's choice stays
    assert compiled.use_disk_cache() == "/elsewhere"


def test_cache_attention_refuses_to_run_outside_a_step():
    q = torch.zeros(1, 2, 4)
    with pytest.raises(RuntimeError, match="step_context"):
        torch.ops.dspark.cache_attention(q, q[:, :1], q[:, :1], 0)


@torch.inference_mode()
def test_compiled_packed_steps_pad_once_not_in_every_product(monkeypatch):
    """bf16 on CPU (packed products): a compiled step of one or two tokens runs as MIN_ROWS rows
    from the first block on, so no product pads its own input (120 pads and slices a step
    before), and a two-token step's logits keep their bits (two rows ran the same graph before)."""
    import dspark.models.packing as packing
    from dspark.models.llama import Transformer

    if not packing.packing_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no oneDNN bf16 products on this CPU")
    model = load_model(dtype="bf16", progress=False).model
    packing.pack_linears(model)
    model.enable_compile()
    cache = model.make_cache(1, 64)
    model(torch.arange(300, 308), cache, make_batch(cache, [0], [8], model.args.n_rep))  # prefill

    def step(tokens):
        cache.truncate(0, 8)
        return model(torch.tensor(tokens), cache, make_batch(cache, [0], [len(tokens)], model.args.n_rep)).logits

    rows: list[int] = []
    product = packing.packed_product
    head = model.output.packed  # the LM head runs after the blocks, on the rows whose logits are wanted

    def counted(x, packed, *args, **kwargs):
        if packed is not head:
            rows.append(x.shape[0])
        return product(x, packed, *args, **kwargs)

    monkeypatch.setattr(packing, "packed_product", counted)
    for tokens in ([42], [42, 43]):
        rows.clear()
        logits = step(tokens)
        assert logits.shape == (len(tokens), model.args.vocab_size)
        assert rows and min(rows) >= packing.MIN_ROWS, (tokens, sorted(set(rows)))
    padded = step([42, 43])
    monkeypatch.setattr(Transformer, "_compiled_rows", lambda self, n: n)  # two rows as they ran before
    assert torch.equal(step([42, 43]), padded)


@torch.inference_mode()
@pytest.mark.parametrize("layout", ["slot", "paged"])
@pytest.mark.parametrize("q_lens,padded_to", [([1], 3), ([2], 3), ([5], 5), ([1, 4, 1], 6), ([3, 2], 7)])
def test_custom_ops_return_what_their_fakes_declare(layout, q_lens, padded_to):
    """The compiled step runs without inductor's size asserts (``compile_blocks``), so the two
    custom ops must return contiguous tensors of the shapes their fakes declare, whatever path
    they take: one or several requests, rows padded past the step's tokens, either KV layout,
    and the product of a packed weight whatever its row count."""
    from dspark.models.compiled import step_context
    from dspark.models.kv_cache import KVCache
    from dspark.models.packing import PackedLinear, packing_supported
    from dspark.models.paged_cache import PagedKVCache

    g = torch.Generator().manual_seed(len(q_lens) * 10 + padded_to)
    n_heads, n_kv, hd = 6, 2, 16
    cache = (KVCache(2, len(q_lens), n_kv, 64, hd, torch.float32, "cpu") if layout == "slot"
             else PagedKVCache(2, len(q_lens), n_kv, 64, hd, torch.float32, "cpu", block=16))
    slots = [cache.allocate() for _ in q_lens]
    batch = make_batch(cache, slots, q_lens, n_heads // n_kv)
    q = torch.randn(padded_to, n_heads, hd, generator=g)
    k = torch.randn(padded_to, n_kv, hd, generator=g)
    with step_context(cache, batch):
        out = torch.ops.dspark.cache_attention(q, k, k.clone(), 1)
    assert out.shape == q.shape and out.is_contiguous()
    if packing_supported(torch.device("cpu"), torch.bfloat16):
        layer = PackedLinear(torch.nn.Linear(hd, 24, bias=True).to(torch.bfloat16))
        for rows in (1, 2, 3, 9):
            for block in (0, 4):
                x = torch.randn(rows, hd, generator=g).to(torch.bfloat16)
                y = torch.ops.dspark.packed_linear(x, layer.packed, layer.bias, 24, block)
                assert y.shape == (rows, 24) and y.is_contiguous()
