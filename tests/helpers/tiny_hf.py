"""Tiny random-weight Hugging Face checkpoint folders, written by transformers itself, for parity
tests of the model families without the model hub.

The folder's tokenizer is a byte-level BPE built here (256 byte tokens, no merges, then special
tokens up to the model's vocabulary), so every id the model can emit decodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320  # 256 bytes + specials; splits evenly over 2 tensor-parallel ranks
EOS = "<|endoftext|>"
PROMPTS = [[(i * 37 + 11) % 256 for i in range(n)] for n in (7, 23, 40)]  # byte ids, three lengths


def write_byte_tokenizer(path: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json with ``vocab_size`` tokens, EOS = id 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = [EOS, "<|im_start|>", "<|im_end|>"]
    names += [f"<|reserved_{i}|>" for i in range(vocab_size - len(alphabet) - len(names))]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tok.save(str(path / "tokenizer.json"))
    # EOS only here, not in config.json: transformers' generate then never stops early, and
    # neither does our engine with ignore_eos, so both produce the same number of tokens.
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))


def tiny_qwen3(path: Path, seed: int = 0, **overrides):
    """Write a Qwen3ForCausalLM to ``path`` and return it (fp32, eval mode).

    3 layers, hidden 64, 4 query / 2 KV heads of width 32 (not 64 / 4), untied LM head.  Every
    RMSNorm weight is drawn around 1 (the init leaves them at exactly 1), so a loader that
    dropped or swapped the per-head q/k norms would change the logits.
    """
    import transformers

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, max_position_embeddings=512,
        initializer_range=0.1,  # logits spread enough that greedy choices are not near-ties
    )
    fields.update(overrides)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    model.save_pretrained(str(path), safe_serialization=True)
    write_byte_tokenizer(path, fields["vocab_size"])
    return model


def tiny_gemma4(path: Path, seed: int = 0, **overrides):
    """Write a Gemma4ForCausalLM (text decoder) to ``path`` and return it (fp32, eval mode).

    4 layers (sliding, full, sliding, full) with a sliding window of 8, shorter than two of the
    PROMPTS; hidden 64, 4 query heads; sliding layers: 2 KV heads of width 16; full layers: 1
    KV head of width 32 whose values are the key projection (``attention_k_eq_v``, as the
    published 31B), proportional RoPE rotating a quarter of the pairs; logits soft-capped at
    30; tied embeddings.  Every norm weight and each layer's output scalar is drawn away from
    its initial value, so a loader that dropped one would change the logits.
    """
    import transformers

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0, final_logit_softcapping=30.0, tie_word_embeddings=True,
        # 0.05: at 0.1 and above the unscaled scores saturate and greedy decoding repeats one token.
        max_position_embeddings=512, initializer_range=0.05,
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    fields.update(overrides)
    model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
        for layer in model.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
    model.save_pretrained(str(path), safe_serialization=True)
    write_byte_tokenizer(path, fields["vocab_size"])
    return model
