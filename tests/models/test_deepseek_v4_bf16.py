"""DeepSeek-V4 in bf16 against the same weights in fp32, and the engine on a bf16 V4 model.

The folders' weights are rounded to bf16 values (as a bf16 checkpoint holds them), so the fp32
model and the bf16 one (``load_model(dtype="bf16")``: bf16 matrices and activations, the
parameters ``keeps_fp32`` names in fp32) differ only by the rounding of the computation.

A random tiny model's routing is fragile: router scores often tie to within bf16's rounding,
and a flipped expert choice changes a row's logits by tens of percent (measured: 2 rows of 45
flip an expert in the score-routed layers).  The logits comparison therefore uses a folder
without discrete choices that rounding could flip: every MoE layer hash-routed (experts by
token id) and an indexer top-k as large as the entry count (every visible entry kept); the
engine tests use the usual one (score-routed layers, top-3 indexer).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from dspark.models.kv_cache import make_batch  # noqa: E402
from dspark.models.loader import load_model  # noqa: E402
from dspark.workers.drafters.ngram import NgramDrafter  # noqa: E402
from dspark.workers.engine import Engine, EngineConfig  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from dspark.workers.runner import LocalRunner, RunnerConfig  # noqa: E402
from helpers.tiny_deepseek_v4 import ScriptedDrafter, write_tiny_folder  # noqa: E402

VOCAB = 260
# bf16 keeps 8 significant bits: one rounding is 0.4% relative, and the three blocks of this
# model round many times; measured worst row 3.7% of its largest logit, mean 1.3%.
ROW_TOL = 0.06


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model, chunks: list[list[int]]) -> torch.Tensor:
    """One request fed chunk by chunk: every row's logits, [sum of lengths, vocab] fp32."""
    cache, out = model.make_cache(1, 256), []
    for toks in chunks:
        batch = make_batch(cache, [0], [len(toks)], 1)
        with torch.no_grad():
            out.append(model(torch.tensor(toks), cache, batch).logits)
    return torch.cat(out)


def test_bf16_logits_close_to_fp32(tmp_path):
    write_tiny_folder(tmp_path, VOCAB, 40, round_to=torch.bfloat16, num_hash_layers=3, index_topk=64)
    fp32, bf16 = load_model(tmp_path, dtype="fp32").model, load_model(tmp_path, dtype="bf16").model
    assert bf16.layers[1].attn.wq_b.weight.dtype == torch.bfloat16
    assert bf16.layers[1].hc_attn_fn.dtype == torch.float32 and bf16.layers[1].attn.attn_sink.dtype == torch.float32
    toks = ids(85, 1)
    chunks = [toks[:45]] + [[t] for t in toks[45:]]  # a prefill, then 40 decode steps (10 CSA windows)
    want, got = run(fp32, chunks), run(bf16, chunks)
    assert want.abs().max() > 1.0
    err = (got - want).abs().max(-1).values / want.abs().max(-1).values  # [rows]
    assert float(err.max()) <= ROW_TOL, float(err.max())
    assert float(err.mean()) <= ROW_TOL / 2, float(err.mean())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4bf16")
    write_tiny_folder(path, VOCAB, 26, round_to=torch.bfloat16)
    return load_model(path, dtype="bf16")


def test_bf16_engine_greedy_and_speculative(bf16_model):
    """Greedy decoding in bf16 runs; speculative decoding with scripted (partly wrong) and n-gram
    drafts accepts and rejects drafts.  Without the deterministic mode a verify block's rows may
    round differently from one-token steps, so the speculative output equals plain decoding up
    to the first near-tie at most: any difference must start where the two top logits of plain
    decoding's token are within bf16 rounding of each other."""
    lm = bf16_model
    cfg = RunnerConfig(n_slots=2, max_seq=256)
    prompts = [ids(10, 6), list(b"the cat sat on the mat; the cat sat")]
    params = SamplingParams(max_tokens=96, ignore_eos=True)
    plain = [s.output_ids for s in Engine(LocalRunner(lm.model, cfg), lm.tokenizer,
                                          EngineConfig(max_batch=2)).generate(prompts, params)]  # fmt: skip
    assert all(len(p) == 96 for p in plain)
    cases = [(ScriptedDrafter(plain[0], VOCAB, seed=7), prompts[0], plain[0]), (NgramDrafter(), prompts[1], plain[1])]
    for drafter, prompt, want in cases:
        engine = Engine(LocalRunner(lm.model, cfg), lm.tokenizer, EngineConfig(max_batch=1, block_len=4),
                        drafter=drafter)  # fmt: skip
        got = engine.generate([prompt], params)[0].output_ids
        m = engine.metrics
        assert 0 < m.num_accepted_tokens < m.num_draft_tokens, (drafter, m.num_accepted_tokens, m.num_draft_tokens)
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is not None:  # only a near tie may differ
            row = run(lm.model, [prompt + want[:first]])[-1]
            gap = float(row[want[first]] - row[got[first]]) / float(row.abs().max())
            assert abs(gap) <= ROW_TOL, (first, gap)


def test_deterministic_mode_is_refused(bf16_model):
    with pytest.raises(ValueError, match="deterministic mode .* not supported for DeepSeek-V4"):
        LocalRunner(bf16_model.model, RunnerConfig(n_slots=2, max_seq=256, deterministic=True))
    bf16_model.model.num.row_invariant = False
