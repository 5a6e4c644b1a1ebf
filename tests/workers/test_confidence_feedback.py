"""Online confidence feedback counts only the drafts verification actually checked.

A budget that verifies a prefix of a block (the adaptive policy, or max_tokens) leaves the rest
untested.  Counting those as rejections used to make the n-gram drafter's confidence fall, the
adaptive budget verify less, and the confidence fall further.
"""

from __future__ import annotations

import pytest
import torch

from dspark.workers.drafters.base import OnlineConfidence
from dspark.workers.drafters.ngram import NgramDrafter
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig


def test_online_confidence_ignores_unverified_positions():
    conf = OnlineConfidence(prior_accept=0.5, prior_weight=2.0)
    for _ in range(10):
        conf.update("r", num_verified=2, num_accepted=2)  # a block of 4, the budget verified 2
    c = conf.confidences("r", 4)
    assert c[0] == c[1] == pytest.approx(11 / 12)
    assert c[2] == c[3] == pytest.approx(0.5)  # never tested: still the prior


def test_ngram_observe_uses_the_verified_count():
    from dspark.workers.request import Sequence

    d = NgramDrafter()
    seq = Sequence(request_id="r", prompt_ids=[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], params=SamplingParams(),
                   generator=torch.Generator())
    for _ in range(5):
        block = d.propose([seq], 4)[0]
        assert block.token_ids == [3, 4, 1, 2]
        # The budget verified the first draft only; it was accepted.
        d.observe(seq, [seq.prompt_ids[-1], 3], None, num_verified=1)
    c = d.conf.confidences("r", 4)
    assert c[0] > 0.8 and c[1:] == [0.5, 0.5, 0.5]
    # Nothing verified (a late block, or the budget chose plain decoding): no evidence at all.
    d.propose([seq], 4)
    d.observe(seq, [seq.prompt_ids[-1]], None, num_verified=0)
    assert d.conf.confidences("r", 4) == c


def test_engine_feedback_with_a_truncating_budget(model_fp32):
    """Through the real engine: a budget verifying one draft per block never moves the
    confidence of positions 2.. away from the prior."""
    drafter = NgramDrafter()
    seen: list[list[float]] = []

    def first_draft_only(blocks, block_len):
        seen.extend(b.confidence for b in blocks if len(b.token_ids) >= 3)
        return [min(1, len(b.token_ids)) for b in blocks]

    eng = Engine(LocalRunner(model_fp32.model, RunnerConfig(n_slots=1, max_seq=512)), model_fp32.tokenizer,
                 EngineConfig(max_batch=1, block_len=4), drafter=drafter, budget=first_draft_only)
    text = "Repeat this line five times: the quick brown fox jumps over the lazy dog."
    ids = model_fp32.tokenizer.encode_chat([{"role": "user", "content": text}])
    seq = eng.generate([ids], SamplingParams(max_tokens=64))[0]
    assert seq.metrics.num_accepted_tokens > 0  # drafts were accepted, so feedback happened
    assert seen and all(c[1:3] == [0.5, 0.5] for c in seen), seen[-3:]
