"""Reading a V4 checkpoint's DSpark draft: refusals by field or tensor name, V4.1's Markov spelling,
and the released FP8 / FP4 layout (tiny random folders, fp32).

Refusals are checked on ``build_v4_dspark`` with the folder's own config and tensors edited in
memory (one field or tensor at a time), and through the drafter registry and the CLI for a
folder without a draft.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from dspark.models.deepseek_v4_dspark import V4DSparkOptions  # noqa: E402
from dspark.models.deepseek_v4_dspark_format import build_v4_dspark, load_v4_dspark  # noqa: E402
from dspark.models.deepseek_v4_mtp import read_mtp_tensors  # noqa: E402
from dspark.models.loader import load_model  # noqa: E402
from dspark.workers.drafters import registry  # noqa: E402
from dspark.workers.runner import RunnerConfig  # noqa: E402
from helpers.tiny_v4_dspark import STAGES, write_v4_dspark_folder  # noqa: E402

LAST = f"{STAGES - 1}."
VOCAB, RANK = 260, 16


def write_folder(path, seed: int, **over):
    return write_v4_dspark_folder(path, vocab_size=VOCAB, block_size=4, layer_ids=(1, 2), rank=RANK,
                                  noise_token_id=VOCAB - 1, seed=seed, **over)  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4dspark_fmt")
    write_folder(path, seed=70)
    ours = load_model(path, dtype="fp32")
    raw = json.loads((path / "config.json").read_text())
    return path, ours, raw, read_mtp_tensors(path, "mtp.")


def build(folder, raw_over=None, drop=(), add=None, opts=V4DSparkOptions()):
    _, ours, raw, tensors = folder
    raw = {**raw, **(raw_over or {})}
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    tensors.update(add or {})
    return build_v4_dspark(ours.model, raw, tensors, opts, source="tiny")


H = 32  # the tiny config's hidden size
REFUSALS = {
    "no field": (dict(raw_over={"dspark_noise_token_id": None}), "config.json has no dspark_noise_token_id"),
    "block size": (dict(raw_over={"dspark_block_size": 0}), "dspark_block_size 0"),
    "layer past the target": (dict(raw_over={"dspark_target_layer_ids": [1, 3]}), "dspark_target_layer_ids: layer 3"),
    "layer count": (dict(raw_over={"dspark_target_layer_ids": [0, 1, 2]}, opts=V4DSparkOptions(features="leaving")),
                    r"dspark_target_layer_ids: 3 layers need mtp.0.main_proj.weight \[32, 96\]"),
    "entering layer 0": (dict(raw_over={"dspark_target_layer_ids": [0, 1]}), "dspark_target_layer_ids contains 0"),
    "noise token": (dict(raw_over={"dspark_noise_token_id": VOCAB}), "dspark_noise_token_id 260"),
    "markov rank": (dict(raw_over={"dspark_markov_rank": RANK + 1}), f"dspark_markov_rank {RANK + 1}"),
    "stage kind": (dict(raw_over={"compress_ratios": [0, 4, 8, 0, 4, 0]}), r"compress_ratios\[4\] = 4"),
    "no draft": (dict(drop=None), "has no DSpark draft"),
    "missing main_proj": (dict(drop=("0.main_proj.weight",)), "tensor mtp.0.main_proj.weight is missing"),
    "missing hc_head": (dict(drop=(LAST + "hc_head_fn",)), "collapse=mean"),
    "gated Markov head": (dict(add={LAST + "markov_head.gate_proj.weight": torch.zeros(RANK, H + RANK)}),
                          f"mtp.{LAST}markov_head.gate_proj.weight: a Markov head other than the vanilla pair"),
    "V4.1 bias_vl": (dict(add={"0.ffn.gate.bias_vl": torch.zeros(6)}), "gate.bias_vl"),
    "an MTP layer": (dict(add={"0.e_proj.weight": torch.zeros(H, H)}), "serve it with --draft mtp"),
    "past the stages": (dict(add={f"{STAGES}.attn_norm.weight": torch.ones(H)}), "past the draft's num_nextn"),
    "unknown tensor": (dict(add={"1.attn.surprise": torch.ones(H)}), "draft tensor layers.1.attn.surprise"),
    "experts per token": (dict(opts=V4DSparkOptions(experts_per_token=7)), "experts_per_token 7"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_field(folder, case):
    kw, message = REFUSALS[case]
    if kw.get("drop", ()) is None:  # every mtp.* tensor gone
        kw = {**kw, "drop": tuple(folder[3])}
    with pytest.raises(ValueError, match=message) as err:
        build(folder, **kw)
    assert "\n" not in str(err.value)


def test_v41_markov_spelling_is_mapped_and_hc_head_optional_with_collapse_mean(folder):
    _, ours, raw, tensors = folder
    want = build(folder)
    renamed = {k.replace("markov_head.markov_w1", "markov_head.embed").replace("markov_head.markov_w2", "markov_head.head"): v
               for k, v in tensors.items()}  # fmt: skip
    got = build_v4_dspark(ours.model, raw, renamed, source="tiny")
    torch.testing.assert_close(got.w.markov_w1.weight, want.w.markov_w1.weight, rtol=0, atol=0)
    torch.testing.assert_close(got.w.markov_w2.weight, want.w.markov_w2.weight, rtol=0, atol=0)
    no_hc = {k: v for k, v in renamed.items() if "hc_head" not in k}
    assert build_v4_dspark(ours.model, raw, no_hc, V4DSparkOptions(collapse="mean"), source="tiny").opts.collapse == "mean"


def test_registry_and_cli_refuse_in_one_line(folder, tmp_path):
    """A V4 folder without the draft, through the registry and ``dspark generate``; a non-V4 target."""
    from click.testing import CliRunner

    from dspark.cli import main

    path, ours, raw, _ = folder
    for f in path.iterdir():
        if f.name != "mtp.safetensors":
            shutil.copy(f, tmp_path / f.name)
    cfg = {k: v for k, v in raw.items() if not k.startswith("dspark_")}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    there = type(ours)(model=ours.model, tokenizer=ours.tokenizer, args=ours.args, source=str(tmp_path), name="x")
    ctx = registry.DraftContext(loaded=there, args=ours.args, target_runner=None, runner=RunnerConfig(n_slots=1, max_seq=64))
    with pytest.raises(ValueError, match="config.json has no dspark_block_size"):
        registry.build_drafter("v4-dspark", ctx, {})
    with pytest.raises(ValueError, match="features"):
        registry.build_drafter("v4-dspark", ctx, {"features": "sideways"})
    none = registry.DraftContext(loaded=None, args=None, target_runner=None, runner=ctx.runner)
    with pytest.raises(ValueError, match="needs a DeepSeek-V4 target"):
        registry.build_drafter("v4-dspark", none, {})
    res = CliRunner().invoke(main, ["generate", "--model", str(tmp_path), "--draft", "v4-dspark", "--dtype", "fp32",
                                    "--max-tokens", "2", "hi"])  # fmt: skip
    assert res.exit_code != 0 and "dspark_block_size" in res.output and "Traceback" not in res.output
    # The folder with its draft, asked for a trained head: pointed to the drafter that reads it.
    res = CliRunner().invoke(main, ["generate", "--model", str(path), "--draft", "dspark", "--dtype", "fp32",
                                    "--max-tokens", "2", "hi"])  # fmt: skip
    assert res.exit_code != 0 and "serve it with --draft v4-dspark" in res.output and "Traceback" not in res.output


def test_released_fp8_fp4_layout_loads(tmp_path):
    """The folder in the release's quantised layout (FP8 attention and shared experts with e8m0
    block scales, FP4 routed experts, main_proj FP8 too, scales in a shard of their own): the draft
    loads, its weights are within the formats' rounding of the float ones, and it drafts."""
    from helpers.quantise_v4 import quantise_fp8, quantise_folder
    from safetensors.torch import load_file, save_file

    src, dst = tmp_path / "float", tmp_path / "fp8"
    src.mkdir()
    write_folder(src, seed=80, moe_intermediate_size=32)  # FP4 scales cover 32 values of a row
    quantise_folder(src, dst, (16, 16))
    shard = load_file(str(dst / "mtp.safetensors"))
    scales = load_file(str(dst / "scales.safetensors"))
    shard["mtp.0.main_proj.weight"], scales["mtp.0.main_proj.scale"] = quantise_fp8(shard["mtp.0.main_proj.weight"].float(), (16, 16))
    save_file(shard, str(dst / "mtp.safetensors"))
    save_file(scales, str(dst / "scales.safetensors"))
    assert shard["mtp.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn and shard["mtp.2.ffn.experts.0.w2.weight"].dtype == torch.int8
    fl, q = load_model(src, dtype="fp32"), load_model(dst, dtype="fp32")
    want, got = load_v4_dspark(src, fl.model), load_v4_dspark(dst, q.model)
    for name in ("main_proj.weight", "layers.1.attn.wq_b.weight", "layers.2.ffn.experts_w2", "layers.0.ffn.shared_experts.w1.weight"):
        a, b = dict(want.w.named_parameters())[name], dict(got.w.named_parameters())[name]
        assert not torch.equal(a, b)  # rounded ...
        assert (a - b).abs().max() <= 0.3 * a.abs().max()  # ... within FP4's coarse grid at worst
    for name in ("markov_w1.weight", "confidence.weight", "layers.0.attn.attn_sink"):
        torch.testing.assert_close(dict(want.w.named_parameters())[name], dict(got.w.named_parameters())[name], rtol=0, atol=0)
    keys = got.context_keys(torch.randn(3, 2 * 3 * 32), torch.arange(3))[:, None]  # [S, 1, 3, D]
    _, normed = got.block_states(torch.tensor([5]), torch.tensor([3]), keys, torch.ones(1, 3, dtype=torch.bool), 4)
    assert torch.isfinite(got.base_logits(normed)).all()


def test_a_sharded_target_gets_the_whole_embedding_and_head_from_the_folder(folder):
    """A tensor-parallel target (rank 0's shard, as the factory hands it over) holds a vocabulary
    shard of the head: the draft reads the whole tensors from the folder instead."""
    from dspark.models.llama import TPHooks

    path, ours, _, _ = folder
    model, saved = ours.model, ours.model.tp
    model.tp = TPHooks(rank=0, world_size=2)
    try:
        sharded = load_v4_dspark(path, model)
    finally:
        model.tp = saved
    assert sharded.head.data_ptr() != model.head.weight.data_ptr()
    torch.testing.assert_close(sharded.head, model.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(sharded.embed, model.embed.weight, rtol=0, atol=0)
    assert registry.get("v4-dspark").takes_target_shard
