"""The router's OpenAI-compatible HTTP API over any :class:`GenerationBackend`: its routes.

    app = make_http_app(LocalBackend(worker, "SmolLM2-135M-Instruct"), tokenizer, RouterConfig())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming as SSE or
whole), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics``
(Prometheus text, when the app is given :class:`~dspark.cluster.metrics.RouterMetrics`) and
FastAPI's ``/openapi.json``.  Request rules live in :mod:`dspark.cluster.validation` (shared with
gRPC); the API parses, streams and maps errors to OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``, one module per concern:

* :mod:`~dspark.cluster.openai_types`: the request and response models;
* :mod:`~dspark.cluster.openai_formats`: each endpoint's stream chunks and whole answers;
* :mod:`~dspark.cluster.openai_streaming`: SSE or one JSON answer over ASGI, under a watch for
  the client leaving (a disconnect cancels the handler, which closes the backend iterator and so
  aborts the request: one debug line, never an error);
* :mod:`~dspark.cluster.openai_errors`: error bodies, statuses and the app's exception handlers;
* :mod:`~dspark.cluster.openai_guard`: what happens before FastAPI parses anything (the API key
  check on ``/v1/*``, the body size limit and the body read deadline, ``body_timeout_s``: a
  client that sends its body slowly, or not at all, gets ``408`` and the connection is closed).
"""

from __future__ import annotations

import time
import uuid

import anyio
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.responses import Response

import dspark
from dspark.cluster import openai_types as T
from dspark.cluster.backend import GenerationBackend
from dspark.cluster.openai_errors import add_error_handlers
from dspark.cluster.openai_formats import ChatFormat, CompletionFormat
from dspark.cluster.openai_guard import BODY_TIMEOUT_S, RequestGuard
from dspark.cluster.openai_streaming import generation_response
from dspark.cluster.validation import RouterConfig, check_model, prepare_request
from dspark.models.tokenizer import Tokenizer


def make_http_app(
    backend: GenerationBackend,
    tokenizer: Tokenizer,
    cfg: RouterConfig = RouterConfig(),
    metrics=None,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible API (see the module docstring).

    ``metrics`` (a :class:`~dspark.cluster.metrics.RouterMetrics`) adds ``GET /metrics``; the
    backend should then be the matching ``MeteredBackend`` so requests are counted.
    ``body_timeout_s`` bounds how long reading one request body may take (408 after it).
    """
    if not body_timeout_s > 0:
        raise ValueError(f"body_timeout_s must be > 0, got {body_timeout_s}")
    api_key = cfg.resolved_api_key()
    started = int(time.time())
    app = FastAPI(
        title="DSpark OpenAI-compatible API",
        version=dspark.__version__,
        description="Lossless speculative decoding behind the OpenAI chat and completions API.",
    )
    app.add_middleware(RequestGuard, api_key=api_key, max_bytes=cfg.max_request_bytes, body_timeout_s=body_timeout_s)
    add_error_handlers(app)

    @app.get("/health", tags=["health"])
    async def health() -> JSONResponse:
        """200 with small status figures when the backend answers, else 503."""
        try:
            with anyio.fail_after(cfg.health_timeout_s):
                details = await backend.health()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            return JSONResponse({"status": "unavailable", "error": str(exc) or type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "model": backend.model_name, **details})

    if metrics is not None:
        from dspark.cluster.metrics import CONTENT_TYPE

        @app.get("/metrics", tags=["health"], response_class=Response)
        async def prometheus_metrics() -> Response:
            """Prometheus text exposition of this router's metrics (no API key: scraped in-cluster)."""
            return Response(await metrics.exposition(), media_type=CONTENT_TYPE)

    # The bearer scheme only documents the key in the OpenAPI schema; RequestGuard enforces it.
    deps = [Depends(HTTPBearer(auto_error=False))] if api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=deps, responses={400: {"model": T.ErrorResponse}})

    def model_card() -> T.ModelCard:
        return T.ModelCard(id=backend.model_name, created=started, max_model_len=backend.max_context)

    @v1.get("/models", response_model=T.ModelList, tags=["models"])
    async def list_models() -> T.ModelList:
        return T.ModelList(data=[model_card()])

    @v1.get("/models/{model_id:path}", response_model=T.ModelCard, tags=["models"])
    async def get_model(model_id: str) -> T.ModelCard:
        check_model(model_id, backend.model_name)
        return model_card()

    @v1.post(
        "/chat/completions",
        tags=["generation"],
        responses={200: {"model": T.ChatCompletion, "description": "JSON, or an SSE stream of chunks"}},
    )
    async def chat_completions(body: T.ChatCompletionRequest) -> Response:
        prepared = prepare_request(body.to_generation_request(), tokenizer, backend, cfg)
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", prepared.model, tokenizer, prepared.params.n)
        return generation_response(backend, prepared, fmt, body.stream, body.include_usage)

    @v1.post(
        "/completions",
        tags=["generation"],
        responses={200: {"model": T.Completion, "description": "JSON, or an SSE stream of chunks"}},
    )
    async def completions(body: T.CompletionRequest) -> Response:
        prepared = prepare_request(body.to_generation_request(), tokenizer, backend, cfg)
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", prepared.model, tokenizer, prepared.params.n,
                               echo_ids=prepared.prompt_ids if body.echo else None)
        return generation_response(backend, prepared, fmt, body.stream, body.include_usage)

    app.include_router(v1)
    return app
