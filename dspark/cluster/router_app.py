"""What a Router replica runs: tokenizer, the backend over the Verifier deployment, the HTTP app,
the gRPC GenerationService, and its Redis heartbeat / arrival counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import AsyncIterator

from dspark.cluster.config import ClusterConfig, cluster_state
from dspark.cluster.backend import BackendUnavailable
from dspark.cluster.background import BackgroundLoop
from dspark.cluster.metrics import MeteredBackend, RouterMetrics
from dspark.cluster.validation import RouterConfig

log = logging.getLogger(__name__)


class ServeBackend:
    """GenerationBackend over the Verifier deployment's handle (streaming calls)."""

    def __init__(self, handle, max_context: int, model_name: str) -> None:
        self.handle = handle.options(stream=True)
        self._stats = handle.options(stream=False)
        self.max_context = max_context
        self.model_name = model_name
        self.arrivals = 0

    async def generate(self, prompt_ids, params, request_id=None) -> AsyncIterator:
        self.arrivals += 1
        gen = self.handle.generate.remote(prompt_ids, params, request_id)
        unfinished = params.n  # a request streams one final output per sequence
        try:
            async for out in gen:
                unfinished -= int(out.finished)
                yield out
        except ValueError:
            raise
        except Exception as exc:
            # A replica's ValueError arrives wrapped; surface it as the client's mistake.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ValueError):
                raise ValueError(str(cause)) from None
            if _replica_gone(exc):
                raise BackendUnavailable(f"the verifier serving this request is gone ({type(exc).__name__}); "
                                         "retry the request") from exc
            raise
        finally:
            if unfinished > 0:  # the client left (or the call failed): abort the verifier side too
                gen.cancel()

    async def stats(self) -> dict:
        return await self._stats.stats.remote()

    async def health(self) -> dict:
        return {"model": self.model_name, "verifier": await self.stats()}


def _replica_gone(exc: BaseException) -> bool:
    """Whether ``exc`` says the Verifier replica died or none can take the request."""
    from ray.exceptions import RayActorError, WorkerCrashedError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return isinstance(exc, (RayActorError, WorkerCrashedError, BackPressureError, DeploymentUnavailableError,
                            ReplicaUnavailableError))


class RouterRuntime:
    def __init__(self, cfg: ClusterConfig, verifier_handle) -> None:
        from dspark.models.loader import load_tokenizer

        self.cfg = cfg
        self.member = f"router-{uuid.uuid4().hex[:8]}"
        self.tokenizer, _, name = load_tokenizer(cfg.model)
        self.serve_backend = ServeBackend(verifier_handle, cfg.max_context, name)
        self.metrics = RouterMetrics(name)
        self.metrics.on_scrape(self._refresh_gauges)
        self.backend = MeteredBackend(self.serve_backend, self.metrics)
        self.router_cfg = RouterConfig(api_key=os.environ.get(cfg.api_key_env) or "")
        self.bg = BackgroundLoop("router-bg")
        self.grpc_server = None
        if cfg.grpc_port:
            from dspark.cluster.grpc_api import start_grpc_server

            host = cfg.host()
            self.grpc_server, port = self.bg.run(
                start_grpc_server(self.backend, self.tokenizer, self.router_cfg, host=host, port=cfg.grpc_port)
            )
            log.info("gRPC GenerationService on %s:%d", host, port)
        self.state = cluster_state(cfg)
        self._reported = 0
        self.bg.every(1.0, self._report, "router report")

    async def _report(self) -> None:
        try:
            await self.state.heartbeat("router", self.member, {"model": self.backend.model_name})
            new = self.serve_backend.arrivals - self._reported
            if new:
                await self.state.record_arrivals(new)
                self._reported += new
        finally:
            self.metrics.set_redis_connected(self.state.connected)

    async def _refresh_gauges(self) -> None:
        stats = await asyncio.wait_for(self.serve_backend.stats(), timeout=self.router_cfg.health_timeout_s)
        self.metrics.set_verifier_stats(stats)

    def http_app(self):
        from dspark.cluster.openai_api import make_http_app

        return make_http_app(self.backend, self.tokenizer, self.router_cfg, metrics=self.metrics,
                             body_timeout_s=self.cfg.http_body_timeout_s)

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) until no request streams through this router, HTTP or gRPC.

        Serve already waits for the HTTP requests it routed here before shutting the replica
        down; the gRPC API is our own server: stopping it with a grace period refuses new calls
        and returns as soon as the calls in flight have ended (gRPC's own bookkeeping, so a call
        that ended abnormally can never hold the shutdown up).
        """
        if self.grpc_server is not None:
            server, self.grpc_server = self.grpc_server, None
            done = asyncio.run_coroutine_threadsafe(server.stop(timeout_s), self.bg.loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(done), timeout_s + 5.0)
            except Exception as exc:  # noqa: BLE001 - shutting down regardless
                log.warning("router %s: gRPC server stop: %s", self.member, exc)
        if self.metrics.requests_in_flight:
            log.warning("router %s: %d requests still streaming at shutdown", self.member,
                        self.metrics.requests_in_flight)

    def close(self) -> None:
        if self.grpc_server is not None:
            self.bg.run(self.grpc_server.stop(5.0), timeout=10)
        self.bg.stop()
