"""The losslessness matrix: every drafter x every budget policy, greedy and sampled.

For each drafter (ngram, layerskip, draft_model, dspark, dspark with short blocks, and hybrid,
the cluster's default) and each way of choosing how much of a block to verify (fixed depth,
adaptive Algorithm 1, adaptive production mode from a fresh budget, so its first steps are
included):

* greedy, fp32: output token-identical to plain decoding on the real default model;
* sampled, T = 1: the first token that comes out of a speculative step is distributed as the
  target's p(x2 | prompt, x1), by a chi-square test on the real model.

Engines are built through the factory (the same assembly path the CLI and the cluster use).
The cost model is made up so that the adaptive budgets make confidence-dependent choices
(admit a draft only when its survival is high), which is where a biased selector would show.
The cluster row of the matrix (hybrid x adaptive) is in tests/cluster/test_cluster.py.
"""

from __future__ import annotations

import collections

import pytest

from dspark.workers.budget_policy import AdaptiveBudget, CostModel
from dspark.workers.budget_policy import fixed_budget
from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.request import SamplingParams
from dspark.workers.runner import RunnerConfig
from dspark.workers.scheduling import VerifyPolicy
from helpers.spec_stats import chisquare_pvalue, second_token_law

DRAFTERS = {
    "ngram": (),
    "layerskip": (("layers", 20),),
    "draft_model": (("draft_layers", 12),),
    "dspark": (),
    # Blocks shorter than the trained one (BLOCK < 7) through the draft layers over their own positions.
    "dspark-short": (("short_block", 1),),
    # Head drafting counted as free, so the head's blocks are proposed wherever they are expected
    # to be longer, whatever this machine's timing (tests/workers/test_hybrid_drafter.py).
    "hybrid": (("head_cost", 0),),
}
POLICIES = ("fixed", "algorithm1", "production")
# Anchors are cheap up to 32 tokens, then each extra token costs ~1/200 of a step: a draft pays
# only if its survival is high, so the adaptive budgets cut blocks by confidence.
COSTS = CostModel(token_counts=[1, 32, 256], step_seconds=[1.0, 1.0, 2.0])
N_SLOTS = 32
BLOCK = 4


def _budget(policy: str):
    if policy == "fixed":
        return fixed_budget
    return AdaptiveBudget(COSTS, VerifyPolicy(budget_mode=policy), learn=False)


@pytest.fixture(scope="module", params=list(DRAFTERS))
def built(request):
    b = build_engine(EngineSpec(dtype="fp32", draft=request.param.removesuffix("-short"), block_len=BLOCK, draft_options=DRAFTERS[request.param],
                                runner=RunnerConfig(n_slots=N_SLOTS, max_seq=256)), progress=False)
    b.kind = request.param
    yield b
    b.close()


@pytest.fixture(scope="module")
def greedy_prompts(model_fp32, prompts20):
    tok = model_fp32.tokenizer
    chats = [tok.encode_chat([{"role": "user", "content": t}]) for t in prompts20]
    short = [c for c in chats if len(c) < 160][:3]
    assert len(short) == 3
    # One copy-heavy prompt so that prompt lookup has something to propose.
    short.append(tok.encode_chat([{"role": "user", "content": "Repeat exactly: red blue green, red blue green, red blue green."}]))
    return short


@pytest.fixture(scope="module")
def plain_outputs(built, greedy_prompts):
    eng = built.engine
    saved, eng.drafter = eng.drafter, None
    try:
        return [s.output_ids for s in eng.generate(greedy_prompts, SamplingParams(max_tokens=24))]
    finally:
        eng.drafter = saved


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_identical_to_plain(built, policy, greedy_prompts, plain_outputs):
    eng = built.engine
    eng.budget = _budget(policy)
    before = eng.metrics.num_draft_tokens
    out = [s.output_ids for s in eng.generate(greedy_prompts, SamplingParams(max_tokens=24))]
    assert out == plain_outputs, (built.kind, policy)
    assert eng.metrics.num_draft_tokens > before, "no draft was verified: the case would be vacuous"


# Prompts whose first token is nearly certain and whose second is a broad choice; the n-gram
# drafter needs a repeated pattern to propose anything at the second position.
SAMPLED_PROMPTS = {"ngram": "A B C D E F G\nA B C D E F G\nA B C D E F G\nA B C", "default": "Once upon a time"}


@pytest.mark.parametrize("policy", POLICIES)
def test_sampled_second_token_follows_the_target(built, policy):
    eng = built.engine
    tok = built.loaded.tokenizer
    prompt = tok.encode(SAMPLED_PROMPTS.get(built.kind, SAMPLED_PROMPTS["default"]))
    x1, p = second_token_law(built.engine.runner, prompt)
    eng.budget = _budget(policy)
    n = 192
    before = eng.metrics.num_draft_tokens
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=1000 * POLICIES.index(policy) + s, ignore_eos=True)
              for s in range(n)]
    counts: collections.Counter = collections.Counter()
    for seq in eng.generate([prompt] * n, params):
        if seq.output_ids[0] == x1:
            counts[seq.output_ids[1]] += 1
    total = sum(counts.values())
    assert total > 0.75 * n, "the first token should be nearly deterministic for this prompt"
    assert eng.metrics.num_draft_tokens > before, "no draft was verified: the case would be vacuous"
    pval = chisquare_pvalue(counts, p)
    assert pval > 1e-3, f"{built.kind} x {policy}: p = {pval:.2e}, observed {counts.most_common(5)}"
