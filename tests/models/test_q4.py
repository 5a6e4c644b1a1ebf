"""``--weights q4``: the GGUF file's own 4-bit layer matrices, multiplied as stored.

* the blocks read from the file are the values the ``gguf`` package dequantizes, exactly;
* a product with the int4 kernel equals the dense product by those values (fp32: to float
  rounding; bf16: to bf16 rounding), and each row's bits do not depend on the rows beside it;
* the whole model in fp32 gives the dense fp32 model's logits and greedy text;
* bf16 deterministic (the serving default), eager and compiled: the start-up row-invariance
  check passes and speculative greedy output equals plain greedy output bit for bit;
* what it cannot serve (a folder, a GPU, fp16, tensor parallelism) is refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dspark.models.kv_cache import make_batch
from dspark.models.loader import default_model_path, load_model
from dspark.models.q4 import GROUP, Q4Blocks, Q4Linear, q4_blocks
from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.runner import RunnerConfig
from helpers.engines import greedy_outputs

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no int4 CPU kernel")


def _q4_layers(engine) -> int:
    return sum(isinstance(m, Q4Linear) for m in engine.runner.model.modules())


@pytest.fixture(scope="module")
def q4_fp32():
    return load_model(dtype="fp32", progress=False, weights="q4")


def test_blocks_are_the_values_gguf_dequantizes():
    """Every layer matrix of the default file, bit for bit (so the fp32 (scale, zero) of every
    block is exact there)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    layers = [t for t in GGUFReader(str(default_model_path())).tensors
              if t.name.startswith("blk.") and len(t.shape) == 2]
    assert len(layers) == 210 and {t.tensor_type.name for t in layers} == {"Q4_1"}
    for t in layers:
        blocks = q4_blocks(np.asarray(t.data), "Q4_1")
        assert torch.equal(blocks.dense(), torch.from_numpy(dequantize(t.data, t.tensor_type))), t.name


def test_q4_0_blocks_match_gguf():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType.Q4_0)
    assert torch.equal(q4_blocks(raw, "Q4_0").dense(), torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_0)))


def _random_blocks(out: int, inp: int, seed: int = 0) -> Q4Blocks:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.int32)
    scale = (torch.rand(out, inp // GROUP, generator=g) * 0.02 + 0.001).half().float()
    zero = (-torch.rand(out, inp // GROUP, generator=g) * 0.1).half().float() + 8 * scale
    return Q4Blocks(codes, scale, zero)


def test_product_equals_the_dense_product_and_is_row_invariant():
    blocks = _random_blocks(192, 1536)
    dense = blocks.dense()
    x = torch.randn(40, 1536, generator=torch.Generator().manual_seed(1))
    layer32 = Q4Linear(blocks, None, torch.float32)
    torch.testing.assert_close(layer32(x), x @ dense.t(), rtol=1e-5, atol=1e-5)
    layer16 = Q4Linear(blocks, None, torch.bfloat16)
    xb = x.bfloat16()
    y = layer16(xb)
    ref = xb.float() @ dense.t()
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
    for m in (1, 2, 3, 8, 17, 33):  # each row's bits whatever the rows beside it
        assert torch.equal(layer16(xb[:m]), y[:m]), m
    assert torch.equal(layer16(xb[20:21]), y[20:21])


def test_model_fp32_matches_the_dense_model(model_fp32, q4_fp32):
    layers = [m for m in q4_fp32.model.modules() if isinstance(m, Q4Linear)]
    assert len(layers) == 4 * q4_fp32.args.n_layers  # q|k|v, o, gate|up, down of every layer
    logits = []
    for m in (model_fp32.model, q4_fp32.model):
        cache = m.make_cache(1, 64)
        batch = make_batch(cache, [0], [12], m.args.n_rep)
        with torch.inference_mode():
            logits.append(m(torch.arange(300, 312), cache, batch).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=2e-3, rtol=0)
    tok = model_fp32.tokenizer
    dense, _ = greedy_outputs(tok, EngineSpec(dtype="fp32", runner=RunnerConfig(n_slots=2, max_seq=256)), max_tokens=32)
    q4, n_q4 = greedy_outputs(tok, EngineSpec(dtype="fp32", weights="q4", runner=RunnerConfig(n_slots=2, max_seq=256)),
                              _q4_layers, max_tokens=32)
    assert n_q4 == 120  # the engine multiplies the 4-bit blocks
    assert q4 == dense


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_deterministic_speculative_equals_plain(model_fp32, compiled):
    tok = model_fp32.tokenizer

    def runner():
        return RunnerConfig(n_slots=2, max_seq=512, deterministic=True, compile=compiled)

    spec = EngineSpec(dtype="bf16", weights="q4", runner=runner())  # start-up: the row-invariance check
    plain, n_q4 = greedy_outputs(tok, spec, _q4_layers)
    drafted, (n_q4_spec, verified) = greedy_outputs(
        tok, EngineSpec(dtype="bf16", weights="q4", draft="ngram", block_len=4, runner=runner()),
        lambda engine: (_q4_layers(engine), engine.metrics.num_draft_tokens))
    assert n_q4 == n_q4_spec == 120  # both engines multiply the 4-bit blocks
    assert verified > 0  # drafts were verified: the comparison is not vacuous
    assert drafted == plain


def test_what_q4_cannot_serve_is_refused(tmp_path):
    with pytest.raises(ValueError, match="GGUF file"):
        load_model(str(tmp_path), weights="q4")
    with pytest.raises(ValueError, match="CPU in bf16 or fp32"):
        load_model(dtype="fp16", weights="q4")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model(weights="q3")
    with pytest.raises(ValueError, match="one rank"):
        build_engine(EngineSpec(weights="q4", tp=2), progress=False)


def test_a_file_with_other_layer_types_is_refused(tmp_path):
    """A GGUF whose layer matrices are not all Q4_0 / Q4_1 (here: F32) is named in the error."""
    from gguf import GGUFWriter

    out = tmp_path / "mixed.gguf"
    w = GGUFWriter(str(out), "llama")
    w.add_block_count(1)
    w.add_head_count(9)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from dspark.models.loader import q4_refusal

    assert "also has F32" in q4_refusal(out)
    with pytest.raises(ValueError, match="also has F32"):
        load_model(str(out), weights="q4")
    assert q4_refusal(None) is None  # the default file can be served


def test_a_matrix_of_rows_the_kernel_cannot_pack_is_refused():
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        Q4Linear(_random_blocks(24, 64), None, torch.bfloat16)


def test_doctests():
    import doctest

    from dspark.models import q4

    result = doctest.testmod(q4)
    assert result.attempted > 0 and result.failed == 0


def test_cluster_config_refuses_q4_where_it_cannot_serve():
    from dspark.cluster.config import ClusterConfig

    assert ClusterConfig.from_args({"weights": "q4"}).weights == "q4"
    for bad in ({"weights": "q4", "tp": 2}, {"weights": "q4", "device": "cuda"}, {"weights": "q4", "dtype": "fp16"}):
        with pytest.raises(ValueError, match="CPU, one rank"):
            ClusterConfig.from_args(bad)
    with pytest.raises(ValueError, match="dense or q4"):
        ClusterConfig.from_args({"weights": "int3"})


def test_a_verifier_group_of_a_q4_cluster_builds_a_q4_engine():
    from dspark.cluster.config import ClusterConfig
    from dspark.cluster.verifier_group import engine_spec

    cfg = ClusterConfig.from_args({"weights": "q4", "draft": "hybrid", "draft_workers": 1, "verify_policy": "adaptive"})
    spec = engine_spec(cfg)
    assert (spec.weights, spec.draft, spec.verify_policy) == ("q4", "hybrid", "adaptive")
    assert engine_spec(ClusterConfig()).weights == "dense"


def test_generate_with_q4_drafts_blocks_of_three_where_the_int4_kernel_multiplies(monkeypatch):
    from click.testing import CliRunner

    from dspark.cli import main
    from dspark.models.q4 import KERNEL_ENV, q4_kernel

    def block_of(*extra):
        res = CliRunner().invoke(main, ["generate", "List three colours.", "--weights", "q4", "--draft", "ngram",
                                        "--max-tokens", "8", *extra])
        assert res.exit_code == 0, res.output
        return int(res.output.split("draft=ngram, block=")[1].split(",")[0])

    assert block_of() == (3 if q4_kernel(torch.bfloat16) == "int4" else 4)
    monkeypatch.setenv(KERNEL_ENV, "int4")
    assert block_of() == 3
    assert block_of("--block", "5") == 5
    monkeypatch.setenv(KERNEL_ENV, "tpu")
    res = CliRunner().invoke(main, ["generate", "Hi.", "--weights", "q4", "--max-tokens", "2"])
    assert res.exit_code == 2 and KERNEL_ENV in res.output and "Traceback" not in res.output


def test_commands_refuse_what_q4_cannot_serve_in_one_line(tmp_path):
    """A folder model: `generate` at build time, `serve` / `demo` before Ray starts."""
    import click
    from click.testing import CliRunner

    from dspark.cli import main
    from dspark.cluster.commands import make_config

    res = CliRunner().invoke(main, ["generate", "hi", "--weights", "q4", "--model", str(tmp_path)])
    assert res.exit_code == 1 and "reads the 4-bit blocks of a GGUF file" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    with pytest.raises(click.UsageError, match="reads the 4-bit blocks of a GGUF file"):
        make_config(str(tmp_path), "bf16", "cpu", 1, 1, "ngram", 4, "adaptive", 4, weights="q4")
    assert make_config(None, "bf16", "cpu", 1, 1, "ngram", 4, "adaptive", 4, weights="q4").weights == "q4"


def test_serve_refuses_a_bad_kernel_choice_before_ray_starts(monkeypatch):
    import click

    from dspark.cluster.commands import make_config
    from dspark.models.q4 import KERNEL_ENV

    monkeypatch.setenv(KERNEL_ENV, "gpu")
    with pytest.raises(click.UsageError, match=KERNEL_ENV):
        make_config(None, "bf16", "cpu", 1, 1, "ngram", 4, "adaptive", 4, weights="q4")
    monkeypatch.setenv(KERNEL_ENV, "amx")  # our kernel multiplies bf16 only: fp32 is refused, not started
    with pytest.raises(click.UsageError, match="bf16"):
        make_config(None, "fp32", "cpu", 1, 1, "ngram", 4, "adaptive", 4, weights="q4")
    monkeypatch.setenv(KERNEL_ENV, "int4")
    assert make_config(None, "bf16", "cpu", 1, 1, "ngram", 4, "adaptive", 4, weights="q4").weights == "q4"
