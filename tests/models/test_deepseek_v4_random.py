"""`dspark make-model`: the random DeepSeek-V4 folder it writes is a V4 checkpoint to both readers.

The command runs in-process (click's runner); the folder (tiny preset, fp32 storage, with the
MTP layer) is loaded by our loader and by transformers' ``DeepseekV4ForCausalLM.from_pretrained``
with nothing missing or left over, and the two give the same logits for a 45-token prefill and
six cached decode steps (CSA and HCA windows close on the way).  That the names and the config
are the published ones is what makes transformers read every tensor.  Bad arguments are one-line
errors; the small preset's configuration is checked without writing its weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dspark.cli import main
from dspark.models.deepseek_v4_config import ATTENTION_KINDS, deepseek_v4_config_from_hf
from dspark.models.deepseek_v4_random import preset_config
from dspark.models.kv_cache import make_batch
from dspark.models.loader import load_model

hf = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm") / "v4"
    res = CliRunner().invoke(main, ["make-model", "--out", str(out), "--seed", "3", "--mtp", "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    return out


def test_folder_holds_published_names_and_loads_in_both(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        names = set(fh.keys())
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.attn.kv_norm.weight",
            "layers.0.ffn.gate.tid2eid", "layers.1.attn.indexer.compressor.ape", "layers.2.ffn.gate.bias",
            "layers.2.ffn.experts.7.w3.weight"} <= names  # fmt: skip
    assert not any(n.startswith(("model.", "mtp.")) or "experts_w" in n for n in names)
    with safe_open(str(folder / "mtp.safetensors"), framework="pt") as fh:
        assert {"mtp.0.e_proj.weight", "mtp.0.hc_head_fn", "mtp.0.ffn.experts.0.w1.weight"} <= set(fh.keys())
    _, info = hf.DeepseekV4ForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_logits_equal_transformers_prefill_and_decode(folder):
    ours = load_model(folder, dtype="fp32").model
    ref = hf.DeepseekV4ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = ours.make_cache(1, 128)
    hf_cache = hf.DynamicCache(config=ref.config)
    x, tokens, worst = prompt, [], 0.0
    with torch.no_grad():
        for _ in range(7):  # the prefill, then six decode steps on the greedy tokens
            got = ours(torch.tensor(x), cache, make_batch(cache, [0], [len(x)], 1)).logits
            want = ref(input_ids=torch.tensor([x]), cache=hf_cache, use_cache=True).logits[0]
            assert want.abs().max() > 1.0
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            x = [int(want[-1].argmax())]
            tokens += x
    assert worst <= 1e-5, worst
    from dspark.models.deepseek_v4_mtp import load_mtp

    assert load_mtp(folder, ours).layer.e_proj.weight.shape == (32, 32)  # the drafter reads the MTP layer


def test_bad_arguments_are_one_line_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    runner = CliRunner()
    for args, msg in (
        (["--out", str(tmp_path / "full")], "exists and is not an empty folder"),
        (["--out", str(tmp_path / "new"), "--preset", "huge"], "preset 'huge' is not one of tiny, small"),
        (["--out", str(tmp_path / "new"), "--family", "llama"], "no random writer"),
        (["--out", str(tmp_path / "new"), "--dtype", "fp8"], "is not one of bf16, fp32"),
    ):
        res = runner.invoke(main, ["make-model", *args])
        assert res.exit_code == 1 and msg in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "new").exists()


def test_small_preset_is_a_benchmark_size_with_every_kind():
    raw = preset_config("small")
    cfg = deepseek_v4_config_from_hf(raw)
    assert set(cfg.layer_types) == set(ATTENTION_KINDS) and set(cfg.mlp_layer_types) == {"hash_moe", "moe"}
    assert 256 <= cfg.hidden_size <= 512 and 4 <= cfg.num_hidden_layers <= 8 and 16 <= cfg.n_routed_experts <= 32
    assert cfg.hc_mult > 1 and cfg.hca_compress_ratio <= 32 and cfg.compress_yarn is not None
    hf_cfg = hf.DeepseekV4Config(**{k: v for k, v in json.loads(json.dumps(raw)).items() if k != "architectures"})
    assert hf_cfg.layer_types == list(cfg.layer_types) and hf_cfg.qk_rope_head_dim == cfg.qk_rope_head_dim
