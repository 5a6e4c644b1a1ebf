"""What a Router replica runs: tokenizer, the backend over the Verifier deployment, the HTTP app,
the gRPC GenerationService, and its Redis heartbeat / arrival counts.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import AsyncIterator

from dspark.cluster.app import ClusterConfig, _state
from dspark.cluster.background import BackgroundLoop
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
        try:
            async for out in gen:
                yield out
        except ValueError:
            raise
        except Exception as exc:
            # A replica's ValueError arrives wrapped; surface it as the client's mistake.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ValueError):
                raise ValueError(str(cause)) from None
            raise

    async def health(self) -> dict:
        stats = await self._stats.stats.remote()
        return {"model": self.model_name, "verifier": stats}


class RouterRuntime:
    def __init__(self, cfg: ClusterConfig, verifier_handle) -> None:
        from dspark.models.loader import load_tokenizer

        self.cfg = cfg
        self.member = f"router-{uuid.uuid4().hex[:8]}"
        self.tokenizer, _, name = load_tokenizer(cfg.model)
        self.backend = ServeBackend(verifier_handle, cfg.max_context, name)
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
        self.state = _state(cfg)
        self._reported = 0
        self.bg.every(1.0, self._report, "router report")

    async def _report(self) -> None:
        await self.state.heartbeat("router", self.member, {"model": self.backend.model_name})
        new = self.backend.arrivals - self._reported
        if new:
            await self.state.record_arrivals(new)
            self._reported += new

    def http_app(self):
        from dspark.cluster.openai_api import make_http_app

        return make_http_app(self.backend, self.tokenizer, self.router_cfg)

    def close(self) -> None:
        if self.grpc_server is not None:
            self.bg.run(self.grpc_server.stop(5.0), timeout=10)
        self.bg.stop()
