"""One verifier group inside a Serve replica: engine, TP rank actors, drafter wiring, Redis.

The replica process is tensor-parallel rank 0 and runs the engine thread; ranks 1.. are Ray
actors in the replica's placement group.  Remote draft workers are discovered through their
Redis heartbeats; the group reports its own heartbeat and demand figures there.  Redis being
down never stops serving: discovery keeps the last known workers and reports resume later.
"""

from __future__ import annotations

import logging
import time
import uuid

from dspark.cluster.app import ClusterConfig, _secret, _state, feature_layers_for
from dspark.cluster.background import BackgroundLoop

log = logging.getLogger(__name__)


class VerifierGroup:
    def __init__(self, cfg: ClusterConfig) -> None:
        import torch

        from dspark.models.loader import load_model, load_tokenizer
        from dspark.workers.engine import Engine, EngineConfig
        from dspark.workers.runner import LocalRunner, RunnerConfig, TPSpec
        from dspark.workers.verifier import VerifierWorker

        self.cfg = cfg
        self.group_id = f"verifier-{uuid.uuid4().hex[:8]}"
        torch.set_num_threads(cfg.threads())
        runner_cfg = RunnerConfig(n_slots=cfg.n_slots, max_seq=cfg.max_seq)
        self.tp_group = None
        if cfg.tp > 1:
            import ray

            from dspark.workers.tp_ray import RayTPGroup

            spec = TPSpec(cfg.model, cfg.dtype, cfg.device, cfg.tp, runner_cfg, threads_per_rank=cfg.threads())
            pg = ray.util.get_current_placement_group()
            gpu = cfg.device == "cuda"
            self.tp_group = RayTPGroup(spec, pg, num_cpus=1.0 if gpu else 0.5, num_gpus=1.0 if gpu else 0)
            runner = self.tp_group.driver
            tokenizer, args, name = load_tokenizer(cfg.model)
        else:
            loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, progress=False)
            runner = LocalRunner(loaded.model, runner_cfg)
            tokenizer, args, name = loaded.tokenizer, loaded.args, loaded.name
        self.model_name = name
        self._drafter_addrs: list[str] = []
        drafter = None
        if cfg.draft == "layerskip":
            from dspark.workers.drafters.autoregressive import LayerSkipDrafter

            drafter = LayerSkipDrafter(runner, int(cfg.draft_options.get("layers", max(1, args.n_layers // 2))))
        elif cfg.remote_draft:
            from dspark.workers.remote_drafter import RemoteDrafter, RemoteDrafterConfig

            rcfg = RemoteDrafterConfig(
                kind=cfg.draft,
                feature_layers=feature_layers_for(cfg, name),
                proposal_top_k=int(cfg.draft_options.get("proposal_top_k", 8)),
                block_timeout_s=cfg.block_timeout_s,
                token=_secret(cfg.internal_token_env),
            )
            drafter = RemoteDrafter(lambda: list(self._drafter_addrs), rcfg, cfg.block_len)
        self.drafter = drafter
        ecfg = EngineConfig(max_batch=cfg.n_slots, max_prefill_tokens=cfg.max_prefill_tokens, block_len=cfg.block_len)
        self.engine = Engine(runner, tokenizer, ecfg, drafter=drafter)
        self.worker = VerifierWorker(self.engine, name=self.group_id)
        self.bg = BackgroundLoop(f"{self.group_id}-redis")
        self.state = _state(cfg)
        self.bg.every(1.0, self._discover, "drafter discovery")
        self.bg.every(0.5, self._report, "verifier report")
        if cfg.remote_draft:
            self._wait_for_drafters(timeout_s=120.0)

    async def _discover(self) -> None:
        alive = await self.state.alive("drafter")
        addrs = sorted(info.get("address", member) for member, info in alive.items())
        if addrs:
            self._drafter_addrs = addrs

    async def _report(self) -> None:
        from dspark.cluster.state_types import Demand

        st = self.worker.stats()
        await self.state.heartbeat("verifier", self.group_id, {"model": self.model_name, "tp": self.cfg.tp})
        await self.state.put_demand(self.group_id, Demand(
            active_requests=st.active_requests, queued_requests=st.queued_requests,
            tokens_per_step=st.tokens_per_step, step_latency_s=st.step_latency_s,
            mean_acceptance_length=st.mean_acceptance_length, timestamp=time.time(),
        ))

    def _wait_for_drafters(self, timeout_s: float) -> None:
        """Serve starts draft workers in parallel; give them time to register before serving."""
        deadline = time.monotonic() + timeout_s
        while not self._drafter_addrs and time.monotonic() < deadline:
            time.sleep(0.2)
        if not self._drafter_addrs:
            log.warning("%s: no draft worker registered; serving with plain decoding until one does", self.group_id)

    def check_health(self) -> None:
        if not self.worker._thread.is_alive():
            raise RuntimeError("engine thread died")

    def close(self) -> None:
        self.worker.close(drain_s=30.0)
        self.bg.stop()
        if self.drafter is not None and hasattr(self.drafter, "close"):
            self.drafter.close()
        if self.tp_group is not None:
            self.tp_group.close()


def build_verifier_group(cfg: ClusterConfig) -> VerifierGroup:
    return VerifierGroup(cfg)
