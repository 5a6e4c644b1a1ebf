"""`dspark serve --model <Qwen3 HF folder> --draft dspark --draft-option head=<DeepSpec folder>`
end to end: the configuration the serve command parses, the real cluster (Ray Serve, a
redis-server, the verifier and a remote draft worker over gRPC on loopback), the official openai
client over HTTP and the gRPC GenerationService (fp32, greedy).

The target is a random-weight Qwen3 folder written by transformers (``helpers.tiny_hf``) with a
ChatML template in its tokenizer_config.json; the drafter a DeepSpec DSpark folder
(``helpers.drafter_checkpoints``) whose Markov head holds the bigrams of the target's own greedy
outputs, so drafts are accepted: the accepted-token count shows that the draft worker serves
the DeepSpec checkpoint (read, bound to the target and fed the target's features) rather than
falling back to plain decoding; of the requests sent at once, the first is drafted in the
verifier's own process and the rest on the worker.  Every text and token id must equal plain
decoding of the same target in process.  Also: bad drafter options are refused by the serve
command before anything starts, and a role that fails at start-up (e.g. a checkpoint that does
not fit the target) is reported with its constructor's one-line error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from dspark.net import free_port
from dspark.workers.request import SamplingParams
from helpers.drafter_checkpoints import write_deepspec_checkpoint
from helpers.tiny_hf import VOCAB, tiny_qwen3

pytestmark = pytest.mark.slow

PROMPTS = ["Write a haiku about the sea.", "What is 17 times 3?", "Name three colors.", "Say hello in French."]
MAX_TOKENS = 24
BLOCK = 4
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclasses.dataclass(frozen=True)
class Published:
    model: Path  # the Qwen3 HF folder
    head: Path  # the DeepSpec DSpark folder
    ids: dict[str, list[int]]  # plain greedy decoding of each prompt: token ids
    text: dict[str, str]  # ... and text


def _bigram_markov_head(folder: Path, outputs: list[list[int]], scale: float = 40.0) -> None:
    """Give the checkpoint's Markov head (rank V) the target's bigrams: W1 = I and W2[b, a] =
    ``scale`` for each a -> b in ``outputs``, so the draft after token a is what the target wrote."""
    state = load_file(str(folder / "model.safetensors"))
    w2 = torch.zeros(VOCAB, VOCAB)  # nn.Linear(r, V): [V, r]
    for out in outputs:
        for a, b in zip(out, out[1:]):
            w2[b, a] = scale
    state["markov_head.markov_w1.weight"] = torch.eye(VOCAB)
    state["markov_head.markov_w2.weight"] = w2
    save_file(state, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    from dspark.models.loader import load_model
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.runner import LocalRunner, RunnerConfig

    root = tmp_path_factory.mktemp("published")
    model_dir = root / "Qwen3-tiny"
    hf = tiny_qwen3(model_dir)
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": CHATML}))

    loaded = load_model(model_dir, dtype="fp32", progress=False)
    tok = loaded.tokenizer
    plain = Engine(LocalRunner(loaded.model, RunnerConfig(n_slots=4, max_seq=256)), tok, EngineConfig(max_batch=4))
    seqs = plain.generate([tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS],
                          SamplingParams(max_tokens=MAX_TOKENS))
    assert all(len(s.output_ids) >= MAX_TOKENS // 2 for s in seqs), "the reference ends too early to test drafting"

    head = root / "dspark_qwen3_tiny_block4"
    # DeepSpec's target_layer_ids for a 3-layer target: 0..1 (id 2 would read the final-normed state).
    write_deepspec_checkpoint(head, hf.model.embed_tokens.weight.detach(), hf.lm_head.weight.detach(), 3,
                              layer_ids=(0, 1), rank=VOCAB, block_size=BLOCK, mask_token_id=VOCAB - 1)
    _bigram_markov_head(head, [s.output_ids for s in seqs])
    return Published(model_dir, head, {p: s.output_ids for p, s in zip(PROMPTS, seqs)},
                     {p: s.text for p, s in zip(PROMPTS, seqs)})


@pytest.fixture(scope="module")
def cluster(published):
    """Started from exactly what `dspark serve` parses from its command line."""
    from dspark.cluster.commands import serve, serve_config
    from dspark.cluster.local import LocalCluster

    # Fixed verification: the test counts accepted drafts, which the adaptive default's gate may
    # trade for plain steps when they measure faster on this host.
    argv = ["--model", str(published.model), "--draft", "dspark", "--draft-option", f"head={published.head}",
            "--dtype", "fp32", "--block", str(BLOCK), "--verify-policy", "fixed", "--slots", "4", "--draft-workers", "1", "--no-compile",
            "--grpc-port", str(free_port()), "--port", "0"]
    params = serve.make_context("serve", argv).params
    cfg = serve_config(**params)
    assert cfg.draft_options == {"head": str(published.head)} and cfg.remote_draft
    c = LocalCluster(cfg, http_port=params["port"]).start(timeout_s=600)
    yield c
    c.stop()


def _chat(client, prompt, **kw):
    return client.chat.completions.create(model="Qwen3-tiny", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=MAX_TOKENS, temperature=0, **kw)


def test_openai_client_through_the_cluster_equals_plain_decoding(cluster, published):
    from openai import OpenAI

    client = OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", timeout=300)
    assert [m.id for m in client.models.list().data] == ["Qwen3-tiny"]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: _chat(client, p), PROMPTS))
    accepted = 0
    for p, r in zip(PROMPTS, replies):
        assert r.choices[0].message.content == published.text[p], p
        assert r.usage.completion_tokens == len(published.ids[p])
        sd = r.model_extra["spec_decode"]
        assert sd["num_drafts"] > 0, "no block was drafted"
        accepted += sd["num_accepted_tokens"]
    # The bigram head drafts what the target writes: most drafts are accepted.
    assert accepted >= len(PROMPTS) * MAX_TOKENS // 3, f"only {accepted} drafted tokens accepted"
    # The first request found the verifier empty and was drafted there (the head built in the
    # verifier's process); the others arrived while it was held and went to the draft worker.
    with urllib.request.urlopen(cluster.base_url + "/metrics", timeout=30) as r:
        metrics = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    assert metrics["dspark:draft_requests_local"] >= 1 and metrics["dspark:draft_requests_remote"] >= 1, metrics
    stream = _chat(client, PROMPTS[0], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == published.text[PROMPTS[0]]


def test_grpc_token_ids_equal_plain_decoding(cluster, published):
    from dspark.proto.dspark.v1 import generate_pb2, generate_pb2_grpc

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.cfg.grpc_port}") as ch:
            stub = generate_pb2_grpc.GenerationServiceStub(ch)

            async def one(p):
                msgs = generate_pb2.ChatMessages(items=[generate_pb2.ChatMessage(role="user", content=p)])
                r = await stub.GenerateUnary(generate_pb2.GenerateRequest(messages=msgs, max_tokens=MAX_TOKENS,
                                                                          temperature=0.0), timeout=300)
                return list(r.token_ids), r.spec_metrics.num_drafts

            return await asyncio.gather(*(one(p) for p in PROMPTS))

    for p, (ids, drafts) in zip(PROMPTS, asyncio.run(run())):
        assert ids == published.ids[p], p
        assert drafts > 0


# ------------------------------------------------------------------------------------------------
# Refusals before and during start-up, each in one line (no cluster needed)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,expected", [
    (["--draft-option", "head=/nonexistent/dspark_head"], "drafter option head=/nonexistent/dspark_head: no such file"),
    (["--draft-option", "blocks=4"], "drafter 'dspark' has no option 'blocks'"),
    (["--draft-option", "head"], "'head' is not KEY=VALUE"),
    (["--draft-option", "proposal_top_k=0"], "proposal_top_k must be an integer >= 1"),
])
def test_serve_refuses_bad_drafter_options_before_starting(argv, expected):
    from click.testing import CliRunner

    from dspark.cli import main

    res = CliRunner().invoke(main, ["serve", "--draft", "dspark", "--port", "1", *argv])
    assert res.exit_code == 2 and expected in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in res.output and len(errors) == 1 and expected in errors[0]


def test_failed_deployment_reports_its_constructor_error():
    """What `dspark serve` prints when a role cannot start: Serve's application status names only
    the failed deployment; the cause is the last line of that deployment's message."""
    from ray.serve.schema import (
        ApplicationStatus, ApplicationStatusOverview, DeploymentStatus, DeploymentStatusOverview, DeploymentStatusTrigger,
    )

    from dspark.cluster.local import _causes

    error = "ValueError: DeepSpec drafter h: target_layer_ids [2] outside 0..1 of the target's 3 layers"

    def dep(status, message):
        return DeploymentStatusOverview(status=status, status_trigger=DeploymentStatusTrigger.REPLICA_STARTUP_FAILED,
                                        replica_states={}, message=message)

    app = ApplicationStatusOverview(
        status=ApplicationStatus.DEPLOY_FAILED, message="Failed to update the deployments ['DraftWorker'].",
        last_deployed_time_s=0.0,
        deployments={"DraftWorker": dep(DeploymentStatus.DEPLOY_FAILED, f"Traceback (most recent call last):\n  File x\n{error}\n"),
                     "Verifier": dep(DeploymentStatus.UPDATING, ""), "Router": dep(DeploymentStatus.HEALTHY, "")})
    assert _causes(app) == f"; DraftWorker: {error}"
