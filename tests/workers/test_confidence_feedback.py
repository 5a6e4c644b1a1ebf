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


def test_online_confidence_horizon_halves_the_counts():
    conf = OnlineConfidence(prior_accept=0.5, prior_weight=2.0, horizon=4)
    for _ in range(3):
        conf.update("r", num_verified=1, num_accepted=1)
    assert conf.confidences("r", 1) == [pytest.approx(4 / 5)]  # 3 of 3, plus the prior
    conf.update("r", num_verified=1, num_accepted=0)  # 3 of 4 reaches the horizon: 1.5 of 2
    assert conf.confidences("r", 1) == [pytest.approx(2.5 / 4)]
    # After a long run of accepted drafts, a shorter run of rejections: the unbounded table still
    # says mostly accepted, the one with a horizon follows the change.
    bounded, unbounded = OnlineConfidence(horizon=8), OnlineConfidence()
    for accepted in [1] * 40 + [0] * 12:
        bounded.update("r", 1, accepted)
        unbounded.update("r", 1, accepted)
    assert unbounded.confidences("r", 1)[0] > 0.7 and bounded.confidences("r", 1)[0] < 0.3


def test_a_new_requests_ngram_tables_start_from_earlier_requests():
    """by_order: a request's table for match length n starts from the drafter's lifetime table
    for n (what such matches did on earlier requests), then follows the request's own blocks."""
    from dspark.workers.request import Sequence

    d = NgramDrafter(by_order=True)
    prompt = [8, 1, 2, 3, 4, 5, 6, 7, 9, 1, 2, 3]  # suffix [1 2 3] (n = 3) recurs: proposes [4 5 6 7]

    def seq(rid):
        return Sequence(request_id=rid, prompt_ids=list(prompt), params=SamplingParams(), generator=torch.Generator())

    first = seq("a")
    assert d.propose([first], 4)[0].confidence == [0.5] * 4  # nothing learned yet
    for _ in range(6):  # every 3-gram block of request a: the first two drafts accepted
        d.propose([first], 4)
        d.observe(first, [3, 4, 5], None, num_verified=4)
    learned = d.lifetime.confidences("3", 4)
    assert learned == pytest.approx([7 / 8, 7 / 8, 1 / 8, 0.5])
    block = d.propose([seq("b")], 4)[0]
    assert block.token_ids == [4, 5, 6, 7] and block.confidence == pytest.approx(learned)
    assert d.lifetime.confidences("1", 4) == [0.5] * 4  # other match lengths are their own tables
    d.release("a")
    assert d.lifetime.confidences("3", 4) == pytest.approx(learned)  # outlives the requests


def test_find_match_is_the_latest_longest_earlier_occurrence():
    """The one-pass lookup against a direct reading of the rule, on random short sequences
    (small alphabets, so that matches of every length and ties between them are common)."""
    import random

    import numpy as np

    from dspark.workers.drafters.ngram import find_match

    def reference(ids, block_len, max_ngram, min_ngram):
        for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
            for i in range(len(ids) - 1 - n, -1, -1):  # latest first; followed by a token
                if ids[i : i + n] == ids[len(ids) - n :]:
                    return ids[i + n : i + n + block_len], n
        return [], 0

    rng = random.Random(0)
    for _ in range(3000):
        ids = [rng.randrange(rng.choice([2, 3, 6, 40])) for _ in range(rng.randint(0, 30))]
        args = (rng.randint(0, 6), rng.randint(1, 6), rng.randint(1, 4))
        assert find_match(np.asarray(ids, dtype=np.int64), *args) == reference(ids, *args), (ids, args)


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
