"""Sampling parameters at the edge of float32, through the real OpenAI HTTP app: a real uvicorn
server on 127.0.0.1 over a real VerifierWorker and engine (the default model, fp32, ngram
drafter).  A request's floats are Python doubles; the kernels sample in float32."""

from __future__ import annotations

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from dspark.cluster.backend import LocalBackend  # noqa: E402
from dspark.cluster.openai_api import make_http_app  # noqa: E402
from dspark.cluster.validation import RouterConfig  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from helpers.servers import serve  # noqa: E402  uvicorn on a free loopback port, in a thread

PROMPT = "The capital of France is"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served():
    """(base URL, greedy reference of PROMPT decoded in-process before the worker starts)."""
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig
    from dspark.workers.verifier import VerifierWorker

    built = build_engine(EngineSpec(dtype="fp32", draft="ngram", runner=RunnerConfig(n_slots=4, max_seq=256)),
                         progress=False)
    eng, tok = built.engine, built.loaded.tokenizer
    # The engine belongs to the worker thread once that starts: decode the reference first.
    (ref,) = eng.generate([tok.encode(PROMPT)], [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)])
    worker = VerifierWorker(eng)
    try:
        with serve(make_http_app(LocalBackend(worker, built.loaded.name), tok, RouterConfig(api_key=""))) as url:
            yield url, ref
    finally:
        worker.close()
        built.close()


def test_top_p_below_float32_range_is_kept_as_the_smallest_normal_float32():
    # 1e-46 is 0 in float32: stored as is, the kernel would see an empty nucleus.
    tiny = float(torch.finfo(torch.float32).tiny)
    assert SamplingParams(temperature=0.7, top_p=1e-46).top_p == tiny
    assert float(torch.tensor([SamplingParams(top_p=1e-46).top_p])[0]) > 0
    assert SamplingParams(top_p=1e-30).top_p == 1e-30  # representable: unchanged
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_tiny_top_p_completion_is_the_greedy_completion(served):
    # A nucleus that small holds the argmax alone, so sampling at any temperature is greedy.
    url, ref = served
    assert ref.text  # the reference itself is not empty
    with httpx.Client(base_url=url, timeout=120) as http:
        r = http.post(
            "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.7, "top_p": 1e-46},
        )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == ref.text
    assert choice["finish_reason"] == ref.finish_reason
    assert r.json()["usage"]["completion_tokens"] == len(ref.output_ids)
