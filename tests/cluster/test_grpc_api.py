"""gRPC GenerationService end to end: a real grpc.aio server on 127.0.0.1 (its own event loop
thread) over a real VerifierWorker and engine, called with the synchronous grpc client."""

from __future__ import annotations

import json
import re
import struct
import time
from types import SimpleNamespace

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_health")
pytest.importorskip("grpc_reflection")

from dspark.cluster.backend import LocalBackend  # noqa: E402
from dspark.cluster.grpc_api import start_grpc_server  # noqa: E402
from dspark.cluster.validation import RouterConfig  # noqa: E402
from dspark.proto.dspark.v1 import generate_pb2 as pb  # noqa: E402
from dspark.proto.dspark.v1 import generate_pb2_grpc  # noqa: E402
from dspark.proto.health import GENERATION_SERVICE  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from helpers.servers import LoopThread, ends_early_backend  # noqa: E402

PROMPT = "The three primary colors are"
PROMPT_MAX = 16
CHAT = [("user", "What is the capital of France? Answer in one sentence.")]
CHAT_MAX = 24
API_KEY = "grpc-test-key"
LONG_PROMPT = "Count from 1 to 300, separated by commas."  # greedy output runs to max_tokens


@pytest.fixture(scope="module")
def stack():
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig
    from dspark.workers.verifier import VerifierWorker

    spec = EngineSpec(dtype="fp32", draft="ngram", runner=RunnerConfig(n_slots=8, max_seq=512))
    built = build_engine(spec, progress=False)
    eng, tok = built.engine, built.loaded.tokenizer
    prompt_ids = tok.encode(PROMPT)
    chat_ids = tok.encode_chat([{"role": r, "content": c} for r, c in CHAT])
    prompt_ref, chat_ref = eng.generate(
        [prompt_ids, chat_ids],
        [SamplingParams(max_tokens=n, temperature=0.0) for n in (PROMPT_MAX, CHAT_MAX)],
    )
    # Plain-decoding references for stop strings that the ngram drafter's blocks run past: it
    # copies " capital of France" from the prompt, so the block after "The capital" is accepted
    # whole and " of" completes inside it; the longer stop starts earlier but completes later.
    words = chat_ref.text.split()
    stop_sets = [(" " + words[2],), (" " + " ".join(words[1:4]), " " + words[2])]
    stop_refs = eng.generate(
        [chat_ids] * len(stop_sets),
        [SamplingParams(max_tokens=CHAT_MAX, temperature=0.0, stop=s, speculative=False) for s in stop_sets],
    )
    worker = VerifierWorker(eng)
    loop = LoopThread()
    backend = LocalBackend(worker, built.loaded.name)
    open_server, open_port = loop.run(start_grpc_server(backend, tok, RouterConfig(api_key="")))
    keyed_server, keyed_port = loop.run(start_grpc_server(backend, tok, RouterConfig(api_key=API_KEY)))
    yield SimpleNamespace(
        engine=eng, worker=worker, model=built.loaded.name, port=open_port, keyed_port=keyed_port,
        prompt_ids=prompt_ids, prompt_ref=prompt_ref, chat_ref=chat_ref, stop_sets=stop_sets, stop_refs=stop_refs,
    )
    for server in (open_server, keyed_server):
        loop.run(server.stop(grace=1))
    loop.close()
    worker.close()
    built.close()


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return generate_pb2_grpc.GenerationServiceStub(channel)


def chat_request(**kw) -> pb.GenerateRequest:
    msgs = pb.ChatMessages(items=[pb.ChatMessage(role=r, content=c) for r, c in CHAT])
    return pb.GenerateRequest(messages=msgs, **kw)


def wait_idle(stack, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.engine.num_active or stack.engine.waiting or stack.worker.num_requests:
        assert time.monotonic() < deadline, "the engine still holds requests"
        time.sleep(0.05)


def test_generate_stream_equals_in_process_greedy(stack, stub):
    ref = stack.prompt_ref
    req = pb.GenerateRequest(prompt=PROMPT, max_tokens=PROMPT_MAX, temperature=0.0, request_id="my-id")
    msgs = list(stub.Generate(req, timeout=60))
    assert "".join(m.text for m in msgs) == ref.text
    assert [t for m in msgs for t in m.token_ids] == ref.output_ids
    assert all(m.request_id == "my-id" and m.model == stack.model for m in msgs)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason == {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}[ref.finish_reason]
    assert last.usage.prompt_tokens == len(stack.prompt_ids)
    assert last.usage.completion_tokens == len(ref.output_ids)
    assert last.spec_metrics.mean_acceptance_length >= 1.0
    assert last.spec_metrics.num_accepted_tokens <= last.spec_metrics.num_draft_tokens


def test_generate_unary_chat_and_token_ids(stack, stub):
    r = stub.GenerateUnary(chat_request(max_tokens=CHAT_MAX, temperature=0.0, model=stack.model), timeout=60)
    assert r.text == stack.chat_ref.text
    assert list(r.token_ids) == stack.chat_ref.output_ids
    assert r.request_id and r.usage.completion_tokens == len(stack.chat_ref.output_ids)
    r = stub.GenerateUnary(
        pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=stack.prompt_ids), max_tokens=PROMPT_MAX, temperature=0.0),
        timeout=60,
    )
    assert r.text == stack.prompt_ref.text
    # Stop strings follow the same rules as over HTTP.
    stop = stack.chat_ref.text.split()[2]
    r = stub.GenerateUnary(chat_request(max_tokens=CHAT_MAX, temperature=0.0, stop=[stop]), timeout=60)
    assert r.text == stack.chat_ref.text[: stack.chat_ref.text.find(stop)]
    assert r.finish_reason == pb.FINISH_REASON_STOP


def test_stop_strings_inside_a_draft_block_match_plain_decoding(stack, stub):
    """Text, token ids, finish reason and usage equal plain decoding's when a stop string
    completes inside an accepted block (the API has no per-request switch: the references
    were decoded in-process with speculation off)."""
    for stops, ref in zip(stack.stop_sets, stack.stop_refs):
        assert ref.finish_reason == "stop" and ref.metrics.num_drafts == 0
        r = stub.GenerateUnary(chat_request(max_tokens=CHAT_MAX, temperature=0.0, stop=list(stops)), timeout=60)
        assert r.spec_metrics.num_accepted_tokens > 0, stops  # speculation took part
        assert (r.text, list(r.token_ids), r.finish_reason) == (ref.text, ref.output_ids, pb.FINISH_REASON_STOP), stops
        assert r.usage.completion_tokens == len(ref.output_ids)
        msgs = list(stub.Generate(chat_request(max_tokens=CHAT_MAX, temperature=0.0, stop=list(stops)), timeout=60))
        assert "".join(m.text for m in msgs) == ref.text
        assert [t for m in msgs for t in m.token_ids] == ref.output_ids
        assert msgs[-1].usage.completion_tokens == len(ref.output_ids)


def test_health_serving_and_reflection(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", GENERATION_SERVICE):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    replies = list(reflection.ServerReflectionInfo(ask, timeout=10))
    listed = {s.name for s in replies[0].list_services_response.service}
    assert GENERATION_SERVICE == "dspark.v1.GenerationService"
    assert {GENERATION_SERVICE, "grpc.health.v1.Health"} <= listed


BAD = [
    ("no-input", pb.GenerateRequest(max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("empty-prompt", pb.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("empty-messages", pb.GenerateRequest(messages=pb.ChatMessages()), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("empty-token-ids", pb.GenerateRequest(prompt_token_ids=pb.TokenIds()), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("token-out-of-vocab", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5, 2**30])),
     grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    ("negative-temperature", pb.GenerateRequest(prompt="x", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    ("huge-temperature", pb.GenerateRequest(prompt="x", temperature=1e9), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    ("top-p", pb.GenerateRequest(prompt="x", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("top-k", pb.GenerateRequest(prompt="x", top_k=-7), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    ("seed", pb.GenerateRequest(prompt="x", seed=2**64 - 1), grpc.StatusCode.INVALID_ARGUMENT, "seed"),
    ("max-tokens-zero", pb.GenerateRequest(prompt="x", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("max-tokens-huge", pb.GenerateRequest(prompt="x", max_tokens=10**9), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens"),
    ("too-many-stops", pb.GenerateRequest(prompt="x", stop=[f"s{i}" for i in range(17)]),
     grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ("unknown-role", pb.GenerateRequest(messages=pb.ChatMessages(items=[pb.ChatMessage(role="wizard", content="x")])),
     grpc.StatusCode.INVALID_ARGUMENT, "role"),
    ("prompt-too-long", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[42] * 600)),
     grpc.StatusCode.INVALID_ARGUMENT, "context length"),
    ("request-id-too-long", pb.GenerateRequest(prompt="x", request_id="r" * 500), grpc.StatusCode.INVALID_ARGUMENT,
     "request_id"),
    ("unknown-model", pb.GenerateRequest(prompt="x", model="gpt-9"), grpc.StatusCode.NOT_FOUND, "gpt-9"),
]


@pytest.mark.parametrize("req,code,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_status(stub, req, code, needle):
    with pytest.raises(grpc.RpcError) as unary:
        stub.GenerateUnary(req, timeout=30)
    assert unary.value.code() == code and needle in unary.value.details(), unary.value.details()
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.Generate(req, timeout=30))
    assert streamed.value.code() == code


def test_oversized_message_is_refused(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateUnary(pb.GenerateRequest(prompt="a" * (2 << 20)), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_api_key(stack):
    with grpc.insecure_channel(f"127.0.0.1:{stack.keyed_port}") as ch:
        stub = generate_pb2_grpc.GenerationServiceStub(ch)
        req = pb.GenerateRequest(prompt=PROMPT, max_tokens=2, temperature=0.0)
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", API_KEY)]):
            with pytest.raises(grpc.RpcError) as err:
                stub.GenerateUnary(req, metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(req, metadata=metadata, timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.GenerateUnary(req, metadata=[("authorization", f"Bearer {API_KEY}")], timeout=30)
        assert ok.usage.completion_tokens >= 1
        # Health stays open, as over HTTP.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_cancel_aborts_the_request(stack, stub):
    wait_idle(stack)
    finished_before = stack.worker.finished_requests
    req = pb.GenerateRequest(
        messages=pb.ChatMessages(items=[pb.ChatMessage(role="user", content=LONG_PROMPT)]),
        max_tokens=400,
        temperature=0.0,
    )
    call = stub.Generate(req, timeout=60)
    for i, _ in enumerate(call):
        if i == 2:
            break
    call.cancel()
    wait_idle(stack, timeout=10)
    assert stack.worker.finished_requests == finished_before


def test_outputs_ending_without_a_final_one_are_internal(stack):
    """A backend whose outputs stop before the finished one: INTERNAL naming it, stream or unary."""

    loop = LoopThread()
    backend = ends_early_backend(stack.worker, stack.model)
    server, port = loop.run(start_grpc_server(backend, stack.engine.tokenizer, RouterConfig(api_key="")))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = generate_pb2_grpc.GenerationServiceStub(ch)
            req = pb.GenerateRequest(prompt=LONG_PROMPT, max_tokens=200, temperature=0.0)
            for call in (lambda: stub.GenerateUnary(req, timeout=60), lambda: list(stub.Generate(req, timeout=60))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.INTERNAL
                assert "without a final output" in err.value.details()
    finally:
        loop.run(server.stop(grace=1))
        loop.close()
    wait_idle(stack)


# --- logprobs, n > 1 and structured outputs ----------------------------------------------------


def direct(stack, prompt_ids, params):
    """The same backend's completions of a request, read in-process (no gRPC)."""
    from dspark.cluster.backend import collect

    async def run():
        outputs = LocalBackend(stack.worker, stack.model).generate(prompt_ids, params)
        try:
            return await collect(outputs, params.n)
        finally:
            await outputs.aclose()

    loop = LoopThread()
    try:
        return loop.run(run(), timeout=120)
    finally:
        loop.close()


def as_f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def check_logprobs(token_ids, logprobs, k):
    assert [lp.token_id for lp in logprobs] == list(token_ids)
    for lp in logprobs:
        assert lp.logprob <= 0.0 and len(lp.top) == k
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)


def test_logprobs_are_aligned_and_equal_the_backends(stack, stub):
    """Greedy, k = 2: one logprob per token id (streamed and unary), the top alternative is the
    token itself, and the values are the backend's own (float32 on the wire)."""
    params = SamplingParams(max_tokens=CHAT_MAX, temperature=0.0, logprobs=2)
    chat_ids = stack.engine.tokenizer.encode_chat([{"role": r, "content": c} for r, c in CHAT])
    (ref,) = direct(stack, chat_ids, params)
    assert ref.token_ids == stack.chat_ref.output_ids and len(ref.logprobs) == len(ref.token_ids)
    ref_values = [(as_f32(lp.logprob), [(t, as_f32(v)) for t, v in lp.top]) for lp in ref.logprobs]

    msgs = list(stub.Generate(chat_request(max_tokens=CHAT_MAX, temperature=0.0, logprobs=2), timeout=60))
    for m in msgs:
        assert len(m.logprobs) == len(m.token_ids) and m.index == 0
    unary = stub.GenerateUnary(chat_request(max_tokens=CHAT_MAX, temperature=0.0, logprobs=2), timeout=60)
    assert not unary.choices
    for token_ids, logprobs in (([t for m in msgs for t in m.token_ids], [lp for m in msgs for lp in m.logprobs]),
                                (list(unary.token_ids), list(unary.logprobs))):
        assert token_ids == ref.token_ids
        check_logprobs(token_ids, logprobs, 2)
        assert all(lp.top[0].token_id == lp.token_id and lp.top[0].logprob == lp.logprob for lp in logprobs)
        assert [(lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for lp in logprobs] == ref_values
    # Not asked for: none, and k = 0 is the token's own log-probability alone.
    assert not stub.GenerateUnary(chat_request(max_tokens=4, temperature=0.0), timeout=60).logprobs
    r = stub.GenerateUnary(chat_request(max_tokens=4, temperature=0.0, logprobs=0), timeout=60)
    check_logprobs(r.token_ids, r.logprobs, 0)
    assert list(r.token_ids) == ref.token_ids[: len(r.token_ids)]
    # Another request (4 tokens: its last verification block is cut shorter) runs steps of other
    # row counts, which float32 products may round differently in the last bits (measured: 1.2e-7
    # at one position on one host, 0 on another); the values must still be the same log-probabilities.
    assert [lp.logprob for lp in r.logprobs] == pytest.approx([v for v, _ in ref_values[: len(r.logprobs)]],
                                                              rel=1e-5, abs=1e-6)


def test_n_sequences_stream_and_unary(stack, stub):
    """n = 3, seeded: the stream interleaves three sequences and ends after the third final
    message, which alone carries the usage; the unary answer has three choices equal to them."""
    req = pb.GenerateRequest(prompt=PROMPT, max_tokens=8, temperature=0.9, seed=11, n=3, logprobs=1)
    msgs = list(stub.Generate(req, timeout=120))
    finals = [m for m in msgs if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
    assert sorted(m.index for m in finals) == [0, 1, 2] and msgs[-1] is finals[-1]
    assert [m.HasField("usage") for m in msgs] == [False] * (len(msgs) - 1) + [True]
    streamed = {i: [t for m in msgs if m.index == i for t in m.token_ids] for i in range(3)}
    streamed_text = {i: "".join(m.text for m in msgs if m.index == i) for i in range(3)}
    for m in msgs:
        assert len(m.logprobs) == len(m.token_ids)
    assert msgs[-1].usage.prompt_tokens == len(stack.prompt_ids)
    assert msgs[-1].usage.completion_tokens == sum(len(ids) for ids in streamed.values())
    assert all(1 <= len(ids) <= 8 for ids in streamed.values())

    r = stub.GenerateUnary(req, timeout=120)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert not r.text and not r.token_ids and r.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert r.usage.prompt_tokens == len(stack.prompt_ids)
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in r.choices)
    for c in r.choices:
        # Sequence i seeds with seed + i, so it is the same sequence however it is read.
        assert (list(c.token_ids), c.text) == (streamed[c.index], streamed_text[c.index])
        assert c.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        check_logprobs(c.token_ids, c.logprobs, 1)
    assert len({tuple(c.token_ids) for c in r.choices}) > 1, "three seeds sampled one text: the test checks little"
    for field in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert getattr(r.spec_metrics, field) == sum(getattr(c.spec_metrics, field) for c in r.choices)
    wait_idle(stack)


CITY_SCHEMA = {
    "type": "object",
    # Not in alphabetical order: the output must keep the schema's.
    "properties": {"population": {"type": "integer"}, "city": {"type": "string", "maxLength": 24}},
    "required": ["population", "city"],
    "additionalProperties": False,
}


CITY_ASK = "Give the capital of France and its population as a JSON object with keys city and population."
# json_object allows any object: greedy, this prompt closes it (the city one adds keys until max_tokens).
ANSWER_ASK = 'Reply with a JSON object with one key "answer" holding the sum 2 + 2.'


def json_chat(ask: str = CITY_ASK, **kw) -> pb.GenerateRequest:
    kw.setdefault("temperature", 0.0)
    return pb.GenerateRequest(messages=pb.ChatMessages(items=[pb.ChatMessage(role="user", content=ask)]),
                              max_tokens=96, **kw)


def test_structured_outputs(stub):
    import jsonschema

    r = stub.GenerateUnary(json_chat(ANSWER_ASK, json_object=True), timeout=120)
    assert r.finish_reason == pb.FINISH_REASON_STOP, r.text
    assert isinstance(json.loads(r.text), dict)
    msgs = list(stub.Generate(json_chat(json_schema=json.dumps(CITY_SCHEMA)), timeout=120))
    text = "".join(m.text for m in msgs)
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP, text
    jsonschema.validate(json.loads(text), CITY_SCHEMA)
    assert list(json.loads(text)) == list(CITY_SCHEMA["properties"])
    r = stub.GenerateUnary(pb.GenerateRequest(prompt=PROMPT, max_tokens=8, temperature=0.0, regex="[0-9]{3}"),
                           timeout=120)
    assert re.fullmatch("[0-9]{3}", r.text) and r.finish_reason == pb.FINISH_REASON_STOP
    # n > 1 with a grammar: every sequence follows it.
    r = stub.GenerateUnary(json_chat(json_schema=json.dumps(CITY_SCHEMA), n=2, temperature=0.7, seed=5),
                           timeout=120)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.finish_reason == pb.FINISH_REASON_STOP, c.text
        jsonschema.validate(json.loads(c.text), CITY_SCHEMA)


BAD_FEATURES = [
    ("n-zero", pb.GenerateRequest(prompt="x", n=0), "n must"),
    ("n-huge", pb.GenerateRequest(prompt="x", n=100), "n must"),
    ("logprobs-50", pb.GenerateRequest(prompt="x", logprobs=50), "logprobs"),
    ("json-schema-not-json", pb.GenerateRequest(prompt="x", json_schema="{\"type\": "), "json_schema"),
    ("json-schema-empty", pb.GenerateRequest(prompt="x", json_schema=""), "json_schema"),
    ("json-schema-not-a-schema", pb.GenerateRequest(prompt="x", json_schema="[1, 2]"), "json_schema"),
    ("json-schema-unsupported", pb.GenerateRequest(prompt="x", json_schema='{"type": "array", "uniqueItems": true}'),
     "json_schema"),
    ("json-object-false", pb.GenerateRequest(prompt="x", json_object=False), "json_object"),
    ("regex-empty", pb.GenerateRequest(prompt="x", regex=""), "regex"),
    ("regex-invalid", pb.GenerateRequest(prompt="x", regex="(ab"), "regex"),
    ("grammar-invalid", pb.GenerateRequest(prompt="x", grammar="start: (("), "grammar"),
]


@pytest.mark.parametrize("req,needle", [b[1:] for b in BAD_FEATURES], ids=[b[0] for b in BAD_FEATURES])
def test_bad_feature_input_is_invalid_argument(stub, req, needle):
    test_bad_input_status(stub, req, grpc.StatusCode.INVALID_ARGUMENT, needle)
