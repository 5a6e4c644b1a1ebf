"""OpenAI-compatible HTTP API end to end: a real uvicorn server on 127.0.0.1 over a real
VerifierWorker and engine (SmolLM2 fp32, ngram drafter), driven by the official openai client
and raw httpx for what the client cannot send (bad bodies, disconnects)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dspark.cluster.backend import LocalBackend  # noqa: E402
from dspark.cluster.openai_api import make_http_app  # noqa: E402
from dspark.cluster.validation import RouterConfig  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from dspark.workers.verifier import EngineError  # noqa: E402
from helpers.servers import ends_early_backend, serve  # noqa: E402

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
CHAT_MAX = 24
COMPLETION = "The three primary colors are"
COMPLETION_MAX = 16
LONG_CHAT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def stack():
    """Engine + worker + backend, with greedy references decoded in-process before serving."""
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig
    from dspark.workers.verifier import VerifierWorker

    spec = EngineSpec(dtype="fp32", draft="ngram", runner=RunnerConfig(n_slots=8, max_seq=512))
    built = build_engine(spec, progress=False)
    eng, tok = built.engine, built.loaded.tokenizer
    chat_ids = tok.encode_chat(CHAT)
    comp_ids = tok.encode(COMPLETION)
    # The engine belongs to the worker thread once that starts: decode the references first.
    chat_ref, comp_ref = eng.generate(
        [chat_ids, comp_ids],
        [SamplingParams(max_tokens=n, temperature=0.0) for n in (CHAT_MAX, COMPLETION_MAX)],
    )
    worker = VerifierWorker(eng)
    backend = LocalBackend(worker, built.loaded.name)
    yield SimpleNamespace(
        engine=eng, worker=worker, backend=backend, tok=tok, model=built.loaded.name,
        chat_ids=chat_ids, chat_ref=chat_ref, comp_ids=comp_ids, comp_ref=comp_ref,
    )
    worker.close()
    built.close()


@pytest.fixture(scope="module")
def base(stack):
    with serve(make_http_app(stack.backend, stack.tok, RouterConfig(api_key=""))) as url:
        yield url


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def assert_healthy(http) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text


def wait_idle(stack, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.engine.num_active or stack.engine.waiting or stack.worker.num_requests:
        assert time.monotonic() < deadline, "the engine still holds requests"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- generation
def test_chat_whole_and_streamed_equal_in_process_greedy(stack, client):
    ref = stack.chat_ref
    whole = client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=CHAT_MAX, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert whole.usage.prompt_tokens == len(stack.chat_ids)
    assert whole.usage.completion_tokens == len(ref.output_ids)
    assert whole.usage.total_tokens == len(stack.chat_ids) + len(ref.output_ids)
    spec = whole.model_extra["spec_decode"]
    assert set(spec) == {"num_drafts", "num_draft_tokens", "num_accepted_tokens", "mean_acceptance_length"}
    # The ngram drafter copies from this prompt, so drafts are verified; speculation off: none.
    assert spec["num_drafts"] > 0 and spec["num_draft_tokens"] >= spec["num_drafts"]
    assert spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert whole.id.startswith("chatcmpl-") and whole.model == stack.model
    plain = client.chat.completions.create(
        model=stack.model, messages=CHAT, max_tokens=CHAT_MAX, temperature=0, extra_body={"speculative": False}
    )
    assert plain.choices[0].message.content == ref.text and plain.usage == whole.usage
    off = plain.model_extra["spec_decode"]
    assert (off["num_drafts"], off["num_draft_tokens"]) == (0, 0)

    chunks = list(
        client.chat.completions.create(
            messages=CHAT, model=stack.model, max_tokens=CHAT_MAX, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == ref.finish_reason
    assert finals[0].model_extra["spec_decode"]["num_drafts"] == spec["num_drafts"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.output_ids)
    assert len({c.id for c in chunks}) == 1


def test_completions_text_and_token_prompts(stack, client):
    ref = stack.comp_ref
    for prompt in (COMPLETION, [COMPLETION], stack.comp_ids, [stack.comp_ids]):
        r = client.completions.create(model=stack.model, prompt=prompt, max_tokens=COMPLETION_MAX, temperature=0)
        assert r.choices[0].text == ref.text, prompt
        assert r.usage.prompt_tokens == len(stack.comp_ids)
        assert r.usage.completion_tokens == len(ref.output_ids)
        assert r.model_extra["spec_decode"]["mean_acceptance_length"] >= 1.0
    stream = client.completions.create(
        model=stack.model, prompt=COMPLETION, max_tokens=COMPLETION_MAX, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert "spec_decode" in chunks[-1].model_extra


def test_stop_strings_cut_the_text(stack, client):
    ref = stack.chat_ref.text
    words = ref.split()
    assert len(words) >= 3, ref
    stop = words[len(words) // 2]
    expected = ref[: ref.find(stop)]
    for stops in (stop, [stop, "no such text"]):
        r = client.chat.completions.create(
            model=stack.model, messages=CHAT, max_tokens=CHAT_MAX, temperature=0, stop=stops
        )
        assert r.choices[0].message.content == expected
        assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=stack.model, messages=CHAT, max_tokens=CHAT_MAX, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_stop_strings_inside_a_draft_block_match_plain_decoding(stack, client):
    """The ngram drafter copies " capital of France" from the prompt, so the block after "The
    capital" is accepted whole and " of" completes inside it (the longer stop starts earlier
    but completes later).  Text, finish reason and usage must equal plain decoding's."""
    words = stack.chat_ref.text.split()
    for stop in ([" " + words[2]], [" " + " ".join(words[1:4]), " " + words[2]]):
        kw = dict(model=stack.model, messages=CHAT, max_tokens=CHAT_MAX, temperature=0, stop=stop)
        spec = client.chat.completions.create(**kw, extra_body={"speculative": True})
        plain = client.chat.completions.create(**kw, extra_body={"speculative": False})
        assert spec.model_extra["spec_decode"]["num_accepted_tokens"] > 0, stop  # speculation took part
        assert plain.model_extra["spec_decode"]["num_drafts"] == 0
        assert spec.choices[0].message.content == plain.choices[0].message.content, stop
        assert spec.choices[0].finish_reason == plain.choices[0].finish_reason == "stop"
        assert spec.usage == plain.usage, stop
        streamed = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain.choices[0].message.content
        assert streamed[-1].usage == plain.usage


def test_max_tokens_alias_default_and_clipping(stack, client, http):
    r = client.chat.completions.create(model=stack.model, messages=CHAT, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    # A prompt 3 tokens short of the context: max_tokens=100 is clipped, not refused.
    room = 3
    ids = (stack.comp_ids * 200)[: stack.backend.max_context - room]
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 100, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] <= room
    assert body["usage"]["prompt_tokens"] == len(ids)
    if body["usage"]["completion_tokens"] == room:
        assert body["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible(stack, client):
    kw = dict(model=stack.model, messages=CHAT, max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw, extra_body={"top_k": 50}).choices[0].message.content
    c = client.chat.completions.create(**kw, extra_body={"top_k": 50}).choices[0].message.content
    assert a and b == c


def test_concurrent_requests_all_complete(stack, base):
    topics = ["cats", "rivers", "the moon", "bread", "music", "snow", "trains", "gardens"]

    async def one(aclient, i: int, topic: str) -> str:
        kw = dict(model=stack.model, messages=[{"role": "user", "content": f"Write one sentence about {topic}."}],
                  max_tokens=12, temperature=0)
        if i % 2:
            return (await aclient.chat.completions.create(**kw)).choices[0].message.content
        stream = await aclient.chat.completions.create(**kw, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, i, t) for i, t in enumerate(topics)))

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(texts)
    wait_idle(stack)


def test_disconnect_mid_stream_aborts_the_request(stack, base):
    wait_idle(stack)
    finished_before = stack.worker.finished_requests
    body = {"messages": LONG_CHAT, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(base_url=base, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 4:
                        break
            assert stack.engine.num_active == 1
    # The connection is closed: the server must abort the request, not decode 400 tokens.
    wait_idle(stack, timeout=10)
    assert stack.worker.finished_requests == finished_before
    # The same for a non-streaming request whose client gives up waiting.
    with httpx.Client(base_url=base, timeout=1.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json={**body, "stream": False})
    wait_idle(stack, timeout=10)
    assert stack.worker.finished_requests == finished_before


def test_engine_error_mid_stream_sends_error_event(stack):
    class FailsAfterFirstOutput(LocalBackend):
        async def generate(self, prompt_ids, params, request_id=None):
            outputs = super().generate(prompt_ids, params, request_id)
            try:
                yield await outputs.__anext__()
                raise EngineError("injected failure")
            finally:
                await outputs.aclose()

    app = make_http_app(FailsAfterFirstOutput(stack.worker, stack.model), stack.tok, RouterConfig(api_key=""))
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        body = {"messages": LONG_CHAT, "max_tokens": 200, "temperature": 0, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert "injected failure" in err["message"] and err["type"] == "server_error"
        r = c.post("/v1/chat/completions", json={**body, "stream": False})
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200
    wait_idle(stack)


def test_outputs_ending_without_a_final_one_are_a_server_error(stack):
    """A backend whose outputs stop before the finished one: 500 naming it, never a partial 200."""

    app = make_http_app(ends_early_backend(stack.worker, stack.model), stack.tok, RouterConfig(api_key=""))
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        body = {"messages": LONG_CHAT, "max_tokens": 200, "temperature": 0, "stream": False}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 500 and "without a final output" in r.json()["error"]["message"]
    wait_idle(stack)


# ---------------------------------------------------------------------------- endpoints
def test_models_health_and_openapi(stack, client, http):
    models = client.models.list().data
    assert [m.id for m in models] == [stack.model]
    assert client.models.retrieve(stack.model).id == stack.model
    r = http.get("/v1/models/no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["model"] == stack.model
    schema = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(schema["paths"])


def test_api_key_required_on_v1_only(stack):
    app = make_http_app(stack.backend, stack.tok, RouterConfig(api_key=API_KEY))
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        req = {"messages": CHAT, "max_tokens": 2}
        wrong = ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic x"})
        for headers in wrong:
            r = c.post("/v1/chat/completions", json=req, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        # Checked before the body is parsed: garbage without a key is still a 401.
        assert c.post("/v1/completions", content=b"{not json").status_code == 401
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        assert good.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=2).choices
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("DSPARK_API_KEY", "from-env")
    assert RouterConfig().resolved_api_key() == "from-env"
    assert RouterConfig(api_key="explicit").resolved_api_key() == "explicit"
    assert RouterConfig(api_key="").resolved_api_key() is None
    monkeypatch.delenv("DSPARK_API_KEY")
    assert RouterConfig().resolved_api_key() is None


# ---------------------------------------------------------------------------- bad input
MSG = [{"role": "user", "content": "hi"}]
CHAT_URL, COMP_URL = "/v1/chat/completions", "/v1/completions"


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


BAD_INPUTS = [
    # (id, url, raw body, status, param, code)
    ("malformed-json", CHAT_URL, b'{"model": ', 400, None, None),
    ("json-array", CHAT_URL, b"[1, 2]", 400, None, None),
    ("not-utf8", COMP_URL, b'{"prompt": "caf\xe9"}', 400, None, "invalid_encoding"),
    ("lone-surrogate", COMP_URL, b'{"prompt": "\\ud800x"}', 400, "prompt", None),
    ("messages-wrong-type", CHAT_URL, _j({"messages": "hello"}), 400, "messages", None),
    ("temperature-string", CHAT_URL, _j({"messages": MSG, "temperature": "hot"}), 400, "temperature", None),
    ("max-tokens-string", CHAT_URL, _j({"messages": MSG, "max_tokens": "5"}), 400, "max_tokens", None),
    ("max-tokens-float", COMP_URL, _j({"prompt": "x", "max_tokens": 2.5}), 400, "max_tokens", None),
    ("missing-messages", CHAT_URL, _j({"model": "x"}), 400, "messages", None),
    ("missing-prompt", COMP_URL, _j({}), 400, "prompt", None),
    ("missing-role", CHAT_URL, _j({"messages": [{"content": "x"}]}), 400, "messages[0].role", None),
    ("empty-body", CHAT_URL, b"", 400, None, None),
    ("empty-messages", CHAT_URL, _j({"messages": []}), 400, "messages", None),
    ("empty-prompt", COMP_URL, _j({"prompt": ""}), 400, "prompt", None),
    ("empty-prompt-list", COMP_URL, _j({"prompt": []}), 400, "prompt", None),
    ("two-prompts", COMP_URL, _j({"prompt": ["a", "b"]}), 400, "prompt", None),
    ("token-out-of-vocab", COMP_URL, _j({"prompt": [1, 10**9]}), 400, "prompt", None),
    ("oversized", COMP_URL, b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, None, "request_too_large"),
    ("prompt-too-long", COMP_URL, _j({"prompt": [42] * 600}), 400, "prompt", "context_length_exceeded"),
    ("chat-too-long", CHAT_URL, _j({"messages": [{"role": "user", "content": "word " * 700}]}), 400, "messages",
     "context_length_exceeded"),
    ("temperature-negative", CHAT_URL, _j({"messages": MSG, "temperature": -0.5}), 400, "temperature", None),
    ("temperature-huge", CHAT_URL, _j({"messages": MSG, "temperature": 1e6}), 400, "temperature", None),
    ("temperature-nan", CHAT_URL, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature", None),
    ("top-p-zero", CHAT_URL, _j({"messages": MSG, "top_p": 0}), 400, "top_p", None),
    ("top-p-big", COMP_URL, _j({"prompt": "x", "top_p": 1.5}), 400, "top_p", None),
    ("top-k-negative", COMP_URL, _j({"prompt": "x", "top_k": -2}), 400, "top_k", None),
    ("seed-negative", COMP_URL, _j({"prompt": "x", "seed": -1}), 400, "seed", None),
    ("max-tokens-zero", CHAT_URL, _j({"messages": MSG, "max_tokens": 0}), 400, "max_tokens", None),
    ("max-tokens-negative", COMP_URL, _j({"prompt": "x", "max_tokens": -5}), 400, "max_tokens", None),
    ("max-tokens-huge", COMP_URL, _j({"prompt": "x", "max_tokens": 10**12}), 400, "max_tokens", None),
    ("unknown-model", CHAT_URL, _j({"model": "gpt-9", "messages": MSG}), 404, "model", "model_not_found"),
    ("too-many-stops", CHAT_URL, _j({"messages": MSG, "stop": [f"s{i}" for i in range(17)]}), 400, "stop", None),
    ("empty-stop", COMP_URL, _j({"prompt": "x", "stop": [""]}), 400, "stop", None),
    ("n-0", CHAT_URL, _j({"messages": MSG, "n": 0}), 400, "n", None),
    ("n-17", COMP_URL, _j({"prompt": "x", "n": 17}), 400, "n", None),
    ("n-over-the-slots", CHAT_URL, _j({"messages": MSG, "n": 9}), 400, "n", None),  # the engine has 8
    ("unknown-role", CHAT_URL, _j({"messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role", None),
    ("tool-role", CHAT_URL, _j({"messages": [{"role": "tool", "content": "x"}]}), 400, "messages[0].role", None),
    ("image-part", CHAT_URL, _j({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400,
     "messages[0].content", None),
    ("top-logprobs-alone", CHAT_URL, _j({"messages": MSG, "top_logprobs": 2}), 400, "top_logprobs", None),
    ("top-logprobs-21", CHAT_URL, _j({"messages": MSG, "logprobs": True, "top_logprobs": 21}), 400, "top_logprobs",
     None),
    ("logprobs-21", COMP_URL, _j({"prompt": "x", "logprobs": 21}), 400, "logprobs", None),
    ("logprobs-bool-completions", COMP_URL, _j({"prompt": "x", "logprobs": True}), 400, "logprobs", None),
    ("tools", CHAT_URL, _j({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}), 400,
     "tools", None),
    ("logit-bias", CHAT_URL, _j({"messages": MSG, "logit_bias": {"42": 5}}), 400, "logit_bias", None),
    ("presence-penalty", COMP_URL, _j({"prompt": "x", "presence_penalty": 0.5}), 400, "presence_penalty", None),
    ("best-of", COMP_URL, _j({"prompt": "x", "best_of": 3}), 400, "best_of", None),
    ("audio", CHAT_URL, _j({"messages": MSG, "audio": {"voice": "alloy", "format": "wav"}}), 400, "audio", None),
    ("modalities", CHAT_URL, _j({"messages": MSG, "modalities": ["text", "audio"]}), 400, "modalities", None),
    ("response-format-type", CHAT_URL, _j({"messages": MSG, "response_format": {"type": "yaml"}}), 400,
     "response_format.type", None),
    ("response-format-no-schema", CHAT_URL, _j({"messages": MSG, "response_format": {"type": "json_schema"}}), 400,
     "response_format.json_schema", None),
    ("response-format-bad-schema", CHAT_URL, _j({"messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}), 400,
     "response_format", None),
    ("response-format-bad-regex", COMP_URL, _j({"prompt": "x", "response_format": {"type": "regex", "regex": "(a"}}),
     400, "response_format", None),
]


@pytest.mark.parametrize("url,raw,status,param,code", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_4xx_with_an_openai_error(http, url, raw, status, param, code):
    r = http.post(url, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert_healthy(http)


def test_streaming_bad_input_is_refused_before_the_stream(http):
    r = http.post(CHAT_URL, json={"messages": MSG, "stream": True, "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").status_code == 404
    r = http.get(CHAT_URL)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# ---------------------------------------------------------------------------- fuzz
@pytest.fixture(scope="module")
def fuzz_http(stack):
    # Tiny default output so the valid requests the fuzzer makes stay fast.
    with serve(make_http_app(stack.backend, stack.tok, RouterConfig(api_key="", default_max_tokens=2))) as url:
        with httpx.Client(base_url=url, timeout=120) as c:
            yield c


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=12)
)
_json = st.recursive(
    _json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _mostly(valid, junk=_json_leaf):
    """Valid values four times as often as junk, so that many whole requests are valid."""
    return st.one_of(valid, valid, valid, valid, junk)


_text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)})
_message = st.fixed_dictionaries(
    {"role": _mostly(st.sampled_from(["user", "system", "assistant", "developer"]), st.sampled_from(["tool", "x", ""]))},
    optional={"content": _mostly(st.text(max_size=40) | st.lists(_text_part, max_size=3), _json)},
)
_common = {
    "model": _mostly(st.sampled_from(["SmolLM2-135M-Instruct", ""]), st.sampled_from(["gpt-4", "smollm2"]) | _json_leaf),
    "max_tokens": _mostly(st.integers(1, 3), st.integers(max_value=0) | st.integers(min_value=600) | _json_leaf),
    "max_completion_tokens": _mostly(st.integers(1, 3), st.integers(max_value=0) | _json_leaf),
    "temperature": _mostly(st.floats(0, 2) | st.just(0), st.floats(allow_nan=True) | st.integers(-5, 10**6)),
    "top_p": _mostly(st.floats(0.01, 1), st.floats(allow_nan=True)),
    "top_k": _mostly(st.integers(-1, 100) | st.integers(min_value=0), st.integers(max_value=-2)),
    "seed": _mostly(st.integers(0, 2**63 - 1), st.integers()),
    "stop": _mostly(st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5), max_size=4),
                    st.lists(st.text(max_size=5), max_size=20) | _json),
    "n": _mostly(st.just(1), st.integers(-1, 3)),
    "stream": _mostly(st.booleans()),
    "stream_options": _mostly(st.fixed_dictionaries({}, optional={"include_usage": _mostly(st.booleans())})),
    "user": _mostly(st.text(max_size=8)),
    "logprobs": _mostly(st.just(False), st.booleans() | st.integers(-1, 3)),
    "top_logprobs": _mostly(st.integers(0, 3), st.integers(-2, 30) | _json_leaf),
    "response_format": _mostly(st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
                               st.fixed_dictionaries({"type": st.text(max_size=12)}) | _json),
    "unknown_field": _json,
}
_chat_body = st.fixed_dictionaries(
    {"messages": _mostly(st.lists(_message, min_size=1, max_size=3), st.lists(_message, max_size=0) | _json)},
    optional=_common,
)
_completion_body = st.fixed_dictionaries(
    {
        "prompt": _mostly(
            st.text(min_size=1, max_size=40)
            | st.lists(st.integers(0, 49151), min_size=1, max_size=5)
            | st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=1),
            st.lists(st.integers(-5, 60000), max_size=5) | st.lists(st.text(max_size=8), max_size=2) | _json,
        )
    },
    optional=_common,
)
_request = st.one_of(
    st.tuples(st.just(CHAT_URL), _chat_body),
    st.tuples(st.just(COMP_URL), _completion_body),
    st.tuples(st.sampled_from([CHAT_URL, COMP_URL]), _json | _chat_body | _completion_body),
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_request)
def test_fuzz_json_bodies_never_500(fuzz_http, request):
    url, body = request
    raw = json.dumps(body, allow_nan=True).encode()
    r = fuzz_http.post(url, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (raw, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"]
    elif body.get("stream") is True:
        assert r.text.endswith("data: [DONE]\n\n")
    else:
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        assert r.json()["usage"]["completion_tokens"] <= 3 * max(n, 1)


@settings(max_examples=30, deadline=None, database=None)
@given(url=st.sampled_from([CHAT_URL, COMP_URL]), raw=st.binary(max_size=64))
def test_fuzz_raw_bytes_never_500(fuzz_http, url, raw):
    r = fuzz_http.post(url, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (raw, r.text)


def test_server_healthy_after_fuzzing(stack, fuzz_http, http):
    assert_healthy(fuzz_http)
    assert_healthy(http)
    wait_idle(stack)
