"""The router's OpenAI-compatible HTTP API over any :class:`GenerationBackend`.

    app = make_http_app(LocalBackend(worker, "SmolLM2-135M-Instruct"), tokenizer, RouterConfig())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming as SSE or
whole), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics``
(Prometheus text, when the app is given :class:`~dspark.cluster.metrics.RouterMetrics`) and
FastAPI's ``/openapi.json``.  Request rules live in :mod:`dspark.cluster.validation` (shared with gRPC);
this module parses, streams and maps errors to OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``.

Three things happen before FastAPI parses anything (:class:`_RequestGuard`): the API key check on
``/v1/*``, the body size limit and the body read deadline (``body_timeout_s``: a client that
sends its body slowly, or not at all, gets ``408`` and the connection is closed).  Every
generation runs under a watch for the client leaving: a disconnect cancels the handler, which
closes the backend iterator and so aborts the request (one debug line, never an error).
"""

from __future__ import annotations

import abc
import json
import logging
import re
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import dspark
from dspark.cluster import openai_types as T
from dspark.cluster.backend import BackendUnavailable, GenerationBackend, collect
from dspark.cluster.validation import ErrorKind, PreparedRequest, RequestError, RouterConfig, check_bearer, check_model
from dspark.cluster.validation import prepare_request
from dspark.models.tokenizer import Tokenizer
from dspark.workers.request import RequestOutput

log = logging.getLogger(__name__)

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies (nginx) must not buffer the stream
]
_DONE = b"data: [DONE]\n\n"
BODY_TIMEOUT_S = 30.0  # a request body not received in full by then is answered 408


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
    app.add_middleware(_RequestGuard, api_key=api_key, max_bytes=cfg.max_request_bytes, body_timeout_s=body_timeout_s)
    _add_error_handlers(app)

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

    # The bearer scheme only documents the key in the OpenAPI schema; _RequestGuard enforces it.
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
        fmt = _ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", prepared.model)
        return _generation_response(backend, prepared, fmt, body.stream, body.include_usage)

    @v1.post(
        "/completions",
        tags=["generation"],
        responses={200: {"model": T.Completion, "description": "JSON, or an SSE stream of chunks"}},
    )
    async def completions(body: T.CompletionRequest) -> Response:
        prepared = prepare_request(body.to_generation_request(), tokenizer, backend, cfg)
        fmt = _CompletionFormat(f"cmpl-{uuid.uuid4().hex}", prepared.model)
        return _generation_response(backend, prepared, fmt, body.stream, body.include_usage)

    app.include_router(v1)
    return app


# ---------------------------------------------------------------------------- formats
class _Format(abc.ABC):
    """Builds one endpoint's response objects from request outputs (one subclass per endpoint)."""

    def __init__(self, request_id: str, model: str) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())

    def first_events(self) -> list[dict]:
        """Stream events sent before any text (none unless the endpoint has some)."""
        return []

    @abc.abstractmethod
    def text_event(self, text: str) -> dict:
        """The stream event carrying a piece of text."""

    @abc.abstractmethod
    def finish_event(self, out: RequestOutput) -> dict:
        """The stream event carrying the finish reason (``out`` is the final output)."""

    @abc.abstractmethod
    def usage_event(self, out: RequestOutput) -> dict:
        """The stream event carrying token usage, sent when the client asked for it."""

    @abc.abstractmethod
    def whole(self, text: str, out: RequestOutput) -> dict:
        """The non-streaming response: all of ``text`` and the final output's figures."""


class _ChatFormat(_Format):
    def _chunk(self, delta: T.Delta, finish: str | None = None, **extra) -> dict:
        choice = T.ChatChunkChoice(delta=delta, finish_reason=finish)
        chunk = T.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice], **extra)
        return T.dump(chunk)

    def first_events(self) -> list[dict]:
        return [self._chunk(T.Delta(role="assistant", content=""))]

    def text_event(self, text: str) -> dict:
        return self._chunk(T.Delta(content=text))

    def finish_event(self, out: RequestOutput) -> dict:
        return self._chunk(T.Delta(), _finish_reason(out), spec_decode=_spec(out))

    def usage_event(self, out: RequestOutput) -> dict:
        chunk = T.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=_usage(out), spec_decode=_spec(out)
        )
        return T.dump(chunk)

    def whole(self, text: str, out: RequestOutput) -> dict:
        choice = T.ChatChoice(message=T.AssistantMessage(content=text), finish_reason=_finish_reason(out))
        whole = T.ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=_usage(out),
            spec_decode=_spec(out),
        )
        return T.dump(whole)


class _CompletionFormat(_Format):
    def _chunk(self, choices: list[T.CompletionChoice], **extra) -> dict:
        return T.dump(T.Completion(id=self.id, created=self.created, model=self.model, choices=choices, **extra))

    def text_event(self, text: str) -> dict:
        return self._chunk([T.CompletionChoice(text=text)])

    def finish_event(self, out: RequestOutput) -> dict:
        return self._chunk([T.CompletionChoice(text="", finish_reason=_finish_reason(out))], spec_decode=_spec(out))

    def usage_event(self, out: RequestOutput) -> dict:
        return self._chunk([], usage=_usage(out), spec_decode=_spec(out))

    def whole(self, text: str, out: RequestOutput) -> dict:
        choice = T.CompletionChoice(text=text, finish_reason=_finish_reason(out))
        return self._chunk([choice], usage=_usage(out), spec_decode=_spec(out))


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason


def _usage(out: RequestOutput) -> T.Usage:
    p, c = out.num_prompt_tokens, out.num_output_tokens
    return T.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _spec(out: RequestOutput) -> T.SpecDecodeStats:
    m = out.metrics
    return T.SpecDecodeStats(
        num_drafts=m.num_drafts,
        num_draft_tokens=m.num_draft_tokens,
        num_accepted_tokens=m.num_accepted_tokens,
        mean_acceptance_length=round(m.mean_acceptance_length, 4),
    )


# ---------------------------------------------------------------------------- generation
def _generation_response(
    backend: GenerationBackend, prepared: PreparedRequest, fmt: _Format, stream: bool | None, include_usage: bool
) -> Response:
    def start() -> AsyncIterator[RequestOutput]:
        return backend.generate(prepared.prompt_ids, prepared.params, fmt.id)

    if stream:
        return _WatchedResponse(lambda send: _stream(start(), fmt, include_usage, send))
    return _WatchedResponse(lambda send: _whole(start(), fmt, send))


async def _stream(outputs: AsyncIterator[RequestOutput], fmt: _Format, include_usage: bool, send: Send) -> None:
    """SSE: the first output decides the status (a backend that refuses gets a JSON 4xx/5xx)."""
    try:
        try:
            out = await outputs.__anext__()
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never a dropped connection
            status, body = _backend_error(exc)
            await _send_json(send, status, body)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        for ev in fmt.first_events():
            await _send_event(send, ev)
        try:
            while True:
                if out.text_delta:
                    await _send_event(send, fmt.text_event(out.text_delta))
                if out.finished:
                    await _send_event(send, fmt.finish_event(out))
                    if include_usage:
                        await _send_event(send, fmt.usage_event(out))
                    break
                out = await outputs.__anext__()
        except OSError:
            raise  # the client is gone (ASGI servers raise OSError on send); nothing to tell it
        except Exception as exc:  # noqa: BLE001 - the client gets an error event, then [DONE]
            _, body = _backend_error(exc)
            await _send_event(send, body)
        await send({"type": "http.response.body", "body": _DONE, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await _close(outputs)


async def _whole(outputs: AsyncIterator[RequestOutput], fmt: _Format, send: Send) -> None:
    try:
        done = await collect(outputs)
    except Exception as exc:  # noqa: BLE001
        status, body = _backend_error(exc)
        await _send_json(send, status, body)
        return
    finally:
        await _close(outputs)
    await _send_json(send, 200, fmt.whole(done.text, done.final))


async def _close(outputs: AsyncIterator[RequestOutput]) -> None:
    """Close the backend iterator (aborting an unfinished request), even while cancelled."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


def _backend_error(exc: BaseException) -> tuple[int, dict]:
    """(status, OpenAI error body) for an exception a backend raised."""
    if isinstance(exc, RequestError):
        return exc.kind.value, _error_body(exc.message, exc.param, exc.code)
    if isinstance(exc, ValueError):  # the backend's own validation
        return 400, _error_body(str(exc))
    if isinstance(exc, BackendUnavailable):
        log.warning("generation interrupted: %s", exc)
        return 503, _error_body(str(exc), type_="server_error", code="backend_unavailable")
    log.error("generation failed: %s", exc, exc_info=exc)
    return 500, _error_body(f"generation failed: {exc}", type_="server_error", code="engine_error")


class _WatchedResponse(Response):
    """Runs ``handler(send)`` while watching the client; a disconnect cancels the handler.

    A client that leaves is normal: one debug line, no error and no traceback, whether the
    server says so with ``http.disconnect`` (uvicorn) or by raising from ``receive`` (Ray Serve's
    proxy cancels the call that fetches messages: ``TaskCancelledError``).
    """

    def __init__(self, handler: Callable[[Send], Awaitable[None]]) -> None:
        super().__init__()  # the handler sends its own status and headers
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                try:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    log.debug("client disconnected mid-response; aborting its request")
                except Exception as exc:  # noqa: BLE001 - Ray Serve's receive raises once the client is gone
                    log.debug("client gone mid-response (%s); aborting its request", type(exc).__name__)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self.handler(send)
            except OSError:  # send failed: the client left before the watcher noticed
                pass
            finally:
                tg.cancel_scope.cancel()


async def _send_event(send: Send, obj: dict) -> None:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    data = b"data: " + text.encode("utf-8", "replace") + b"\n\n"  # "replace": never fail on odd text
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _send_json(send: Send, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------------------- errors
def _error_body(
    message: str, param: str | None = None, code: str | None = None, type_: str = "invalid_request_error"
) -> dict:
    return T.dump(T.ErrorResponse(error=T.ErrorDetail(message=message, type=type_, param=param, code=code)))


def _error_response(status: int, body: dict) -> Response:
    # ASCII-escaped JSON: an error message may quote client text that is not valid Unicode.
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if status == 408:  # the rest of the body may still arrive: this connection cannot carry another request
        headers["Connection"] = "close"
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|.*\[.*\])$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending field from pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON: {detail}".rstrip(": "), None
    loc = [p for p in e.get("loc", ()) if p != "body"]
    path = ""
    for p in loc:
        if isinstance(p, int):
            path += f"[{p}]"
        elif _TYPE_TAG.match(str(p)):
            break  # a union member's tag, not a field
        else:
            path += f".{p}" if path else str(p)
    if e.get("type") == "missing" and not path:
        return "the request body is missing or not a JSON object", None
    msg = e.get("msg", "invalid value")
    return (f"{path}: {msg}" if path else msg), (path or None)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> Response:
        return _error_response(exc.kind.value, _error_body(exc.message, exc.param, exc.code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return _error_response(400, _error_body(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(exc.status_code, _error_body(str(exc.detail), code=code, type_=type_))

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> Response:
        log.error("unhandled error: %s", exc, exc_info=exc)
        return _error_response(500, _error_body("internal server error", type_="server_error"))


class _RequestGuard:
    """ASGI middleware: API key on /v1/* and the body size limit, before anything is parsed.

    A /v1 request with more than one Authorization header is 400, key or no key.
    The body is read here (counting bytes, so a missing or lying Content-Length cannot get past
    the limit), within ``body_timeout_s`` (uvicorn itself never times a request that is being
    received), and replayed to the app; later ``receive`` calls (disconnect) pass through.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        try:
            if scope["path"].startswith("/v1"):
                auths = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
                if len(auths) > 1:  # servers and proxies disagree on which one counts: refuse, never pick
                    raise RequestError("more than one Authorization header: send exactly one",
                                       code="duplicate_authorization")
                check_bearer(auths[0].decode("latin-1") if auths else None, self.api_key)
            with anyio.fail_after(self.body_timeout_s):
                body = await self._read_body(headers, receive)
            _check_utf8(body)
        except RequestError as exc:
            await _error_response(exc.kind.value, _error_body(exc.message, exc.param, exc.code))(scope, receive, send)
            return
        except TimeoutError:
            log.debug("request body not received within %g s; answering 408", self.body_timeout_s)
            message = f"the request body was not received within {self.body_timeout_s:g} s"
            await _error_response(408, _error_body(message, code="request_timeout"))(scope, receive, send)
            return
        except _ClientGone as exc:
            log.debug("client left while sending the request body (%s)", exc)
            return
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        too_large = RequestError(
            f"the request body is larger than {self.max_bytes} bytes",
            code="request_too_large",
            kind=ErrorKind.TOO_LARGE,
        )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                msg = await receive()
            except Exception as exc:  # noqa: BLE001 - Ray Serve's receive raises once the client is gone
                raise _ClientGone(type(exc).__name__) from None
            if msg["type"] != "http.request":
                raise _ClientGone(msg["type"])  # nobody is left to answer
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


class _ClientGone(Exception):
    """The client went away before its request body was complete."""


def _check_utf8(body: bytes) -> None:
    # JSON bodies must be UTF-8 (RFC 8259); json.loads would also guess UTF-16/32 and blur errors.
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
