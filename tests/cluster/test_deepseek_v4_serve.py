"""`dspark serve --model <DeepSeek-V4 folder> --draft mtp` end to end: the configuration the serve
command parses (no --compile flag: V4 folders run eager by default), the real cluster (Ray
Serve, a redis-server, the verifier with its in-process MTP drafter), the official openai client
over HTTP and the gRPC GenerationService on loopback (fp32, greedy); a verifier of one rank, then
a tensor / expert parallel group of two (the shape of deploy/kuberay/rayservice-deepseek-v4.yaml).

The target is a tiny random V4 folder (three layers of the three attention kinds, hash-routed and
score-routed MoE, three hyper-connection streams) with an MTP layer under its published
``mtp.0.*`` names; every text and token id must equal plain decoding of the same folder in process.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest

from dspark.net import free_port
from dspark.workers.request import SamplingParams
from helpers.tiny_deepseek_v4 import SLIDING, mtp_checkpoint_tensors, tiny_mtp_layer, write_mtp, write_tiny_folder

pytestmark = pytest.mark.slow

VOCAB = 300
PROMPTS = ["The sea at dawn", "Seventeen times three is", "Colors: red,"]
MAX_TOKENS = 20


@dataclasses.dataclass(frozen=True)
class Folder:
    path: Path
    ids: dict[str, list[int]]  # plain greedy decoding of each prompt: token ids
    text: dict[str, str]  # ... and text


@pytest.fixture(scope="module")
def v4(tmp_path_factory) -> Folder:
    from dspark.models.loader import load_model
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.runner import LocalRunner, RunnerConfig

    path = tmp_path_factory.mktemp("v4") / "DeepSeek-V4-tiny"
    ref = write_tiny_folder(path, VOCAB, 7)
    one, own = tiny_mtp_layer(ref, SLIDING, seed=8, vocab_size=VOCAB)
    write_mtp(path, mtp_checkpoint_tensors(one, own), SLIDING)
    loaded = load_model(path, dtype="fp32", progress=False)
    tok = loaded.tokenizer
    plain = Engine(LocalRunner(loaded.model, RunnerConfig(n_slots=4, max_seq=256)), tok, EngineConfig(max_batch=4))
    seqs = plain.generate([tok.encode(p) for p in PROMPTS], SamplingParams(max_tokens=MAX_TOKENS))
    assert all(len(s.output_ids) >= MAX_TOKENS // 2 for s in seqs), "the reference ends too early"
    return Folder(path, {p: s.output_ids for p, s in zip(PROMPTS, seqs)}, {p: s.text for p, s in zip(PROMPTS, seqs)})


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def cluster(v4, request):
    """One verifier; with tp2 a group of two ranks (rank 1 a Ray actor), each loading only its
    slice of the folder, and the MTP layer built on rank 0 beside its shard."""
    from dspark.cluster.commands import serve, serve_config
    from dspark.cluster.local import LocalCluster

    argv = ["--model", str(v4.path), "--draft", "mtp", "--dtype", "fp32", "--block", "2", "--slots", "4",
            "--grpc-port", str(free_port()), "--port", "0", "--tp", str(request.param)]
    params = serve.make_context("serve", argv).params
    cfg = serve_config(**params)
    assert cfg.compile is False and not cfg.remote_draft  # eager by default; MTP runs beside the target
    c = LocalCluster(cfg, http_port=params["port"]).start(timeout_s=600)
    yield c
    c.stop()


def test_openai_completions_through_the_cluster_equal_plain_decoding(cluster, v4):
    from openai import OpenAI

    client = OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", timeout=300)
    assert [m.id for m in client.models.list().data] == ["DeepSeek-V4-tiny"]
    for prompt in PROMPTS:
        r = client.completions.create(model="DeepSeek-V4-tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == v4.text[prompt], prompt
        assert r.usage.completion_tokens == len(v4.ids[prompt])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="DeepSeek-V4-tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True)
        if c.choices)
    assert streamed == v4.text[PROMPTS[0]]


def test_grpc_tokens_through_the_cluster_equal_plain_decoding(cluster, v4):
    from dspark.proto.dspark.v1 import generate_pb2, generate_pb2_grpc

    async def run() -> dict[str, list[int]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.cfg.grpc_port}") as ch:
            stub = generate_pb2_grpc.GenerationServiceStub(ch)
            out = {}
            for prompt in PROMPTS:
                r = await stub.GenerateUnary(generate_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS,
                                                                          temperature=0.0), timeout=300)
                out[prompt] = list(r.token_ids)
            return out

    assert asyncio.run(run()) == v4.ids
