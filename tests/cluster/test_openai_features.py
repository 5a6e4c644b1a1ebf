"""logprobs, n > 1 and structured outputs through the OpenAI HTTP API, with the official openai
client, a real uvicorn server on 127.0.0.1 and a real engine (SmolLM2 fp32, the DSpark drafter)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from dspark.cluster.backend import LocalBackend  # noqa: E402
from dspark.cluster.openai_api import make_http_app  # noqa: E402
from dspark.cluster.validation import RouterConfig  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from helpers.servers import serve  # noqa: E402

CHAT = [{"role": "user", "content": "Name three fruits and say which is the sweetest."}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
PERSON_PROMPTS = [
    "Describe a fictional person as JSON with name, age, role, tags and address.",
    "Give me a JSON record for a librarian from Boston.",
    "Invent a user profile for a chess player.",
    "Create a JSON profile of an admin named Ada.",
    "A guest visiting Paris: write their record.",
]


@pytest.fixture(scope="module")
def stack():
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig
    from dspark.workers.verifier import VerifierWorker

    built = build_engine(EngineSpec(dtype="fp32", draft="dspark", block_len=7,
                                    runner=RunnerConfig(n_slots=50, max_seq=512)), progress=False)  # test_50 at once
    eng, tok = built.engine, built.loaded.tokenizer
    chat_ids = tok.encode_chat(CHAT)
    # Engine-level reference (before the worker thread owns the engine): greedy tokens and logprobs.
    eng.add_request(chat_ids, SamplingParams(max_tokens=20, logprobs=2), "ref")
    ref = []
    while eng.has_work:
        ref += eng.step()
    worker = VerifierWorker(eng)
    backend = LocalBackend(worker, built.loaded.name)
    with serve(make_http_app(backend, tok, RouterConfig(api_key=""))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        yield SimpleNamespace(engine=eng, tok=tok, client=client, model=built.loaded.name,
                              ref_ids=[t for o in ref for t in o.new_token_ids],
                              ref_lps=[lp for o in ref for lp in o.logprobs])
    worker.close()
    built.close()


def test_chat_logprobs_are_the_engines(stack):
    r = stack.client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=20, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(stack.ref_ids)
    # Every generated token has its entry, the end-of-turn token included (it counts in usage too).
    assert "".join(c.token for c in content) == r.choices[0].message.content + "<|im_end|>"
    for c, lp, t in zip(content, stack.ref_lps, stack.ref_ids):
        assert c.logprob == pytest.approx(lp.logprob, abs=1e-5)
        assert bytes(c.bytes) == stack.tok.token_bytes(t)
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token  # greedy: the top token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob


def test_streamed_logprobs_equal_whole(stack):
    kw = dict(model=stack.model, messages=CHAT, max_tokens=20, temperature=0, logprobs=True, top_logprobs=1)
    whole = stack.client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = []
    for chunk in stack.client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                streamed += ch.logprobs.content
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in whole]


def test_completion_logprobs_shape(stack):
    r = stack.client.completions.create(model=stack.model, prompt="The capital of France is", max_tokens=8,
                                        temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    assert all(len(d) <= 3 and max(d.values()) <= 0 for d in lp.top_logprobs)


def test_completion_echo_with_logprobs(stack):
    prompt = "The capital of France is"
    ids = stack.tok.encode(prompt)
    whole = stack.client.completions.create(model=stack.model, prompt=prompt, max_tokens=4, temperature=0,
                                            logprobs=1, echo=True)
    c = whole.choices[0]
    assert c.text.startswith(prompt) and len(c.text) > len(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 4 and "".join(lp.tokens) == c.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    streamed = "".join(ch.text for chunk in stack.client.completions.create(
        model=stack.model, prompt=prompt, max_tokens=4, temperature=0, echo=True, stream=True) for ch in chunk.choices)
    assert streamed == c.text


def test_n_4_returns_4_choices_with_exact_usage(stack):
    r = stack.client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=16, temperature=1.0,
                                             seed=7, n=4, logprobs=True)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(stack.tok.encode_chat(CHAT))
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # sampled: the choices differ


def test_n_streamed_with_usage(stack):
    stream = stack.client.completions.create(model=stack.model, prompt="Once upon a time", max_tokens=10,
                                             temperature=0.8, seed=3, n=3, stream=True,
                                             stream_options={"include_usage": True})
    texts, finish, usage = {0: "", 1: "", 2: ""}, {}, None
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert set(finish) == {0, 1, 2}
    assert usage is not None and usage.completion_tokens == 30  # 3 x max_tokens (no stop at T=0.8 in 10 tokens)
    whole = stack.client.completions.create(model=stack.model, prompt="Once upon a time", max_tokens=10,
                                            temperature=0.8, seed=3, n=3)
    assert {c.index: c.text for c in whole.choices} == texts  # seeded: streamed and whole agree


def test_50_json_schema_outputs_validate(stack):
    """Greedy on five prompts and sampled at two temperatures: every output parses and validates.
    The eight requests are sent at once: the engine decodes all fifty sequences in one batch."""
    from concurrent.futures import ThreadPoolExecutor

    asks = [(p, dict(temperature=0)) for p in PERSON_PROMPTS]
    asks += [(PERSON_PROMPTS[0], dict(temperature=t, seed=seed, n=15)) for t, seed in ((1.0, 1), (0.7, 2), (1.0, 3))]

    def ask(prompt, kw):
        return stack.client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=200, response_format=PERSON_FORMAT, **kw).choices

    with ThreadPoolExecutor(len(asks)) as pool:
        outputs = [c for choices in pool.map(lambda a: ask(*a), asks) for c in choices]
    assert len(outputs) == 50
    for c in outputs:
        assert c.finish_reason == "stop", c.message.content
        doc = json.loads(c.message.content)
        jsonschema.validate(doc, PERSON_SCHEMA)
        assert list(doc) == list(PERSON_SCHEMA["properties"])  # the schema's order


def test_json_object_and_regex(stack):
    r = stack.client.chat.completions.create(
        model=stack.model, max_tokens=120, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with {"ok": true} and nothing else.'}])
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = stack.client.completions.create(model=stack.model, prompt="Today's date in ISO format:", max_tokens=20,
                                        temperature=1.0, seed=5, n=4,
                                        extra_body={"response_format": {"type": "regex", "regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    for c in r.choices:
        assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", c.text), c.text


def test_metrics_count_masks(stack):
    stats = stack.engine.grammar_stats()
    assert stats["grammar_masks"] > 0 and stats["grammar_mask_seconds"] > 0
