"""End to end through the real cluster: Ray Serve, a TP=3 verifier over gloo, 2 gRPC draft
workers, Redis, the official openai client and the gRPC GenerationService (fp32, greedy)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from dspark.cluster.config import ClusterConfig
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams
from dspark.net import free_port
from dspark.workers.runner import LocalRunner, RunnerConfig

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a Python function that returns the squares of a list of numbers.",
    "What is the capital of Japan? Answer briefly.",
    "Write a function to check whether a number is prime.",
    "Name three colors of the rainbow.",
]
MAX_TOKENS = 32
PUBLIC_HOST = "127.0.0.2"  # the public gRPC API: loopback, but not the draft workers' address


@pytest.fixture(scope="module")
def cluster():
    """Started with no DSPARK_INTERNAL_TOKEN (the cluster generates one) and the public gRPC API
    on 127.0.0.2, another loopback address than the draft workers' internal 127.0.0.1 (they must
    not follow bind_host); HTTP on 127.0.0.1.  Nothing listens beyond loopback."""
    from dspark.cluster.commands import _default_draft  # what `dspark serve` drafts with: hybrid
    from dspark.cluster.local import LocalCluster

    cfg = ClusterConfig(dtype="fp32", tp=3, draft=_default_draft(), draft_workers=2, block_len=5, n_slots=16,
                        max_seq=512, torch_threads=1, grpc_port=free_port(), bind_host=PUBLIC_HOST,
                        block_timeout_s=20.0, verify_policy="adaptive", scheduler_interval_s=0.25,
                        # Every step speculates, so the sampled test below checks verification
                        # (the gate's own choice is covered in-process by tests/workers/test_spec_gate.py).
                        speculation_gate=False)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("DSPARK_INTERNAL_TOKEN", raising=False)
        c = LocalCluster(cfg, http_port=0).start(timeout_s=900)
        yield c
        c.stop()


@pytest.fixture(scope="module")
def reference(model_fp32):
    """In-process plain greedy decoding of the same prompts (the target alone)."""
    tok = model_fp32.tokenizer
    eng = Engine(LocalRunner(model_fp32.model, RunnerConfig(n_slots=8, max_seq=512)), tok, EngineConfig(max_batch=8))
    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    return {p: s.text for p, s in zip(PROMPTS, eng.generate(ids, SamplingParams(max_tokens=MAX_TOKENS)))}


@pytest.fixture(scope="module")
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", timeout=300)


def _chat(client, prompt, **kw):
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS, temperature=0, **kw,
    )


def test_openai_client_matches_plain_decoding(client, reference):
    for p in PROMPTS:
        r = _chat(client, p)
        assert r.choices[0].message.content == reference[p]
        sd = r.model_extra["spec_decode"]
        assert sd["num_drafts"] > 0 and sd["mean_acceptance_length"] >= 1.0
        stream = _chat(client, p, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == reference[p]


def test_draft_workers_keep_the_generated_token_and_stay_on_loopback(cluster):
    """The verifier drafts (above) with the token the cluster generated, while a Draft stream
    without it is refused and each draft port is on 127.0.0.1 only, not on bind_host (127.0.0.2)
    nor on every address."""
    from dspark.proto.dspark.v1 import draft_pb2, draft_pb2_grpc

    alive, _ = _alive(cluster, "drafter")
    assert len(alive) == 2
    for worker in alive.values():
        host, port = worker["address"].rsplit(":", 1)
        assert host == "127.0.0.1"
        with pytest.raises(OSError):  # a socket on bind_host or on 0.0.0.0 would accept this
            socket.create_connection((PUBLIC_HOST, int(port)), timeout=2).close()
        opening = draft_pb2.DraftRequest(open=draft_pb2.Open(
            request_id="probe-1", prompt_len=3, options=draft_pb2.DrafterOptions(kind="ngram", block_len=3)))
        with grpc.insecure_channel(worker["address"]) as ch, pytest.raises(grpc.RpcError) as refused:
            list(draft_pb2_grpc.DraftServiceStub(ch).Draft(iter([opening]), timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_logprobs_n_and_json_schema_through_the_cluster(client, reference, model_fp32):
    """The OpenAI features through Ray Serve, the TP verifier and the remote draft workers."""
    import json

    p = PROMPTS[0]
    r = _chat(client, p, logprobs=True, top_logprobs=2, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:  # greedy: both sequences are plain decoding's, with a logprob per token
        assert c.message.content == reference[p]
        assert len(c.logprobs.content) == r.usage.completion_tokens // 2
        assert all(t.logprob <= 0 and t.top_logprobs[0].token == t.token for t in c.logprobs.content)
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "count"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=40,
        temperature=1.0, seed=4, n=4,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert len(r.choices) == 4
    for c in r.choices:
        doc = json.loads(c.message.content)
        assert doc["color"] in ("red", "green", "blue") and 0 <= doc["count"] <= 9


def test_many_concurrent_requests(client, reference):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: _chat(client, p).choices[0].message.content, prompts))
    assert results == [reference[p] for p in prompts]


def test_grpc_generate_and_health(cluster, reference):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from dspark.proto.dspark.v1 import generate_pb2, generate_pb2_grpc

    async def run():
        async with grpc.aio.insecure_channel(f"{PUBLIC_HOST}:{cluster.cfg.grpc_port}") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = generate_pb2_grpc.GenerationServiceStub(ch)
            req = generate_pb2.GenerateRequest(
                messages=generate_pb2.ChatMessages(items=[generate_pb2.ChatMessage(role="user", content=PROMPTS[1])]),
                max_tokens=MAX_TOKENS, temperature=0.0,
            )
            pieces = [r async for r in stub.Generate(req)]
            unary = await stub.GenerateUnary(req)
            return "".join(r.text for r in pieces), unary.text

    streamed, unary = asyncio.run(run())
    assert streamed == reference[PROMPTS[1]] == unary


def _alive(cluster, role):
    from dspark.cluster.redis_state import RedisState, StateConfig

    async def run():
        async with RedisState(StateConfig(url=cluster.redis_url, prefix=cluster.cfg.redis_prefix)) as st:
            return await st.alive(role), await st.get_policy_version(next(iter(await st.alive("verifier")), "none"))

    return asyncio.run(run())


def _gauge(cluster, name: str) -> float | None:
    import httpx

    for line in httpx.get(cluster.base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(f"dspark:{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_pinned_policy_reaches_the_verifier_and_lifting_it_restores_the_schedulers(cluster, client, reference):
    """`dspark policy pin` through the scheduler to the verifier: blocks drafted and verified at the
    pinned depth (2 of the cluster's 5), output unchanged; after `unpin` the scheduler's own policy."""
    import re

    from click.testing import CliRunner

    from dspark.cli import main

    where = ["--redis-url", cluster.redis_url, "--redis-prefix", cluster.cfg.redis_prefix]

    def change(*args) -> int:
        out = CliRunner().invoke(main, ["policy", *args, *where, "--wait", "30"], catch_exceptions=False)
        assert out.exit_code == 0 and "published: " in out.output, out.output
        version = max(int(v) for v in re.findall(r" v(\d+)", out.output))
        deadline = time.monotonic() + 30
        while (_gauge(cluster, "policy_version") or 0) < version and time.monotonic() < deadline:
            time.sleep(0.1)  # the verifier polls its policy every 0.25 s
        assert _gauge(cluster, "policy_version") >= version
        return version

    pinned = change("pin", "--depth", "2", "--budget", "fixed", "--no-gate")
    assert _chat(client, PROMPTS[0]).choices[0].message.content == reference[PROMPTS[0]]
    assert _gauge(cluster, "draft_depth") == 2
    assert change("unpin") > pinned
    assert _chat(client, PROMPTS[1]).choices[0].message.content == reference[PROMPTS[1]]
    shown = CliRunner().invoke(main, ["policy", "show", *where], catch_exceptions=False).output
    assert '"pinned": null' in shown and '"budget_mode": "algorithm1"' in shown, shown
    # The adaptive budget's step times for 1-8 tokens (what sets a lone request's depth): exported,
    # profiled at start-up and corrected by real steps, no count dearer than a larger one.
    import httpx

    from bench.load import step_costs_ms

    got = step_costs_ms(httpx.get(cluster.base_url + "/metrics", timeout=30).text)
    costs = [got.get(str(t), 0.0) for t in range(1, 9)]
    assert set(got) == {str(t) for t in range(1, 9)} and costs[0] > 0 and costs == sorted(costs), got


def test_adaptive_policy_published_and_redis_restart(cluster, client, reference):
    """The scheduler's policy reaches the verifier; killing Redis loses no request; all resumes."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        verifiers, version = _alive(cluster, "verifier")
        if verifiers and version > 0:
            break
        time.sleep(0.5)
    assert verifiers and version > 0, "no policy published for the verifier group"
    cluster._redis.kill()
    with ThreadPoolExecutor(4) as pool:  # served while Redis is down
        results = list(pool.map(lambda p: _chat(client, p).choices[0].message.content, PROMPTS))
    assert results == [reference[p] for p in PROMPTS]
    cluster._redis.restart()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        verifiers, version = _alive(cluster, "verifier")
        drafters, _ = _alive(cluster, "drafter")
        routers, _ = _alive(cluster, "router")
        if verifiers and drafters and routers and version > 0:
            break
        time.sleep(0.5)
    assert verifiers and drafters and routers, "heartbeats did not resume after the Redis restart"
    assert version > 0, "the scheduler did not republish after Redis lost its data"
    assert _chat(client, PROMPTS[2]).choices[0].message.content == reference[PROMPTS[2]]


def test_draft_worker_killed_mid_request(cluster, client, reference):
    """SIGKILL a draft worker while requests stream: they finish, token-identical."""
    from dspark.cluster.redis_state import RedisState, StateConfig

    async def drafters():
        async with RedisState(StateConfig(url=cluster.redis_url, prefix=cluster.cfg.redis_prefix)) as st:
            return await st.alive("drafter")

    alive = asyncio.run(drafters())
    assert len(alive) == 2
    victim = next(iter(alive.values()))["pid"]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(lambda p: _chat(client, p).choices[0].message.content, p) for p in PROMPTS]
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=600) for f in futures]
    assert results == [reference[p] for p in PROMPTS]
    # Requests after the failure are served too (by the survivor, Serve's replacement, or plainly).
    assert _chat(client, PROMPTS[0]).choices[0].message.content == reference[PROMPTS[0]]


def test_sampled_first_speculative_token_follows_the_target(cluster, model_fp32):
    """The matrix row dspark x adaptive through the cluster, sampled: the token that comes out
    of the first speculative step (the 2nd output token, given the nearly certain 1st) is
    distributed as the target's p(x2 | prompt, x1), by a chi-square test."""
    import collections

    from helpers.spec_stats import chisquare_pvalue, second_token_law

    from dspark.proto.dspark.v1 import generate_pb2, generate_pb2_grpc

    tok = model_fp32.tokenizer
    text = "Once upon a time"
    x1, p = second_token_law(LocalRunner(model_fp32.model, RunnerConfig(n_slots=1, max_seq=64)), tok.encode(text))
    n = 192

    async def run():
        sem = asyncio.Semaphore(16)  # the verifier's 16 slots
        async with grpc.aio.insecure_channel(f"{PUBLIC_HOST}:{cluster.cfg.grpc_port}") as ch:
            stub = generate_pb2_grpc.GenerationServiceStub(ch)

            async def one(seed):
                async with sem:
                    r = await stub.GenerateUnary(generate_pb2.GenerateRequest(
                        prompt=text, max_tokens=3, temperature=1.0, seed=seed), timeout=300)
                    return list(r.token_ids), r.spec_metrics.num_drafts

            return await asyncio.gather(*(one(s) for s in range(n)))

    results = asyncio.run(run())
    counts = collections.Counter(ids[1] for ids, _ in results if len(ids) >= 2 and ids[0] == x1)
    total = sum(counts.values())
    assert total > 0.75 * n
    # The gate holds speculation off where plain decoding measures faster, which a host busy with
    # other tests can make it do for part of the run (90 of 192 requests verified a draft once in
    # a full suite run; alone, most do): a third still puts speculative tokens in the law tested.
    assert sum(1 for _, d in results if d > 0) > n // 3, "a third of the requests should verify a draft"
    pval = chisquare_pvalue(counts, p)
    assert pval > 1e-3, f"p = {pval:.2e}, observed {counts.most_common(5)}"
