"""Router metrics in-process: a scripted backend behind the real HTTP app, scraped at /metrics
and parsed with prometheus_client's own parser (the real-cluster check is in test_faults.py)."""

from __future__ import annotations

import asyncio

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dspark.cluster.backend import BackendUnavailable  # noqa: E402
from dspark.cluster.metrics import MeteredBackend, RouterMetrics  # noqa: E402
from dspark.cluster.openai_api import make_http_app  # noqa: E402
from dspark.cluster.validation import RouterConfig  # noqa: E402
from dspark.workers.request import RequestOutput, SpecMetrics  # noqa: E402


class _Tok:
    vocab_size = 100

    def encode(self, text: str) -> list[int]:
        return [1 + (ord(c) % 90) for c in text]


class ScriptedBackend:
    """Emits three outputs with known speculative-decoding figures; 'fail' prompts break."""

    model_name = "m"
    max_context = 64

    def __init__(self) -> None:
        self.stats = {"active_requests": 2, "queued_requests": 5, "verification_budget": 3.5, "policy_version": 7,
                      "prefix_cache_hit_rate": 0.25, "kv_cache_usage": 0.5,
                      "kv_cache_block_usage": 0.75, "speculative_steps": 40, "plain_steps": 9, "draft_depth": 3,
                      "gate_rates": {"1": {"speculative": 31.5, "plain": 20.25},
                                     "16-31": {"speculative": 120.0, "plain": 0.0}},
                      "step_costs": {"1": 0.03, "8": 0.0325}}

    async def generate(self, prompt_ids, params, request_id=None):
        spec = SpecMetrics()
        for drafted, accepted in ((4, 2), (4, 4)):
            spec.record(drafted, accepted)
        yield RequestOutput(request_id or "r", [5], "a", False, None, len(prompt_ids), 1, SpecMetrics())
        await asyncio.sleep(0.01)
        if prompt_ids[0] == 1 + (ord("f") % 90):
            raise BackendUnavailable("the verifier serving this request is gone")
        yield RequestOutput(request_id or "r", [6, 7, 8], "bcd", True, "length", len(prompt_ids), 4, spec)

    async def health(self):
        return {"verifier": self.stats}


def _scrape(client) -> dict[str, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[key] = s.value
    return out


@pytest.fixture
def client():
    backend = ScriptedBackend()
    metrics = RouterMetrics(backend.model_name)

    async def refresh():
        metrics.set_verifier_stats((await backend.health())["verifier"])

    metrics.on_scrape(refresh)
    app = make_http_app(MeteredBackend(backend, metrics), _Tok(), RouterConfig(api_key=""), metrics=metrics)
    transport = httpx.ASGITransport(app=app)

    # ASGITransport is async-only: run each call on a private loop.
    class SyncClient:
        def _run(self, method, url, **kw):
            async def go():
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    return await c.request(method, url, **kw)

            return asyncio.run(go())

        def get(self, url, **kw):
            return self._run("GET", url, **kw)

        def post(self, url, **kw):
            return self._run("POST", url, **kw)

    return SyncClient()


def test_counters_histograms_and_gauges(client):
    before = _scrape(client)
    assert before["dspark:spec_decode_num_drafts_total"] == 0
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": stream})
        assert r.status_code == 200
    after = _scrape(client)
    assert after["dspark:spec_decode_num_drafts_total"] == 4  # 2 rounds x 2 requests
    assert after["dspark:spec_decode_num_draft_tokens_total"] == 16
    assert after["dspark:spec_decode_num_accepted_tokens_total"] == 12
    per_pos = {k: v for k, v in after.items() if k.startswith("dspark:spec_decode_num_accepted_tokens_per_pos_total")}
    assert per_pos == {f"dspark:spec_decode_num_accepted_tokens_per_pos_total|position={p}": v
                       for p, v in enumerate([4.0, 4.0, 2.0, 2.0])}
    assert after["dspark:time_to_first_token_seconds_count"] == 2
    assert after["dspark:inter_token_latency_seconds_count"] == 2  # one gap per request
    assert after["dspark:request_success_total|finished_reason=length"] == 2
    assert after["dspark:generation_tokens_total"] == 8
    assert after["dspark:num_requests_in_flight"] == 0
    assert after["dspark:queue_depth"] == 5 and after["dspark:num_requests_running"] == 2
    assert after["dspark:verification_budget"] == 3.5 and after["dspark:policy_version"] == 7
    assert after["dspark:prefix_cache_hit_rate"] == 0.25 and after["dspark:kv_cache_usage"] == 0.5
    assert after["dspark:kv_cache_block_usage"] == 0.75
    assert after["dspark:speculative_steps"] == 40 and after["dspark:plain_steps"] == 9 and after["dspark:draft_depth"] == 3
    gate = {k: v for k, v in after.items() if k.startswith("dspark:spec_gate_tokens_per_second")}
    assert gate == {"dspark:spec_gate_tokens_per_second|arm=plain|batch=1": 20.25,
                    "dspark:spec_gate_tokens_per_second|arm=speculative|batch=1": 31.5,
                    "dspark:spec_gate_tokens_per_second|arm=plain|batch=16-31": 0.0,
                    "dspark:spec_gate_tokens_per_second|arm=speculative|batch=16-31": 120.0}
    costs = {k: v for k, v in after.items() if k.startswith("dspark:verify_step_seconds")}
    assert costs == {"dspark:verify_step_seconds|tokens=1": 0.03, "dspark:verify_step_seconds|tokens=8": 0.0325}


def test_unavailable_backend_is_503_and_counted(client):
    r = client.post("/v1/completions", json={"prompt": "fail", "max_tokens": 4})
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
    r = client.post("/v1/completions", json={"prompt": "fail", "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and '"backend_unavailable"' in r.text and r.text.endswith("data: [DONE]\n\n")
    m = _scrape(client)
    assert m["dspark:request_failure_total"] == 2 and m["dspark:num_requests_in_flight"] == 0
    # Client mistakes are not failures of the service.
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
    assert _scrape(client)["dspark:request_failure_total"] == 2


def test_registries_are_private():
    a, b = RouterMetrics("m"), RouterMetrics("m")  # same names twice: no duplicate-series error
    a.labels(a.num_drafts).inc(3)
    assert b.labels(b.num_drafts)._value.get() == 0


def test_generated_tokens_are_counted_as_they_stream():
    """``dspark:generation_tokens`` counts each output's tokens when it passes, not the request's
    at its end: a rate over a window is the tokens made in it (``bench load`` reads it so), and
    the tokens of a request that breaks after its first output are counted too."""
    from prometheus_client import generate_latest

    backend, metrics = ScriptedBackend(), RouterMetrics("m")

    def generated() -> float:
        text = generate_latest(metrics.registry).decode()
        return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                    if s.name == "dspark:generation_tokens_total")

    async def stream(prompt_ids) -> list[float]:
        seen = []
        try:
            async for _ in metrics.observe(backend.generate(prompt_ids, None), 0.0):
                seen.append(generated())
        except BackendUnavailable:
            seen.append(generated())
        return seen

    assert asyncio.run(stream([3, 4])) == [1.0, 4.0]
    assert asyncio.run(stream([1 + (ord("f") % 90)])) == [5.0, 5.0]  # broke after one token
