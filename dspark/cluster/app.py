"""The Ray Serve application: Router, Verifier, DraftWorker (and Scheduler) deployments.

Deployment classes only wire components together; the work happens in ``dspark.workers``
(engine, verifier worker, draft worker, remote drafter) and in the router's API modules.

    client --HTTP/gRPC--> Router --Serve handle, streaming--> Verifier (rank 0 + TP rank actors)
                                                                 |  gRPC bidi stream per worker
                                                                 v
                                                          DraftWorker x N (drafters)
    every role heartbeats into Redis; draft workers publish their gRPC address there, which
    is how verifiers find them.

``build_app(args)`` is the import path for ``serve run`` / ``serve deploy`` / KubeRay.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from dspark.workers.drafters import registry

log = logging.getLogger(__name__)

_LOCAL_REDIS = None  # a redis-server build_app started because none was configured


@dataclass(frozen=True)
class ClusterConfig:
    """Application arguments (the ``args`` of the Serve config); every field has a default."""

    model: str | None = None  # GGUF file or HF folder; None/"default" = embedded SmolLM2-135M-Instruct
    dtype: str = "bf16"  # bf16 | fp32 | fp16
    device: str = "cpu"  # cpu | cuda
    tp: int = 1  # tensor-parallel ranks per verifier group
    draft: str = "dspark"  # "none" or a registered drafter kind (dspark.workers.drafters.registry)
    draft_workers: int = 2  # DraftWorker replicas (drafter kinds that can run remotely)
    block_len: int = 7  # draft block length (gamma)
    verify_policy: str = "fixed"  # fixed | adaptive (confidence-scheduled, global scheduler)
    # adaptive only: skip drafting on steps where measured throughput says speculation does not pay
    speculation_gate: bool = True
    redis_url: str | None = field(default=None, repr=False)  # Redis for heartbeats, discovery, demand, policy
    redis_url_env: str = "DSPARK_REDIS_URL"  # env var read when redis_url is not given
    redis_prefix: str = "dspark"  # key prefix (several clusters can share one Redis)
    n_slots: int = 32  # concurrent requests per verifier group (KV cache slots)
    max_seq: int = 2048  # longest request: prompt + output + one block
    max_prefill_tokens: int = 512  # chunked-prefill budget per step
    deterministic: bool = False  # row-invariant verifier kernels (RunnerConfig.deterministic)
    torch_threads: int = 0  # threads per compute process; 0 = cores / compute processes
    grpc_port: int = 0  # router's GenerationService port; 0 = disabled
    http_body_timeout_s: float = 30.0  # an HTTP request body not received in full by then is answered 408
    bind_host: str = "127.0.0.1"  # where the router's gRPC API listens ("auto": node IP)
    internal_host: str = "127.0.0.1"  # where draft workers listen, apart from the public API ("auto": node IP)
    draft_options: dict = field(default_factory=dict)  # drafter settings (e.g. head=PATH)
    internal_token_env: str = "DSPARK_INTERNAL_TOKEN"  # verifier <-> draft worker shared secret
    internal_token: str | None = field(default=None, repr=False)  # the secret itself; build_app generates one if unset
    internal_tls_cert_env: str = "DSPARK_INTERNAL_TLS_CERT"  # draft workers' PEM certificate file (TLS when set)
    internal_tls_key_env: str = "DSPARK_INTERNAL_TLS_KEY"  # draft workers' PEM private key file
    internal_tls_ca_env: str = "DSPARK_INTERNAL_TLS_CA"  # PEM CA file verifiers trust for draft workers
    internal_tls_name_env: str = "DSPARK_INTERNAL_TLS_SERVER_NAME"  # name checked in workers' certificates
    api_key_env: str = "DSPARK_API_KEY"  # client API key (HTTP Bearer, gRPC metadata)
    block_timeout_s: float = 10.0  # a draft block later than this -> plain decoding for that request
    draft_stream_quota: int = 0  # requests one verifier may hold open on a draft worker (0: half its slots)
    draft_idle_release_s: float = 60.0  # a draft worker frees a request with no step for this long
    scheduler_interval_s: float = 0.5  # global scheduler period (adaptive policy)
    target_tokens_per_s_per_user: float = 0.0  # per-user speed target for the scheduler (0: none)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ClusterConfig":
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown application arguments: {', '.join(unknown)}")
        if args.get("model") in ("default", ""):
            args["model"] = None
        cfg = cls(**args)
        if cfg.verify_policy not in ("fixed", "adaptive"):
            raise ValueError("verify_policy must be fixed or adaptive")
        if cfg.tp < 1 or cfg.block_len < 0 or cfg.draft_workers < 0:
            raise ValueError("tp >= 1, block_len >= 0 and draft_workers >= 0 are required")
        if cfg.draft_stream_quota < 0 or cfg.draft_idle_release_s <= 0:
            raise ValueError("draft_stream_quota >= 0 and draft_idle_release_s > 0 are required")
        if cfg.draft != "none":  # an unknown kind or option is refused here, naming it
            registry.parse_options(cfg.draft, cfg.draft_options)
        return cfg

    @property
    def remote_draft(self) -> bool:
        """Drafting happens on draft workers: the kind can run remotely and there are workers."""
        return self.draft != "none" and registry.get(self.draft).remote and self.draft_workers > 0

    @property
    def max_context(self) -> int:
        return self.max_seq - self.block_len - 1

    @property
    def draft_slots(self) -> int:
        """Requests one draft worker holds at once (its drafter's cache slots): four groups' worth."""
        return 4 * self.n_slots

    def redis(self) -> str:
        url = self.redis_url or os.environ.get(self.redis_url_env)
        if not url:
            raise RuntimeError(f"no Redis: set redis_url or ${self.redis_url_env}")
        return url

    def threads(self) -> int:
        if self.torch_threads > 0:
            return self.torch_threads
        procs = self.tp + (self.draft_workers if self.remote_draft else 0)
        return max(1, (os.cpu_count() or 1) // max(1, procs))

    def host(self) -> str:
        """Bind address of the public gRPC API."""
        return _resolve_host(self.bind_host)

    def internal_bind(self) -> str:
        """Bind address of the draft workers' DraftService: ``internal_host``, never ``bind_host``."""
        return _resolve_host(self.internal_host)

    def internal_secret(self) -> str | None:
        """The verifier <-> draft worker token: the configured one, else ``$internal_token_env``."""
        return self.internal_token or _secret(self.internal_token_env)

    def with_internal_token(self) -> "ClusterConfig":
        """This config with a fresh random internal token when none is configured, so the internal
        link is authenticated by default.  Called once at start-up (``build_app``); the token then
        reaches every role through the application arguments and is never logged."""
        if self.internal_secret():
            return self
        return dataclasses.replace(self, internal_token=secrets.token_urlsafe(32))


def _resolve_host(host: str) -> str:
    if host != "auto":
        return host
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())


def _secret(env: str) -> str | None:
    return os.environ.get(env) or None


@dataclass(frozen=True)
class InternalTLS:
    """TLS of the verifier <-> draft worker link, from the environment (all None: plaintext)."""

    cert_file: str | None = None  # draft worker side
    key_file: str | None = None
    ca_file: str | None = None  # verifier side
    server_name: str | None = None  # checked instead of the address (workers register IPs)

    @classmethod
    def from_env(cls, cfg: "ClusterConfig") -> "InternalTLS":
        tls = cls(_secret(cfg.internal_tls_cert_env), _secret(cfg.internal_tls_key_env),
                  _secret(cfg.internal_tls_ca_env), _secret(cfg.internal_tls_name_env))
        if bool(tls.cert_file) != bool(tls.key_file):
            raise ValueError(f"set both ${cfg.internal_tls_cert_env} and ${cfg.internal_tls_key_env}, or neither")
        return tls


def draft_worker_config(cfg: ClusterConfig):
    """How a draft worker of this cluster serves: internal bind address, token, TLS, quotas."""
    from dspark.workers.draft_worker import DraftWorkerConfig

    token = cfg.internal_secret()
    if not token:  # build_app always sets one; refuse to open the port without it
        raise ValueError(f"no internal token: set ${cfg.internal_token_env} or start the app through build_app")
    tls = InternalTLS.from_env(cfg)
    return DraftWorkerConfig(
        host=cfg.internal_bind(), port=0, token=token, tls_cert_file=tls.cert_file, tls_key_file=tls.key_file,
        max_requests=cfg.draft_slots, max_requests_per_stream=cfg.draft_stream_quota,
        idle_release_s=cfg.draft_idle_release_s,
    )


def _state(cfg: ClusterConfig):
    from dspark.cluster.redis_state import RedisState, StateConfig

    return RedisState(StateConfig(url=cfg.redis(), prefix=cfg.redis_prefix))


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

            self.server = DraftWorkerServer(factory, draft_worker_config(cfg)).start()
            self.member = self.server.address
            self._register()

        def _register(self) -> None:
            from dspark.cluster.background import BackgroundLoop

            self.bg = BackgroundLoop("draft-heartbeat")
            state = _state(self.cfg)

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
            self.scheduler = GlobalScheduler(_state(cfg), scfg)
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
            request_router_class="dspark.cluster.routing:HeadroomRouter", request_routing_stats_period_s=1.0,
        ),
    ).bind(args, drafters)
    scheduler = None
    if cfg.verify_policy == "adaptive":
        scheduler = Scheduler.options(ray_actor_options={"num_cpus": 0.1}).bind(args)
    return Router.options(
        ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    ).bind(verifier, args, scheduler)


__all__ = ["ClusterConfig", "InternalTLS", "build_app", "draft_worker_config"]
