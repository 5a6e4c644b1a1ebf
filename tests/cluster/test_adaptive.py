"""Confidence-scheduled verification: budget policy, cost profile, global scheduler on Redis."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dspark.cluster.scheduler import GlobalScheduler, SchedulerConfig, compute_policy, pressure_of
from dspark.workers.budget_policy import AdaptiveBudget, CostModel, profile_step_costs
from dspark.workers.drafters.base import DraftBlock
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig
from dspark.workers.scheduling import Demand, VerifyPolicy

# A made-up cost curve: flat up to 8 tokens, then each token costs as much as a whole step.
COSTS = CostModel(token_counts=[1, 8, 16], step_seconds=[1.0, 1.0, 9.0])


def blocks(*confs):
    return [DraftBlock(token_ids=list(range(len(c))), confidence=list(c)) for c in confs]


def test_budget_fixed_mode_respects_block_cap_and_floor():
    b = AdaptiveBudget(COSTS, VerifyPolicy(budget_mode="fixed", max_block_len=3))
    assert b(blocks([0.9] * 5, [0.5] * 2), 7) == [3, 2]
    b.set_policy(VerifyPolicy(budget_mode="fixed", max_block_len=7, survival_floor=0.5))
    # survivals 0.9, 0.81, 0.729, 0.656, 0.59 | 0.5, 0.25
    assert b(blocks([0.9] * 5, [0.5] * 2), 7) == [5, 1]


def test_budget_algorithm1_spends_only_where_it_pays():
    b = AdaptiveBudget(COSTS, VerifyPolicy(budget_mode="algorithm1"))
    # 2 anchors + up to 6 drafts fit the flat part of the curve: the 6 most likely are admitted
    # (greedy by survival), the 7th token would cost a whole extra step for < 1 expected token.
    out = b(blocks([0.9, 0.9, 0.9, 0.9], [0.8, 0.8, 0.8, 0.8]), 7)
    assert sum(out) == 6 and out == [4, 2]


def test_budget_production_mode_uses_stale_capacity():
    b = AdaptiveBudget(COSTS, VerifyPolicy(budget_mode="production"))
    for _ in range(3):
        out = b(blocks([0.95] * 7, [0.95] * 7), 7)
    assert sum(out) <= 16 - 2 and all(n > 0 for n in out)


def test_policy_follows_pressure():
    cfg = SchedulerConfig(max_block_len=7, min_block_len=2, max_survival_floor=0.5)
    idle, mid, busy = (compute_policy(p, cfg) for p in (0.1, 0.6, 2.0))
    assert (idle.max_block_len, idle.survival_floor) == (7, 0.0)
    assert (busy.max_block_len, busy.survival_floor) == (2, 0.5)
    assert busy.max_block_len < mid.max_block_len < idle.max_block_len
    assert pressure_of(Demand(active_requests=16, queued_requests=16), slots=32) == 1.0


def test_per_user_target_caps_the_batch():
    cfg = SchedulerConfig(target_tokens_per_s_per_user=50.0)
    slow = Demand(active_requests=10, step_latency_s=0.1, mean_acceptance_length=2.0)  # 20 tok/s/user
    assert compute_policy(0.5, cfg, slow, slots=32).max_batch_size == 10
    fast = Demand(active_requests=10, step_latency_s=0.01, mean_acceptance_length=2.0)  # 200 tok/s/user
    assert compute_policy(0.5, cfg, fast, slots=32).max_batch_size == 32


def test_scheduler_publishes_policy_that_follows_demand_in_redis(redis_server, redis_prefix):
    from dspark.cluster.policy_follower import PolicyFollower
    from dspark.cluster.redis_state import RedisState, StateConfig

    async def run():
        async with RedisState(StateConfig(url=redis_server.url, prefix=redis_prefix)) as st:
            sched = GlobalScheduler(st, SchedulerConfig(max_block_len=7, smoothing=0.5))
            follower = PolicyFollower(st, "g1")
            await st.heartbeat("verifier", "g1", {"n_slots": 8})

            async def at(active, queued, ticks=1):
                await st.put_demand("g1", Demand(active_requests=active, queued_requests=queued, step_latency_s=0.05))
                for _ in range(ticks):
                    await sched.tick()
                return await follower.refresh()

            idle = await at(1, 0)
            busy = await at(8, 24)  # a simulated rise in queued requests
            relaxed = await at(1, 0, ticks=8)  # demand falls: verification deepens again
            return idle, busy, relaxed

    idle, busy, relaxed = asyncio.run(run())
    assert idle.version >= 1 and idle.max_block_len == 7 and idle.survival_floor == 0.0
    assert busy.version > idle.version and busy.max_block_len == 2 and busy.survival_floor > 0
    assert relaxed.version > busy.version and relaxed.max_block_len == 7


def test_a_pinned_policy_is_published_instead_and_lifting_it_restores_the_schedulers(redis_server, redis_prefix):
    """`dspark policy pin`'s path: the scheduler publishes the pin for every live group, whatever
    the demand, and goes back to its own policy once the pin is lifted; a malformed pin stored by
    hand is ignored, not obeyed in part; pin_and_wait returns once the scheduler has published."""
    from dspark.cluster.policy_command import pin_and_wait
    from dspark.cluster.policy_follower import PolicyFollower
    from dspark.cluster.redis_state import RedisState, StateConfig

    pin = VerifyPolicy(max_block_len=3, budget_mode="fixed", speculation_gate=False)

    async def run():
        async with RedisState(StateConfig(url=redis_server.url, prefix=redis_prefix)) as st:
            sched = GlobalScheduler(st, SchedulerConfig(max_block_len=7, interval_s=0.05))
            for g in ("g1", "g2"):
                await st.heartbeat("verifier", g, {"n_slots": 8})
                await st.put_demand(g, Demand(active_requests=8, queued_requests=24, step_latency_s=0.05))
            follower = PolicyFollower(st, "g1")
            await sched.tick()
            own = await follower.refresh()
            ticking = asyncio.create_task(sched.run(stop_after=10))
            versions = await pin_and_wait(st, pin, timeout_s=5)
            pinned = await follower.refresh()
            other = await st.get_policy("g2")
            again = await pin_and_wait(st, pin, timeout_s=5)  # the same pin: nothing changes
            lifted_versions = await pin_and_wait(st, None, timeout_s=5)
            lifted = await follower.refresh()
            await st.pin_policy(None)
            ticking.cancel()
            await st._redis.set(st.keys.policy_pin(), '{"max_block_len": 0}')
            before = (await st.get_policy("g1")).version
            await sched.tick()
            after_bad = await st.get_policy("g1")
            return own, versions, pinned, other, again, lifted_versions, lifted, before, after_bad

    own, versions, pinned, other, again, lifted_versions, lifted, before, after_bad = asyncio.run(run())
    assert own.budget_mode == "algorithm1" and own.max_block_len == 2  # busy: the scheduler's own
    assert set(versions) == {"g1", "g2"} and pinned.version == versions["g1"] > own.version
    assert (pinned.max_block_len, pinned.budget_mode, pinned.speculation_gate) == (3, "fixed", False)
    assert other.max_block_len == 3 and not other.speculation_gate  # every group
    assert again == versions
    assert lifted.version == lifted_versions["g1"] > pinned.version
    assert (lifted.max_block_len, lifted.budget_mode, lifted.speculation_gate) == (2, "algorithm1", True)
    assert after_bad.version == before and after_bad.budget_mode == "algorithm1"  # the bad pin is not obeyed


def test_profile_step_costs_is_monotone(model_fp32):
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=4, max_seq=64))
    costs = profile_step_costs(runner, token_counts=[1, 4, 16, 32], repeats=1)
    assert costs.token_counts == [1, 4, 16, 32]
    assert all(b >= a > 0 for a, b in zip(costs.step_seconds, costs.step_seconds[1:]))
    table = costs.table(64)
    assert table.shape == (65,) and float(table[32]) == pytest.approx(costs.step_seconds[-1])


def test_budget_weighs_the_drafting_it_was_told_of():
    """Drafting paid for every step makes a verified draft relatively cheaper: one draft of
    survival 0.6 does not pay on a bare step (1 token in 1 s beats 1.6 in 2 s) and does once
    drafting takes 2 s per step (1.6 in 4 s beats 1 in 3 s); the timing is per batch bucket."""
    costs = CostModel(token_counts=[1, 2], step_seconds=[1.0, 2.0])
    b = AdaptiveBudget(costs, VerifyPolicy(budget_mode="algorithm1", max_block_len=1))
    assert b(blocks([0.6]), 1) == [0]
    b.observe_drafting(1, 9.0)  # a bucket's first drafting step (warm-up) is left out
    assert b.drafting_seconds(1) == 0.0 and b(blocks([0.6]), 1) == [0]
    b.observe_drafting(1, 2.0)
    assert b.drafting_seconds(1) == 2.0 and b(blocks([0.6]), 1) == [1]
    b.observe_drafting(2, 0.0)
    b.observe_drafting(2, 0.0)  # a 2-request step drafted in no time; the 1-request figure stays
    assert b.drafting_seconds(2) == 0.0 and b.drafting_seconds(1) == 2.0
    # The figure is looked up by the requests that drafted: an empty block (a request with no
    # room left, or drafting off) does not move the step into the 2-request bucket.
    assert b(blocks([0.6], []), 1) == [1, 0]


def test_real_steps_correct_the_profiled_costs():
    """Real steps scale the profile: one ratio for every count one request verifies (1-8
    tokens), one per doubling past it, interpolated between and kept non-decreasing.  Once real
    16-token steps are seen to cost 3x the profile while 8-token ones cost what it says, two
    requests' blocks stop being verified whole."""
    b = AdaptiveBudget(CostModel(token_counts=[1, 8, 16, 32], step_seconds=[1.0, 1.0, 1.0, 2.0]),
                       VerifyPolicy(budget_mode="algorithm1", max_block_len=7))
    conf = [0.9, 0.8, 0.6, 0.6, 0.6, 0.6, 0.6]
    assert b(blocks(conf, conf), 7) == [7, 7]
    for _ in range(AdaptiveBudget.CORRECT_EVERY):
        b.observe_step(8, 1.0)
        b.observe_step(16, 3.0)
    table = b.step_table()
    assert float(table[2]) == float(table[8]) == pytest.approx(1.0, abs=0.02)
    assert float(table[16]) == pytest.approx(3.0, abs=0.05) and 1.0 < float(table[12]) < float(table[16])
    assert bool((table[1:] >= table[:-1]).all()) and float(table[32]) == pytest.approx(6.0, abs=0.1)  # 2.0 x the ratio at 16
    assert sum(b(blocks(conf, conf), 7)) < 14
    # A range's ratio stands at the counts that ran in it: 10-token steps at 3x the profile make
    # a 10-token step cost 3x, not a blend with the 8-token range's ratio.
    c = AdaptiveBudget(CostModel(token_counts=[1, 8, 16, 32], step_seconds=[1.0, 1.0, 1.0, 2.0]),
                       VerifyPolicy(budget_mode="algorithm1", max_block_len=7))
    for _ in range(AdaptiveBudget.CORRECT_EVERY):
        c.observe_step(8, 1.0)
        c.observe_step(10, 3.0)
    assert float(c.step_table()[10]) == pytest.approx(3.0, abs=0.05) and float(c.step_table()[8]) == pytest.approx(1.0, abs=0.02)
    b.set_costs(CostModel(token_counts=[1, 8, 16], step_seconds=[1.0, 1.0, 2.0]))  # a new profile starts over
    assert float(b.step_table()[8]) == 1.0
    # A cost curve set by hand stays as given: neither real steps nor drafting change it.
    fixed = AdaptiveBudget(CostModel(token_counts=[1, 8, 16], step_seconds=[1.0, 1.0, 2.0], draft_seconds=0.5),
                           VerifyPolicy(budget_mode="algorithm1", max_block_len=7), learn=False)
    for _ in range(2 * AdaptiveBudget.CORRECT_EVERY):
        fixed.observe_step(8, 3.0)
        fixed.observe_drafting(1, 0.001)
    assert float(fixed.step_table()[8]) == 1.0 and fixed.drafting_seconds(1) == 0.5
    assert fixed(blocks(conf), 7) == [7]


def test_a_slow_spell_does_not_condemn_the_counts_it_fell_on():
    """The budget chooses the counts it then observes.  With a ratio per count, 5-token steps
    timed during a slow spell (35% over 4-token ones) made the table dearer from 5 tokens on, so
    a lone request's verification stopped at 3 drafts and never measured 5 tokens again (through
    the cluster it verified about 3.5 drafts where fixed depths 4 and 7 led it by 5-10%).  Every
    count of one request's verification shares one correction, so the profile's flat shape
    stands; and a range of counts that did not run lately relaxes toward the level of the one
    that did."""
    b = AdaptiveBudget(CostModel(token_counts=[1, 8, 16], step_seconds=[1.0, 1.0, 1.0]),
                       VerifyPolicy(budget_mode="algorithm1", max_block_len=7))
    conf = [0.9, 0.8, 0.6, 0.6, 0.6, 0.6, 0.6]
    for _ in range(AdaptiveBudget.CORRECT_EVERY):
        b.observe_step(4, 1.0)
        b.observe_step(5, 1.35)
    assert float(b.step_table()[4]) == float(b.step_table()[5])
    assert b(blocks(conf), 7) == [7]
    # Two requests' 16-token steps hit a slow spell (3x); then only one request runs, at the
    # profile's speed: the 9-16 range follows it back.
    for _ in range(AdaptiveBudget.CORRECT_EVERY):
        b.observe_step(16, 3.0)
    high = float(b.step_table()[16])
    assert high > 2.0
    for _ in range(50 * AdaptiveBudget.CORRECT_EVERY):
        b.observe_step(8, 1.0)
    assert float(b.step_table()[16]) < 1.1 < high


def test_one_requests_steps_set_the_slope_a_lone_request_verifies_by():
    """How deep a lone request verifies turns on how much dearer 8 tokens are than 1, which the
    start-up profile alone used to decide (one ratio corrects all of 1-8 tokens).  Survivals
    0.9, 0.72, 0.50, 0.30, 0.18, 0.11, 0.07: with each token 10% dearer the budget stops at 4
    drafts, with a flat cost it verifies all 7.  One request's real steps fit that slope,
    whichever way the profile erred; steps of several requests in the same counts do not."""
    conf = [0.9, 0.8, 0.7, 0.6, 0.6, 0.6, 0.6]
    policy = VerifyPolicy(budget_mode="algorithm1", max_block_len=7)
    steep = CostModel(token_counts=[1, 8, 16], step_seconds=[1.0, 1.7, 2.0])
    flat = CostModel(token_counts=[1, 8, 16], step_seconds=[1.0, 1.0, 1.2])
    assert AdaptiveBudget(steep, policy)(blocks(conf), 7) == [4]
    assert AdaptiveBudget(flat, policy)(blocks(conf), 7) == [7]

    def run(costs, per_token, num_requests):
        b = AdaptiveBudget(costs, policy)
        for i in range(96):
            t = 1 + i % 8
            b.observe_step(t, 1.0 + per_token * (t - 1), num_requests=num_requests)
        return b

    b = run(steep, 0.0, 1)  # real steps as dear at 8 tokens as at 1
    assert b.one_request_slope() == pytest.approx(0.0, abs=1e-6)
    assert float(b.step_table()[8]) == pytest.approx(float(b.step_table()[1]), rel=0.01)
    assert b(blocks(conf), 7) == [7]
    assert run(steep, 0.0, 4)(blocks(conf), 7) == [4]  # four requests' steps: the profile's shape stands
    b = run(flat, 0.1, 1)  # real steps 10% dearer a token
    assert b.one_request_slope() == pytest.approx(0.1, rel=1e-3)
    assert float(b.step_table()[8]) == pytest.approx(1.7 * float(b.step_table()[1]), rel=0.02)
    assert b(blocks(conf), 7) == [4]
    # Too few steps, or all at one count, say nothing of the slope.
    few = AdaptiveBudget(flat, policy)
    for _ in range(200):
        few.observe_step(5, 1.3, num_requests=1)
    assert few.one_request_slope() is None and few(blocks(conf), 7) == [7]
    # A stall counts for at most SLOPE_CLIP times the table's figure.
    stalled = run(steep, 0.0, 1)
    for _ in range(3):
        stalled.observe_step(8, 60.0, num_requests=1)
    assert stalled.one_request_slope() < 0.05 and stalled(blocks(conf), 7) == [7]
    # A budget that then verifies whole blocks every step (all its steps at 8 tokens) keeps the
    # slope it learned: it does not fall back to the profile's steep shape and stop at 4.
    b = run(steep, 0.0, 1)
    for _ in range(2000):
        b.observe_step(8, 1.0, num_requests=1)
    assert b.one_request_slope() == pytest.approx(0.0, abs=1e-6) and b(blocks(conf), 7) == [7]
    # The line's slope is bounded: deep counts at twice the 1-token steps' time make 8 tokens
    # at most SLOPE_MAX x 7 + 1 times one, and never a 1-token step of no time.
    wild = AdaptiveBudget(flat, policy)
    for i in range(96):
        t = 1 + i % 8
        wild.observe_step(t, 0.1 if t < 5 else 40.0, num_requests=1)
    assert wild.one_request_slope() <= AdaptiveBudget.SLOPE_MAX and float(wild.step_table()[1]) > 0.0
    # The correction of 1-8 tokens carries over a change of shape: when the line's flat shape
    # replaces the steep profile, the middle counts keep costing what they were seen to cost
    # (without the carry-over, 4 tokens would jump to 1.26 s for the next dozen steps).
    b = AdaptiveBudget(steep, policy)
    for i in range(AdaptiveBudget.CORRECT_EVERY * 16):
        b.observe_step(1 + i % 8, 1.0, num_requests=1)
        if i >= 2 * AdaptiveBudget.CORRECT_EVERY:
            assert float(b.step_table()[4]) == pytest.approx(1.0, rel=0.08), i
    assert b.one_request_slope() is not None


def test_probe_steps_verify_a_lone_requests_whole_block():
    """Every PROBE_EVERY-th step (drafted to the policy's depth) verifies a lone request's whole
    block whatever the budget would choose, so the line above is measured at the deep end.  The
    depths drafted next follow what the budget chose, and steps of several requests are left as
    chosen."""
    b = AdaptiveBudget(CostModel(token_counts=[1, 8, 16], step_seconds=[1.0, 2.0, 3.0]),
                       VerifyPolicy(budget_mode="algorithm1", max_block_len=7))
    chosen = []
    for _ in range(2 * AdaptiveBudget.PROBE_EVERY + 1):
        probe = b.steps > 0 and b.steps % AdaptiveBudget.PROBE_EVERY == 0
        assert b.draft_depth(7) == (7 if b.steps % AdaptiveBudget.PROBE_EVERY == 0 else 2)
        chosen.append((probe, b(blocks([0.9] + [0.1] * 6), 7)))
    assert [n for probe, n in chosen if probe] == [[7], [7]]
    assert {tuple(n) for probe, n in chosen if not probe} == {(1,)}
    while b.steps % AdaptiveBudget.PROBE_EVERY:
        b(blocks([0.9] * 7), 7)
    assert b(blocks([0.9, 0.1], [0.9, 0.1]), 7) == [1, 1]
    off = AdaptiveBudget(CostModel(token_counts=[1, 8], step_seconds=[1.0, 2.0]),
                         VerifyPolicy(budget_mode="algorithm1", max_block_len=7), learn=False)
    assert {tuple(off(blocks([0.9, 0.1, 0.1]), 7)) for _ in range(2 * AdaptiveBudget.PROBE_EVERY)} == {(1,)}
    off = AdaptiveBudget(CostModel(token_counts=[1, 8], step_seconds=[1.0, 2.0]),
                         VerifyPolicy(budget_mode="algorithm1", max_block_len=7))
    off.VERIFY_WHOLE_ON_PROBE = False  # the budget's choice on every step (e.g. to compare with and without)
    assert {tuple(off(blocks([0.9, 0.1, 0.1]), 7)) for _ in range(2 * AdaptiveBudget.PROBE_EVERY)} == {(1,)}


def test_the_engine_tells_the_budget_which_steps_were_one_requests(model_fp32, prompts20):
    """A lone request's verification steps reach the budget's line with one request; a step
    that ran a prompt chunk does not (its count says nothing of verification); several requests'
    steps say how many.  Output stays plain decoding's, probe steps included."""
    from dspark.workers.drafters.autoregressive import LayerSkipDrafter

    tok = model_fp32.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in prompts20[:2]]
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=2, max_seq=512))
    params = SamplingParams(max_tokens=40)
    plain = Engine(runner, tok, EngineConfig(max_batch=2)).generate(prompts, params)
    seen: list[tuple[int, int | None]] = []

    probes: list[tuple[int, int]] = []  # (verified, drafted) on the probe steps of one block

    class Recording(AdaptiveBudget):
        def observe_step(self, num_tokens, seconds, num_requests=None):
            seen.append((num_tokens, num_requests))
            super().observe_step(num_tokens, seconds, num_requests)

        def __call__(self, blocks, block_len):
            probe = len(blocks) == 1 and self.steps and self.steps % self.PROBE_EVERY == 0
            out = super().__call__(blocks, block_len)
            if probe:
                probes.append((out[0], len(blocks[0].token_ids)))
            return out

    budget = Recording(CostModel(token_counts=[1, 8, 512], step_seconds=[1.0, 1.5, 9.0]),
                       VerifyPolicy(budget_mode="algorithm1", max_block_len=6))
    eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=6), drafter=LayerSkipDrafter(runner, 20), budget=budget)
    out = eng.generate(prompts, params)
    assert [s.output_ids for s in out] == [s.output_ids for s in plain]
    prompt_steps = [t for t, n in seen if n is None]
    assert len(prompt_steps) >= 2 and min(prompt_steps) > 8  # each prompt's one chunk
    assert {n for _, n in seen if n is not None} == {1}
    assert probes and all(v == d for v, d in probes)  # every probe step verified its whole block
    two = Recording(budget.costs, VerifyPolicy(budget_mode="algorithm1", max_block_len=6))
    seen.clear()
    eng = Engine(runner, tok, EngineConfig(max_batch=2, block_len=6), drafter=LayerSkipDrafter(runner, 20), budget=two)
    eng.generate(prompts, SamplingParams(max_tokens=8))
    assert 2 in {n for _, n in seen}


def test_the_steps_fixed_overhead_makes_deeper_verification_pay():
    """Every step pays the engine's work outside its forward pass whatever it verifies, as it
    pays drafting.  Survivals 0.9, 0.5, 0.18 and a fourth token costing 10% more: on the forward
    pass alone the third draft does not pay (Theta 2.58 / 1.1 = 2.35 against 2.4 / 1.0), with a
    second of overhead a step it does (2.58 / 2.1 = 1.23 against 2.4 / 2.0 = 1.2)."""
    costs = CostModel(token_counts=[1, 2, 3, 4], step_seconds=[1.0, 1.0, 1.0, 1.1])
    b = AdaptiveBudget(costs, VerifyPolicy(budget_mode="algorithm1", max_block_len=3))
    conf = [0.9, 0.5 / 0.9, 0.36]
    assert b.overhead_seconds(1) == 0.0 and b(blocks(conf), 3) == [2]
    b.observe_overhead(1, 1.0)
    b.observe_overhead(3, 1.0)  # the nearest bucket measured stands for the others
    assert b.overhead_seconds(1) == b.overhead_seconds(2) == 1.0
    assert b(blocks(conf), 3) == [3]
    # A cost curve set by hand stays as given.
    fixed = AdaptiveBudget(costs, VerifyPolicy(budget_mode="algorithm1", max_block_len=3), learn=False)
    fixed.observe_overhead(1, 1.0)
    assert fixed.overhead_seconds(1) == 0.0 and fixed(blocks(conf), 3) == [2]


def test_step_cost_envelope_comes_from_the_larger_counts():
    """A count timed during a slow spell must not lift the larger counts to its time (a table
    flat from 1 to 8 tokens made verifying 8 tokens look as cheap as decoding 1)."""
    import doctest

    from dspark.workers import budget_policy
    from dspark.workers.budget_policy import envelope_from_above

    assert envelope_from_above([0.045, 0.034, 0.036, 0.041, 0.049]) == [0.034, 0.034, 0.036, 0.041, 0.049]
    assert envelope_from_above([0.01, 0.02, 0.015]) == [0.01, 0.015, 0.015]
    assert doctest.testmod(budget_policy).failed == 0


def test_profiling_leaves_every_cache_layout_as_it_found_it(model_fp32, tmp_path):
    """The profile runs from position 0 and releases its slots: a paged cache gets every block
    back, and a DeepSeek-V4 state (which refuses a start beyond what it holds) profiles too."""
    from helpers.tiny_deepseek_v4 import write_tiny_folder

    from dspark.models.loader import load_model

    paged = LocalRunner(model_fp32.model, RunnerConfig(n_slots=4, max_seq=64, kv_layout="paged"))
    profile_step_costs(paged, token_counts=[1, 8, 32], repeats=1)
    assert paged.cache.blocks_in_use == 0 and set(paged.cache.lengths) == {0}
    write_tiny_folder(tmp_path / "v4", 300, 2)
    v4 = LocalRunner(load_model(tmp_path / "v4", dtype="fp32", progress=False).model, RunnerConfig(n_slots=2, max_seq=64))
    costs = profile_step_costs(v4, token_counts=[1, 8], repeats=1)
    assert len(costs.step_seconds) == 2 and set(v4.cache.lengths) == {0}


@pytest.mark.parametrize("mode", ["algorithm1", "production"])
def test_adaptive_engine_is_lossless_and_shortens_under_load(model_fp32, prompts20, mode):
    """Greedy output with the adaptive budget equals plain decoding; a busy policy verifies less."""
    from dspark.workers.drafters.autoregressive import LayerSkipDrafter

    tok = model_fp32.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in prompts20[:3]]
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=4, max_seq=512))
    plain = Engine(runner, tok, EngineConfig(max_batch=4)).generate(prompts, SamplingParams(max_tokens=16))
    costs = profile_step_costs(runner, token_counts=[1, 8, 32], repeats=1)
    verified = {}
    for name, pol in (("idle", VerifyPolicy(budget_mode=mode, max_block_len=6)),
                      ("busy", VerifyPolicy(budget_mode=mode, max_block_len=2, survival_floor=0.5))):
        budget = AdaptiveBudget(costs, pol)
        eng = Engine(runner, tok, EngineConfig(max_batch=4, block_len=6), drafter=LayerSkipDrafter(runner, 20), budget=budget)
        out = eng.generate(prompts, SamplingParams(max_tokens=16))
        assert [s.output_ids for s in out] == [s.output_ids for s in plain]
        verified[name] = budget.verified_tokens / max(1, budget.steps)
        assert budget.drafting_seconds(len(prompts)) > 0  # the engine timed its drafting for the budget
    assert verified["busy"] < verified["idle"]
