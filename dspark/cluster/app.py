"""The Ray Serve application: Router, Verifier, DraftWorker (and Scheduler) deployments.

Deployment classes only wire components together; the work happens in ``dspark.workers``
(engine, verifier worker, draft worker, remote drafter) and in the router's API modules.

    client --HTTP/gRPC--> Router --Serve handle, streaming--> Verifier (rank 0 + TP rank actors)
                                                                 |  gRPC bidi stream per worker
                                                                 v
                                                          DraftWorker x N (drafters)
    every role heartbeats into Redis; draft workers publish their gRPC address there, which
    is how verifiers find them.

``build_app(args)`` is the import path for ``serve run`` / ``serve deploy`` / KubeRay.  The
application arguments are a :class:`~dspark.cluster.config.ClusterConfig` (``cluster/config.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import AsyncIterator

from dspark.cluster.config import ClusterConfig, cluster_state, draft_worker_config
from dspark.workers.drafters import registry

log = logging.getLogger(__name__)

_LOCAL_REDIS = None  # a redis-server build_app started because none was configured


# --------------------------------------------------------------------------------------------
# Deployments (defined lazily so importing this module does not import Ray)
# --------------------------------------------------------------------------------------------
# Graceful shutdown: Serve stops routing to a replica, waits for its ongoing requests, then
# awaits its ``__del__`` (async here, so the event loop keeps streaming meanwhile), all within
# ``graceful_shutdown_timeout_s``; after that the replica is killed.
GRACEFUL_SHUTDOWN_S = 60.0
DRAIN_S = GRACEFUL_SHUTDOWN_S - 10.0  # our own drain inside __del__, leaving time to close


async def _wait_until(done, timeout_s: float, period_s: float = 0.1) -> bool:
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(period_s)
    return True


def _deployments():
    from ray import serve

    @serve.deployment(name="DraftWorker")
    class DraftWorkerDeployment:
        def __init__(self, args: dict) -> None:
            import torch

            from dspark.models.loader import load_model
            from dspark.workers.draft_worker import DraftWorkerServer
            from dspark.workers.runner import RunnerConfig

            cfg = self.cfg = ClusterConfig.from_args(args)
            torch.set_num_threads(cfg.threads())

            def factory():
                # No target runner here: the kinds that run remotely draft from the target's weights
                # (when they need any) and the features the verifier sends.
                needs_weights = registry.get(cfg.draft).needs_weights
                loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, progress=False) if needs_weights else None
                ctx = registry.DraftContext(
                    loaded=loaded, args=loaded.args if loaded else None, target_runner=None,
                    runner=RunnerConfig(n_slots=cfg.draft_slots, max_seq=cfg.max_seq), model=cfg.model,
                    dtype=cfg.dtype, device=cfg.device, name=loaded.name if loaded else "",
                )
                return registry.build_drafter(cfg.draft, ctx, cfg.draft_options)

            from dspark.models.loader import load_tokenizer

            tokenizer = load_tokenizer(cfg.model)[0]  # drafts follow structured-output grammars
            self.server = DraftWorkerServer(factory, draft_worker_config(cfg), tokenizer).start()
            self.member = self.server.address
            self._register()

        def _register(self) -> None:
            from dspark.cluster.background import BackgroundLoop

            self.bg = BackgroundLoop("draft-heartbeat")
            state = cluster_state(self.cfg)

            async def beat() -> None:
                await state.heartbeat("drafter", self.member, {"address": self.member, "kind": self.cfg.draft, "pid": os.getpid()})

            self.bg.every(1.0, beat, "drafter heartbeat")

        def address(self) -> str:
            return self.member

        def check_health(self) -> None:
            if not self.server._thread.is_alive():
                raise RuntimeError("draft worker server stopped")

        async def __del__(self) -> None:
            # Serve calls this on shutdown (bounded by graceful_shutdown_timeout_s).  Verifiers
            # reach us over gRPC, not Serve, so Serve cannot see our work: drain it here.
            import asyncio

            drained = await _wait_until(lambda: not (self.server.servicer and self.server.servicer.busy()), DRAIN_S)
            if not drained:
                log.warning("draft worker %s: %d requests still drafting at shutdown", self.member,
                            self.server.servicer.busy())
            try:
                await asyncio.to_thread(self.server.stop)
                self.bg.stop()
            except Exception:
                pass

    @serve.deployment(name="Verifier")
    class VerifierDeployment:
        def __init__(self, args: dict, drafters=None) -> None:
            from dspark.cluster.verifier_group import build_verifier_group

            self.cfg = ClusterConfig.from_args(args)
            self.drafters = drafters  # keeps the draft workers in the application
            self.group = build_verifier_group(self.cfg)

        async def generate(self, prompt_ids: list[int], params, request_id: str | None = None) -> AsyncIterator:
            async for out in self.group.worker.generate(prompt_ids, params, request_id):
                yield out

        def stats(self) -> dict:
            return self.group.stats()

        def record_routing_stats(self) -> dict:
            return self.group.routing_stats()

        def check_health(self) -> None:
            self.group.check_health()

        async def __del__(self) -> None:
            # Serve has already waited for the generate() calls it routed here; wait for any
            # stragglers without blocking the loop that streams them, then stop the engine.
            import asyncio

            await _wait_until(lambda: self.group.worker.num_requests == 0, DRAIN_S)
            try:
                await asyncio.to_thread(self.group.close)
            except Exception:
                log.exception("verifier group close failed")

    @serve.deployment(name="Scheduler", num_replicas=1)
    class SchedulerDeployment:
        def __init__(self, args: dict) -> None:
            from dspark.cluster.background import BackgroundLoop
            from dspark.cluster.scheduler import GlobalScheduler, SchedulerConfig

            cfg = ClusterConfig.from_args(args)
            scfg = SchedulerConfig(interval_s=cfg.scheduler_interval_s, max_block_len=cfg.block_len,
                                   target_tokens_per_s_per_user=cfg.target_tokens_per_s_per_user,
                                   default_slots=cfg.n_slots)
            self.scheduler = GlobalScheduler(cluster_state(cfg), scfg)
            self.bg = BackgroundLoop("scheduler")
            self.bg.every(scfg.interval_s, self._tick, "scheduler tick")

        async def _tick(self) -> None:
            from dspark.cluster.redis_state import RedisUnavailable

            try:
                await self.scheduler.tick()
            except RedisUnavailable as exc:
                log.warning("scheduler: redis unreachable (%s); verifiers keep their last policy", exc)

        def policies(self) -> dict:
            return {g: p.to_dict() for g, p in self.scheduler.published.items()}

    @serve.deployment(name="Router")
    @serve.ingress()
    class RouterDeployment:
        def __init__(self, verifier, args: dict, scheduler=None) -> None:
            from dspark.cluster.router_app import RouterRuntime

            self.cfg = ClusterConfig.from_args(args)
            self.scheduler = scheduler  # keeps the global scheduler in the application
            self.runtime = RouterRuntime(self.cfg, verifier)

        def __serve_build_asgi_app__(self):
            return self.runtime.http_app()

        async def __del__(self) -> None:
            import asyncio

            await self.runtime.drain(DRAIN_S)  # gRPC streams (Serve drains the HTTP ones)
            try:
                await asyncio.to_thread(self.runtime.close)
            except Exception:
                pass

    return RouterDeployment, VerifierDeployment, DraftWorkerDeployment, SchedulerDeployment


def build_app(args: dict | None = None):
    """Serve application builder (``import_path: dspark.cluster.app:build_app``)."""
    # One internal token per cluster unless one is configured: the same arguments go to every role.
    cfg = ClusterConfig.from_args(args).with_internal_token()
    if not (cfg.redis_url or os.environ.get(cfg.redis_url_env)):
        # `serve run deploy/serve_config.yaml` without Redis configured: start a private one on
        # loopback for this single-node cluster (it lives as long as this process).
        from dspark.cluster.redis_server import start_cluster_redis
        from dspark.cluster.redis_state import redact_url

        global _LOCAL_REDIS
        _LOCAL_REDIS = start_cluster_redis()  # password-protected, supervised
        log.warning("no Redis configured ($%s); started a local redis-server at %s", cfg.redis_url_env,
                    redact_url(_LOCAL_REDIS.url))
        cfg = dataclasses.replace(cfg, redis_url=_LOCAL_REDIS.url)
    args = dataclasses.asdict(cfg)
    from ray.serve.config import RequestRouterConfig

    from dspark.cluster.routing import HeadroomRouter

    Router, Verifier, DraftWorker, Scheduler = _deployments()
    gpu = cfg.device == "cuda"
    rank_bundle = {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": 0.5}
    drafters = None
    if cfg.remote_draft:
        # Draft workers are reached over gRPC, not through Serve; binding them into the
        # verifier's arguments is what makes Serve deploy (and health-check) them.
        drafters = DraftWorker.options(
            num_replicas=cfg.draft_workers,
            ray_actor_options={"num_cpus": 1.0 if gpu else 0.5, "num_gpus": 1.0 if gpu else 0},
            health_check_period_s=5,
            graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        ).bind(args)
    verifier = Verifier.options(
        ray_actor_options={"num_cpus": rank_bundle["CPU"], "num_gpus": rank_bundle.get("GPU", 0)},
        placement_group_bundles=[dict(rank_bundle) for _ in range(cfg.tp)],
        placement_group_strategy="STRICT_PACK",
        max_ongoing_requests=4 * cfg.n_slots,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        # New requests go to the group with the most headroom (see cluster/routing.py).
        request_router_config=RequestRouterConfig(
            request_router_class=HeadroomRouter, request_routing_stats_period_s=1.0,
        ),
    ).bind(args, drafters)
    scheduler = None
    if cfg.verify_policy == "adaptive":
        scheduler = Scheduler.options(ray_actor_options={"num_cpus": 0.1}).bind(args)
    return Router.options(
        ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    ).bind(verifier, args, scheduler)


__all__ = ["build_app"]
