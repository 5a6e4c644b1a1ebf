"""Model-level losslessness of speculative decoding on the real default model (fp32)."""

from __future__ import annotations

import collections

import pytest
import torch

from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig
from helpers.spec_stats import chisquare_pvalue

DRAFTERS = {
    "ngram": (),
    "layerskip": (("layers", 8),),
    "draft_model": (("draft_layers", 10),),  # an independent 10-layer model with its own cache
}


@pytest.fixture(scope="module")
def chat20(model_fp32, prompts20):
    return [model_fp32.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in prompts20]


@pytest.fixture(scope="module")
def plain20(model_fp32, chat20):
    eng = Engine(LocalRunner(model_fp32.model, RunnerConfig(n_slots=20, max_seq=512)), model_fp32.tokenizer, EngineConfig(max_batch=20))
    return [s.output_ids for s in eng.generate(chat20, SamplingParams(max_tokens=32))]


@pytest.mark.parametrize("draft", list(DRAFTERS))
def test_greedy_identical_to_plain_on_20_prompts(draft, chat20, plain20):
    built = build_engine(EngineSpec(dtype="fp32", draft=draft, block_len=4, runner=RunnerConfig(n_slots=20, max_seq=512),
                                    draft_options=DRAFTERS[draft]), progress=False)
    try:
        seqs = built.engine.generate(chat20, SamplingParams(max_tokens=32))
        assert [s.output_ids for s in seqs] == plain20
        m = built.engine.metrics
        assert m.num_drafts > 0 and m.num_draft_tokens >= m.num_accepted_tokens > 0
        assert m.mean_acceptance_length == pytest.approx(1 + m.num_accepted_tokens / m.num_drafts)
        # The per-request metrics add up to the engine's.
        assert sum(s.metrics.num_drafts for s in seqs) == m.num_drafts
        assert sum(s.metrics.num_accepted_tokens for s in seqs) == m.num_accepted_tokens
        assert sum(m.accepted_per_pos) == m.num_accepted_tokens
    finally:
        built.close()


def test_batch_of_8_equals_each_alone(chat20):
    built = build_engine(EngineSpec(dtype="fp32", draft="ngram", block_len=5, runner=RunnerConfig(n_slots=8, max_seq=512)),
                         progress=False)
    try:
        params = SamplingParams(max_tokens=24)
        together = [s.output_ids for s in built.engine.generate(chat20[:8], params)]
        alone = [built.engine.generate([p], params)[0].output_ids for p in chat20[:8]]
        assert together == alone
    finally:
        built.close()


def _second_token_counts(engine, prompt, n, temperature, first_token):
    """Sample n two-token continuations; count the 2nd token when the 1st is ``first_token``."""
    counts: collections.Counter = collections.Counter()
    # max_tokens=3 leaves room to verify one draft token at the second position.
    params = [SamplingParams(max_tokens=3, temperature=temperature, seed=s, ignore_eos=True) for s in range(n)]
    for seq in engine.generate([prompt] * n, params):
        if seq.output_ids[0] == first_token:
            counts[seq.output_ids[1]] += 1
    return counts


def test_sampled_distribution_matches_target(model_fp32):
    """The first token that goes through rejection sampling is distributed as the target's.

    The prompt makes the first token nearly certain; conditioned on it, the second token comes
    out of the speculative step.  Its empirical law must match p(x2 | prompt, x1) computed by one
    forward pass.  The drafter (a 26-layer early exit, top-8 proposals) is chosen so that about
    half of the drafts are rejected and its q differs from p where it matters: sampling the
    recovered token from p instead of the residual would shift the law by a chi-square
    non-centrality of ~200 at this sample size (checked while writing this test).
    """
    tok = model_fp32.tokenizer
    prompt = tok.encode("Once upon a time")  # first token "," with p = 0.93, then a broad choice
    temperature = 1.0
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=64, max_seq=64))
    with torch.inference_mode():
        from dspark.workers.runner import StepInput

        first_logits = runner.forward(StepInput(prompt, [0], [0], [len(prompt)], [len(prompt) - 1])).logits[0]
        x1 = int(first_logits.argmax())
        p = torch.softmax(runner.forward(StepInput(prompt + [x1], [0], [0], [len(prompt) + 1], [len(prompt)])).logits[0] / temperature, -1)
    from dspark.workers.drafters.autoregressive import LayerSkipDrafter

    engine = Engine(runner, tok, EngineConfig(max_batch=64, block_len=3), drafter=LayerSkipDrafter(runner, n_layers=26))
    counts = _second_token_counts(engine, prompt, 1000, temperature, x1)
    total = sum(counts.values())
    assert total > 700, "the first token should be nearly deterministic for this prompt"
    assert engine.metrics.num_draft_tokens > 0 and engine.metrics.acceptance_rate < 0.9
    pval = chisquare_pvalue(counts, p.double())
    assert pval > 0.001, f"speculative sampling deviates from the target (p={pval:.2e})"
