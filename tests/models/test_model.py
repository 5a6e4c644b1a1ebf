"""Model-level tests of the engine foundation on the real default model (fp32 unless noted)."""

from __future__ import annotations

import pytest
import torch

from dspark.kernels.attention import build_plan
from dspark.models.kv_cache import CacheFullError, KVCache, copy_held, make_batch
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput
from helpers.varlen import assert_varlen_batch_equals_alone


def chat_ids(lm, text: str) -> list[int]:
    return lm.tokenizer.encode_chat([{"role": "user", "content": text}])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_logits_match_transformers(model_fp32, hf_model, prompts20):
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=1, max_seq=1024))
    for text in prompts20[:4]:
        ids = chat_ids(model_fp32, text)
        ours = runner.forward(StepInput(ids, [0], [0], [len(ids)])).logits
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
        assert rel_err(ours, ref) <= 1e-4


def test_tokenizer_matches_transformers(model_fp32, hf_tokenizer, prompts20):
    hf_tok = hf_tokenizer
    texts = prompts20 + ["héllo wörld 12345 ünïcödé 🙂 日本語", "  leading spaces\n\n\ttabs", "x=1;y=22;z=333"]
    for t in texts:
        assert model_fp32.tokenizer.encode(t) == hf_tok.encode(t, add_special_tokens=False)
        msgs = [{"role": "user", "content": t}]
        ref = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if not isinstance(ref, list) else ref
        assert model_fp32.tokenizer.encode_chat(msgs) == list(ref)


def test_greedy_matches_transformers_generate(model_fp32, hf_model, prompts20):
    tok = model_fp32.tokenizer
    prompts = [chat_ids(model_fp32, t) for t in prompts20]
    engine = Engine(LocalRunner(model_fp32.model, RunnerConfig(n_slots=20, max_seq=1024)), tok, EngineConfig(max_batch=20))
    ours = engine.generate(prompts, SamplingParams(max_tokens=64, ignore_eos=True))
    # transformers generates the 20 prompts as one left-padded batch (its own batching path).
    width = max(len(p) for p in prompts)
    pad = tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf_model.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                pad_token_id=pad)[:, width:].tolist()
    same = sum(int(r == seq.output_ids) for r, seq in zip(ref, ours))
    assert same >= 19, f"only {same}/20 greedy continuations identical to transformers"


def test_varlen_batch_equals_each_alone(model_fp32):
    """Requests of different lengths and new-token counts in one forward = each alone."""
    assert_varlen_batch_equals_alone(model_fp32.model, [list(range(100, 100 + n)) for n in (5, 17, 40)])


def test_padded_attention_equals_loop(model_fp32):
    """The GPU-oriented padded attention path gives the loop path's results (on CPU here)."""
    torch.manual_seed(0)
    n_kv, rep, hd = 3, 3, 64
    cache_k = torch.randn(4, n_kv, 64, hd)
    cache_v = torch.randn(4, n_kv, 64, hd)
    slots, starts, q_lens = [2, 0, 3], [10, 0, 30], [1, 7, 4]
    T = sum(q_lens)
    q = torch.randn(T, n_kv * rep, hd)
    from dspark.kernels.attention import varlen_attention

    a = varlen_attention(q, cache_k, cache_v, build_plan(slots, starts, q_lens, rep, "cpu", padded=False))
    b = varlen_attention(q, cache_k, cache_v, build_plan(slots, starts, q_lens, rep, "cpu", padded=True))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_span_attention_equals_the_per_request_loop(dtype):
    """Short queries in one call over a strided slot span (with an unused slot inside it and a
    long prefill beside it) give the per-request loop's results."""
    torch.manual_seed(0)
    n_kv, rep, hd = 3, 3, 64
    cache_k = torch.randn(6, n_kv, 96, hd, dtype=dtype)
    cache_v = torch.randn(6, n_kv, 96, hd, dtype=dtype)
    slots, starts, q_lens = [4, 1, 3, 0], [10, 0, 30, 5], [1, 7, 20, 5]  # slot 2 unused; 20 > SPAN_MAX_Q
    q = torch.randn(sum(q_lens), n_kv * rep, hd, dtype=dtype)
    from dspark.kernels.attention import varlen_attention

    span = build_plan(slots, starts, q_lens, rep, "cpu")
    assert span.span is not None and span.span.tokens.numel() == 1 + 7 + 5
    loop = build_plan(slots, starts, q_lens, rep, "cpu", span=False)
    assert loop.span is None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(varlen_attention(q, cache_k, cache_v, span),
                               varlen_attention(q, cache_k, cache_v, loop), atol=tol, rtol=0)


def test_truncate_and_refeed(model_fp32):
    model = model_fp32.model
    cache = KVCache(model.args.n_layers, 2, model.args.n_kv_heads, 64, model.args.head_dim, torch.float32, "cpu")
    slot = cache.allocate()
    ids = torch.arange(200, 220)
    b = make_batch(cache, [slot], [20], model.args.n_rep)
    with torch.inference_mode():
        ref = model(ids, cache, b).logits
        # Pretend the last 6 were rejected drafts: drop them, feed different tokens, then the originals.
        cache.truncate(slot, 14)
        model(torch.tensor([7, 8, 9]), cache, make_batch(cache, [slot], [3], model.args.n_rep))
        cache.truncate(slot, 14)
        again = model(ids[14:], cache, make_batch(cache, [slot], [6], model.args.n_rep)).logits
    assert rel_err(again, ref[14:]) < 1e-5
    cache.free(slot)
    assert cache.allocate() == slot  # slots are reused


def test_the_cache_grows_with_use_and_gives_the_same_logits(model_fp32):
    """A cache that starts with 64 positions per slot and grows (twice) as two requests of
    different lengths are prefilled in chunks and decoded gives the logits of one allocated for
    max_seq up front; the slots' contents survive each growth."""
    model = model_fp32.model
    args = model.args

    def run(initial):
        cache = KVCache(args.n_layers, 3, args.n_kv_heads, 320, args.head_dim, torch.float32, "cpu", initial_seq=initial)
        a, b = cache.allocate(), cache.allocate()
        ids = torch.arange(100, 400)
        out, caps = [], []
        with torch.inference_mode():
            for lens in ([40, 20], [50, 30], [100, 1], [1, 1], [90, 1]):  # slot a reaches 281 positions
                batch = make_batch(cache, [a, b], lens, args.n_rep)
                toks = torch.cat([ids[cache.lengths[a] - lens[0] : cache.lengths[a]],
                                  ids[cache.lengths[b] - lens[1] : cache.lengths[b]]])
                out.append(model(toks, cache, batch).logits)
                caps.append(cache.capacity)
        return torch.cat(out), caps

    grown, caps = run(64)
    full, full_caps = run(320)
    assert caps[0] == 64 and caps[-1] == 320 and len(set(caps)) >= 3, caps
    assert full_caps == [320] * len(full_caps)
    assert torch.equal(grown, full)
    with pytest.raises(CacheFullError):
        KVCache(1, 1, 1, 100, 8, torch.float32, "cpu").reserve(101)


def test_growing_copies_every_held_position_bit_for_bit():
    """The copy of a growing cache stops at each row's last position that is not zero (the
    rest is zero already): rows with zeros inside, a stored -0.0 at the end, an empty row and a
    full one all come out bit for bit."""
    src = torch.randn(5, 12, 4).to(torch.bfloat16)
    src[0, 6:] = 0  # held up to 6
    src[1, 3:9] = 0  # a gap of zeros, then held again up to the end
    src[2] = 0  # never written
    src[3, 5:] = 0
    src[3, 4] = -0.0  # all its bits but the sign are zero: still held
    dst = torch.zeros(5, 20, 4, dtype=torch.bfloat16)
    copy_held(dst, src)
    assert torch.equal(dst[:, :12].view(torch.int16), src.view(torch.int16))
    assert not dst[:, 12:].view(torch.int16).any()


def test_seeded_sampling_is_reproducible(model_fp32):
    tok = model_fp32.tokenizer
    ids = chat_ids(model_fp32, "Tell me a short story about a cat.")

    def run(seed, others):
        eng = Engine(LocalRunner(model_fp32.model, RunnerConfig(n_slots=4, max_seq=256)), tok, EngineConfig())
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=seed)
        seqs = eng.generate([ids] + [chat_ids(model_fp32, o) for o in others], [params] + [SamplingParams(max_tokens=5, temperature=1.0)] * len(others))
        return seqs[0].output_ids

    a = run(1234, [])
    assert a == run(1234, ["other request", "and another"])  # batch-mates do not change the stream
    assert a != run(4321, [])


def test_stop_strings_and_max_tokens(model_fp32):
    tok = model_fp32.tokenizer
    eng = Engine(LocalRunner(model_fp32.model, RunnerConfig(n_slots=2, max_seq=256)), tok, EngineConfig())
    ids = chat_ids(model_fp32, "Count from 1 to 20 separated by commas.")
    full = eng.generate([ids], SamplingParams(max_tokens=40))[0]
    assert len(full.output_ids) <= 40
    # Pick a stop string that occurs in the greedy output; the text must end right before it.
    stop = full.text[5:8]
    cut = eng.generate([ids], SamplingParams(max_tokens=40, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
