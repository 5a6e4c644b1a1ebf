"""Whether this step should speculate at all: measured throughput, speculative vs plain.

The verification budget (``budget_policy.AdaptiveBudget``) decides how much of each block to
verify once the blocks exist; by then drafting has been paid for.  Whether drafting pays in the
first place depends on things a profiled cost table does not see: what the drafter costs on
this hardware (it may share the verifier's cores), the verify step at the real context lengths,
and how often the drafts are accepted for today's traffic.  So the gate measures both arms:

* for each batch-size bucket (1, 2-3, 4-7, ... decoding requests) it keeps exponential moving
  averages of tokens emitted per step and seconds per step, once for steps that speculated and
  once for plain steps.  A step counts every request it was chosen for (one whose block came
  late and sat the step out emitted nothing) and its seconds include the steps before it that
  only waited for blocks: both are costs of speculating.  Its seconds also include the work
  after the step before it that prepared it (the drafter hearing that step's tokens, which
  follows the report of that step): every step carries its own arm's, and ahead of a
  speculative step it is the larger;
* only steady state is measured.  The first step of an arm after the other one (a settling
  step) is left out of both averages: the first speculative step after a plain stretch waits
  for every request's block at once (measured through the cluster at 16 requests: 11 tokens/s
  against 59 in steady state), which is the cost of switching, not of either arm;
* each step it keeps the arm with the higher tokens per second, switching only when the other
  is ahead by the bucket's margin (a switch costs a settling step): two standard errors of the
  difference of the two averages, from the spread of the steps they average, between
  ``min_margin`` (2%) and ``confirm_margin`` (10%).  A lone request's speculative steps emit 1
  to 8 tokens and keep the 10%; sixty-four requests' steps vary by a few percent, and a fixed
  10% held speculation there at 0.94x of plain decoding by the gate's own figures, for whole
  slices (adaptive at 0.93x of plain per user).  Exploration takes the other
  arm for a run of ``explore_run`` steps (one settling, the rest measured; their mean replaces
  that arm's old average) every ``explore_every``-th step of a bucket.  A run whose arm came out
  clearly behind (by ``confirm_margin``) lengthens that interval, up to ``max_explore_every``, so
  a settled choice pays little for its probes: 2x just past the margin, up to 8x for a gap of
  three margins, since the further behind an arm is the more each probe costs and the less
  likely the next one is to change the choice (at 64 requests through the cluster speculation
  ran at 0.7x of plain, and doubling from 16 took some 240 steps, a minute and a half there, to
  reach the longest interval).  A run whose arm came out ahead is extended by as many steps,
  and again while it stays ahead (``max_extensions`` times at most); the gate switches only if
  the longer sample leads by the margin: four steps are a noisy sample (a speculative step
  emits 1 to 8 tokens), and through the cluster at 4 requests, with speculation at 0.77x of
  plain, a lucky run switched the gate to speculation for some 150 steps.  Runs of an arm that
  read ahead inside the margin used to end after their four steps: at sixty-four requests
  through the cluster the margin held speculation (its steps emit 75 to 119 tokens) while
  plain decoding's runs led it by 5-15%, so plain decoding ran in only 12-23% of the steps;
  a run now goes on while its arm reads ahead (up to 17 steps with the defaults).  A bucket
  on its own rates switches only at the end of a run, on figures of both arms from the same
  stretch: when the incumbent's own average falls behind the other's
  by the margin, the gate runs the other arm at once (``explore_every`` steps after the last
  run at the soonest) instead of switching (a bucket deciding by another's rates, or a run
  that measured nothing, switches on the figures as they stand).  The incumbent's average
  follows the host from step to step, the other's dates from its last run, and a slower spell
  of the whole host (a shared one) looked like the incumbent falling behind: simulated at
  sixteen requests with speculation at 0.8x of plain and the host at half speed for 200 steps,
  the gate switched to speculation, back three steps later and ran it again 16 steps on (two
  stretches, four settling steps); now it runs speculation once and stays on plain decoding.
  A switch starts the new incumbent's probes at ``explore_every`` again.  A close run
  (the arms within the margin, so it could not have moved the choice) that measured
  ``MIN_SPREAD_STEPS`` steps of its arm doubles the interval (one that measured fewer leaves
  it: at sixty-four requests a run of plain decoding fell into a slice's drain, was judged on
  its one step at the bucket's batch size, and the doubled interval held speculation at 0.9x
  of plain through the next slice):
  resetting on every close sample kept a clear but moderate lead (plain at 0.8x speculation at 4
  requests through the cluster) probing every 16 steps, 18% of all steps; keeping the interval
  kept arms that stay within the margin probing every 16 steps for good, and each run of the
  second arm costs two settling steps (simulated with speculation at 0.95x of plain decoding and
  a settling step at a quarter of the rate: 12% of the steps speculated, now under 5%).
* speculation's rate is discounted by ``spec_edge`` (3%) wherever the arms are compared: its
  drafting runs on cores the verifier's clock does not see (a draft worker sharing the host with
  the HTTP proxy, the router and the clients), so a tie goes to plain decoding.  At sixty-four
  requests through the cluster the gate measured the two arms within a few percent of each other
  and speculated in 87% of the steps, while the clients received 0.94x and 1.01x of plain
  decoding's throughput in two runs of the same code.  Simulated with steady steps (8% spread)
  and speculation at 1.00x of plain decoding, the gate speculates in a quarter of the steps
  instead of 85%; at 1.03x it still does in 85% (1.02x of plain), and from 1.06x as before.
* the engine asks with the largest of the step's batch size and the last few steps'
  (``engine.GATE_WINDOW``), so a batch that shrinks for a step or two keeps its bucket's
  choice; it reports such a step under the bucket of the batch it ran.  Under a closed loop a
  finished request is replaced two steps later, and at 4 requests those dips to 3 were decided
  by the 2-3 bucket (mostly unmeasured steps), each one a switch to the other arm and back:
  two settling steps.
* a bucket not yet measured on both arms decides from the nearest one that is, and its own
  exploration runs measure it (batch sizes seen only for a step or two while finished requests
  are replaced never completed a warm-up: their steps are mostly settling steps or share a
  prompt chunk); with no measured bucket, both arms warm up.  It borrows the nearest bucket's
  incumbent arm.  Speculation pays less the larger the batch, so a choice of plain decoding by
  a smaller bucket (or of speculation by a larger one) can only be stronger here: it is taken
  with that bucket's probe interval (through the cluster, sixteen requests after four used to
  pay a run at their first step and another 16 steps in, each about a tenth of a 10-second
  slice at 0.55x of plain).  Any other borrowed choice is a guess, and the bucket starts its
  first run at its first step: after one-request traffic, sixteen requests borrowed the
  one-request choice and speculated at 0.64x of plain for 15 steps, until the run due 16 steps
  in measured plain decoding there.  A guess is not an incumbent: once the bucket has measured
  both arms itself it takes the leader of its own rates, with no margin.  Four requests after
  one borrowed speculation, and with their steps of the two arms within 2% of each other the
  margin kept that guess for good (through the cluster: speculation in 89% of the steps, 0.91x
  plain decoding's throughput).  A bucket between two measured ones guesses from both:
  speculation's rate relative to plain decoding's, interpolated between them.  And a run is
  judged only on the bucket's own measurements: the eight-to-fifteen requests of a sixteen-request
  closed loop's ramp and drain had their first run fall on steps that all shared a prompt chunk,
  were judged on the smaller bucket's rates, backed off 128 steps and never measured plain
  decoding there.

Lossless: the choice for step t depends only on steps before t, never on the tokens drafted at
step t, so it cannot bias which drafts get verified (the condition of the paper's Appendix A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Arm:
    tokens: float = 0.0  # EMA of tokens emitted per step
    seconds: float = 0.0  # EMA of wall seconds per step
    steps: int = 0  # steps measured in all
    fresh: int = 0  # steps measured since the average (re)started
    step_rate: float = 0.0  # EMA of each step's own tokens per second
    step_rate_sq: float = 0.0  # EMA of its square: the spread of single steps' rates

    def add(self, tokens: float, seconds: float, decay: float) -> None:
        """The mean of the steps since the (re)start until there are 1 / (1 - decay), then the EMA."""
        self.fresh += 1
        w = max(1 - decay, 1 / self.fresh)
        self.tokens += w * (tokens - self.tokens)
        self.seconds += w * (seconds - self.seconds)
        r = tokens / seconds
        self.step_rate += w * (r - self.step_rate)
        self.step_rate_sq += w * (r * r - self.step_rate_sq)
        self.steps += 1

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def relative_variance(self, decay: float) -> float | None:
        """The variance of this average relative to its square, from the spread of the steps it
        averages (None with fewer than ``MIN_SPREAD_STEPS`` steps): the mean of n steps while
        there are fewer than 1 / (1 - decay), then the EMA's, w / (2 - w) of a step's."""
        if self.fresh < MIN_SPREAD_STEPS or self.step_rate <= 0:
            return None
        n = self.fresh
        spread = max(0.0, self.step_rate_sq - self.step_rate**2) * n / (n - 1)  # unbiased while a mean
        w = 1 - decay
        return spread / self.step_rate**2 * max(1 / n, w / (2 - w))


MIN_SPREAD_STEPS = 4  # steps an average needs before its spread sets the margin (a run measures 4)


@dataclass
class _Probe:
    """Exploration state of one bucket."""

    every: int  # steps between exploration runs (doubles while runs confirm the incumbent)
    tick: int = 0  # steps since the last run
    left: int = 0  # steps of the current run still to take
    arm: bool = False  # the arm the current run explores
    judge: bool = False  # a run ended: compare the arms at the next step
    extended: int = 0  # times the current run was extended (its arm kept leading)
    best: bool | None = None  # the incumbent arm (None: none yet)
    guess: bool = False  # ``best`` was borrowed from another bucket as a guess (see ``_new_probe``)
    probe_now: bool = False  # start a run at the next choice (a bucket that borrows another's figures)


class SpeculationGate:
    """Chooses speculative or plain decoding per step from measured throughput.

    Example (speculative steps emit 1.5 tokens in 40 ms, plain ones 1 token in 25 ms; the
    first step of each arm only settles, and is not measured):
        >>> g = SpeculationGate(explore_every=4, warmup_steps=1, explore_run=2)
        >>> [(g.speculate(1), g.record(1, True, 1.5, 0.040))[0] for _ in range(2)]
        [True, True]
        >>> [(g.speculate(1), g.record(1, False, 1.0, 0.025))[0] for _ in range(2)]
        [False, False]
        >>> [g.speculate(1) for _ in range(6)]  # plain wins; the 4th step starts a run of 2
        [False, False, False, True, True, False]
    """

    def __init__(self, explore_every: int = 16, decay: float = 0.97, warmup_steps: int = 3,
                 explore_run: int = 5, max_explore_every: int = 256, confirm_margin: float = 0.1,
                 min_margin: float = 0.02, noise_z: float = 2.0, spec_edge: float = 0.03,
                 max_extensions: int = 3) -> None:  # fmt: skip
        if (explore_every < 2 or not 0 <= decay < 1 or warmup_steps < 1 or explore_run < 2
                or not 0 < confirm_margin < 1 or not 0 < min_margin <= confirm_margin or noise_z < 0
                or not 0 <= spec_edge < 1 or max_extensions < 1):  # fmt: skip
            raise ValueError("explore_every >= 2, 0 <= decay < 1, warmup_steps >= 1, explore_run >= 2, "
                             "0 < min_margin <= confirm_margin < 1, noise_z >= 0, 0 <= spec_edge < 1 and max_extensions >= 1 are required")
        self.explore_every = explore_every
        self.max_explore_every = max(explore_every, max_explore_every)
        self.explore_run = explore_run  # one settling step, then measured ones
        self.confirm_margin = confirm_margin  # largest lead a switch needs; how far behind a run's arm backs probes off
        self.min_margin = min_margin  # smallest lead a switch needs, however steady the steps
        self.noise_z = noise_z  # a switch needs a lead of this many standard errors of the arms' difference
        self.spec_edge = spec_edge  # speculation's rate is discounted by this fraction (see ``_rate``)
        self.max_extensions = max_extensions  # a run whose arm keeps leading goes on at most this many times
        self.decay = decay
        self.warmup_steps = warmup_steps
        self._arms: dict[tuple[int, bool], _Arm] = {}
        self._probes: dict[int, _Probe] = {}
        self._last: bool | None = None  # the arm of the last step recorded (any bucket)
        self.speculative_steps = 0
        self.plain_steps = 0
        self.settling_steps = 0  # steps left out of the averages (the first of an arm after the other)

    @staticmethod
    def bucket(num_requests: int) -> int:
        """1 -> 1, 2-3 -> 2, 4-7 -> 3, ...: batches whose step costs are alike."""
        return max(1, num_requests).bit_length()

    def speculate(self, num_requests: int) -> bool:
        """Whether the coming step (``num_requests`` decoding) should draft and verify."""
        b = self.bucket(num_requests)
        spec = self._arms.get((b, True), _Arm())
        plain = self._arms.get((b, False), _Arm())
        src = self._measured_bucket(b)
        if src is None:  # measure each arm a few times first (speculation first: why the drafter is here)
            choice = spec.steps < self.warmup_steps or plain.steps >= self.warmup_steps
        else:  # this bucket's rates, or the nearest measured bucket's until its exploration runs measure it
            probe = self._probes.get(b)
            if probe is None:
                probe = self._probes[b] = self._new_probe(b, src)
            if probe.guess and src == b:  # measured itself: the borrowed guess gets no margin
                probe.guess, probe.best = False, None
            choice = self._choose(b, probe, *self._rates_for(b, src), own=src == b)
        if choice:
            self.speculative_steps += 1
        else:
            self.plain_steps += 1
        return choice

    def _new_probe(self, b: int, src: int) -> _Probe:
        """Exploration state of bucket ``b``, first seen while ``src`` is the nearest measured one.

        Speculation pays less the larger the batch (a verification step grows with the rows it
        checks; a plain step barely does until the batch fills the hardware).  So when a smaller
        bucket chose plain decoding, or a larger one chose speculation, ``b`` borrows that choice
        with ``src``'s probe interval: the lead was confirmed there, and it can only be larger
        here.  Otherwise (a larger batch after a smaller one that speculates, and the reverse)
        the borrowed choice is a guess, and ``b`` starts its first run at once.  So is the choice
        of a lender in the middle of a run, or whose rates moved past the margin since its last
        choice (it would run the other arm next, and switch if the lead holds): ``b`` guesses the
        arm ``src``'s rates favour."""
        if src == b:
            return _Probe(self.explore_every)
        sp = self._probes.get(src)
        src_best = self._incumbent(None if sp is None else sp.best, self._rate(src, True), self._rate(src, False))
        settled = sp is not None and sp.best == src_best and not (sp.left or sp.judge)
        if settled and ((src < b and not src_best) or (src > b and src_best)):
            return _Probe(sp.every, best=src_best)
        return _Probe(self.explore_every, best=self._incumbent(None, *self._rates_for(b, src)), probe_now=True,
                      guess=True)

    def _rates_for(self, b: int, src: int) -> tuple[float, float]:
        """(speculative, plain) rates bucket ``b`` decides by: its own once measured (``src == b``).
        Until then, between two measured buckets, speculation's rate relative to plain decoding's
        interpolated between them (it falls as the batch grows: at four requests through the
        cluster the two arms tied, at sixteen speculation read 0.75x, and the eight-to-fifteen
        requests of a closed loop's ramp and drain borrowed the smaller bucket's speculation);
        else the nearest measured bucket's, ``src``.

            >>> g = SpeculationGate(warmup_steps=1, spec_edge=0.0)
            >>> for b, spec, plain in ((3, 1.05, 1.0), (5, 0.75, 1.0)):
            ...     g._arms[(b, True)], g._arms[(b, False)] = _Arm(spec, 1.0, 1), _Arm(plain, 1.0, 1)
            >>> [round(r, 2) for r in g._rates_for(4, 3)]
            [0.9, 1.0]
        """
        if src != b:
            done = self._measured()
            lo, hi = max((c for c in done if c < b), default=None), min((c for c in done if c > b), default=None)
            if lo is not None and hi is not None:
                ratio = [self._rate(c, True) / max(self._rate(c, False), 1e-12) for c in (lo, hi)]
                return ratio[0] + (ratio[1] - ratio[0]) * (b - lo) / (hi - lo), 1.0
        return self._rate(src, True), self._rate(src, False)

    def _incumbent(self, best: bool | None, spec_rate: float, plain_rate: float, margin: float | None = None) -> bool:
        """The arm to keep: ``best`` unless the other arm leads by ``margin`` (a fraction of the
        larger rate; default ``confirm_margin``): a switch costs a settling step, and a small lead
        may be noise.  The leader when there is no ``best``."""
        margin = self.confirm_margin if margin is None else margin
        if best is None or abs(spec_rate - plain_rate) > margin * max(spec_rate, plain_rate):
            return spec_rate >= plain_rate
        return best

    def margin(self, b: int) -> float:
        """The lead bucket ``b``'s own figures need for a switch: ``noise_z`` standard errors of
        the difference of its arms' averages, from the spread of the steps they average, between
        ``min_margin`` and ``confirm_margin``; ``confirm_margin`` while an arm has too few steps.

        A fixed 10% margin kept whichever arm a bucket held while the other led by less: at
        sixty-four requests through the cluster the gate held speculation at 0.94x of plain
        decoding by its own figures, whose steps varied by a few percent (64 tokens each, 8-12%
        in time), for whole slices.  A lone request's speculative steps emit 1 to 8 tokens: their
        average is noisy, and the margin stays at its largest there.

            >>> g = SpeculationGate()
            >>> for arm in (True, False):  # the first step of each arm settles, the rest are averaged
            ...     for k in range(41):
            ...         g.record(64, arm, 64.0, 0.30 + 0.01 * (k % 3))
            >>> round(g.margin(7), 3), g.margin(1)  # 64 tokens, 3% in time; one request: nothing yet
            (0.02, 0.1)
            >>> for k in range(41):  # 1 to 8 tokens a step
            ...     g.record(1, True, 1 + k % 8, 0.05)
            >>> for k in range(41):
            ...     g.record(1, False, 1.0, 0.03)
            >>> g.margin(1)
            0.1
        """
        rv = [self._arms.get((b, arm), _Arm()).relative_variance(self.decay) for arm in (True, False)]
        if None in rv:
            return self.confirm_margin
        return min(self.confirm_margin, max(self.min_margin, self.noise_z * (rv[0] + rv[1]) ** 0.5))

    def _rate(self, b: int, speculated: bool) -> float:
        """The rate the gate decides by: speculation's discounted by ``spec_edge``."""
        rate = self._arms.get((b, speculated), _Arm()).rate
        return rate / (1 + self.spec_edge) if speculated else rate

    def _measured_bucket(self, b: int) -> int | None:
        """``b`` if both its arms are measured ``warmup_steps`` times, else the nearest such bucket."""
        return min(self._measured(), key=lambda c: (abs(c - b), c), default=None)

    def _measured(self) -> list[int]:
        """The buckets whose arms are both measured ``warmup_steps`` times."""
        return [c for c in {k for k, _ in self._arms}
                if min(self._arms.get((c, arm), _Arm()).steps for arm in (True, False)) >= self.warmup_steps]

    def _choose(self, b: int, p: _Probe, spec_rate: float, plain_rate: float, own: bool = True) -> bool:
        """The better arm, or the explored one during a run; starts, ends and judges runs.

        ``own``: the rates are the bucket's own.  A run is judged only on them, and only if it
        measured a step of its arm: one whose steps all shared a prompt chunk or settled, or a
        bucket that borrows another's rates, learnt nothing about this bucket, and backing off
        on it would keep a wrong guess for ``max_explore_every`` steps."""
        if p.left:
            p.left -= 1
            p.judge = p.left == 0
            return p.arm
        lead = self.margin(b) if own else self.confirm_margin  # the lead a switch needs (see ``margin``)
        margin = self.confirm_margin * max(spec_rate, plain_rate)
        ran = self._arms.get((b, p.arm))
        ended = p.judge  # a run ended with the last step (judged below if it measured its arm)
        if p.judge and not (own and ran is not None and ran.fresh):  # the run measured nothing: no verdict
            p.judge, p.extended = False, 0
        if p.judge:  # the run just ended: behind or close backs off, ahead is confirmed
            p.judge = False
            explored, other = (spec_rate, plain_rate) if p.arm else (plain_rate, spec_rate)
            clear = explored - other > lead * max(spec_rate, plain_rate)
            more = p.extended < self.max_extensions and not (clear and p.extended)
            if explored > other and p.best is not None and more:
                # Ahead on a short sample: measure as many steps again (the arm's average goes
                # on from the run's steps) before paying for a switch, and again while it stays
                # ahead inside the margin; a clear lead confirmed by one extension switches.
                p.extended, p.left, p.judge = p.extended + 1, self.explore_run - 2, self.explore_run == 2
                return p.arm
            p.extended = 0
            if explored < (1 - self.confirm_margin) * other:
                p.every = min(self._backoff(explored, other) * p.every, self.max_explore_every)
            elif abs(explored - other) <= margin and ran.fresh >= MIN_SPREAD_STEPS:
                # Close on enough steps: the run could not have moved the choice.
                p.every = min(2 * p.every, self.max_explore_every)
        best = self._incumbent(p.best, spec_rate, plain_rate, lead)
        if best != p.best and p.best is not None and own and not ended:
            # The incumbent's average, which follows the host from step to step, fell behind the
            # other arm's, measured at its last run: a slower spell of the whole host looks the
            # same.  Measure the other arm now and switch only if it still leads (a run's verdict).
            # A run that measured nothing leaves the old figures: then they decide, as before.
            best, p.probe_now = p.best, p.tick >= self.explore_every or p.probe_now
        if best != p.best:  # a switch probes the old arm soon
            p.every, p.tick = self.explore_every, 0
        p.best = best
        p.tick += 1
        if p.tick < p.every and not p.probe_now:
            return best
        p.tick, p.arm, p.left, p.probe_now = 0, not best, self.explore_run - 1, False
        self._arms.setdefault((b, p.arm), _Arm()).fresh = 0  # measured long ago: the run's steps replace it
        return p.arm

    def _backoff(self, explored: float, other: float) -> int:
        """How many times longer to wait before the next run, after one whose arm came out
        clearly behind: 2 just past the margin, up to 8 for a gap of three margins or more (the
        probes of an arm at 0.7x of the other pay 0.3 of a step each; those of one at 0.9x, 0.1)."""
        gap = 1 - explored / other if other > 0 else 1.0
        return int(min(8, max(2, round((gap / self.confirm_margin) ** 2))))

    def record(self, num_requests: int, speculated: bool, tokens: int | float, seconds: float,
               measured: bool = True) -> None:  # fmt: skip
        """One step finished: ``tokens`` emitted by the ``num_requests`` decoding requests it was
        chosen for, in ``seconds``.  Report every step that decoded: one with ``measured`` False
        (a prompt chunk shared it) and the first of an arm after the other are not averaged, but
        they tell the gate which arm ran last."""
        settling, self._last = self._last != speculated, speculated
        if settling:
            self.settling_steps += 1
        if settling or not measured or not (0 < seconds < math.inf) or not math.isfinite(tokens):
            return  # a NaN would stay in the averages for good (and take the margin to its floor)
        self._arms.setdefault((self.bucket(num_requests), speculated), _Arm()).add(float(tokens), seconds, self.decay)

    @staticmethod
    def bucket_range(b: int) -> str:
        """The decoding requests bucket ``b`` covers, as a label: 1 -> "1", 3 -> "4-7".

            >>> [SpeculationGate.bucket_range(b) for b in (1, 2, 5)]
            ['1', '2-3', '16-31']
        """
        lo, hi = 1 << (b - 1), (1 << b) - 1
        return str(lo) if lo == hi else f"{lo}-{hi}"

    def rates_by_batch(self) -> dict[str, dict[str, float]]:
        """The averages the gate decides by, per batch-size range and arm (tokens per second;
        0 where an arm is not measured yet): what ``/metrics`` exports, so an operator sees why
        the gate speculates, or not, at each load."""
        return {self.bucket_range(b): {"speculative": spec, "plain": plain}
                for b, (spec, plain) in self.rates().items()}

    def rates(self) -> dict[int, tuple[float, float]]:
        """Per bucket: (speculative, plain) tokens per second measured so far (0: not yet)."""
        buckets = sorted({b for b, _ in self._arms})
        return {b: (self._arms.get((b, True), _Arm()).rate, self._arms.get((b, False), _Arm()).rate) for b in buckets}
