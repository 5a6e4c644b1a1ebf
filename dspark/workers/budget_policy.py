"""Confidence-scheduled verification on the verifier: cost profile + per-step budget.

* :class:`VerifyBudget` is what the engine asks each step (how many drafts of each block to
  verify); :func:`fixed_budget` verifies whole blocks; :class:`DepthAwareBudget` also says how
  deep to draft.
* :func:`profile_step_costs` measures, at start-up, how long one target forward takes as a
  function of the number of tokens it carries (the paper's SPS(B) curve) on this very hardware.
* :class:`AdaptiveBudget` is the engine's ``VerifyBudget``: from the drafts' confidences it forms
  survivals a_{r,j} = prod_{i<=j} c_{r,i} and lets the budget kernels choose how many of each
  block to verify (Algorithm 1 with its early stop, or the section-5.2 production variant), under
  the policy the global scheduler publishes (max block length, survival floor, mode, batch cap).
  It also says how deep the next blocks need be drafted (:meth:`AdaptiveBudget.draft_depth`): one
  position past the deepest it verified in recent steps, so a busy verifier that keeps only
  confident prefixes does not pay for drafting positions it would never verify.

The policy (:class:`~dspark.workers.scheduling.VerifyPolicy`) arrives from outside through
:meth:`AdaptiveBudget.set_policy` (the cluster owns Redis; workers never import it).  Swapping
the policy is one reference assignment, safe to do from another thread between engine steps.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from dspark.kernels.budget import select_budget_async, select_budget_greedy, survival
from dspark.workers.drafters.base import DraftBlock
from dspark.workers.runner import StepInput
from dspark.workers.scheduling import VerifyPolicy

log = logging.getLogger(__name__)


class VerifyBudget(Protocol):
    """Chooses how many draft tokens of each block to verify this step (one count per block)."""

    def __call__(self, blocks: list[DraftBlock], block_len: int) -> list[int]: ...


@runtime_checkable
class DepthAwareBudget(Protocol):
    """A budget that also says how many drafts the coming step's blocks need (the rest would not
    be verified, so nobody drafts them): ``AdaptiveBudget``.  Other budgets get whole blocks."""

    def __call__(self, blocks: list[DraftBlock], block_len: int) -> list[int]: ...

    def draft_depth(self, block_len: int) -> int: ...


def fixed_budget(blocks: list[DraftBlock], block_len: int) -> list[int]:
    """Verify every drafted token up to the block length."""
    return [min(len(b.token_ids), block_len) for b in blocks]


@dataclass
class CostModel:
    """Seconds per target step by token count, and drafting seconds per step (the figure used
    until the budget has timed drafting itself: see :meth:`AdaptiveBudget.observe_drafting`)."""

    token_counts: list[int]
    step_seconds: list[float]
    draft_seconds: float = 0.0
    measured_at: float = field(default_factory=time.time)

    def describe(self) -> str:
        """The profile as one line, e.g. ``1: 33.1, 2: 33.1, 8: 34.2``."""
        return ", ".join(f"{t}: {s * 1e3:.1f}" for t, s in zip(self.token_counts, self.step_seconds))

    def table(self, max_tokens: int) -> torch.Tensor:
        """step_time[T] for T = 0..max_tokens, linearly interpolated (extrapolated past the end)."""
        xs, ys = self.token_counts, self.step_seconds
        out = torch.empty(max_tokens + 1, dtype=torch.float64)
        for t in range(max_tokens + 1):
            if t <= xs[0]:
                out[t] = ys[0]
                continue
            i = next((k for k in range(1, len(xs)) if xs[k] >= t), len(xs) - 1)
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            out[t] = y0 + (y1 - y0) * (t - x0) / max(1, x1 - x0)
        return out


def profile_step_costs(runner, token_counts: list[int] | None = None, repeats: int = 3) -> CostModel:
    """Time one forward pass of T tokens (spread over requests of up to 8 tokens) for each T.

    Uses the runner's last cache slots with dummy tokens from position 0 and releases them after
    (a paged cache gives their blocks back); call it before serving (the slots are free then).

    Noise only ever adds time, so each count keeps its fastest run.  The runs are interleaved:
    after one warm-up pass over every count, ``repeats`` rounds time each count once, in
    alternating order, so a slow spell of a shared host lands on several counts rather than on
    every run of one.  The envelope is then taken from the largest count down (a count costs no
    more than the fastest larger one): one count timed during a slow spell would otherwise lift
    every count above it to its time, and a table flat from 1 to 8 tokens makes verification look
    free.
    """
    cache = runner.cache
    if token_counts is None:
        cap = cache.n_slots * 8
        # Every count a one-request verification can take (an anchor and up to 7 drafts: the
        # budget's choices at low load turn on a few milliseconds between them), then doublings.
        token_counts = sorted({t for t in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 512) if t <= cap} | {cap})
    steps = []
    for T in token_counts:
        per = 8
        n_req = min(cache.n_slots, -(-T // per))
        q_lens = ([per] * (T // per) + ([T % per] if T % per else []))[:n_req]
        slots = list(range(cache.n_slots - len(q_lens), cache.n_slots))
        steps.append((slots, StepInput([1] * sum(q_lens), slots, [0] * len(q_lens), q_lens,
                                       logits_rows=list(range(sum(q_lens))))))
    best = [float("inf")] * len(steps)
    for r in range(repeats + 1):  # round 0 warms up (compiles each shape); each run starts its slots over
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            slots, step = steps[i]
            t0 = time.perf_counter()
            runner.forward(step)
            took = time.perf_counter() - t0
            if r:
                best[i] = min(best[i], took)
            for slot in slots:
                runner.release_slot(slot)
    costs = CostModel(token_counts=list(token_counts), step_seconds=envelope_from_above(best))
    log.info("verification step costs (tokens: ms): %s", costs.describe())
    return costs


def envelope_from_above(seconds: list[float]) -> list[float]:
    """Non-decreasing step times from timings that noise only ever lengthens: each count costs
    no more than the fastest larger count.

        >>> envelope_from_above([0.045, 0.034, 0.036, 0.049])  # the 1-token run hit a slow spell
        [0.034, 0.034, 0.036, 0.049]
    """
    out = list(seconds)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


class AdaptiveBudget:
    """Per-step verification budget from confidences, a cost model and the current policy."""

    # Steps whose deepest verification bounds the next draft depth: long enough that one shallow
    # step does not cut the depth, short enough to follow load within a fraction of a second.
    DEPTH_WINDOW = 8
    # Every PROBE_EVERY-th step drafts the policy's whole depth whatever the window says (and,
    # for a lone request, verifies it whole: see ``observe_step``): the window alone can only
    # grow the depth by one past what was verified, so a budget that verified nothing for a while
    # (a busy spell, a run of unconfident drafts) would otherwise never see a deep block again,
    # and a block can pay as a whole where its first draft alone does not (the drafting cost is
    # shared by the block).
    PROBE_EVERY = 16

    # How far below the best expected throughput a deeper verification may go (the kernels'
    # ``slack``).  Where throughput is about flat in the depth, deeper is faster per user: the
    # requests whose drafts are accepted finish sooner.  Through the cluster at four requests,
    # fixed depth 4 led this budget (2.4-2.9 drafts verified a step) by 6% per user in every
    # sweep, while within 2% of it in aggregate.  Not for a lone request, whose speed is the
    # throughput, and never below plain decoding's expected throughput: at sixteen requests
    # speculation and plain decoding were within a few percent, and the slack took speculative
    # steps below plain ones (see ``select_budget_greedy``'s ``plain_seconds``).
    DEPTH_SLACK = 0.05

    def __init__(self, costs: CostModel, policy: VerifyPolicy, learn: bool = True) -> None:
        """``learn=False`` keeps ``costs`` as given: neither real steps nor in-process drafting
        change them (a cost curve set by hand, e.g. to make a test's budget verify a given way)."""
        self.slack = self.DEPTH_SLACK
        self.costs = costs
        self.policy = policy
        self.learn = learn
        self._base = self._profile = self._table = costs.table(4096)
        self._line = [0.0] * 5  # decayed sums w, wx, wy, wxx, wxy over one request's steps (x tokens, y seconds)
        self._slope: float | None = None  # the line's last relative slope fitted on enough steps
        self._step_ratio: dict[int, float] = {}  # EMA of real / profiled seconds, by range of counts
        self._last_seen: dict[int, int] = {}  # range -> the real step (of ``_observed``) that last ran it
        self._range_x: dict[int, float] = {}  # range -> EMA of log2 of the counts that ran in it
        self._observed = 0
        self._new_steps = 0  # steps observed since the table was last corrected
        self._history: collections.deque = collections.deque(maxlen=2)  # survivals of past steps
        self._deepest: collections.deque = collections.deque(maxlen=self.DEPTH_WINDOW)  # max verified per step
        self._draft_seconds: dict[int, float] = {}  # EMA of drafting seconds per step, by batch bucket
        self._draft_seen: set[int] = set()  # buckets whose first (warm-up) drafting step was left out
        self._overhead_seconds: dict[int, float] = {}  # EMA of a step's time outside forward and drafting, by bucket
        self.verified_tokens = 0
        self.steps = 0

    def set_policy(self, policy: VerifyPolicy) -> None:
        """Verify under ``policy`` from the next step on (its budget mode was checked when it was made)."""
        self.policy = policy

    def set_costs(self, costs: CostModel) -> None:
        self.costs = costs
        self._base = self._profile = self._table = costs.table(4096)
        self._line = [0.0] * 5
        self._slope = None
        self._step_ratio.clear()
        self._last_seen.clear()
        self._range_x.clear()

    # Real steps correct the profile every this many steps (a table of 4k entries is rebuilt then).
    CORRECT_EVERY = 8
    # Token counts up to this many share one correction: every count one request's verification
    # can take (an anchor and up to 7 drafts).  Past it, one correction per doubling.
    SHARED_UP_TO = 8
    # Per step, how far the correction of a range of counts that has not run for ``STALE_AFTER``
    # steps moves toward that of the range that did: what has not been measured for a while
    # falls back to the profile's shape at the level the real steps show (half-way about 70
    # steps after it went stale).  Ranges that all run now and then keep their own figures.
    RELAX = 0.01
    STALE_AFTER = 32

    # One request's steps fit the slope of the step's cost over 1 to SHARED_UP_TO tokens: a
    # least-squares line of seconds on tokens, each step's weight decaying by SLOPE_DECAY per
    # later step (half-life about 180 steps).  The line's relative slope replaces the profile's
    # shape over those counts once the fit holds SLOPE_MIN_WEIGHT steps' worth of weight spread
    # over counts at least SLOPE_MIN_SPREAD apart (a weighted variance of the counts), and
    # SLOPE_CLIP bounds each step's seconds around what the table says of its count (a stall of
    # the host is not a slope).
    # The last slope fitted stands while the steps since sit at too few counts (a budget that
    # verifies whole blocks every step, or a lone request that stopped speculating) until a
    # new profile; SLOPE_MAX bounds it (8 tokens at most 8x one).
    SLOPE_DECAY = 1.0 - 1.0 / 256
    SLOPE_MIN_WEIGHT = 64.0
    SLOPE_MIN_SPREAD = 0.5
    SLOPE_CLIP = 2.0
    SLOPE_MAX = 1.0
    # Whether the probe step verifies a lone request's whole block (see ``__call__``).
    VERIFY_WHOLE_ON_PROBE = True

    @classmethod
    def _range_of(cls, num_tokens: int) -> int:
        """0 for 1..SHARED_UP_TO tokens, then one range per doubling (9-16 -> 1, 17-32 -> 2, ...)."""
        return max(0, (max(num_tokens, cls.SHARED_UP_TO) - 1).bit_length() - (cls.SHARED_UP_TO - 1).bit_length())

    def observe_step(self, num_tokens: int, seconds: float, num_requests: int | None = None) -> None:
        """The engine ran a forward pass of ``num_tokens`` tokens in ``seconds``, after this
        budget chose that step's verification; ``num_requests`` decoding requests fed them
        (None: not told, or the step also ran a prompt chunk).

        The profile times each count from position 0, on dummy tokens, in one burst; a real step
        also attends over its requests' contexts, pays the engine's per-step work and shares the
        host with whatever else runs then.  So real steps scale the profile: each range of counts
        (1 to ``SHARED_UP_TO`` tokens, then a doubling at a time) keeps a moving average of real
        over profiled seconds, and every ``CORRECT_EVERY`` steps the table becomes the profile
        times that ratio, interpolated in log2 of the count between ranges (each past the first
        placed at the mean log2 of the counts that ran in it), the nearest range's beyond them,
        kept non-decreasing.

        Why ranges and not a ratio per count: this budget chooses the counts it then observes.  A
        count timed during a slow spell (on a shared host, or while a drafter on the same cores
        worked) looked dearer than its neighbours, was never chosen again and so never corrected:
        through the cluster at one request the table kept 5 tokens 35% dearer than 4 for hundreds
        of steps, while fixed depths 4 and 7 (5 and 8 tokens) ran steps as long as each other's.
        Within one request's counts the profile's own shape stands (measured alike for every
        count, in one burst), and a range that has not run for ``STALE_AFTER`` steps relaxes
        toward the range that did (``RELAX`` a step), so no range stays condemned by one bad spell.

        The profile's shape within those counts is the one figure real steps did not correct,
        and it alone decides how deep a lone request verifies: four start-up profiles in one
        process on a quiet host read 0% to 10% dearer at 8 tokens than at 1, one cluster's 17%,
        while the drafts past the fourth add about 4% to the tokens a step emits.  So one
        request's steps (``num_requests == 1``, 1 to ``SHARED_UP_TO`` tokens) also fit a line of
        seconds on tokens (see ``SLOPE_DECAY``), and once it holds enough steps spread over
        enough counts its relative slope becomes the profile's shape over those counts (kept
        equal to the profile at ``SHARED_UP_TO``, so the larger counts join it as before).  A
        line and not a ratio per count, for the reason above: a slow spell that falls on some
        counts moves the line a little (each step's seconds are bounded by ``SLOPE_CLIP``), it
        does not take counts out of the budget's choices for good; and every ``PROBE_EVERY``-th
        step verifies a lone request's whole block (see ``__call__``), so the deep end of the
        line is measured whatever the budget chooses.

            >>> b = AdaptiveBudget(CostModel([1, 8], [0.010, 0.012]), VerifyPolicy())
            >>> for _ in range(8): b.observe_step(8, 0.024)  # real 8-token steps take twice the profile
            >>> [round(float(b.step_table()[t]), 4) for t in (1, 8, 16)]  # 16: the profile's slope, doubled
            [0.02, 0.024, 0.0286]
        """
        if not self.learn or num_tokens < 1 or num_tokens >= len(self._profile) or not 0 < seconds < math.inf:
            return
        if num_requests == 1 and num_tokens <= self.SHARED_UP_TO:
            self._fit_line(num_tokens, seconds)
        ratio = seconds / max(float(self._profile[num_tokens]), 1e-9)
        k = self._range_of(num_tokens)
        old = self._step_ratio.get(k)
        self._step_ratio[k] = ratio if old is None else 0.9 * old + 0.1 * ratio
        x = math.log2(num_tokens)
        self._range_x[k] = x if old is None else 0.9 * self._range_x[k] + 0.1 * x
        self._observed += 1
        self._last_seen[k] = self._observed
        for other, seen in self._last_seen.items():
            if self._observed - seen > self.STALE_AFTER:
                self._step_ratio[other] += self.RELAX * (self._step_ratio[k] - self._step_ratio[other])
        self._new_steps += 1
        if self._new_steps >= self.CORRECT_EVERY:
            self._new_steps = 0
            self._reshape()
            self._table = self._corrected()

    def _fit_line(self, num_tokens: int, seconds: float) -> None:
        """Add one request's step to the decayed least-squares sums (its seconds bounded to
        ``SLOPE_CLIP`` times either side of the table's figure for its count)."""
        ref = max(float(self._table[num_tokens]), 1e-9)
        y = min(max(seconds, ref / self.SLOPE_CLIP), ref * self.SLOPE_CLIP)
        x = float(num_tokens)
        d = self.SLOPE_DECAY
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            self._line[i] = d * self._line[i] + v

    def one_request_slope(self) -> float | None:
        """How much dearer each token past the first makes one request's step, as a fraction of
        a 1-token step, from the fitted line (0 to ``SLOPE_MAX``); None until the fit has held
        enough steps over enough counts, and the last such figure while it does not.

            >>> b = AdaptiveBudget(CostModel([1, 8], [0.010, 0.017]), VerifyPolicy())
            >>> b.one_request_slope() is None
            True
            >>> for i in range(96): b.observe_step(1 + i % 8, 0.020 + 0.0002 * (i % 8), num_requests=1)
            >>> round(b.one_request_slope(), 4)  # 0.2 ms a token over 20 ms at one token
            0.01
        """
        w, sx, sy, sxx, sxy = self._line
        mx, my = sx / max(w, 1e-9), sy / max(w, 1e-9)
        var = sxx / max(w, 1e-9) - mx * mx
        if w >= self.SLOPE_MIN_WEIGHT and var >= self.SLOPE_MIN_SPREAD:
            slope = (sxy / w - mx * my) / var
            first = my + slope * (1.0 - mx)  # the line's seconds at one token
            # A line that reaches one token at no time (steep, fitted on deep counts) is as steep as allowed.
            self._slope = self.SLOPE_MAX if first <= 0.0 else min(self.SLOPE_MAX, max(0.0, slope / first))
        return self._slope

    def _reshape(self) -> None:
        """Give the profile the fitted line's relative slope over 1..SHARED_UP_TO tokens, equal
        to the start-up profile at SHARED_UP_TO (the start-up shape until the line holds).  The
        correction of those counts was averaged against the old shape: it is carried over at the
        counts that ran, so the table does not jump for the steps it takes the average to follow."""
        g = self.one_request_slope()
        if g is None:
            return
        n = self.SHARED_UP_TO
        counts = torch.arange(n + 1, dtype=torch.float64).clamp(min=1.0)
        new = self._base.clone()
        new[: n + 1] = self._base[n] * (1.0 + g * (counts - 1.0)) / (1.0 + g * (n - 1))
        if 0 in self._step_ratio:
            at = min(n, max(1, round(2.0 ** self._range_x[0])))
            self._step_ratio[0] *= float(self._profile[at]) / max(float(new[at]), 1e-12)
        self._profile = new

    def step_table(self) -> torch.Tensor:
        """Seconds per forward pass by token count, as the budget uses it now (profile x real/profile)."""
        return self._table

    def step_costs(self) -> dict[str, float]:
        """Seconds per forward pass for each count one request's verification can take (1 to
        ``SHARED_UP_TO`` tokens), as the budget uses them now: what sets how deep a lone request
        verifies (``dspark:verify_step_seconds``).

            >>> AdaptiveBudget(CostModel([1, 8], [0.010, 0.017]), VerifyPolicy()).step_costs()["4"]
            0.013
        """
        table = self._table  # replaced whole by the engine's thread, never changed in place
        return {str(t): round(float(table[t]), 6) for t in range(1, self.SHARED_UP_TO + 1)}

    def _corrected(self) -> torch.Tensor:
        ranges = sorted(self._step_ratio)
        # Range 0 covers 1..SHARED_UP_TO flat; each later range's ratio sits at the mean log2 of
        # the counts that ran in it (inside the range, so the points stay in order).
        xs = [math.log2(self.SHARED_UP_TO) if k == 0 else self._range_x[k] for k in ranges]
        ys = [self._step_ratio[k] for k in ranges]
        if ranges[0] == 0:
            xs, ys = [0.0, *xs], [ys[0], *ys]
        counts = np.log2(np.maximum(np.arange(len(self._profile)), 1))
        r = torch.from_numpy(np.interp(counts, xs, ys))
        table = self._profile * r
        return torch.flip(torch.cummin(torch.flip(table, [0]), 0).values, [0])  # no count dearer than a larger one

    def draft_depth(self, block_len: int) -> int:
        """How many drafts the coming step's blocks need: at most the policy's depth, and one past
        the deepest verification of the last ``DEPTH_WINDOW`` steps (so the depth can grow by one
        per step when confidences rise), except every ``PROBE_EVERY``-th step, which drafts the
        policy's depth.  Depends only on past steps, never on the coming drafts.

        Before any step it is the policy's depth:
            >>> AdaptiveBudget(CostModel([1], [0.01]), VerifyPolicy(max_block_len=5)).draft_depth(7)
            5
        """
        G = max(0, min(block_len, self.policy.max_block_len))
        if self.policy.budget_mode == "fixed" or not self._deepest or self.steps % self.PROBE_EVERY == 0:
            return G
        return min(G, max(self._deepest) + 1)

    @staticmethod
    def _bucket(num_requests: int) -> int:
        return max(1, num_requests).bit_length()  # 1, 2-3, 4-7, ...: batches drafted at alike cost

    def observe_drafting(self, num_requests: int, seconds: float) -> None:
        """Drafting for ``num_requests`` requests cost the engine ``seconds`` this step, reported
        after this step's verification was chosen: its own time for drafting in its process, the
        time it waited for the blocks of a remote drafter (near nothing under load, where the
        worker drafts while other requests verify; the whole round trip at one request).  A
        bucket's first report is left out (it may carry one-off warm-up costs, which would make
        verification look free for dozens of steps).

            >>> b = AdaptiveBudget(CostModel([1], [0.01]), VerifyPolicy())
            >>> b.observe_drafting(1, 0.5)  # the first drafting step of one request: warm-up
            >>> b.observe_drafting(1, 0.004); b.observe_drafting(1, 0.002); round(b.drafting_seconds(1), 6)
            0.0036
            >>> b.drafting_seconds(3) == b.drafting_seconds(64) == b.drafting_seconds(1)  # the nearest bucket timed
            True
        """
        if not self.learn:
            return
        b = self._bucket(num_requests)
        if b not in self._draft_seen:
            self._draft_seen.add(b)
            return
        self._average_into(self._draft_seconds, num_requests, seconds)

    @classmethod
    def _average_into(cls, by_bucket: dict[int, float], num_requests: int, seconds: float) -> None:
        """Moving average (weight 0.2 for the newest) of ``seconds`` in ``num_requests``' bucket."""
        b = cls._bucket(num_requests)
        old = by_bucket.get(b)
        by_bucket[b] = seconds if old is None else 0.8 * old + 0.2 * seconds

    @classmethod
    def _nearest(cls, by_bucket: dict[int, float], num_requests: int, default: float) -> float:
        """The figure of ``num_requests``' bucket, else of the nearest bucket measured, else ``default``."""
        if not by_bucket:
            return default
        b = cls._bucket(num_requests)
        return by_bucket[min(by_bucket, key=lambda c: (abs(c - b), c))]

    def drafting_seconds(self, num_requests: int) -> float:
        """What drafting adds to a step of ``num_requests`` decoding requests: the EMA timed for
        its batch bucket (the nearest bucket timed, else the cost model's figure)."""
        return self._nearest(self._draft_seconds, num_requests, self.costs.draft_seconds)

    def observe_overhead(self, num_requests: int, seconds: float) -> None:
        """A step of ``num_requests`` decoding requests took ``seconds`` beyond its forward pass
        and its drafting: sampling and acceptance, handing out the tokens, telling the drafter,
        the engine loop until the next step.  Every step pays it once, whatever it verifies, so
        it belongs with drafting in the fixed part of a step: left out, each verified draft looks
        dearer than it is.

            >>> b = AdaptiveBudget(CostModel([1], [0.01]), VerifyPolicy())
            >>> b.observe_overhead(1, 0.010); b.observe_overhead(1, 0.005); round(b.overhead_seconds(1), 6)
            0.009
            >>> round(b.overhead_seconds(16), 6)  # the nearest bucket measured
            0.009
        """
        if self.learn and 0 <= seconds < math.inf:
            self._average_into(self._overhead_seconds, num_requests, seconds)

    def overhead_seconds(self, num_requests: int) -> float:
        """A step's time outside forward and drafting for ``num_requests`` decoding requests (the
        nearest bucket measured; 0 before any)."""
        return self._nearest(self._overhead_seconds, num_requests, 0.0)

    def __call__(self, blocks: list[DraftBlock], block_len: int) -> list[int]:
        pol = self.policy
        G = max(0, min(block_len, pol.max_block_len))
        B = len(blocks)
        if B == 0 or G == 0:
            return [0] * B
        lengths = [min(len(b.token_ids), G) for b in blocks]
        # Confidences clipped to [0, 1]; an undefined one (NaN), or a draft without one, counts as
        # no chance.  Every row holds G.
        conf = []
        for b, n in zip(blocks, lengths):
            row = [min(1.0, max(0.0, c)) if c == c else 0.0 for c in b.confidence[:n]]
            conf.append(row + [0.0] * (G - len(row)))
        surv = survival(conf, lengths)  # [B][G], zero past each block
        if pol.survival_floor > 0:
            surv = [[a if a >= pol.survival_floor else 0.0 for a in row] for row in surv]
        floor_lengths = [sum(1 for a in row if a > 0) for row in surv]
        # What every step pays whatever it verifies: drafting (by the requests that drafted) and the
        # engine's work outside the forward pass.
        # The slack goes no lower than plain decoding's throughput: a plain step pays the same
        # overhead outside its forward pass, and no drafting.
        plain_seconds = self.overhead_seconds(B)
        draft_seconds = self.drafting_seconds(sum(1 for b in blocks if b.token_ids)) + plain_seconds
        slack = self.slack if B > 1 else 0.0  # one request: its speed is the throughput, nothing to trade
        table = self._table.numpy()  # the table's own memory (CPU float64): the budget slices what it needs
        if pol.budget_mode == "fixed":
            out = floor_lengths
        elif pol.budget_mode == "algorithm1":
            out = select_budget_greedy(surv, table, draft_seconds, slack, plain_seconds).lengths
        elif len(self._history) < 2:
            # No settled survivals from two steps ago yet (a fresh verifier, or one that was
            # just switched to this mode).  The 5.2 capacity search must never look at the
            # block being verified (Appendix A: an argmax over its own survivals biases the
            # output), so the first steps use the lossless early-stop walk instead.
            out = select_budget_greedy(surv, table, draft_seconds, slack, plain_seconds).lengths
        else:
            out = select_budget_async(self._history[0], surv, table, draft_seconds, slack, plain_seconds).lengths
        self._history.append(surv)
        res = [min(int(x), f) for x, f in zip(out, floor_lengths)]
        self._deepest.append(max(res))  # what the budget chose, which the next depths follow
        if B == 1 and self.learn and self.VERIFY_WHOLE_ON_PROBE and self.steps and self.steps % self.PROBE_EVERY == 0:
            # The probe step (drafted to the policy's depth) verifies a lone request's whole
            # block, so one request's step cost is measured at the deep end however shallow the
            # budget verifies (see ``observe_step``).  Lossless: which step does so depends on
            # the step count and the batch size alone, and it verifies each block up to the
            # policy's survival floor, the rule of fixed mode; nothing looks at what verifying
            # these drafts will return.
            res = floor_lengths
        self.verified_tokens += sum(res)
        self.steps += 1
        return res
