"""The global scheduler: cluster-wide demand in Redis -> a verification policy per verifier group.

Every ``interval_s`` it reads each group's demand (active and queued requests, tokens per step,
step latency, acceptance), its capacity (KV slots, from its heartbeat) and the routers' arrival
rate, and publishes a versioned policy per group (key + pub/sub poke; see ``redis_keys``):

* idle (pressure <= ``idle_pressure``): deep verification — the whole block, no survival floor;
* busy (pressure >= ``busy_pressure``, or requests queuing): only confident prefixes — a short
  maximum block and a survival floor, so batch capacity goes to the tokens likely to survive;
* in between, both move linearly.  Pressure is (active + queued) / slots, smoothed over time,
  plus the arrivals expected within one step.

Within the policy, each verifier still picks per-step budgets from its own profiled cost table
(Algorithm 1), so the scheduler sets the envelope and the verifier the exact admission.
A per-user speed target, when set, caps the batch of a group whose users fall below it.
An operator may pin one policy for every group (``RedisState.pin_policy``; ``dspark policy pin``):
while the pin stands the scheduler publishes it instead, and it still tracks the pressure.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from dspark.workers.scheduling import Demand, VerifyPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the global scheduler; every field has a default."""

    interval_s: float = 0.5  # how often demand is read and policies published
    max_block_len: int = 7  # deepest verification (the drafters' block length)
    min_block_len: int = 2  # shortest maximum block under full load
    max_survival_floor: float = 0.5  # survival floor at full load
    idle_pressure: float = 0.25  # at or below: deep verification
    busy_pressure: float = 1.0  # at or above: shortest verification
    smoothing: float = 0.5  # weight of the newest pressure reading (EMA)
    budget_mode: str = "algorithm1"  # per-step admission the verifiers use
    target_tokens_per_s_per_user: float = 0.0  # per-user speed target (0: none)
    default_slots: int = 32  # capacity assumed for a group that did not report one


def pressure_of(demand: Demand, slots: int, arrivals_per_s: float = 0.0, groups: int = 1) -> float:
    """Load of one group in [0, inf): 1.0 means every slot busy, above 1 requests are queuing."""
    expected = arrivals_per_s / max(1, groups) * max(demand.step_latency_s, 0.0)
    return (demand.active_requests + demand.queued_requests + expected) / max(1, slots)


def compute_policy(
    pressure: float, cfg: SchedulerConfig, demand: Demand | None = None, slots: int = 0
) -> VerifyPolicy:
    """The policy for a group at ``pressure`` (pure function; the version is set on publish).

    Example: idle -> VerifyPolicy(max_block_len=7, survival_floor=0.0); busy -> (2, 0.5).
    """
    span = max(1e-9, cfg.busy_pressure - cfg.idle_pressure)
    x = min(1.0, max(0.0, (pressure - cfg.idle_pressure) / span))
    max_block = int(round(cfg.max_block_len - x * (cfg.max_block_len - cfg.min_block_len)))
    floor = round(x * cfg.max_survival_floor, 4)
    max_batch = max(1, slots or cfg.default_slots)
    target = cfg.target_tokens_per_s_per_user
    if target > 0 and demand is not None and demand.step_latency_s > 0:
        per_user = max(demand.mean_acceptance_length, 1.0) / demand.step_latency_s
        if per_user < target and demand.active_requests > 1:
            # Users are slower than promised: stop growing the batch (queue instead).
            max_batch = max(1, min(max_batch, demand.active_requests))
    return VerifyPolicy(
        max_block_len=max(1, max_block),
        survival_floor=floor,
        budget_mode=cfg.budget_mode,
        max_batch_size=max_batch,
        target_tokens_per_s_per_user=target,
    )


def same_policy(a: VerifyPolicy | None, b: VerifyPolicy) -> bool:
    if a is None:
        return False
    strip = lambda p: dataclasses.replace(p, version=0)  # noqa: E731
    return strip(a) == strip(b)


class GlobalScheduler:
    """Reads demand, publishes policies; one instance per cluster (a Serve deployment)."""

    def __init__(self, state, cfg: SchedulerConfig = SchedulerConfig(), member: str = "scheduler") -> None:
        self.state = state
        self.cfg = cfg
        self.member = member
        self._pressure: dict[str, float] = {}
        self.published: dict[str, VerifyPolicy] = {}
        self._bad_pin: str | None = None  # the error of a malformed pin, once logged
        self.rounds = 0

    async def tick(self) -> dict[str, VerifyPolicy]:
        """One round: read everything, publish what changed.  Returns the policies in force."""
        await self.state.heartbeat("scheduler", self.member, {"interval_s": self.cfg.interval_s})
        verifiers = await self.state.alive("verifier")
        demand = await self.state.all_demand()
        rate = await self.state.arrival_rate(window_s=10)
        groups = [g for g in demand if g in verifiers] or list(verifiers)
        try:
            pin = await self.state.get_policy_pin()
        except ValueError as exc:  # a malformed pin is ignored, not obeyed in part
            if str(exc) != self._bad_pin:  # once per distinct pin, not every round
                log.warning("scheduler: ignoring the pinned policy: %s", exc)
            self._bad_pin, pin = str(exc), None
        else:
            self._bad_pin = None
        for g in groups:
            d = demand.get(g) or Demand()
            slots = int((verifiers.get(g) or {}).get("n_slots", self.cfg.default_slots))
            raw = pressure_of(d, slots, rate, len(groups))
            a = self.cfg.smoothing
            # Rising load acts at once (protect capacity); falling load relaxes gradually.
            prev = self._pressure.get(g, raw)
            p = raw if raw >= prev else a * raw + (1 - a) * prev
            self._pressure[g] = p
            policy = pin if pin is not None else compute_policy(p, self.cfg, d, slots)
            lost = g in self.published and await self.state.get_policy_version(g) == 0  # Redis restarted
            if lost or not same_policy(self.published.get(g), policy):
                self.published[g] = await self.state.publish_policy(g, policy)
                log.info("group %s pressure %.2f -> policy v%d %s", g, p, self.published[g].version, policy)
        self.rounds += 1
        return dict(self.published)

    async def run(self, stop_after: float | None = None) -> None:
        import asyncio

        from dspark.cluster.redis_state import RedisUnavailable

        t_end = None if stop_after is None else time.monotonic() + stop_after
        while t_end is None or time.monotonic() < t_end:
            try:
                await self.tick()
            except RedisUnavailable as exc:
                log.warning("scheduler: redis unreachable (%s); verifiers keep their last policy", exc)
            await asyncio.sleep(self.cfg.interval_s)
