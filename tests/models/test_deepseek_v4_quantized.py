"""The released checkpoints' FP8 / FP4 block-scaled weights, dequantised on load.

A tiny random V4 folder with its MTP layer is written again in the released layout
(``helpers.quantise_v4``: FP8 e4m3 attention / shared-expert / MTP projections in 16 x 16 blocks,
some of them ragged, FP4 e2m1 routed experts, e8m0 scales in a shard of their own).  This file
dequantises it independently (bit fields decoded by hand, scales broadcast by index) into an
fp32 folder without quantisation; the quantised folder must load to exactly that folder's
weights, logits, greedy output and MTP layer.  Unknown formats are refused by name.
"""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from dspark.models.deepseek_v4_config import SLIDING  # noqa: E402
from dspark.models.deepseek_v4_mtp import load_mtp  # noqa: E402
from dspark.models.kv_cache import make_batch  # noqa: E402
from dspark.models.loader import load_model  # noqa: E402
from dspark.models import quantized  # noqa: E402
from dspark.models.quantized import BlockQuant, block_quant_from_hf, dequantise_tensors  # noqa: E402
from dspark.workers.engine import Engine, EngineConfig  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from dspark.workers.runner import LocalRunner, RunnerConfig  # noqa: E402
from helpers.quantise_v4 import quantise_folder  # noqa: E402
from helpers.tiny_deepseek_v4 import mtp_checkpoint_tensors, tiny_mtp_layer, write_mtp, write_tiny_folder  # noqa: E402

VOCAB = 260
BLOCK = (16, 16)  # wq_a is 24 x 32 and wq_b 64 x 24: ragged edge blocks on both axes
WIDE = dict(moe_intermediate_size=32)  # FP4 scales cover 32 values of a row: expert rows of 32


# -- an independent dequantisation: bit fields by hand ----------------------------------------------
def e8m0(scale: torch.Tensor) -> torch.Tensor:
    return torch.exp2(scale.view(torch.uint8).double() - 127)


def e4m3(q: torch.Tensor) -> torch.Tensor:
    b = q.view(torch.uint8).long()
    sign = 1 - 2 * (b >> 7).double()
    exp, man = (b >> 3) & 0xF, (b & 0x7).double()
    normal = (1 + man / 8) * torch.exp2(exp.double() - 7)
    return sign * torch.where(exp == 0, man / 8 * 2.0**-6, normal)


def e2m1_pairs(packed: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).long()
    codes = torch.stack([b & 0xF, b >> 4], -1).flatten(-2)  # low nibble is the even column
    sign = 1 - 2 * (codes >> 3).double()
    exp, man = (codes >> 1) & 0x3, (codes & 1).double()
    return sign * torch.where(exp == 0, man * 0.5, (1 + man / 2) * torch.exp2(exp.double() - 1))


def by_index(scale: torch.Tensor, rows: int, cols: int, b0: int, b1: int) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return e8m0(scale)[i // b0, j // b1]


def reference_dequantise(qdir: Path, fdir: Path) -> dict[str, torch.Tensor]:
    """Write ``qdir``'s weights as an fp32 folder ``fdir`` (no quantization_config); returns them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    raw = {}
    for f in sorted(qdir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            raw.update({k: fh.get_tensor(k) for k in fh.keys()})
    out = {}
    for name, t in raw.items():
        if name.endswith(".scale"):
            continue
        scale = raw.get(name.removesuffix(".weight") + ".scale")
        if scale is None:
            out[name] = t
        elif t.dtype == torch.int8:
            v = e2m1_pairs(t)
            out[name] = (v * by_index(scale, *v.shape, 1, 32)).float()
        else:
            out[name] = (e4m3(t) * by_index(scale, *t.shape, *BLOCK)).float()
    fdir.mkdir()
    for f in qdir.iterdir():
        if f.suffix != ".safetensors":
            (fdir / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((qdir / "config.json").read_text())
    del cfg["quantization_config"], cfg["expert_dtype"]
    (fdir / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in out.items()}, str(fdir / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(quantised folder, its fp32 dequantisation, quantised names, the original float tensors)."""
    src = tmp_path_factory.mktemp("v4src")
    target = write_tiny_folder(src, VOCAB, 61, **WIDE)
    one, own = tiny_mtp_layer(target, SLIDING, seed=62, vocab_size=VOCAB, **WIDE)
    write_mtp(src, mtp_checkpoint_tensors(one, own), SLIDING)
    qdir, fdir = tmp_path_factory.mktemp("v4q"), tmp_path_factory.mktemp("v4f") / "f"
    names = quantise_folder(src, qdir, BLOCK)
    return qdir, fdir, names, reference_dequantise(qdir, fdir)


@pytest.fixture(scope="module")
def loaded(folders):
    qdir, fdir = folders[:2]
    return load_model(qdir, dtype="fp32"), load_model(fdir, dtype="fp32")


def test_folder_holds_the_release_layout(folders):
    from safetensors import safe_open

    qdir, _, names, _ = folders
    dtypes = {}
    for f in qdir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            dtypes.update({k: fh.get_tensor(k).dtype for k in fh.keys()})
    experts = [n for n in names if ".experts." in n]
    assert experts and all(dtypes[n] == torch.int8 for n in experts)  # packed FP4
    assert any(n.startswith("mtp.0.") for n in experts) and "mtp.0.e_proj.weight" in names
    assert dtypes["model.layers.1.attn.wq_b.weight"] == torch.float8_e4m3fn
    assert dtypes["model.layers.1.attn.wq_b.scale"] == torch.float8_e8m0fnu
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # not quantised in the release


def test_dequantised_weights_equal_an_independent_dequantisation(folders, loaded):
    ours, ref = loaded
    got, want = ours.model.state_dict(), ref.model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # Spot-check against the reference values directly, including a stacked expert.
    real = folders[3]
    assert torch.equal(got["layers.0.attn.wq_a.weight"], real["model.layers.0.attn.wq_a.weight"])
    w13 = torch.cat([real["model.layers.2.ffn.experts.5.w1.weight"], real["model.layers.2.ffn.experts.5.w3.weight"]])
    assert torch.equal(got["layers.2.ffn.experts_w13"][5], w13)


def test_bf16_dequantisation_is_exact(folders, loaded):
    """FP8 / FP4 values times a power of two are bf16 values: nothing is lost in bf16."""
    bf16 = load_model(folders[0], dtype="bf16").model.state_dict()
    fp32 = loaded[1].model.state_dict()
    assert bf16["layers.1.attn.wq_b.weight"].dtype == torch.bfloat16
    for k in ("layers.1.attn.wq_b.weight", "layers.0.ffn.experts_w13", "layers.2.ffn.shared_experts.w2.weight"):
        assert torch.equal(bf16[k].float(), fp32[k]), k


def test_logits_and_greedy_decoding_equal_the_fp32_folder(loaded):
    ours, ref = loaded
    toks = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    rows = []
    for lm in (ours, ref):
        cache, out = lm.model.make_cache(1, 128), []
        for chunk in (toks[:30], *[[t] for t in toks[30:]]):  # a prefill, then 10 decode steps
            batch = make_batch(cache, [0], [len(chunk)], 1)
            with torch.no_grad():
                out.append(lm.model(torch.tensor(chunk), cache, batch).logits)
        rows.append(torch.cat(out))
    assert rows[1].abs().max() > 1.0
    torch.testing.assert_close(rows[0], rows[1], rtol=1e-6, atol=1e-6)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    greedy = [
        Engine(LocalRunner(lm.model, RunnerConfig(n_slots=1, max_seq=128)), lm.tokenizer, EngineConfig(max_batch=1))
        .generate([toks[:12]], params)[0].output_ids
        for lm in (ours, ref)
    ]
    assert len(greedy[0]) == 24 and greedy[0] == greedy[1]


def test_mtp_layer_is_dequantised_the_same_way(folders, loaded):
    ours, ref = loaded
    got = load_mtp(folders[0], ours.model).layer.state_dict()
    want = load_mtp(folders[1], ref.model).layer.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(got["e_proj.weight"], folders[3]["mtp.0.e_proj.weight"])


RELEASE = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"quantization_config": {**RELEASE, "quant_method": "gptq"}}, "^quantization_config.quant_method 'gptq'"),
        ({"quantization_config": {**RELEASE, "fmt": "e5m2"}}, "^quantization_config.fmt 'e5m2'"),
        ({"quantization_config": {**RELEASE, "scale_fmt": "ue4m3"}}, "^quantization_config.scale_fmt 'ue4m3'"),
        ({"quantization_config": {**RELEASE, "activation_scheme": "static"}},
         "^quantization_config.activation_scheme 'static'"),
        ({"quantization_config": {**RELEASE, "group_size": 64}}, "^quantization_config.group_size: unknown"),
        ({"quantization_config": {**RELEASE, "weight_block_size": None}}, "^quantization_config.weight_block_size"),
        ({"quantization_config": RELEASE, "expert_dtype": "int4"}, "^expert_dtype 'int4'"),
        ({"expert_dtype": "fp4"}, "^expert_dtype 'fp4' without a quantization_config"),
    ],
)  # fmt: skip
def test_unknown_quantisation_configs_are_refused_by_field(cfg, message):
    with pytest.raises(ValueError, match=message) as err:
        block_quant_from_hf(cfg)
    assert "\n" not in str(err.value)


def test_v4_1_spelling_is_read():
    assert block_quant_from_hf({"quantization_config": {**RELEASE, "expert_dtype": "fp4"}}) == BlockQuant(
        (128, 128), True
    )


def _fp8(rows, cols):
    return torch.ones(rows, cols).to(torch.float8_e4m3fn)


def _e8m0(*shape):
    return torch.ones(shape).to(torch.float8_e8m0fnu)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"a.weight": _fp8(4, 4), "a.scale": _e8m0(2, 1)}, "^tensor a.weight: scale of shape \\(2, 1\\)"),
        ({"a.scale": _e8m0(1, 1)}, "^tensor a.scale: a block scale without its weight a.weight"),
        ({"a.weight": _fp8(4, 4), "a.scale": torch.ones(1, 1, dtype=torch.uint8)}, "^tensor a.scale has dtype"),
        ({"a.weight": torch.zeros(4, 2, dtype=torch.int8), "a.scale": _e8m0(4, 1)},
         "^tensor a.weight: scale of shape \\(4, 1\\) for an FP4 weight 4x4"),
        ({"a.weight": torch.ones(4, 4).to(torch.float8_e5m2), "a.scale": _e8m0(1, 1)},
         "^tensor a.weight: dtype torch.float8_e5m2 with a block scale"),
        ({"a.weight": torch.zeros(4, 16, dtype=torch.int8), "a.scale": _e8m0(4, 1)}, "FP8", ),
    ],
)  # fmt: skip
def test_tensors_that_do_not_fit_the_format_are_refused_by_name(tensors, message):
    quant = BlockQuant(block=(4, 4), expert_fp4=message != "FP8")
    if message == "FP8":  # packed FP4 in a checkpoint whose experts are declared FP8
        message = "^tensor a.weight: dtype torch.int8 \\(packed FP4\\) but the config's expert_dtype is not 'fp4'"
    with pytest.raises(ValueError, match=message) as err:
        dequantise_tensors(dict(tensors), quant, lambda n: torch.float32)
    assert "\n" not in str(err.value)


def test_a_quantised_weight_without_its_scale_is_refused(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    qdir = folders[0]
    for f in qdir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    scales = load_file(str(tmp_path / "scales.safetensors"))
    del scales["model.layers.0.attn.wo_b.scale"]
    save_file(scales, str(tmp_path / "scales.safetensors"))
    with pytest.raises(ValueError, match="^tensor layers.0.attn.wo_b.weight has dtype torch.float8_e4m3fn and no"):
        load_model(tmp_path, dtype="fp32")


def test_docstring_examples():
    result = doctest.testmod(quantized, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0
