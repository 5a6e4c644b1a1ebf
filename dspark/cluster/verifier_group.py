"""One verifier group inside a Serve replica: engine, TP rank actors, drafter wiring, Redis.

The replica process is tensor-parallel rank 0 and runs the engine thread; ranks 1.. are Ray
actors in the replica's placement group.  Remote draft workers are discovered through their
Redis heartbeats; the group reports its own heartbeat and demand figures there.  Redis being
down never stops serving: discovery keeps the last known workers and reports resume later.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING

from dspark.cluster.config import ClusterConfig, InternalTLS, cluster_state
from dspark.cluster.background import BackgroundLoop
from dspark.workers.drafters import registry

if TYPE_CHECKING:
    from dspark.workers.drafters.remote import RemoteDrafter

log = logging.getLogger(__name__)


def engine_spec(cfg: ClusterConfig):
    """The engine a verifier group of ``cfg`` builds (its ``EngineSpec``)."""
    from dspark.workers.factory import EngineSpec
    from dspark.workers.runner import RunnerConfig

    # The drafter that runs here: a kind that drafts in the target's own cache (layerskip),
    # or the remote drafter for the kind the draft workers run.  A kind that only runs
    # remotely with no draft worker configured means plain decoding.
    in_process = cfg.draft != "none" and not registry.get(cfg.draft).remote
    return EngineSpec(
        model=cfg.model, dtype=cfg.dtype, weights=cfg.weights, device=cfg.device, tp=cfg.tp,
        draft=cfg.draft if in_process or cfg.remote_draft else "none", block_len=cfg.block_len,
        runner=RunnerConfig(n_slots=cfg.n_slots, max_seq=cfg.max_seq, deterministic=cfg.deterministic,
                            compile=cfg.compile, kv_layout=cfg.kv_layout, cuda_graphs=cfg.cuda_graphs),
        max_prefill_tokens=cfg.max_prefill_tokens, draft_options=tuple(cfg.draft_options.items()),
        verify_policy=cfg.verify_policy, speculation_gate=cfg.speculation_gate,
    )


class VerifierGroup:
    def __init__(self, cfg: ClusterConfig) -> None:
        import torch

        from dspark.workers.factory import EngineParts, build_engine
        from dspark.workers.verifier import VerifierWorker

        self.cfg = cfg
        self.group_id = f"verifier-{uuid.uuid4().hex[:8]}"
        torch.set_num_threads(cfg.threads())
        self._drafter_addrs: list[str] = []
        self.remote: RemoteDrafter | None = None
        spec = engine_spec(cfg)
        parts = EngineParts(tp_group=self._ray_tp_group if cfg.tp > 1 else None,
                            drafter=self._remote_drafter if cfg.remote_draft else None)
        self.built = build_engine(spec, progress=False, parts=parts)
        self.engine = self.built.engine
        self.model_name = self.built.model_name
        self.budget = self.built.adaptive
        # The verification-budget gauge measures what the engine's budget grants.
        self.budget_meter = self.engine.budget = BudgetMeter(self.engine.budget)
        self.worker = VerifierWorker(self.engine, name=self.group_id)
        self.bg = BackgroundLoop(f"{self.group_id}-redis")
        self.state = cluster_state(cfg)
        self.bg.every(1.0, self._discover, "drafter discovery")
        self.bg.every(0.5, self._report, "verifier report")
        if self.budget is not None:
            from dspark.cluster.policy_follower import PolicyFollower

            self.follower = PolicyFollower(self.state, self.group_id)
            self.bg.every(0.25, self._follow_policy, "policy follow")
        if cfg.remote_draft:
            self._wait_for_drafters(timeout_s=120.0)

    def _ray_tp_group(self, tp_spec):
        """Ranks 1.. as Ray actors in this replica's placement group (this process is rank 0)."""
        import ray

        from dspark.workers.tp_ray import RayTPGroup

        gpu = self.cfg.device == "cuda"
        return RayTPGroup(dataclasses.replace(tp_spec, threads_per_rank=self.cfg.threads()),
                          ray.util.get_current_placement_group(), num_cpus=1.0 if gpu else 0.5,
                          num_gpus=1.0 if gpu else 0)

    def _remote_drafter(self, ctx) -> "RemoteDrafter":
        """Drafts on the draft workers found in Redis (``_discover``); this group closes it."""
        from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig
        from dspark.workers.runner import RunnerConfig

        cfg = self.cfg
        tls = InternalTLS.from_env(cfg)
        opts = registry.parse_options(cfg.draft, cfg.draft_options)
        rcfg = RemoteDrafterConfig(
            kind=cfg.draft,
            feature_layers=registry.feature_layers(cfg.draft, cfg.draft_options, ctx.name),
            proposal_top_k=opts.get("proposal_top_k", RemoteDrafterConfig.proposal_top_k),
            block_timeout_s=cfg.block_timeout_s,
            token=cfg.internal_secret(),
            tls_ca_file=tls.ca_file,
            tls_server_name=tls.server_name,
        )
        # Drafting in process needs the target's whole weights for the kinds that share them: one
        # rank holds them only at tp 1.  Its cache holds the few requests it drafts, sized as a
        # draft worker sizes its own (no compiled step, no CUDA graphs of the verifier's).
        local = None
        if cfg.local_draft_below and cfg.tp == 1:
            sizing = RunnerConfig(n_slots=min(cfg.local_draft_below, cfg.n_slots), max_seq=cfg.max_seq)
            local = registry.build_drafter(cfg.draft, dataclasses.replace(ctx, runner=sizing), cfg.draft_options)
        elif cfg.local_draft_below:
            log.info("%s: tp %d holds no whole target beside the group; every request drafts on the workers",
                     self.group_id, cfg.tp)
        self.remote = RemoteDrafter(lambda: list(self._drafter_addrs), rcfg, cfg.block_len,
                                    local=local, local_below=cfg.local_draft_below)
        return self.remote

    async def _discover(self) -> None:
        alive = await self.state.alive("drafter")
        addrs = sorted(info.get("address", member) for member, info in alive.items())
        if addrs:
            self._drafter_addrs = addrs

    async def _follow_policy(self) -> None:
        p = await self.follower.refresh()
        if p.version and (self.budget.policy.version != p.version):
            self.budget.set_policy(p)
            self.engine.max_batch = max(1, min(self.cfg.n_slots, p.max_batch_size))
            self.engine.gate_enabled = p.speculation_gate

    def routing_stats(self) -> dict:
        """Headroom for the router: free request capacity under the current policy."""
        st = self.worker.demand()
        cap = self.engine.max_batch
        return {"headroom": cap - st.active_requests - st.queued_requests, "active": st.active_requests,
                "queued": st.queued_requests, "group": self.group_id}

    def stats(self) -> dict:
        """The worker's demand figures and counters plus what metrics want: budget, policy version, pid."""
        demand = dataclasses.asdict(self.worker.demand())
        del demand["timestamp"]  # unstamped here: only the report to Redis carries a time
        return {**demand, "steps": self.engine.num_steps, "finished_requests": self.worker.finished_requests,
                "verification_budget": self.budget_meter.value,
                "policy_version": self.budget.policy.version if self.budget else 0, "pid": os.getpid(),
                "group": self.group_id, **self.engine.cache_stats(), **self.engine.speculation_stats(),
                "step_costs": self.budget.step_costs() if self.budget else {},
                **({f"draft_requests_{k}": v for k, v in self.remote.requests_drafted.items()} if self.remote else {})}

    async def _report(self) -> None:
        demand = self.worker.demand()
        info = {"model": self.model_name, "tp": self.cfg.tp, "n_slots": self.cfg.n_slots, "pid": os.getpid(),
                "policy_version": self.budget.policy.version if self.budget else 0}
        await self.state.heartbeat("verifier", self.group_id, info)
        await self.state.put_demand(self.group_id, dataclasses.replace(demand, timestamp=time.time()))

    def _wait_for_drafters(self, timeout_s: float) -> None:
        """Serve starts draft workers in parallel; give them time to register before serving."""
        deadline = time.monotonic() + timeout_s
        while not self._drafter_addrs and time.monotonic() < deadline:
            time.sleep(0.2)
        if not self._drafter_addrs:
            log.warning("%s: no draft worker registered; serving with plain decoding until one does", self.group_id)

    def check_health(self) -> None:
        if not self.worker.alive:
            raise RuntimeError("engine thread died")

    def close(self) -> None:
        self.worker.close(drain_s=30.0)
        self.bg.stop()
        if self.remote is not None:
            self.remote.close()
        self.built.close()


class BudgetMeter:
    """Wraps the engine's verification budget function to measure what it grants.

    ``value`` is an exponential moving average (over steps) of the mean number of drafts
    verified per request in a step: the ``dspark:verification_budget`` gauge.
    """

    def __init__(self, budget, alpha: float = 0.2) -> None:
        self.budget = budget
        self.alpha = alpha
        self.value = 0.0

    def __call__(self, blocks, block_len: int) -> list[int]:
        lengths = self.budget(blocks, block_len)
        if lengths:
            mean = sum(lengths) / len(lengths)
            self.value = mean if self.value == 0.0 else (1 - self.alpha) * self.value + self.alpha * mean
        return lengths

    def draft_depth(self, block_len: int) -> int:
        """The wrapped budget's draft depth (whole blocks for a budget that has none), so that
        wrapping does not hide it from the engine."""
        depth = getattr(self.budget, "draft_depth", None)
        return depth(block_len) if depth is not None else block_len

    def observe_drafting(self, num_requests: int, seconds: float) -> None:
        """Passed on to the wrapped budget, which weighs drafting (ignored by one that does not)."""
        self._pass_on("observe_drafting", num_requests, seconds)

    def observe_overhead(self, num_requests: int, seconds: float) -> None:
        """Passed on to the wrapped budget, which counts a step's time outside its forward pass."""
        self._pass_on("observe_overhead", num_requests, seconds)

    def observe_step(self, num_tokens: int, seconds: float, num_requests: int | None = None) -> None:
        """Passed on to the wrapped budget, which corrects its step costs by real steps."""
        self._pass_on("observe_step", num_tokens, seconds, num_requests)

    def _pass_on(self, name: str, *args) -> None:
        observe = getattr(self.budget, name, None)
        if observe is not None:
            observe(*args)


def build_verifier_group(cfg: ClusterConfig) -> VerifierGroup:
    return VerifierGroup(cfg)
