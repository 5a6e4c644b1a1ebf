"""Structured outputs are lossless: sampled under a grammar, with drafts verified (prompt lookup,
whose drafts copy the prompt's JSON and so pass the grammar), the first and second tokens follow the target's distribution masked by the grammar (chi-square), and greedy
output equals plain decoding's under the same grammar (real default model, fp32)."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.grammar import GrammarSpec
from dspark.workers.request import SamplingParams
from dspark.workers.runner import RunnerConfig, StepInput
from helpers.spec_stats import chisquare_pvalue

REGEX = r' "(yes|no|maybe|sure|never|always|rarely)"'
QUESTION = 'Is the sky blue? Reply as {"answer": "yes"} or {"answer": "no"} or {"answer": "maybe"}.'


@pytest.fixture(scope="module")
def built():
    b = build_engine(EngineSpec(dtype="fp32", draft="dspark", block_len=4, runner=RunnerConfig(n_slots=32, max_seq=256)),
                     progress=False)
    yield b
    b.close()


def _masked_law(runner, matcher, ids: list[int]) -> torch.Tensor:
    """The target's next-token law after ``ids`` at temperature 1, masked by ``matcher``'s state, float64 [V]."""
    with torch.inference_mode():
        logits = runner.forward(StepInput(ids, [0], [0], [len(ids)], [len(ids) - 1])).logits[0].double()
    allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
    matcher.fill_mask(allowed)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)


@pytest.fixture(scope="module")
def lookup():
    b = build_engine(EngineSpec(dtype="fp32", draft="ngram", block_len=4, runner=RunnerConfig(n_slots=32, max_seq=256)),
                     progress=False)
    yield b
    b.close()


@pytest.mark.parametrize("drafter", ["lookup", "built"])
def test_first_and_second_token_follow_the_masked_target(drafter, request):
    """With prompt lookup (one-hot drafts copied from the prompt) and with DSpark, whose drafts
    are drawn among what the grammar allows (a proposal distribution masked per position)."""
    b = request.getfixturevalue(drafter)
    eng, tok = b.engine, b.loaded.tokenizer
    spec = GrammarSpec("regex", REGEX)
    prompt = tok.encode_chat([{"role": "user", "content": QUESTION}])
    m = eng.grammars.matcher(spec)
    p1 = _masked_law(eng.runner, m, prompt)
    x1 = int(p1.argmax())
    assert m.accept(x1)
    p2 = _masked_law(eng.runner, m, prompt + [x1])
    before = eng.metrics.num_draft_tokens
    # 12 requests x n = 16 sequences (seeds 1000 + 16 r + i: all distinct).
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=1000 + 16 * r, n=16, grammar=spec) for r in range(12)]
    for p in params:
        eng.add_request(prompt, p)
    firsts, seconds = collections.Counter(), collections.Counter()
    outs: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    while eng.has_work:
        for o in eng.step():
            outs[(o.request_id, o.index)] += o.new_token_ids
    assert len(outs) == 192
    for ids in outs.values():
        firsts[ids[0]] += 1
        if ids[0] == x1 and len(ids) > 1:
            seconds[ids[1]] += 1
    assert eng.metrics.num_draft_tokens > before, "no draft was verified: the case would be vacuous"
    assert all(p1[t] > 0 for t in firsts) and all(p2[t] > 0 for t in seconds)  # nothing the grammar forbids
    assert sum(seconds.values()) > 100
    assert p2.max() < 0.95, "the second token should be a real choice (yes / no / maybe ...)"
    for counts, law in ((firsts, p1), (seconds, p2)):
        if law.max() > 0.999:  # forced by the grammar: one cell, nothing to test but that
            assert set(counts) == {int(law.argmax())}
            continue
        pval = chisquare_pvalue(counts, law)
        assert pval > 1e-3, f"p = {pval:.2e}, observed {counts.most_common(5)}"


def test_greedy_under_a_schema_equals_plain_decoding(built):
    eng, tok = built.engine, built.loaded.tokenizer
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                               "population": {"type": "integer"},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "population", "capital"], "additionalProperties": False}
    spec = GrammarSpec("json_schema", json.dumps(schema))
    prompts = [tok.encode_chat([{"role": "user", "content": f"Describe {c} as JSON."}]) for c in ("Paris", "Lagos", "Lima")]
    plain = build_engine(EngineSpec(dtype="fp32", runner=RunnerConfig(n_slots=4, max_seq=256)), progress=False)
    try:
        ref = plain.engine.generate(prompts, SamplingParams(max_tokens=60, grammar=spec))
    finally:
        plain.close()
    before = eng.metrics.num_accepted_tokens
    ours = eng.generate(prompts, SamplingParams(max_tokens=60, grammar=spec))
    assert [s.output_ids for s in ours] == [s.output_ids for s in ref]
    assert eng.metrics.num_accepted_tokens > before
    for s in ours:
        if s.finish_reason == "stop":
            doc = json.loads(tok.decode(s.output_ids))
            assert set(doc) == {"city", "population", "capital"}


class _FixedGrammar:
    """A grammar that allows the same token set at every position (scripted, stateless)."""

    done = False

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed

    def fill_mask(self, out: torch.Tensor) -> None:
        out.zero_()
        out[sorted(self.allowed)] = True

    def accept(self, token_id: int) -> bool:
        return token_id in self.allowed

    def rollback(self, n: int) -> None:
        pass


def test_a_forbidden_sparse_draft_is_verified_not_resampled_from_the_target():
    """q proposes an allowed and a forbidden token; the emitted token must follow the masked p.

    p (masked) = (0.2, 0.5, 0.3) over {0, 1, 2}; q = 0.5 on 0, 0.5 on the forbidden 3.  Verifying
    the forbidden draft (certain rejection, residual max(0, p - q)) keeps the law p; sampling that
    position from p instead would give token 0 probability 0.3, not 0.2.
    """
    from dspark.workers.drafters.base import DraftBlock
    from dspark.workers.request import Sequence
    from dspark.workers.step_plan import Scheduled, StepPlan

    V, n = 6, 4000
    p = torch.tensor([0.2, 0.5, 0.3])
    row0 = torch.full((V,), 0.0)
    row0[:3] = p.log()
    row0[3:] = 5.0  # the forbidden tokens would be the likeliest without the grammar
    pick = torch.Generator().manual_seed(0)
    entries = []
    for i in range(n):
        seq = Sequence(f"r{i}", [1], SamplingParams(temperature=1.0), torch.Generator().manual_seed(i),
                       output_ids=[5], grammar=_FixedGrammar({0, 1, 2}))
        d = 0 if torch.rand((), generator=pick) < 0.5 else 3  # d ~ q
        block = DraftBlock([d], probs=torch.tensor([[0.5, 0.5]]), prob_ids=torch.tensor([[0, 3]]))
        entries.append(Scheduled.decode(seq, [d], block))
    plan = StepPlan(entries)
    plan.constrain(V)
    assert all(len(e.drafts) == 1 for e in entries)  # the forbidden draft stays, to be rejected
    logits = torch.stack([row0, torch.zeros(V)] * n)  # [2n, V]: each entry's draft row and bonus row
    plan.set_emitted(plan.verify(plan.mask_logits(logits)))
    firsts = collections.Counter(e.emitted[0] for e in entries)
    assert set(firsts) <= {0, 1, 2}
    pval = chisquare_pvalue(firsts, torch.cat([p, torch.zeros(V - 3)]).double())
    assert pval > 1e-3, f"p = {pval:.2e}, observed {sorted(firsts.items())}"


@pytest.mark.parametrize("mask", [True, False])
def test_remote_dspark_worker_drafts_within_the_grammar(mask, model_fp32):
    """A draft worker told the request's grammar (DrafterOptions) follows the output the Steps
    carry and drafts only what the grammar allows: no verified block holds a forbidden draft.
    With the worker's masking off (grammar_mask=0), forbidden drafts do reach the verifier (so
    the count checks something).  Greedy output equals plain decoding's either way."""
    from dspark.workers.draft_worker import DraftWorkerServer
    from dspark.workers.drafters.dspark import head_feature_layers, make_dspark_drafter
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.runner import LocalRunner

    tok = model_fp32.tokenizer
    spec = GrammarSpec("json_schema", json.dumps({
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}, "population": {"type": "integer"}},
        "required": ["city", "population"], "additionalProperties": False}))
    prompt = tok.encode_chat([{"role": "user", "content": "Describe Paris as JSON."}])
    runner_cfg = RunnerConfig(n_slots=2, max_seq=256)
    factory = lambda: make_dspark_drafter(model_fp32, {"grammar_mask": "1" if mask else "0"},  # noqa: E731
                                          EngineSpec(runner=runner_cfg))
    server = DraftWorkerServer(factory, tokenizer=tok).start()
    layers = head_feature_layers({}, model_fp32.name)
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="dspark", feature_layers=layers), block_len=7)
    try:
        eng = Engine(LocalRunner(model_fp32.model, runner_cfg), tok, EngineConfig(max_batch=2, block_len=7),
                     drafter=drafter)
        seq = eng.generate([prompt], SamplingParams(max_tokens=40, grammar=spec))[0]
        plain = Engine(LocalRunner(model_fp32.model, runner_cfg), tok, EngineConfig(max_batch=2))
        assert seq.output_ids == plain.generate([prompt], SamplingParams(max_tokens=40, grammar=spec))[0].output_ids
        assert eng.metrics.num_draft_tokens > 0
        forbidden = eng.grammar_stats()["grammar_forbidden_blocks"]
        assert (forbidden == 0) if mask else (forbidden > 0), forbidden
    finally:
        drafter.close()
        server.stop()
