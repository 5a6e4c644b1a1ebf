"""The speculation gate: speculate only when measured throughput says it pays.

Unit cases on hand-made measurements, then the real engine on the real default model (fp32,
greedy) with two scripted drafters: one that is slow and always wrong (the gate must settle on
plain decoding) and one that proposes the target's own continuation for free (the gate must
keep speculating).  Output stays identical to plain decoding either way.
"""

from __future__ import annotations

import random
import time

import pytest

from dspark.workers.drafters.base import DraftBlock, StatelessDrafter
from dspark.workers.engine import GATE_WINDOW, Engine, EngineConfig
from dspark.workers.request import SamplingParams, Sequence
from dspark.workers.runner import LocalRunner, RunnerConfig
from dspark.workers.spec_gate import SpeculationGate


def test_gate_measures_both_arms_then_follows_the_faster():
    g = SpeculationGate(explore_every=8, warmup_steps=2, explore_run=2)
    assert [g.speculate(1) for _ in range(3)] == [True] * 3  # no measurement yet: try speculation
    for _ in range(3):  # the first step settles, two are measured
        g.record(1, True, 1.2, 0.050)  # 24 tokens/s
    assert [g.speculate(1) for _ in range(3)] == [False] * 3  # then plain
    for _ in range(3):
        g.record(1, False, 1.0, 0.025)  # 40 tokens/s
    choices = [g.speculate(1) for _ in range(16)]
    assert choices[7] and choices[8] and choices.count(True) == 2  # one exploration run of 2 steps
    assert g.rates()[1] == pytest.approx((24.0, 40.0)) and g.settling_steps == 2


def test_gate_keeps_batch_sizes_apart_and_recovers():
    g = SpeculationGate(explore_every=4, warmup_steps=1, decay=0.5)
    for n, spec, tokens, seconds in [(1, True, 3.0, 0.030), (16, True, 20.0, 0.5),  # 100 / 40 tok/s
                                     (1, False, 1.0, 0.025), (16, False, 16.0, 0.2)]:  # 40 / 80 tok/s
        for _ in range(2):  # settling, then measured
            g.record(n, spec, tokens, seconds)
    assert g.speculate(1) and not g.speculate(16)
    # Speculation at 16 becomes cheap (say, a copy-heavy stretch): an exploration run notices.
    for _ in range(24):  # a run of 5 notices, 4 more confirm; 4 steps on, a run of 5 probes plain again
        spec = g.speculate(16)
        g.record(16, spec, 60.0 if spec else 16.0, 0.3 if spec else 0.2)
    assert g.speculate(16)


def test_gate_follows_the_nearest_measured_bucket():
    """A batch size seen only briefly (16 requests, then 14 for a step or two while finished ones
    are replaced) would warm up with speculation on every visit: its steps are mostly settling
    or share a prompt chunk, so they never complete its measurements.  It follows the nearest
    bucket measured on both arms until it has its own, and its first exploration run starts at
    its first step."""
    g = SpeculationGate(warmup_steps=1, explore_run=2)
    for spec, tokens, seconds in [(True, 20.0, 0.5), (False, 16.0, 0.2)]:  # at 16: 40 vs 80 tok/s
        for _ in range(2):
            g.record(16, spec, tokens, seconds)
    assert [g.speculate(14) for _ in range(3)] == [True, True, False]  # a run of 2, then 16's choice
    assert not g.speculate(16)  # measured itself: no run yet
    for spec, tokens, seconds in [(True, 28.0, 0.2), (False, 14.0, 0.2)]:  # at 14 (8-15): 140 vs 70
        for _ in range(2):
            g.record(14, spec, tokens, seconds)
    assert g.speculate(14) and not g.speculate(16)
    # A bucket that follows another measures itself at once: alone speculation wins, at 16
    # requests it does not.  Sixteen requests after one-request traffic probe plain decoding at
    # their first step and decide from their own steps soon after (they used to speculate until
    # the run due 16 steps in).
    g = SpeculationGate(warmup_steps=1)
    for spec, tokens, seconds in [(True, 3.0, 0.03)] * 2 + [(False, 1.0, 0.025)] * 2:  # alone: 100 vs 40
        g.record(1, spec, tokens, seconds)  # tokens/s (each arm's first step settles)
    arms = []
    for _ in range(60):
        arms.append(g.speculate(16))
        g.record(16, arms[-1], *((20.0, 0.5) if arms[-1] else (16.0, 0.2)))  # at 16: 40 vs 80 tok/s
    assert not arms[0] and arms[:20].count(True) <= 3, arms  # plain at once, speculation measured briefly
    assert arms[-30:].count(True) <= 5, arms  # and at most one run of probes later


def test_a_borrowed_choice_the_batch_size_can_only_strengthen_is_not_probed_at_once():
    """Speculation pays less the larger the batch.  So a larger batch after a smaller one that
    settled on plain decoding (sixteen requests after four) takes plain decoding with the
    smaller one's probe interval, instead of paying a run of speculative steps at its first
    step and another 16 steps later (at 0.55x of plain through the cluster, each run cost about
    a tenth of a 10-second slice).  The same for a smaller batch after a larger one that
    speculates.  The other directions still probe at once (the test above)."""
    g = SpeculationGate(warmup_steps=1)
    arms = []
    for _ in range(400):  # four requests: plain 80 tok/s, speculation 40
        arms.append(g.speculate(4))
        g.record(4, arms[-1], *((8.0, 0.2) if arms[-1] else (4.0, 0.05)))
    assert arms[-100:].count(True) <= 5, arms  # settled on plain, probing rarely
    sixteen = []
    for _ in range(300):
        sixteen.append(g.speculate(16))
        g.record(16, sixteen[-1], *((24.0, 0.5) if sixteen[-1] else (16.0, 0.2)))
    assert sixteen[:64] == [False] * 64, sixteen
    assert True in sixteen  # its own probes still come, at the longer interval

    g = SpeculationGate(warmup_steps=1)
    arms = []
    for _ in range(200):  # sixteen requests where speculation wins: 120 vs 80 tok/s
        arms.append(g.speculate(16))
        g.record(16, arms[-1], *((24.0, 0.2) if arms[-1] else (16.0, 0.2)))
    assert arms[-100:].count(False) <= 10, arms
    assert [g.speculate(4) for _ in range(16)] == [True] * 16  # borrowed, and not probed at once

    # A lender in the middle of a probe run has not settled: a lucky first step of speculation
    # there must not hand sixteen requests a speculation choice without a probe of their own.
    g = SpeculationGate(warmup_steps=1)
    for _ in range(400):
        arm = g.speculate(4)
        g.record(4, arm, *((8.0, 0.2) if arm else (4.0, 0.05)))
    while not g.speculate(4):  # up to the start of the next run of speculative steps
        g.record(4, False, 4.0, 0.05)
    g.record(4, True, 8.0, 0.2)
    g.speculate(4)
    g.record(4, True, 40.0, 0.2)  # a lucky step: speculation's average jumps past plain's
    sixteen = []
    for _ in range(40):
        sixteen.append(g.speculate(16))
        g.record(16, sixteen[-1], *((24.0, 0.5) if sixteen[-1] else (16.0, 0.2)))
    assert sixteen[:20].count(True) <= 5 and not any(sixteen[-10:]), sixteen  # a probe at once, then plain


def test_a_borrowed_guess_gives_way_to_the_buckets_own_leader():
    """Four requests after one: the one-request bucket speculates (100 against 40 tok/s), so four
    requests start from that choice as a guess.  Their own steps of the two arms come out within
    the margin of each other (speculation 74 tok/s, plain 78, as measured through the cluster).
    The guess used to be kept as an incumbent, which the margin protects (speculation in almost
    every step there); once measured, the bucket takes the leader of its own rates: plain."""
    g = SpeculationGate(warmup_steps=1)
    for spec, tokens, seconds in [(True, 3.0, 0.03)] * 2 + [(False, 1.0, 0.025)] * 2:
        g.record(1, spec, tokens, seconds)
    arms = []
    for _ in range(300):
        arms.append(g.speculate(4))
        g.record(4, arms[-1], *((5.4, 5.4 / 74) if arms[-1] else (4.0, 4.0 / 78)))
    assert arms[-200:].count(True) <= 60, arms.count(True)  # plain, with the close second's probes


def _measure(g: SpeculationGate, n: int, spec_rate: float, plain_rate: float) -> None:
    """Both arms of ``n`` requests' bucket measured: one token per request a step, at these rates."""
    for arm, rate in ((True, spec_rate), (False, plain_rate)):
        for _ in range(2):  # settling, then measured
            g.record(n, arm, float(n), n / rate)


def test_a_bucket_between_two_measured_ones_guesses_from_both():
    """A closed loop of sixteen requests ramps up and drains through eight to fifteen.  Measured
    through the cluster: at four requests the arms tied (speculation 69 tok/s, plain 67), at
    sixteen speculation read 0.75x of plain.  The eight-to-fifteen bucket used to borrow the
    nearer smaller bucket's speculation as its guess (and speculated at 75-81 tok/s through every
    drain); it now interpolates speculation's relative rate between its neighbours, 0.9x: plain,
    after the first run that measures speculation there."""
    g = SpeculationGate(warmup_steps=1)
    _measure(g, 4, 69.0, 67.0)
    _measure(g, 16, 127.0, 168.0)
    arms = [g.speculate(10) for _ in range(g.explore_run + 5)]
    assert arms == [True] * g.explore_run + [False] * 5


def test_a_run_that_measured_nothing_is_not_judged():
    """The eight-to-fifteen bucket's first run fell on the steps of a ramp-up, every one sharing
    a prompt chunk, so none was measured.  It was then judged on the rates of the bucket it
    borrowed from, which put its explored arm far behind, and its next run was pushed 128 steps
    away: plain decoding was never measured there, and the guess (speculation at 0.75x) stayed.
    Now a run that measured nothing has no verdict, and the next one comes after the usual
    interval."""
    g = SpeculationGate(warmup_steps=1)
    _measure(g, 4, 100.0, 60.0)  # only the smaller bucket is measured: speculation, by far
    arms = []
    for _ in range(2 * g.explore_every + g.explore_run):
        arms.append(g.speculate(10))
        g.record(10, arms[-1], 10.0, 0.1, measured=False)  # every step shares a prompt chunk
    runs = [i for i in range(1, len(arms)) if not arms[i] and arms[i - 1]]
    assert arms[0] is False and runs and runs[0] <= g.explore_run + g.explore_every, arms


def _simulate(gate: SpeculationGate, steps: int, cost) -> list[bool]:
    """Drive ``gate`` for ``steps`` steps of one request: ``cost(arm, previous arm, step)`` gives
    each step's (tokens, seconds).  Returns the arms chosen."""
    arms, prev = [], None
    for i in range(steps):
        arm = gate.speculate(1)
        gate.record(1, arm, *cost(arm, prev, i))
        arms.append(prev := arm)
    return arms


def _cluster_at_1(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
    """Step costs measured through the cluster at concurrency 1 (a loaded host): speculative
    steps 2 tokens in 100 ms in steady state (20 tok/s), the first after a plain step 1.8 in
    125 ms (14.4 tok/s), plain steps 1 token in 66 ms (15.2 tok/s).  For the first 40 steps the
    host is busy and speculation measures 1 token in 200 ms."""
    if not arm:
        return 1.0, 0.066
    if step < 40:
        return 1.0, 0.200
    return (2.0, 0.100) if prev else (1.8, 0.125)


def test_gate_measures_steady_state_not_the_switch():
    """Once a noisy stretch has put the gate on plain decoding, probing speculation one step at
    a time measures only first-steps-after-plain (14.4 tok/s, below plain's 15.2): the gate that
    averaged them (before settling steps were left out) stays on plain here for good.
    Settling steps are left out and exploration runs long enough to see steady state (20 tok/s)."""
    g = SpeculationGate()
    arms = _simulate(g, 400, _cluster_at_1)
    assert arms[10:40].count(True) <= 8  # the busy stretch moved it to plain ...
    assert arms[-200:].count(True) > 190, arms[-200:].count(True)  # ... and it came back
    assert g.rates()[1] == pytest.approx((20.0, 1 / 0.066), rel=1e-3)  # steady state, both arms


def test_gate_holds_a_noisy_lead():
    """Speculative steps emit 1 to 8 tokens (here 1.9 on average in 103 ms, 18 tok/s, against
    plain's 14.5): a short average of them often dips below plain.  Averaged over about 30 steps,
    switching only on a 10% lead and re-probing soon after a close run, the gate speculates in
    most steps (with a 10-step average and no margin: about 55%)."""
    for seed in range(3):
        rng = random.Random(seed)

        def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
            if not arm:
                return 1.0, rng.gauss(0.069, 0.008)
            tokens = 1
            while tokens < 8 and rng.random() < 0.47:
                tokens += 1
            return tokens, rng.gauss(0.103, 0.02) + (0.0 if prev else 0.013)

        arms = _simulate(SpeculationGate(), 2000, cost)
        assert arms.count(True) > 0.8 * len(arms), (seed, arms.count(True))


def test_gate_probes_a_settled_choice_less_and_less():
    """At concurrency 16 through the cluster plain steps gave 100 tok/s, speculative ones 59 in
    steady state and 11 just after a plain stretch: each probe costs, so a run that confirms the
    incumbent doubles the interval to the next one, up to ``max_explore_every`` steps."""
    g = SpeculationGate(explore_every=16, max_explore_every=128)

    def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
        return (13.0, 0.130) if not arm else ((12.3, 0.210) if prev else (2.4, 0.217))

    arms = _simulate(g, 1000, cost)
    spec = arms[20:].count(True)
    assert spec <= 50, spec  # 9 runs of 5 steps, 16, 32, 64, then 128 steps apart (one every 16: 300)
    assert g.rates()[1] == pytest.approx((12.3 / 0.210, 100.0), rel=1e-3)


def test_gate_keeps_probing_a_close_second_rarely():
    """Four requests, plain decoding at 0.9x of speculation's rate: exploration runs of plain
    come out close (within the 10% margin) about as often as clearly behind.  Resetting the
    interval after every close run kept plain in 13-16% of the steps (through the cluster at 4
    requests: 18%); a close run now backs the interval off, and plain takes under 6%."""
    for seed in range(3):
        rng = random.Random(seed)

        def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
            if not arm:  # 4 tokens at 0.9x of speculation's 7.6 tokens per 150 ms
                return 4.0, rng.gauss(4 / (0.9 * 7.6 / 0.150), 0.01)
            tokens = 0
            for _ in range(4):
                k = 1
                while k < 8 and rng.random() < 0.47:
                    k += 1
                tokens += k
            return tokens, rng.gauss(0.150, 0.02) + (0.0 if prev else 0.05)

        arms = _simulate(SpeculationGate(), 3000, cost)[100:]
        assert arms.count(False) < 0.06 * len(arms), (seed, arms.count(False))


def test_arms_within_the_margin_are_probed_less_and_less():
    """Sixteen requests through the cluster: speculation at 0.95x of plain decoding in steady
    state, and its first step after a plain stretch waits for every block (a quarter of the
    rate).  With the arms within the margin, keeping the probe interval ran a run of speculation
    every 16 steps for good (about a fifth of the steps, each run with two settling steps);
    close runs now double the interval, up to ``max_explore_every``."""
    for seed in range(3):
        rng = random.Random(seed)

        def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
            if not arm:
                return 16.0, rng.gauss(16 / 248, 0.004)
            return (16.0 * 0.95, rng.gauss(16 / 248, 0.004)) if prev else (4.0, 16 / 248)

        arms = _simulate(SpeculationGate(), 3000, cost)[200:]
        assert arms.count(True) < 0.05 * len(arms), (seed, arms.count(True))


def test_steady_steps_switch_on_a_lead_inside_the_fixed_margin():
    """Sixty-four requests through the cluster: speculation settled in first (plain decoding slow
    for a stretch), then plain decoding at 1.05x of it, on steps that vary by 3-4%.  With a fixed
    10% margin the gate kept speculation for good (a close second, probed less and less); the
    margin now follows the steps' spread, and plain decoding takes over at its first probe."""
    for seed in range(3):
        rng = random.Random(seed)

        def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
            if not arm:
                return 64.0, rng.gauss(0.32 if step < 200 else 0.26, 0.01)  # 200, then 246 tok/s
            return 70.0, rng.gauss(0.30, 0.012) if prev else 0.45  # 233 tok/s; the first waits for every block

        g = SpeculationGate()
        arms = _simulate(g, 1500, cost)
        assert arms[100:200].count(True) > 90, (seed, arms[100:200].count(True))
        assert arms[500:].count(True) < 0.05 * len(arms[500:]), (seed, arms[500:].count(True))
        assert g.margin(1) < 0.05
    # A lone request's noisy steps keep the full margin (see test_gate_holds_a_noisy_lead).


def _sixty_four(ratio: float, seed: int):
    """Sixty-four requests' steps (8% spread in time): plain decoding 64 tokens in 228 ms,
    speculation 92 tokens at ``ratio`` times plain decoding's rate, its first step after a plain
    stretch half as long again (it waits for every block)."""
    rng = random.Random(seed)
    spec_seconds = 92.0 / (ratio * 64 / 0.228)

    def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
        if not arm:
            return 64.0, rng.gauss(0.228, 0.018)
        return rng.gauss(92.0, 4.0), rng.gauss(spec_seconds, 0.08 * spec_seconds) * (1.0 if prev else 1.5)

    return cost


@pytest.mark.parametrize("edge, most", [(0.0, False), (0.03, True)])
def test_a_tie_goes_to_plain_decoding(edge, most):
    """Sixty-four requests through the cluster: the gate measured the arms within a few percent of
    each other and speculated in 87% of the steps, while the clients got 0.94x-1.01x of plain
    decoding's throughput (speculation's drafting runs on cores the gate does not time).  With
    speculation's rate discounted by ``spec_edge`` a tie goes to plain decoding; without the
    discount the gate keeps speculating."""
    for seed in range(3):
        arms = _simulate(SpeculationGate(spec_edge=edge), 1500, _sixty_four(1.0, seed))[200:]
        plain = arms.count(False)
        assert (plain > 0.6 * len(arms)) == most, (seed, plain)


def test_a_clear_lead_of_speculation_still_speculates():
    """The discount costs little where speculation leads: at 1.06x of plain decoding the gate
    speculates in nearly every step."""
    for seed in range(3):
        arms = _simulate(SpeculationGate(), 1500, _sixty_four(1.06, seed))[200:]
        assert arms.count(True) > 0.9 * len(arms), (seed, arms.count(True))


def test_a_step_without_a_finite_measure_is_not_averaged():
    """A NaN or infinite step would stay in an arm's averages for good."""
    g = SpeculationGate()
    for _ in range(6):
        g.record(4, True, 8.0, 0.1)
    before = g.rates()[3]
    for tokens, seconds in ((float("nan"), 0.1), (8.0, float("nan")), (8.0, float("inf")), (float("inf"), 0.1)):
        g.record(4, True, tokens, seconds)
    assert g.rates()[3] == before and g._arms[(3, True)].steps == 5


def test_gate_confirms_a_lucky_run_before_switching():
    """Plain leads (80 tok/s against speculation's 60), but one exploration run of speculation
    happens to measure 100 tok/s.  A run that comes out ahead is extended by as many steps, whose
    mean (80) is no lead: the gate stays on plain.  (Switching on the four lucky steps put the
    gate on speculation until its next probe of plain, 16 steps at 0.75x.)"""
    g = SpeculationGate(warmup_steps=1)
    lucky = iter([100.0] * 4)

    def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
        if not arm:
            return 8.0, 0.1
        return 6.0, 6.0 / (next(lucky, 60.0) if prev and step > 10 else 60.0)  # after the warm-up

    arms = _simulate(g, 200, cost)
    spec_steps = [i for i, a in enumerate(arms) if a and i > 10]
    assert spec_steps[:9] == list(range(spec_steps[0], spec_steps[0] + 9)), spec_steps  # run of 5, 4 more
    assert not arms[spec_steps[0] + 9]  # then plain again, not a switch
    runs = "".join("s" if a else "." for a in arms[11:]).split(".")
    assert max(map(len, runs)) == 9, runs  # no stretch of speculation beyond a run and its extension


def _runs_of(arms: list[bool], arm: bool) -> list[tuple[int, int]]:
    """(start, length) of each stretch of ``arm`` in ``arms``."""
    out, i = [], 0
    while i < len(arms):
        if arms[i] == arm:
            j = i
            while j < len(arms) and arms[j] == arm:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def test_a_run_whose_arm_keeps_leading_goes_on():
    """Sixty-four requests through the cluster: speculation held by the margin while plain
    decoding's runs came out ahead of it, inside the margin (a run's few steps against the
    incumbent's long average), and each such run lasted five steps and doubled the interval to
    the next.  A run whose arm is ahead is now extended while it stays ahead, up to
    ``max_extensions`` times, so the arm that reads faster gets the steps."""
    def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
        if arm:
            return 10.0, 0.1  # 100 tok/s
        return 10.0, 0.2 if step < 30 else 10.0 / 107  # slow at first (speculation settles in), then 107

    for ext in (1, 3):
        g = SpeculationGate(warmup_steps=1, min_margin=0.1, spec_edge=0.0, max_extensions=ext)
        arms = _simulate(g, 200, cost)
        later = [run for run in _runs_of(arms, False) if run[0] > 30]
        assert later and later[0][1] == g.explore_run + ext * (g.explore_run - 1), (ext, later)
        assert arms[-50:].count(True) > 25  # a lead inside the margin does not switch the gate


def test_a_close_run_on_few_measured_steps_keeps_the_interval():
    """At sixty-four requests a slice's drain fell into a run of plain decoding: its steps, but
    one, were taken with fewer decoding requests than the bucket's, so unmeasured, and the run was
    judged on that one step, came out close and doubled the interval to the next (speculation was
    then held at 0.9x of plain for the next whole slice).  A close run that measured fewer than
    ``MIN_SPREAD_STEPS`` steps of its arm now leaves the interval as it was."""
    g = SpeculationGate(warmup_steps=1, spec_edge=0.0)
    arms, prev, plain_seen = [], None, 0
    for i in range(300):
        arm = g.speculate(64)
        plain_seen += not arm
        measured = arm or i < 10 or plain_seen % 4 == 0  # after the warm-up, one plain step in four
        g.record(64, arm, 64.0 * (1.2 if arm else 1.0), 0.3 if arm else 0.25 / 0.97, measured=measured)
        arms.append(prev := arm)
    starts = [s for s, _ in _runs_of(arms, False) if s > 10]
    gaps = {b - a for a, b in zip(starts, starts[1:])}
    assert len(starts) > 10 and gaps == {g.explore_every + g.explore_run - 1}, (starts, gaps)


def test_gate_probes_the_old_arm_soon_after_its_own_average_flips_it():
    """The incumbent (plain) slows down for a stretch until it falls behind the other arm's old
    average: the gate measures speculation again (a run, extended to confirm the lead), switches
    to it and must check plain again within ``explore_every`` steps (it used to wait out the
    backed-off interval, by then 128 steps)."""
    g = SpeculationGate(warmup_steps=1)

    def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
        if arm:
            return 7.0, 0.1  # 70 tok/s
        return 8.0, 0.1 if not 600 <= step < 700 else 0.2  # 80 tok/s; 40 for a hundred steps

    arms = _simulate(g, 830, cost)
    start = next(i for i in range(600, 700) if arms[i])
    flip = start + 2 * g.explore_run - 1  # the run and its extension, then on speculation
    assert all(arms[start : flip + 1]), start
    assert not all(arms[flip : flip + g.explore_every + g.explore_run]), flip  # plain probed soon
    assert arms[-50:].count(False) >= 35  # and, plain fast again, back on it (with probes)


def test_a_slow_spell_of_the_whole_host_does_not_flip_the_gate():
    """Sixteen requests through the cluster: plain decoding ahead (speculation at 0.8x), then the
    host slows down by half for a stretch.  The incumbent's average follows the spell while the
    other arm's is from its last run: compared as they stand, plain soon read behind, and the
    gate switched to speculation (slowed alike; each switch's first step waits for every block),
    and back at plain's next probe, 16 steps later: two stretches of speculation in the spell,
    four settling steps.  Now the other arm is measured again first, by one run, and it stays
    behind."""
    for seed in range(3):
        rng = random.Random(seed)

        def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
            slow = 2.0 if 700 <= step < 900 else 1.0
            if not arm:
                return 16.0, slow * rng.gauss(0.2, 0.01)  # 80 tok/s
            return (16.0, slow * rng.gauss(0.25, 0.012)) if prev else (4.0, slow * 0.25)  # 64 tok/s

        g = SpeculationGate()
        spell = "".join("s" if a else "." for a in _simulate(g, 1000, cost)[700:900])
        assert spell.split(".").count("s" * g.explore_run) == 1 and spell.count("s") == g.explore_run, (seed, spell)


def test_a_check_that_measured_nothing_falls_back_to_the_figures():
    """The incumbent (plain) truly slows down, and the run of speculation its fall sets off
    measures nothing (every step shares a prompt chunk).  The gate then switches on the figures
    as they stand, as it did before such runs: re-running every ``explore_every`` steps with no
    verdict kept it on the slower arm."""
    g = SpeculationGate(warmup_steps=1)
    _measure(g, 16, 64.0, 80.0)
    arms = []
    for i in range(120):
        arms.append(g.speculate(16))
        measured = not (arms[-1] and i < 60)  # speculation's steps share prompt chunks for a while
        g.record(16, arms[-1], 16.0, 16 / (64.0 if arms[-1] else 40.0), measured=measured)
    trail = "".join("s" if a else "." for a in arms)
    start = g.explore_every - 1
    assert trail[:start] == "." * start and trail[start : start + 20] == "s" * 20, trail  # the run, then the switch
    assert trail[start:].count(".") <= g.explore_run, trail  # plain only in its probe


def test_engine_judges_a_short_dip_by_the_batch_before(model_fp32):
    """When a request finishes, the gate is asked about the next steps with the largest batch size
    of the last GATE_WINDOW steps (a closed loop replaces it two steps later); a lasting change
    counts GATE_WINDOW steps later.  Each step is reported with the size it was decided by,
    except the steps of a dip into a smaller bucket (four requests to three): those are measured
    in the bucket of the batch they ran (a few requests' tokens would read as that arm's
    slowness at the larger size, and left unmeasured they starved the smaller bucket)."""
    tok = model_fp32.tokenizer
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=4, max_seq=256))

    class Sizes(SpeculationGate):
        asked: list = []
        told: list = []
        measured: list = []

        def speculate(self, n):
            self.asked.append(n)
            return super().speculate(n)

        def record(self, n, *a, **k):
            self.told.append(n)
            self.measured.append(k.get("measured", True))
            super().record(n, *a, **k)

    gate = Sizes(warmup_steps=1)
    prompt = tok.encode_chat([{"role": "user", "content": "Count to ten."}])
    eng = Engine(runner, tok, EngineConfig(max_batch=4, block_len=2), drafter=_Script([], wrong=True, delay_s=0.0),
                 gate=gate)  # fmt: skip
    eng.generate([prompt] * 4, [SamplingParams(max_tokens=m, ignore_eos=True) for m in (8, 30, 30, 30)])
    assert len(gate.asked) == len(gate.told)  # one question and one report per decoding step
    # Wrong drafts: one token per request and step.  The short request's 8 tokens take the
    # prompt's step and 7 decoding steps of 4 requests (asked about 7 times, after the prompt's
    # step and the first six); the first GATE_WINDOW steps of 3 are judged as 4.  The last step,
    # with room for no draft, is not asked about.
    assert gate.asked == [4] * (7 + GATE_WINDOW) + [3] * (21 - GATE_WINDOW), gate.asked
    assert gate.told == [4] * 7 + [3] * 21, gate.told  # a dip's steps go to the bucket of their batch
    assert all(gate.measured), gate.measured
    # A size from before the gate was set aside is not carried over: three requests decode with
    # the gate aside until the short one finishes; back in force, the gate is asked about 2.
    gate.asked.clear(), gate.told.clear()
    seqs = [eng.add_request(prompt, SamplingParams(max_tokens=m, ignore_eos=True)) for m in (3, 12, 12)]
    eng.step(), eng.step()  # the prompts, then a step of 3 with the gate in force
    eng.gate_enabled = False
    while not seqs[0].finished:
        eng.step()
    eng.gate_enabled = True
    eng.run_until_done()
    # Asked at the end of the prompt's step and of the step of 3 (that answer lapses: set aside).
    assert gate.asked[:2] == [3, 3] and set(gate.asked[2:]) == {2}, gate.asked
    assert gate.told == [3] + gate.asked[2:], gate.told


def test_gate_backs_off_faster_the_further_behind_the_probed_arm_is():
    """64 requests through the cluster: speculation at 0.69x of plain.  After the first run the
    interval grows 8x (a gap of three margins), not 2x: the next run comes 128 steps later
    instead of 32, 64 and 128 steps later in turn.  At 0.87x (0.845x after the discount of
    speculation's rate, a gap of 1.5 margins) it doubles."""

    def starts(ratio: float) -> list[int]:
        def cost(arm: bool, prev: bool | None, step: int) -> tuple[float, float]:
            if not arm:
                return 64.0, 64 / 232
            return (108.8, 108.8 / (232 * ratio)) if prev else (30.0, 0.5)

        arms = _simulate(SpeculationGate(), 700, cost)
        return [i for i in range(10, len(arms)) if arms[i] and not arms[i - 1]]

    far, near = starts(0.69), starts(0.87)  # a run of 5 steps, then the interval (its last step starts the next)
    assert [b - a for a, b in zip(far, far[1:])] == [4 + 128, 4 + 256, 4 + 256], far  # the cap
    assert [b - a for a, b in zip(near, near[1:])][:3] == [4 + 32, 4 + 64, 4 + 128], near


def test_gate_refuses_bad_settings():
    with pytest.raises(ValueError):
        SpeculationGate(explore_every=1)
    with pytest.raises(ValueError):
        SpeculationGate(explore_run=1)  # a run of one step is all settling: nothing measured
    with pytest.raises(ValueError):
        SpeculationGate(confirm_margin=0.0)  # the back-off is measured in margins
    with pytest.raises(ValueError):
        SpeculationGate(spec_edge=-0.01)  # a premium on speculation, not a discount


def test_gate_doctests():
    import doctest

    from dspark.workers import spec_gate

    assert doctest.testmod(spec_gate).failed == 0


class _Script(StatelessDrafter):
    """Proposes the next tokens of ``script`` (correct drafts), or wrong ones after a delay."""

    name = "scripted"

    def __init__(self, script: list[int], wrong: bool, delay_s: float) -> None:
        self.script, self.wrong, self.delay_s = script, wrong, delay_s

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        time.sleep(self.delay_s)
        out = []
        for seq in seqs:
            ids = list(self.script[len(seq.output_ids) : len(seq.output_ids) + block_len])
            out.append(DraftBlock(token_ids=[(t + 1) % 1000 for t in ids] if self.wrong else ids))
        return out


@pytest.fixture(scope="module")
def setup(model_fp32):
    tok = model_fp32.tokenizer
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=1, max_seq=256))
    prompt = tok.encode_chat([{"role": "user", "content": "Describe a sunrise over the sea."}])
    plain = Engine(runner, tok, EngineConfig(max_batch=1)).generate([prompt], SamplingParams(max_tokens=48))[0]
    return runner, tok, prompt, plain.output_ids


@pytest.mark.parametrize("wrong", [True, False])
def test_engine_gate_settles_on_the_faster_arm(setup, wrong):
    runner, tok, prompt, plain = setup
    gate = SpeculationGate(explore_every=8, warmup_steps=3, explore_run=2)
    drafter = _Script(plain, wrong=wrong, delay_s=0.2 if wrong else 0.0)
    eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=8), drafter=drafter, gate=gate)
    seq = eng.generate([prompt], SamplingParams(max_tokens=48, ignore_eos=True))[0]
    assert seq.output_ids == plain[: len(seq.output_ids)] and len(seq.output_ids) == 48
    # What /metrics exports: the averages the gate chose by, for one decoding request.
    rates = eng.speculation_stats()["gate_rates"]
    assert set(rates) == {"1"} and min(rates["1"].values()) > 0, rates
    spec_faster = rates["1"]["speculative"] > rates["1"]["plain"]
    assert spec_faster != wrong, rates
    if wrong:  # 0.2 s of drafting for nothing: plain decoding after the warm-up, a few probes
        assert gate.plain_steps > 3 * gate.speculative_steps, (gate.plain_steps, gate.speculative_steps)
    else:  # free, always-accepted drafts: 9 tokens per step instead of 1
        assert gate.speculative_steps > gate.plain_steps
        assert seq.metrics.num_accepted_tokens > 0


def test_a_gate_set_aside_lets_every_step_speculate_and_learns_nothing(setup):
    """A pinned policy with ``speculation_gate`` off (the verifier sets ``gate_enabled``): a gate
    measured to prefer plain decoding is neither asked nor told, and every step speculates."""
    runner, tok, prompt, plain = setup
    gate = SpeculationGate(explore_every=4, warmup_steps=1, explore_run=2)
    for spec, seconds in [(True, 60.0), (False, 0.001)] * 2:  # speculation measured hopeless
        gate.record(1, spec, 1.0, seconds)
    counts = (gate.speculative_steps, gate.plain_steps, gate.rates())
    drafter = _Script(plain, wrong=False, delay_s=0.0)
    eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=4), drafter=drafter, gate=gate)
    eng.gate_enabled = False
    seq = eng.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert seq.output_ids == plain[:40]
    assert seq.metrics.num_drafts == eng.num_steps - 1 > 0  # every step after the prompt's speculated
    assert (gate.speculative_steps, gate.plain_steps, gate.rates()) == counts
    eng.gate_enabled = True  # back in force: the gate chooses plain steps again
    seq = eng.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert seq.output_ids == plain[:40] and gate.plain_steps > counts[1]


def test_remote_drafter_drafts_nothing_for_plain_steps(setup):
    """The gate chooses the next step's arm before the step's tokens go to the draft worker, so a
    worker is asked for a block only ahead of speculative steps (it used to draft after every
    step, busy for nothing while the verifier decoded plainly).  Output stays plain decoding's."""
    from dspark.workers.draft_worker import DraftWorkerServer
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig

    runner, tok, prompt, plain = setup
    server = DraftWorkerServer(lambda: _Script(plain, wrong=True, delay_s=0.1)).start()  # slow, never right
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="scripted"), block_len=4)
    try:
        gate = SpeculationGate(explore_every=4, warmup_steps=1, explore_run=2)
        for spec, seconds in [(True, 60.0), (False, 0.001)] * 2:  # speculation measured hopeless, plain
            gate.record(1, spec, 1.0, seconds)  # fast: plain steps, with runs of speculative probes
        eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=4), drafter=drafter, gate=gate)
        seq = eng.generate([prompt], SamplingParams(max_tokens=48, ignore_eos=True))[0]
        assert seq.output_ids == plain[: len(seq.output_ids)] and len(seq.output_ids) == 48
        assert gate.plain_steps >= 2 * gate.speculative_steps > 0, (gate.plain_steps, gate.speculative_steps)
        # One block per speculative step, at most: none for the plain ones.
        assert 0 < server.servicer.blocks_served <= gate.speculative_steps, (
            server.servicer.blocks_served, gate.speculative_steps, gate.plain_steps)
    finally:
        drafter.close()
        server.stop()


class _Recording(_Script):
    """A scripted drafter that notes, per block, how many tokens its request had output."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(script, wrong=True, delay_s=0.0)
        self.drafted_at: list[tuple[int, int]] = []  # (output tokens, drafts asked for)

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        self.drafted_at += [(len(s.output_ids), block_len) for s in seqs]
        return super().propose(seqs, block_len)


def test_no_block_is_drafted_for_a_request_with_no_draft_left_to_verify(setup):
    """At its last token a request verifies no draft: its step decodes plainly, so the worker
    drafts it nothing (it used to draft a block for nobody after the step before; under load the
    block was served before the request closed, one more block than speculative steps).  A
    request near its end is asked the step's depth like every other (one batch on the worker);
    the step trims its block to what it may emit."""
    from dspark.workers.draft_worker import DraftWorkerServer
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig

    runner, tok, prompt, plain = setup
    drafters: list[_Recording] = []
    server = DraftWorkerServer(lambda: drafters.append(_Recording(plain)) or drafters[-1]).start()
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="scripted"), block_len=4)
    n = 12
    try:
        eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=4), drafter=drafter)  # no gate
        seq = eng.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        assert seq.output_ids == plain[:n]
        time.sleep(0.3)  # a block asked for at the end would be drafted by now
        drafted_at = [d for rec in drafters for d in rec.drafted_at]
        # Wrong drafts: one token per step, a block for each of tokens 2 .. n-1, none for the last.
        assert [k for k, _ in drafted_at] == list(range(1, n - 1)), drafted_at
        assert all(depth == 4 for _, depth in drafted_at), drafted_at
        assert server.servicer.blocks_served == n - 2
    finally:
        drafter.close()
        server.stop()


def test_a_request_that_does_not_speculate_is_never_drafted_for(setup):
    """``speculative: false`` beside a speculative request: the draft worker serves blocks for
    the speculative one only (it used to draft for both every step, and receive the plain one's
    tokens, on cores it may share with the verifier)."""
    from dspark.workers.draft_worker import DraftWorkerServer
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig

    runner, tok, prompt, plain = setup
    server = DraftWorkerServer(lambda: _Script(plain, wrong=False, delay_s=0.0)).start()
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="scripted"), block_len=4)
    try:
        eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=4), drafter=drafter)
        seq = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True, speculative=False))[0]
        assert seq.output_ids == plain[:24] and seq.metrics.num_drafts == 0
        assert server.servicer.blocks_served == 0
        seq = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0]
        assert seq.output_ids == plain[:24] and seq.metrics.num_drafts > 0
        assert server.servicer.blocks_served > 0  # the same worker drafts for a speculative request
    finally:
        drafter.close()
        server.stop()


def test_steps_of_requests_that_do_not_speculate_teach_the_gate_nothing(setup):
    """Requests with ``speculative: false`` leave the gate unasked and its averages untouched:
    counted as speculative steps, they gave speculation plain decoding's speed, and a gate that
    had measured speculation slower took it up again.  A speculative request is gated as before."""
    runner, tok, prompt, plain = setup
    gate = SpeculationGate(explore_every=4, warmup_steps=1, explore_run=2)
    for spec, seconds in [(True, 0.5), (False, 0.05)] * 2:  # speculation measured 10x slower
        gate.record(1, spec, 1.0, seconds)
    before = (gate.speculative_steps, gate.plain_steps, gate.rates())
    drafter = _Script(plain, wrong=False, delay_s=0.0)
    eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=4), drafter=drafter, gate=gate)
    seq = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True, speculative=False))[0]
    assert seq.output_ids == plain[:24] and seq.metrics.num_drafts == 0
    assert (gate.speculative_steps, gate.plain_steps, gate.rates()) == before
    seq = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    assert seq.output_ids == plain[:24] and gate.plain_steps > before[1]


class _Late(_Script):
    """An asynchronous drafter of correct drafts whose blocks for ``late`` requests miss the first
    ask at each position: those requests sit a step out (others are ready) or the engine waits
    (nobody is), ``wait_s`` per wait for blocks."""

    def __init__(self, script: list[int], late: set[str], wait_s: float) -> None:
        super().__init__(script, wrong=False, delay_s=0.0)
        self.late, self.wait_s, self.asked = late, wait_s, set()

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock | None]:
        blocks = super().propose(seqs, block_len)
        out = []
        for seq, blk in zip(seqs, blocks):
            key = (seq.request_id, seq.num_cached)
            out.append(None if seq.request_id in self.late and key not in self.asked else blk)
            self.asked.add(key)
        return out

    def wait_for_blocks(self, timeout: float) -> None:
        time.sleep(self.wait_s)


def test_engine_charges_late_blocks_to_speculation(setup, model_fp32):
    """A request whose block is late sits the step out: the step counts it (it emitted nothing)
    in the bucket the gate chose for, not in a smaller bucket of the requests that were ready,
    which made speculative steps look faster than they were."""
    _, tok, prompt, plain = setup
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=4, max_seq=256))
    gate = SpeculationGate(explore_every=100, warmup_steps=1)
    drafter = _Late(plain, late={"req-0"}, wait_s=0.0)
    eng = Engine(runner, tok, EngineConfig(max_batch=4, block_len=4, max_block_wait_s=0.0), drafter=drafter, gate=gate)
    seqs = eng.generate([prompt] * 4, SamplingParams(max_tokens=24, ignore_eos=True))
    assert all(s.output_ids == plain[:24] for s in seqs)
    # 4 decoding (bucket 3) while req-0 lags, then req-0 alone (judged as 3 for GATE_WINDOW
    # steps, then as 1); never 3 counted as 2-3.
    assert 3 in gate.rates() and 2 not in gate.rates(), gate.rates()


def test_engine_charges_waits_for_blocks_to_speculation(setup):
    """Steps that only waited for a late block (no forward) are part of the next speculative
    step's time: here 1 s per step, so speculation cannot measure above 5 tokens per second."""
    runner, tok, prompt, plain = setup
    gate = SpeculationGate(explore_every=100, warmup_steps=1)
    drafter = _Late(plain, late={"req-0"}, wait_s=1.0)
    eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=4), drafter=drafter, gate=gate)
    seq = eng.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert seq.output_ids == plain[:16]
    spec_rate = gate.rates()[1][0]
    assert 0 < spec_rate <= 5 / 1.0, gate.rates()


class _SlowToHear(_Script):
    """Correct drafts at no cost, but hearing a step's tokens ahead of a speculative step (a remote
    drafter copies the features and sends them for the next block) takes ``hear_s``."""

    def __init__(self, script: list[int], hear_s: float) -> None:
        super().__init__(script, wrong=False, delay_s=0.0)
        self.hear_s = hear_s

    def observe(self, seq: Sequence, token_ids, features=None, num_verified=None) -> None:
        if seq.output_ids and seq.wants_block:
            time.sleep(self.hear_s)


def test_engine_charges_the_drafter_hearing_a_step_to_speculation(setup):
    """The work after a step that feeds the next block (the drafter hearing the step's tokens) is
    part of the next step's seconds: it ran after the gate was told of its own step, and left out
    it made speculation look faster than it was (through the cluster at sixteen requests, 2-8% of
    the wall time of adaptive slices, against 1% for plain decoding).  Here 1 s per speculative
    step, so speculation cannot measure above 5 tokens per second, and the gate settles on plain
    decoding."""
    runner, tok, prompt, plain = setup
    gate = SpeculationGate(explore_every=100, warmup_steps=1)
    eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=4), drafter=_SlowToHear(plain, 1.0), gate=gate)
    seq = eng.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert seq.output_ids == plain[:16]
    spec_rate, plain_rate = gate.rates()[1]
    assert 0 < spec_rate <= 5 / 1.0 < plain_rate, gate.rates()
    assert gate.plain_steps > gate.speculative_steps
