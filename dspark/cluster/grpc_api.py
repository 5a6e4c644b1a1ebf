"""The router's gRPC API (``dspark.v1.GenerationService``) over any :class:`GenerationBackend`.

    server, port = await start_grpc_server(backend, tokenizer, RouterConfig())
    ...
    await server.stop(grace=5)

The servicer is thin: it turns a ``GenerateRequest`` into the protocol-neutral
:class:`GenerationRequest` (:func:`request_from_proto`), applies the rules shared with the HTTP
API (:func:`dspark.cluster.validation.prepare_request`) and turns request outputs back into
``GenerateResponse`` messages.  Protobuf types stop here.  A request for n > 1 sequences streams
the outputs of all n interleaved (each message names its ``index``) and ends after the last
sequence's final output, which carries the usage of the whole request; GenerateUnary answers
n > 1 with one ``Choice`` per sequence.  Status codes: INVALID_ARGUMENT
(bad input, including a payload that is not a ``GenerateRequest``), NOT_FOUND (unknown model),
UNAUTHENTICATED (API key), UNAVAILABLE (the verifier replica is gone; retry), INTERNAL (engine
failure).
A client that cancels or goes away cancels the handler, which aborts the request.

A server interceptor (:class:`_Gate`) runs before any servicer code: it checks the API key from
the metadata alone, so an unauthenticated client learns nothing about how its payload would be
read, and only then decodes the payload, answering INVALID_ARGUMENT when it is not a valid
message (gRPC's own deserializer would answer UNKNOWN naming the protobuf exception).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

import grpc
from google.protobuf.message import DecodeError

from dspark.cluster.backend import BackendUnavailable, Completion, GenerationBackend, IncompleteOutput, collect
from dspark.cluster.validation import (
    ChatTurn,
    ErrorKind,
    GenerationRequest,
    PreparedRequest,
    RequestError,
    RouterConfig,
    check_bearer,
    grammar_from_response_format,
    prepare_request,
)
from dspark.kernels.sampling import LOGPROB_FLOOR
from dspark.models.tokenizer import Tokenizer
from dspark.proto.dspark.v1 import generate_pb2, generate_pb2_grpc
from dspark.proto.health import GENERATION_SERVICE, add_health_and_reflection, bind_loopback
from dspark.workers.request import RequestOutput, SpecMetrics, TokenLogprob

if TYPE_CHECKING:
    from dspark.workers.grammar import GrammarSpec

log = logging.getLogger(__name__)

STATUS_OF_KIND = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_FINISH = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
}


def request_from_proto(req: generate_pb2.GenerateRequest) -> GenerationRequest:
    """The protocol-neutral form of a GenerateRequest (unset optional fields stay None)."""
    form = req.WhichOneof("input")
    prompt = messages = None
    if form == "prompt":
        prompt = req.prompt
    elif form == "messages":
        messages = [ChatTurn(m.role, m.content) for m in req.messages.items]
    elif form == "prompt_token_ids":
        prompt = list(req.prompt_token_ids.ids)
    else:
        raise RequestError("set one input: prompt, messages or prompt_token_ids", param="input")
    return GenerationRequest(
        model=req.model or None,
        prompt=prompt,
        messages=messages,
        max_tokens=req.max_tokens if req.HasField("max_tokens") else None,
        temperature=req.temperature if req.HasField("temperature") else None,
        top_p=req.top_p if req.HasField("top_p") else None,
        top_k=req.top_k if req.HasField("top_k") else None,
        seed=req.seed if req.HasField("seed") else None,
        stop=list(req.stop),
        n=req.n if req.HasField("n") else None,
        logprobs=req.logprobs if req.HasField("logprobs") else None,
        grammar=_grammar_from_proto(req),
    )


def _grammar_from_proto(req: generate_pb2.GenerateRequest) -> GrammarSpec | None:
    """The ``response_format`` oneof as a GrammarSpec, through the rules the HTTP API applies."""
    kind = req.WhichOneof("response_format")
    if kind is None:
        return None
    if kind == "json_object":
        if not req.json_object:  # a set oneof member that asks for nothing: refuse rather than guess
            raise RequestError("json_object must be true when set (leave response_format unset for free text)",
                               param="json_object")
        return grammar_from_response_format({"type": "json_object"}, param="response_format")
    if kind == "json_schema":
        try:
            schema = json.loads(req.json_schema)
        except ValueError as exc:
            raise RequestError(f"json_schema is not valid JSON: {exc}", param="json_schema") from None
        if not isinstance(schema, (dict, bool)):
            raise RequestError("json_schema must be a JSON schema: an object (or true / false)", param="json_schema")
        return grammar_from_response_format(
            {"type": "json_schema", "json_schema": {"schema": schema}}, param="response_format"
        )
    return grammar_from_response_format({"type": kind, kind: getattr(req, kind)}, param="response_format")


def _logprobs_to_proto(logprobs: Sequence[TokenLogprob] | None) -> list[generate_pb2.TokenLogprob]:
    return [
        generate_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=_finite(lp.logprob),
            top=[generate_pb2.TopLogprob(token_id=t, logprob=_finite(v)) for t, v in lp.top],
        )
        for lp in logprobs or ()
    ]


def _finite(logprob: float) -> float:
    # -inf: a token the sampling distribution excludes; sent as the floor, as over HTTP.
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def _finish(out: RequestOutput) -> int:
    return _FINISH.get(out.finish_reason or "", generate_pb2.FINISH_REASON_ABORT)


def _fill_metrics(dst: generate_pb2.SpecMetrics, m: SpecMetrics) -> None:
    dst.num_drafts = m.num_drafts
    dst.num_draft_tokens = m.num_draft_tokens
    dst.num_accepted_tokens = m.num_accepted_tokens
    dst.mean_acceptance_length = m.mean_acceptance_length


def _fill_usage(dst: generate_pb2.Usage, finals: list[RequestOutput]) -> None:
    """The request's usage from its sequences' final outputs: the shared prompt once, outputs summed."""
    dst.prompt_tokens = finals[0].num_prompt_tokens
    dst.completion_tokens = sum(f.num_output_tokens for f in finals)


def response_from_output(out: RequestOutput, request_id: str, model: str) -> generate_pb2.GenerateResponse:
    """One streamed GenerateResponse for one output of sequence ``out.index``; a sequence's final
    output (``out.finished``) adds its finish reason and metrics (the caller adds usage at the end)."""
    msg = generate_pb2.GenerateResponse(
        request_id=request_id,
        text=out.text_delta,
        token_ids=out.new_token_ids,
        model=model,
        index=out.index,
        logprobs=_logprobs_to_proto(out.logprobs),
    )
    if out.finished:
        msg.finish_reason = _finish(out)
        _fill_metrics(msg.spec_metrics, out.metrics)
    return msg


def response_from_completions(done: list[Completion], request_id: str, model: str) -> generate_pb2.GenerateResponse:
    """The GenerateUnary answer: n = 1 in the top-level fields, n > 1 as choices; usage and metrics
    cover every sequence."""
    msg = generate_pb2.GenerateResponse(request_id=request_id, model=model)
    _fill_usage(msg.usage, [c.final for c in done])
    if len(done) == 1:
        c = done[0]
        msg.text = c.text
        msg.token_ids.extend(c.token_ids)
        msg.finish_reason = _finish(c.final)
        msg.logprobs.extend(_logprobs_to_proto(c.logprobs))
        _fill_metrics(msg.spec_metrics, c.final.metrics)
        return msg
    total = SpecMetrics()
    for c in done:
        choice = msg.choices.add(
            index=c.index,
            text=c.text,
            token_ids=c.token_ids,
            finish_reason=_finish(c.final),
            logprobs=_logprobs_to_proto(c.logprobs),
        )
        m = c.final.metrics
        _fill_metrics(choice.spec_metrics, m)
        total.num_drafts += m.num_drafts
        total.num_draft_tokens += m.num_draft_tokens
        total.num_accepted_tokens += m.num_accepted_tokens
    _fill_metrics(msg.spec_metrics, total)
    return msg


class GenerationServicer(generate_pb2_grpc.GenerationServiceServicer):
    """grpc.aio servicer of GenerationService."""

    def __init__(self, backend: GenerationBackend, tokenizer: Tokenizer, cfg: RouterConfig = RouterConfig()) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.cfg = cfg

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        prepared, client_id = await self._admit(request, context)
        outputs = self.backend.generate(prepared.prompt_ids, prepared.params, f"grpc-{uuid.uuid4().hex}")
        n = prepared.params.n
        finals: dict[int, RequestOutput] = {}
        failure = None
        try:
            async for out in outputs:
                msg = response_from_output(out, client_id, prepared.model)
                if out.finished:
                    finals[out.index] = out
                    if len(finals) == n:  # the last sequence to finish closes the stream with the usage
                        _fill_usage(msg.usage, list(finals.values()))
                yield msg
                if len(finals) == n:
                    break
            else:
                failure = _failure(IncompleteOutput())
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            failure = _failure(exc)
        finally:
            await _close(outputs)
        if failure is not None:
            await context.abort(*failure)

    async def GenerateUnary(self, request, context: grpc.aio.ServicerContext):
        prepared, client_id = await self._admit(request, context)
        outputs = self.backend.generate(prepared.prompt_ids, prepared.params, f"grpc-{uuid.uuid4().hex}")
        failure = None
        try:
            done = await collect(outputs, prepared.params.n)
        except Exception as exc:  # noqa: BLE001
            failure = _failure(exc)
        finally:
            await _close(outputs)
        if failure is not None:
            await context.abort(*failure)
        return response_from_completions(done, client_id, prepared.model)

    async def _admit(self, request, context: grpc.aio.ServicerContext) -> tuple[PreparedRequest, str]:
        """Validate (the interceptor has authenticated); aborts the call with the matching status on failure."""
        try:
            client_id = request.request_id
            if len(client_id) > self.cfg.max_request_id_chars:
                raise RequestError(
                    f"request_id is longer than {self.cfg.max_request_id_chars} characters", param="request_id"
                )
            prepared = prepare_request(request_from_proto(request), self.tokenizer, self.backend, self.cfg)
        except RequestError as exc:
            failure = (STATUS_OF_KIND[exc.kind], exc.message)
        else:
            return prepared, client_id or f"gen-{uuid.uuid4().hex}"
        await context.abort(*failure)
        raise AssertionError("unreachable: abort raises")


def _failure(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RequestError):
        return STATUS_OF_KIND[exc.kind], exc.message
    if isinstance(exc, ValueError):  # the backend's own validation
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, BackendUnavailable):
        log.warning("generation interrupted: %s", exc)
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    log.error("generation failed: %s", exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"generation failed: {exc}"


async def _close(outputs: AsyncIterator[RequestOutput]) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        await aclose()


_UNDECODABLE = object()  # what the lenient deserializer hands the handler for a payload that does not decode
_MALFORMED = "the request payload is not a valid GenerateRequest message"


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw) if deserialize is not None else raw
        except DecodeError:
            return _UNDECODABLE

    return decode


class _Gate(grpc.aio.ServerInterceptor):
    """Authenticates GenerationService calls from their metadata, then decodes leniently.

    More than one ``authorization`` entry is INVALID_ARGUMENT, key or no key.
    A refused call gets a handler whose deserializer is the identity, so its payload is never
    parsed.  Health checking and reflection stay open, like ``/health`` over HTTP.
    """

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{GENERATION_SERVICE}/"):
            return handler
        try:
            auths = [v for k, v in details.invocation_metadata or () if k == "authorization"]
            if len(auths) > 1:  # proxies and servers disagree on which one counts: refuse, never pick
                raise RequestError("more than one authorization metadata entry: send exactly one",
                                   code="duplicate_authorization")
            check_bearer(auths[0] if auths and isinstance(auths[0], str) else None, self.api_key)
        except RequestError as exc:
            return _refusal(handler, STATUS_OF_KIND[exc.kind], exc.message)
        return _decoding(handler)


def _with_behaviour(handler: grpc.RpcMethodHandler, deserializer, behaviour) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind (unary or server streaming) running ``behaviour``."""
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(behaviour, request_deserializer=deserializer, response_serializer=handler.response_serializer)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with ``code`` without reading its payload."""

    async def refuse(request, context):  # a coroutine, not a generator: gRPC awaits it
        await context.abort(code, message)

    return _with_behaviour(handler, None, refuse)


def _decoding(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that turns DecodeError into INVALID_ARGUMENT."""
    if handler.request_streaming:
        return handler  # GenerationService has none; a client stream would need per-message checks
    if handler.response_streaming:
        inner = handler.unary_stream

        async def stream(request, context):
            if request is _UNDECODABLE:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _MALFORMED)
            async for response in inner(request, context):
                yield response

        return _with_behaviour(handler, _lenient(handler.request_deserializer), stream)
    inner = handler.unary_unary

    async def unary(request, context):
        if request is _UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _MALFORMED)
        return await inner(request, context)

    return _with_behaviour(handler, _lenient(handler.request_deserializer), unary)


async def start_grpc_server(
    backend: GenerationBackend,
    tokenizer: Tokenizer,
    cfg: RouterConfig = RouterConfig(),
    host: str = "127.0.0.1",
    port: int = 0,
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with GenerationService, health checking (SERVING) and reflection.

    Port 0 picks a free one; returns (server, bound port).  Messages above
    ``cfg.max_request_bytes`` are refused by gRPC itself (RESOURCE_EXHAUSTED).
    """
    server = grpc.aio.server(
        interceptors=[_Gate(cfg.resolved_api_key())],
        options=[("grpc.max_receive_message_length", cfg.max_request_bytes)],
    )
    generate_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(backend, tokenizer, cfg), server)
    if host == "127.0.0.1":
        bound = bind_loopback(server, port)
    else:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"could not bind {address}")
    await add_health_and_reflection(server, [GENERATION_SERVICE])
    await server.start()
    return server, bound
