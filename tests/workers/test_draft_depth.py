"""Draft depth follows the verification budget: nobody drafts positions the budget will not verify.

Unit cases on the adaptive budget, then the real engine on the real default model (fp32, greedy)
with a scripted drafter whose second and later drafts are hopeless (confidence 0.05), in process
and through a draft worker over gRPC on loopback: after the first step the drafter is asked for
two drafts per block instead of eight, and the output stays plain decoding's.  Also the DSpark
head: a shorter block keeps the first drafts of the trained block (its positions attend to each
other, so the backbone runs the trained length), or with ``short_block`` is drafted as a head
trained at its length would draft it.
"""

from __future__ import annotations

import time

import pytest
import torch

from dspark.workers.budget_policy import AdaptiveBudget, CostModel
from dspark.workers.drafters.base import DraftBlock, StatelessDrafter
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams, Sequence
from dspark.workers.runner import LocalRunner, RunnerConfig
from dspark.workers.scheduling import VerifyPolicy
from helpers.tiny_models import make_seq, tiny_head, tiny_target

# A step costs 20 ms plus 10 ms per extra token: a draft pays when its survival is above ~0.5.
COSTS = CostModel(token_counts=[1, 64], step_seconds=[0.020, 0.020 + 63 * 0.010])


def _blocks(confs: list[list[float]]) -> list[DraftBlock]:
    return [DraftBlock(token_ids=list(range(len(c))), confidence=c) for c in confs]


def test_depth_is_one_past_the_deepest_recent_verification():
    budget = AdaptiveBudget(COSTS, VerifyPolicy(budget_mode="algorithm1", max_block_len=7))
    assert budget.draft_depth(7) == 7  # nothing verified yet: the policy's depth
    assert budget(_blocks([[0.95, 0.05, 0.05, 0.05], [0.9, 0.1, 0.1, 0.1]]), 7) == [1, 1]
    assert budget.draft_depth(7) == 2 and budget.draft_depth(1) == 1
    # Confident drafts: the depth grows by one per step (the budget verifies all it is offered).
    for want in (3, 4, 5):
        d = budget.draft_depth(7)
        assert budget(_blocks([[0.99] * d]), 7) == [d]
        assert budget.draft_depth(7) == want
    # The window forgets: after DEPTH_WINDOW shallow steps the depth comes back down.
    for _ in range(AdaptiveBudget.DEPTH_WINDOW):
        budget(_blocks([[0.95, 0.05]]), 7)
    assert budget.draft_depth(7) == 2
    # Even a budget that verified nothing sees a whole block every PROBE_EVERY steps.
    while budget.steps % AdaptiveBudget.PROBE_EVERY:
        assert budget.draft_depth(7) <= 2
        budget(_blocks([[0.05, 0.05]]), 7)
    assert budget.draft_depth(7) == 7
    budget(_blocks([[0.05] * 7]), 7)
    assert budget.draft_depth(7) == 2  # the window's depth again (it still holds steps that verified 1)


def _probed(asked: list[int], deep: int, shallow: int) -> bool:
    """The depths a drafter was asked for: ``deep`` first and at every probe, ``shallow`` otherwise."""
    probes = [i for i, n in enumerate(asked) if n == deep]
    return (bool(asked) and asked[0] == deep and set(asked) <= {deep, shallow}
            and len(probes) <= 1 + len(asked) // AdaptiveBudget.PROBE_EVERY)


def test_depth_respects_the_policy():
    budget = AdaptiveBudget(COSTS, VerifyPolicy(budget_mode="algorithm1", max_block_len=3))
    budget(_blocks([[0.99] * 3]), 7)
    assert budget.draft_depth(7) == 3  # never past the policy's max_block_len
    fixed = AdaptiveBudget(COSTS, VerifyPolicy(budget_mode="fixed", max_block_len=5))
    fixed(_blocks([[0.95, 0.05]]), 7)
    assert fixed.draft_depth(7) == 5  # whole blocks are verified: they are drafted whole


class _Script(StatelessDrafter):
    """The target's own continuation as drafts; only the first is confident.  Records the depth asked."""

    name = "scripted"

    def __init__(self, script: list[int]) -> None:
        self.script, self.asked = script, []

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        self.asked.append(block_len)
        out = []
        for seq in seqs:
            ids = list(self.script[len(seq.output_ids) : len(seq.output_ids) + block_len])
            out.append(DraftBlock(token_ids=ids, confidence=[0.95] + [0.05] * (len(ids) - 1)))
        return out


@pytest.fixture(scope="module")
def setup(model_fp32):
    tok = model_fp32.tokenizer
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=1, max_seq=256))
    prompt = tok.encode_chat([{"role": "user", "content": "Describe a sunrise over the sea."}])
    plain = Engine(runner, tok, EngineConfig(max_batch=1)).generate([prompt], SamplingParams(max_tokens=32))[0]
    return runner, tok, prompt, plain.output_ids


def test_engine_reports_a_steps_overhead_but_not_its_idle_time(setup):
    """The engine tells the budget each forward step's time outside its forward pass and
    drafting.  Time the engine spent with no request running is none of it: a client's pause
    between two requests used to be reported as the last step's overhead."""
    runner, tok, prompt, _ = setup
    seen: list[float] = []

    class Spy:
        def __call__(self, blocks, block_len):
            return [len(b.token_ids) for b in blocks]

        def observe_overhead(self, num_requests: int, seconds: float) -> None:
            seen.append(seconds)

    eng = Engine(runner, tok, EngineConfig(max_batch=1), budget=Spy())
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    eng.generate([prompt], params)
    assert len(seen) >= 3 and all(0 <= x < 0.1 for x in seen), seen
    time.sleep(0.15)  # idle: no request running
    eng.generate([prompt], params)
    assert len(seen) >= 6 and max(seen) < 0.1, seen


@pytest.mark.parametrize("metered", [False, True])
def test_engine_drafts_only_what_the_budget_verifies(setup, metered):
    """``metered``: the budget wrapped as the cluster's verifier wraps it (``BudgetMeter``, which
    feeds the verification-budget gauge) must still drive the draft depth."""
    from dspark.cluster.verifier_group import BudgetMeter

    runner, tok, prompt, plain = setup
    drafter = _Script(plain)
    budget = AdaptiveBudget(COSTS, VerifyPolicy(budget_mode="algorithm1", max_block_len=8))
    budget = BudgetMeter(budget) if metered else budget
    eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=8), drafter=drafter, budget=budget)
    seq = eng.generate([prompt], SamplingParams(max_tokens=32, ignore_eos=True))[0]
    assert seq.output_ids == plain[: len(seq.output_ids)] and len(seq.output_ids) == 32
    assert _probed(drafter.asked, 8, 2) and drafter.asked[1] == 2, drafter.asked
    assert [n for i, n in enumerate(drafter.asked) if i % AdaptiveBudget.PROBE_EVERY] == [2] * (
        len(drafter.asked) - 1 - (len(drafter.asked) - 1) // AdaptiveBudget.PROBE_EVERY)
    assert eng.speculation_stats() == {"speculative_steps": 0, "plain_steps": 0, "draft_depth": 2,
                                       "gate_rates": {}}  # no gate
    inner = budget.budget if metered else budget
    assert inner.drafting_seconds(1) > 0  # in-process drafting was timed for the budget (through the meter too)
    assert inner.overhead_seconds(1) > 0  # and the engine's work outside forward and drafting
    assert not torch.equal(inner.step_table(), COSTS.table(4096))  # and real steps corrected the made-up costs
    # Without a depth-aware budget every block is drafted whole.
    whole = _Script(plain)
    Engine(runner, tok, EngineConfig(max_batch=1, block_len=8), drafter=whole).generate(
        [prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    assert set(whole.asked) == {8}


class _SlowScript(_Script):
    """A draft worker that takes ``DRAFT_S`` per block (a slow head, a slow link)."""

    DRAFT_S = 0.03

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        time.sleep(self.DRAFT_S)
        return super().propose(seqs, block_len)


def test_remote_worker_is_asked_for_the_budgets_depth(setup):
    """The Step sent to a draft worker at the end of a step carries the depth the budget wants,
    and at one request the budget counts what the verifier waited for each block as drafting
    (the next block needs the step's tokens, so nothing overlaps the round trip)."""
    from dspark.workers.draft_worker import DraftWorkerServer
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig

    runner, tok, prompt, plain = setup
    scripts: list[_Script] = []

    def factory() -> _Script:
        scripts.append(_SlowScript(plain))
        return scripts[-1]

    server = DraftWorkerServer(factory).start()
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="ngram"), block_len=8)
    try:
        budget = AdaptiveBudget(COSTS, VerifyPolicy(budget_mode="algorithm1", max_block_len=8))
        eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=8), drafter=drafter, budget=budget)
        seq = eng.generate([prompt], SamplingParams(max_tokens=32, ignore_eos=True))[0]
        assert seq.output_ids == plain[: len(seq.output_ids)] and len(seq.output_ids) == 32
        asked = [n for s in scripts for n in s.asked]
        assert _probed(asked, 8, 2) and asked[1] == 2, asked
        # Every block cost the verifier at least the worker's drafting time (it was waiting).
        assert _SlowScript.DRAFT_S <= budget.drafting_seconds(1) < 1.0, budget.drafting_seconds(1)
    finally:
        drafter.close()
        server.stop()


def test_dspark_head_shorter_block_keeps_the_first_drafts():
    """The default: the backbone runs the whole trained block, so a shorter block's drafts are
    the first drafts of the trained block."""
    from dspark.workers.drafters.dspark import DSparkDrafter

    target = tiny_target()
    head = tiny_head(target)  # trained block length 4
    feats = torch.randn(9, head.cfg.dim * len(head.cfg.feature_layers), generator=torch.Generator().manual_seed(2))
    drafter = DSparkDrafter(head, n_slots=1, max_seq=32)
    seq = make_seq("r0", list(range(1, 10)), anchor=7)
    with torch.no_grad():
        drafter.observe(seq, seq.prompt_ids, feats)
        h4, base4 = drafter.block_logits([seq], torch.tensor([7]), 4)
        h2, base2 = drafter.block_logits([seq], torch.tensor([7]), 2)
        full = drafter.propose([seq], 4)[0]
        short = drafter.propose([seq], 2)[0]
    assert h2.shape[1] == 2 and torch.allclose(h2, h4[:, :2], atol=1e-6) and torch.allclose(base2, base4[:, :2], atol=1e-6)
    assert short.token_ids == full.token_ids[:2]
    assert torch.allclose(torch.tensor(short.confidence), torch.tensor(full.confidence[:2]), atol=1e-6)


def test_dspark_head_short_block_runs_only_its_own_positions():
    """``short_block``: a block shorter than the trained one is drafted as a head trained at that
    length would draft it (the draft layers see only the block's own positions), so its drafts
    may differ from the trained block's first ones; a block of the trained length is unchanged."""
    import dataclasses

    from dspark.workers.drafters.dspark import DSparkDrafter

    target = tiny_target()
    head = tiny_head(target)  # trained block length 4
    feats = torch.randn(9, head.cfg.dim * len(head.cfg.feature_layers), generator=torch.Generator().manual_seed(2))
    seq = make_seq("r0", list(range(1, 10)), anchor=7)
    short = DSparkDrafter(head, n_slots=1, max_seq=32, short_block=True)
    trained = DSparkDrafter(head, n_slots=1, max_seq=32)
    as_if_trained_at_2 = DSparkDrafter(head, n_slots=1, max_seq=32, short_block=False)
    as_if_trained_at_2.cfg = dataclasses.replace(head.cfg, block_len=2)
    anchor = torch.tensor([7])
    with torch.no_grad():
        for d in (short, trained, as_if_trained_at_2):
            d.observe(seq, seq.prompt_ids, feats)
        h2, base2 = short.block_logits([seq], anchor, 2)
        ref2, ref_base2 = as_if_trained_at_2.block_logits([seq], anchor, 2)
        h4_rows, _ = trained.block_logits([seq], anchor, 2)
        assert h2.shape[1] == 2 and torch.equal(h2, ref2) and torch.equal(base2, ref_base2)
        assert not torch.allclose(h2, h4_rows, atol=1e-4)  # the trained block's rows see positions 2 and 3
        full_short, full_trained = short.propose([seq], 4)[0], trained.propose([seq], 4)[0]
    assert full_short.token_ids == full_trained.token_ids and full_short.confidence == full_trained.confidence


def test_adaptive_budget_verifies_deeper_where_throughput_is_flat():
    """A flat cost curve (0.4 ms a token on a 20 ms step, as at a few requests on this CPU): the
    budget takes the deepest verification within ``DEPTH_SLACK`` of the best expected throughput,
    not the strict optimum (through the cluster at four requests the strict one verified 2.4-2.9
    drafts a step, and fixed depth 4 led it by 6% per user at the same aggregate)."""
    flat = CostModel(token_counts=[1, 64], step_seconds=[0.020, 0.020 + 63 * 0.0004])
    blocks = _blocks([[0.8, 0.6, 0.5, 0.4, 0.3, 0.3, 0.3]] * 4)
    policy = VerifyPolicy(budget_mode="algorithm1", max_block_len=7)
    strict = AdaptiveBudget(flat, policy, learn=False)
    strict.slack = 0.0
    assert sum(AdaptiveBudget(flat, policy, learn=False)(blocks, 7)) > sum(strict(blocks, 7))
    # A lone request's speed is the throughput: nothing to trade, the strict optimum.
    assert AdaptiveBudget(flat, policy, learn=False)(blocks[:1], 7) == strict(blocks[:1], 7)


def test_adaptive_budget_trades_depth_for_no_less_than_plain_decodings_throughput():
    """The slack's deeper verification costs aggregate throughput.  Where speculation barely beats
    plain decoding (drafting 20 ms on a 20 ms step, four requests at confidence 0.6: best expected
    throughput 193.8 tokens/s against plain decoding's 188.7), the slack alone verifies every
    draft, at 0.95x the best and below plain decoding; the budget stops where plain decoding
    would be faster."""
    from dspark.kernels.budget import select_budget_greedy, survival

    costs = CostModel(token_counts=[1, 64], step_seconds=[0.020, 0.020 + 63 * 0.0004], draft_seconds=0.020)
    conf = [[0.6] * 7] * 4
    surv = survival(torch.tensor(conf), torch.full((4,), 7))
    table = costs.table(64)
    policy = VerifyPolicy(budget_mode="algorithm1", max_block_len=7)
    strict = AdaptiveBudget(costs, policy, learn=False)
    strict.slack = 0.0
    slack_alone = select_budget_greedy(surv, table, 0.020, slack=AdaptiveBudget.DEPTH_SLACK)
    assert slack_alone.expected_throughput < 4 / float(table[4])
    lengths = AdaptiveBudget(costs, policy, learn=False)(_blocks(conf), 7)
    assert sum(strict(_blocks(conf), 7)) <= sum(lengths) < slack_alone.num_draft_tokens
    tau = 4 + sum(0.6 ** (j + 1) for n in lengths for j in range(n))
    assert tau / (float(table[4 + sum(lengths)]) + 0.020) >= 4 / float(table[4])
    # Plain decoding pays the step's overhead outside the forward pass too: the floor counts it.
    # Drafting 21 ms and 0.5 ms of overhead: the slack alone verifies 28 drafts, a floor without
    # the overhead 20, the floor with it 25.
    loaded = AdaptiveBudget(CostModel(costs.token_counts, costs.step_seconds, draft_seconds=0.021), policy)
    for _ in range(3):
        loaded.observe_overhead(4, 0.0005)
    ovh = loaded.overhead_seconds(4)
    assert ovh == pytest.approx(0.0005)

    def drafts(plain_seconds):
        return select_budget_greedy(surv, loaded.step_table(), 0.021 + ovh, slack=AdaptiveBudget.DEPTH_SLACK,
                                    plain_seconds=plain_seconds).num_draft_tokens

    assert (drafts(None), drafts(0.0), drafts(ovh)) == (28, 20, 25)
    assert sum(loaded(_blocks(conf), 7)) == 25


def test_adaptive_budget_reads_an_undefined_confidence_as_no_chance():
    """A confidence outside [0, 1] is clipped, and a NaN one (a drafter's numerical fault) is no
    chance: it ends the block's verified prefix instead of ranking anywhere in the admission."""
    flat = CostModel(token_counts=[1, 64], step_seconds=[0.020, 0.020])  # every draft is free
    policy = VerifyPolicy(budget_mode="algorithm1", max_block_len=7)
    budget = AdaptiveBudget(flat, policy, learn=False)
    blocks = _blocks([[1.5, 0.9, float("nan"), 0.9], [0.9, -0.5, 0.9, 0.9]])
    assert budget(blocks, 7) == [2, 1]


def test_a_step_asks_the_worker_for_one_block_length(setup, model_fp32):
    """Every request of a step is asked for the same number of drafts, so the worker drafts
    them in one batch: a request near its end used to be asked for no more than it may emit,
    and the worker drafts each block length apart (its head runs the trained block whatever
    is asked).  The verifier trims each block to what its request may emit."""
    from dspark.workers.draft_worker import DraftWorkerServer
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig

    _, tok, prompt, plain = setup
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=3, max_seq=256))
    scripts: list[_Script] = []

    def factory() -> _Script:
        scripts.append(_Script(plain))
        return scripts[-1]

    server = DraftWorkerServer(factory).start()
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="ngram"), block_len=4)
    try:
        eng = Engine(runner, tok, EngineConfig(max_batch=3, block_len=4), drafter=drafter)
        seqs = eng.generate([prompt] * 3, [SamplingParams(max_tokens=n, ignore_eos=True) for n in (9, 14, 19)])
        for s, n in zip(seqs, (9, 14, 19)):
            assert s.output_ids == plain[:n]
        asked = [n for s in scripts for n in s.asked]
        assert asked and set(asked) == {4}, asked
    finally:
        drafter.close()
        server.stop()
