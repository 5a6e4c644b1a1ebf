"""Checkpoint loading (GGUF and Hugging Face folders), architecture variants, detokenization."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.models.loader import load_model
from dspark.models.tokenizer import IncrementalDetokenizer
from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput


def _logits(lm, ids):
    runner = LocalRunner(lm.model, RunnerConfig(n_slots=1, max_seq=512))
    return runner.forward(StepInput(ids, [0], [0], [len(ids)])).logits


@pytest.fixture(scope="module")
def hf_tokenizer_dir(hf_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    hf_tokenizer.save_pretrained(str(d))
    return d


def test_hf_folder_of_the_default_model(hf_model, model_fp32, hf_tokenizer_dir, tmp_path):
    """save_pretrained of the reference -> our safetensors loader -> same logits as our GGUF load."""
    from safetensors.torch import save_file

    # A GGUF-backed HF model refuses save_pretrained; write the same folder layout by hand.
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = hf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in hf_tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    lm = load_model(tmp_path, dtype="fp32", progress=False)
    ids = model_fp32.tokenizer.encode_chat([{"role": "user", "content": "Name a prime number."}])
    assert lm.tokenizer.encode_chat([{"role": "user", "content": "Name a prime number."}]) == ids
    a, b = _logits(lm, ids), _logits(model_fp32, ids)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


@pytest.mark.parametrize("family", ["llama3_scaled_untied", "qwen2_bias"])
def test_tiny_random_architectures_match_transformers(family, hf_tokenizer_dir, tmp_path):
    """RoPE llama3 scaling, untied head and Qwen2 qkv bias against transformers' own modules."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama3_scaled_untied":
        cfg = transformers.LlamaConfig(
            **common, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random init leaves biases at zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.eval().save_pretrained(str(tmp_path), safe_serialization=True)
    for f in hf_tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    lm = load_model(tmp_path, dtype="fp32", progress=False)
    assert lm.args.attention_bias == (family == "qwen2_bias")
    assert (lm.args.rope_scaling is not None) == (family == "llama3_scaled_untied")
    ids = list(range(1000, 1300))  # long enough for scaled low frequencies to matter
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = _logits(lm, ids)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-4


def test_incremental_detokenizer_utf8(model_fp32):
    tok = model_fp32.tokenizer
    text = "Grüße, 世界! Emoji: 🙂🚀 — ünïcödé\nfin"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(t) for t in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # Multi-byte characters split over several byte-level tokens were held back, not broken.
    assert any(p == "" for p in pieces)


def test_converted_copy_is_read_one_tensor_at_a_time(tmp_path):
    """The converted-copy cache is read tensor by tensor (what ``build_model`` pops is read
    then), equal to safetensors' own reading; a truncated file is refused, so the loader
    converts the GGUF again instead of failing later."""
    from safetensors.torch import load_file, save_file

    from dspark.models.loader import _LazyTensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "c": torch.randn(2, 2, generator=g).half(), "empty": torch.zeros(0, 4)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    lazy = _LazyTensors(path)
    ref = load_file(str(path))
    assert sorted(lazy) == sorted(ref)
    assert torch.equal(lazy["a"], ref["a"])
    for name in list(lazy):
        got = lazy.pop(name)
        assert got.dtype == ref[name].dtype and torch.equal(got, ref[name]), name
    assert not lazy
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        _LazyTensors(path)
