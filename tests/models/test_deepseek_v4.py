"""The DeepSeek-V4 model in our engine against transformers' DeepseekV4ForCausalLM (fp32, tiny, random).

The folder is written by transformers' ``save_pretrained`` (published weight names) and loaded
through ``load_model``.  Three layers (sliding, CSA with m = 4, HCA with m' = 8), window 8,
three hyper-connection streams, one hash-routed MoE layer: windows close every few tokens, so
100+ decoding steps cross dozens of them.  Covered: prefill and chunked prefill logits, greedy
decoding through ``Engine`` + ``LocalRunner`` against transformers' cached step-by-step greedy,
several requests of different lengths in one step against each alone, speculative decoding with
partly wrong scripted drafts equal to plain decoding (full-length and ring state), and the live
state after a verify + rollback equal to token-by-token decoding's, with the rejected tokens
having closed a CSA and an HCA window and wrapped the rings.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf  # noqa: E402

from dspark.models.kv_cache import make_batch  # noqa: E402
from dspark.models.loader import load_model  # noqa: E402
from dspark.workers.engine import Engine, EngineConfig  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from dspark.workers.runner import LocalRunner, RunnerConfig  # noqa: E402
from helpers.tiny_hf import write_byte_tokenizer  # noqa: E402
from helpers.tiny_deepseek_v4 import ScriptedDrafter, randomise, tiny_hf_config  # noqa: E402

VOCAB = 260  # the byte tokenizer's 257 tokens and a few more
DECODE = 120


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = tiny_hf_config(vocab_size=VOCAB)
    cfg._attn_implementation = "eager"
    ref = randomise(hf.DeepseekV4ForCausalLM(cfg), 26)
    with torch.no_grad():  # unit-variance embeddings: logits of a sane scale
        ref.model.embed_tokens.weight.normal_(generator=torch.Generator().manual_seed(27))
    path = tmp_path_factory.mktemp("v4")
    ref.save_pretrained(path)
    write_byte_tokenizer(path, VOCAB)
    return path, ref


@pytest.fixture(scope="module")
def ours(folder):
    return load_model(folder[0], dtype="fp32")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def step(model, cache, slots, tokens_per_slot):
    """One varlen forward: all rows' logits."""
    batch = make_batch(cache, slots, [len(t) for t in tokens_per_slot], 1)
    flat = torch.tensor([t for ts in tokens_per_slot for t in ts])
    with torch.no_grad():
        return model(flat, cache, batch).logits


def hf_greedy(ref, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation with its own cache, one token per forward."""
    cache, out, rows = DynamicCache(config=ref.config), [], []
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            logits = ref(input_ids=x, cache=cache, use_cache=True).logits[0, -1]
            rows.append(logits)
            out.append(int(logits.argmax()))
            x = torch.tensor([[out[-1]]])
    return out, torch.stack(rows)


def test_prefill_and_chunked_prefill_match_transformers(folder, ours):
    ref = folder[1]
    prompt = ids(45, 1)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([prompt]), use_cache=False).logits[0]
    cache = ours.model.make_cache(2, 128)
    whole = step(ours.model, cache, [0], [prompt])
    assert want.abs().max() > 1.0
    torch.testing.assert_close(whole, want, rtol=1e-4, atol=1e-4)
    chunks, o = [], 0
    for n in (5, 3, 1, 11, 9, 16):  # uneven chunks: windows close inside and across them
        chunks.append(step(ours.model, cache, [1], [prompt[o : o + n]]))
        o += n
    torch.testing.assert_close(torch.cat(chunks), want, rtol=1e-4, atol=1e-4)


def test_greedy_decoding_through_the_engine_matches_transformers(folder, ours):
    prompt = ids(12, 2)
    want, _ = hf_greedy(folder[1], prompt, DECODE)
    runner = LocalRunner(ours.model, RunnerConfig(n_slots=2, max_seq=256))
    engine = Engine(runner, ours.tokenizer, EngineConfig(max_batch=2))
    seq = engine.generate([prompt], SamplingParams(max_tokens=DECODE, ignore_eos=True))[0]
    assert seq.output_ids == want


def test_batched_requests_of_different_lengths_equal_each_alone(ours):
    model = ours.model
    a, b, c = ids(30, 3), ids(21, 4), ids(9, 5)
    alone = model.make_cache(3, 128)
    together = model.make_cache(3, 128)
    # Bring the requests to different lengths, then one step: a verify-sized block, one decode
    # token and a prefill chunk, all in one flat batch.
    for slot, prefix in enumerate((a[:25], b[:20], c[:1])):
        step(model, alone, [slot], [prefix])
        step(model, together, [slot], [prefix])
    news = [a[25:30], b[20:21], c[1:9]]
    want = torch.cat([step(model, alone, [s], [t]) for s, t in enumerate(news)])
    got = step(model, together, [0, 1, 2], news)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slack", [None, 5])
def test_speculative_decoding_with_partly_wrong_drafts_equals_plain(ours, slack):
    prompt = ids(10, 6)
    model = ours.model
    model.ring_slack = slack  # 5 = block_len + 1: the rings wrap every few steps
    try:
        plain_runner = LocalRunner(model, RunnerConfig(n_slots=1, max_seq=256))
        params = SamplingParams(max_tokens=DECODE, ignore_eos=True)
        plain = Engine(plain_runner, ours.tokenizer, EngineConfig(max_batch=1, prefix_caching=False))
        script = plain.generate([prompt], params)[0].output_ids
        runner = LocalRunner(model, RunnerConfig(n_slots=1, max_seq=256))
        spec = Engine(runner, ours.tokenizer, EngineConfig(max_batch=1, block_len=4, prefix_caching=False),
                      drafter=ScriptedDrafter(script, VOCAB, seed=7))  # fmt: skip
        seq = spec.generate([prompt], params)[0]
    finally:
        model.ring_slack = None
    assert seq.output_ids == script
    m = spec.metrics
    assert 0 < m.num_accepted_tokens < m.num_draft_tokens  # some drafts rejected, some accepted


def assert_same_live_state(cache, slot_a: int, slot_b: int) -> None:
    a, b = cache.live(slot_a), cache.live(slot_b)
    assert a.keys() == b.keys()
    for name in a:  # rows of a 5-token step and of 1-token steps round differently: ~1e-6
        assert a[name].shape == b[name].shape, name
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-5), (name, (a[name] - b[name]).abs().max())


def test_state_after_verify_and_rollback_equals_token_by_token(ours):
    model = ours.model
    model.ring_slack = 5  # blocks of at most 5 may be rolled back
    try:
        cache = model.make_cache(2, 128)
    finally:
        model.ring_slack = None
    prompt, real = ids(45, 8), ids(12, 9)
    step(model, cache, [0], [prompt])
    step(model, cache, [1], [prompt])
    # Slot 0: the two accepted tokens one at a time.  Slot 1: a block of five at positions
    # 45..49 whose last three are rejected; position 47 closes CSA window 11 and HCA window 5,
    # so those entries were computed from a rejected token; the rings (12 rows for the
    # sliding keys, 12 for CSA, 12 for HCA) have wrapped several times.
    for t in real[:2]:
        step(model, cache, [0], [[t]])
    block = real[:2] + [(t + 1) % VOCAB for t in real[2:5]]
    step(model, cache, [1], [block])
    assert cache.layers[1].compressor.entries[1, 11].abs().sum() > 0  # closed by a rejected token
    cache.truncate(1, 47)
    assert_same_live_state(cache, 0, 1)
    # From here both decode the same real tokens (and one verify block that is all accepted):
    # equal logits and equal state at every step, entry 11 / 5 recomputed from the ring.
    for t in real[2:6]:
        torch.testing.assert_close(step(model, cache, [0], [[t]]), step(model, cache, [1], [[t]]),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        assert_same_live_state(cache, 0, 1)
    one_by_one = torch.cat([step(model, cache, [0], [[t]]) for t in real[6:10]])
    torch.testing.assert_close(step(model, cache, [1], [real[6:10]]), one_by_one, rtol=1e-5, atol=1e-5)
    assert_same_live_state(cache, 0, 1)
    # Rolling back further than the rings' slack is refused, not silently wrong: the last
    # step wrote up to length 55, so 50 is the shortest length the rings still restore.
    assert cache.lengths[1] == 55
    cache.truncate(1, 50)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(1, 49)
    cache.lengths[0] = 49  # what the runner does with a step's start: refused as well
    with pytest.raises(ValueError, match="roll back"):
        step(model, cache, [0], [real[:1]])



def test_unsupported_quantisation_folder_is_refused(folder, tmp_path):
    cfg = json.loads((folder[0] / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="^quantization_config.fmt 'e5m2'"):
        load_model(tmp_path, dtype="fp32")
