"""Whether this step should speculate at all: measured throughput, speculative vs plain.

The verification budget (``budget_policy.AdaptiveBudget``) decides how much of each block to
verify once the blocks exist; by then drafting has been paid for.  Whether drafting pays in the
first place depends on things a profiled cost table does not see: what the drafter costs on
this hardware (it may share the verifier's cores), the verify step at the real context lengths,
and how often the drafts are accepted for today's traffic.  So the gate measures both arms:

* for each batch-size bucket (1, 2-3, 4-7, ... decoding requests) it keeps exponential moving
  averages of tokens emitted per step and seconds per step (drafting included), once for steps
  that speculated and once for plain steps;
* each step it picks the arm with the higher tokens per second, and every ``explore_every``-th
  step in a bucket it takes the other arm, so a drafter that starts paying (longer context,
  copy-heavy traffic) or stops paying is noticed.

Lossless: the choice for step t depends only on steps before t, never on the tokens drafted at
step t, so it cannot bias which drafts get verified (the condition of the paper's Appendix A).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Arm:
    tokens: float = 0.0  # EMA of tokens emitted per step
    seconds: float = 0.0  # EMA of wall seconds per step
    steps: int = 0

    def add(self, tokens: float, seconds: float, decay: float) -> None:
        if self.steps == 0:
            self.tokens, self.seconds = tokens, seconds
        else:
            self.tokens = decay * self.tokens + (1 - decay) * tokens
            self.seconds = decay * self.seconds + (1 - decay) * seconds
        self.steps += 1

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class SpeculationGate:
    """Chooses speculative or plain decoding per step from measured throughput.

    Example (speculative steps emit 1.5 tokens in 40 ms, plain ones 1 token in 25 ms):
        >>> g = SpeculationGate(explore_every=4, warmup_steps=1)
        >>> g.speculate(1), g.record(1, True, 1.5, 0.040)
        (True, None)
        >>> g.speculate(1), g.record(1, False, 1.0, 0.025)
        (False, None)
        >>> [g.speculate(1) for _ in range(4)]  # plain wins; every 4th step explores
        [False, False, False, True]
    """

    def __init__(self, explore_every: int = 16, decay: float = 0.9, warmup_steps: int = 3) -> None:
        if explore_every < 2 or not 0 <= decay < 1 or warmup_steps < 1:
            raise ValueError("explore_every >= 2, 0 <= decay < 1 and warmup_steps >= 1 are required")
        self.explore_every = explore_every
        self.decay = decay
        self.warmup_steps = warmup_steps
        self._arms: dict[tuple[int, bool], _Arm] = {}
        self._ticks: dict[int, int] = {}
        self.speculative_steps = 0
        self.plain_steps = 0

    @staticmethod
    def bucket(num_requests: int) -> int:
        """1 -> 1, 2-3 -> 2, 4-7 -> 3, ...: batches whose step costs are alike."""
        return max(1, num_requests).bit_length()

    def speculate(self, num_requests: int) -> bool:
        """Whether the coming step (``num_requests`` decoding) should draft and verify."""
        b = self.bucket(num_requests)
        spec = self._arms.get((b, True), _Arm())
        plain = self._arms.get((b, False), _Arm())
        # Measure each arm a few times first (speculation first: it is why the drafter is here).
        if spec.steps < self.warmup_steps:
            choice = True
        elif plain.steps < self.warmup_steps:
            choice = False
        else:
            tick = self._ticks[b] = self._ticks.get(b, 0) + 1
            choice = spec.rate >= plain.rate
            if tick % self.explore_every == 0:
                choice = not choice
        if choice:
            self.speculative_steps += 1
        else:
            self.plain_steps += 1
        return choice

    def record(self, num_requests: int, speculated: bool, tokens: int | float, seconds: float) -> None:
        """One decode step finished: ``tokens`` emitted over all requests in ``seconds``."""
        if seconds <= 0:
            return
        self._arms.setdefault((self.bucket(num_requests), speculated), _Arm()).add(float(tokens), seconds, self.decay)

    def rates(self) -> dict[int, tuple[float, float]]:
        """Per bucket: (speculative, plain) tokens per second measured so far (0: not yet)."""
        buckets = sorted({b for b, _ in self._arms})
        return {b: (self._arms.get((b, True), _Arm()).rate, self._arms.get((b, False), _Arm()).rate) for b in buckets}
