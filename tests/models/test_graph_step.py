"""The graph-safe step (dspark/models/graph_step.py) against the regular step, on the real model.

On CPU a bucket's "replay" is the eager forward on the static buffers, so these tests run the
copy-in / copy-out of the CUDA path.  fp32: logits within 1e-3 of the regular path (about 3e-5
of their largest value) over decode and verification steps with rollbacks, in several token and
key buckets, padded and not; the real slots of the cache hold what the regular path wrote
(padding goes to the scratch slot only); steps that fit no bucket take the regular path; greedy
output token for token the same, plain and speculative, through the engine.
"""

from __future__ import annotations

import pytest
import torch

from dspark.models.graph_step import MAX_Q, MAX_TOKEN_KEYS, GraphStep, bucket, key_buckets
from dspark.workers.factory import EngineSpec
from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput
from helpers.engines import greedy_outputs

TOL = 1e-3
N_SLOTS = 3


def _pair(model):
    regular = LocalRunner(model, RunnerConfig(N_SLOTS, 256))
    graphs = LocalRunner(model, RunnerConfig(N_SLOTS, 256, cuda_graphs=True))
    assert graphs.graphs is not None and not graphs.graphs.capture  # CPU: eager on the static buffers
    return regular, graphs


def _both(regular, graphs, step: StepInput) -> torch.Tensor:
    a, b = regular.forward(step), graphs.forward(step)
    torch.testing.assert_close(b.logits, a.logits, atol=TOL, rtol=0)
    return a.logits


@torch.inference_mode()
def test_graph_step_matches_regular_over_decode_and_verify_with_rollbacks(model_fp32):
    """Greedy decode of three requests, then verification blocks whose tails are rejected
    (the next step starts below the cache's length), crossing the 64-key bucket; every step's
    logits agree and so does the cache of every real slot."""
    regular, graphs = _pair(model_fp32.model)
    tok = model_fp32.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}])
               for p in ("Name a colour.", "Write a short story about a lighthouse keeper who finds a message in a "
                         "bottle on a stormy night.", "Say hi.")]
    lengths = [len(p) for p in prompts]
    assert all(n > MAX_Q for n in lengths)  # the prefills take the regular path on both
    last = []
    for slot, p in enumerate(prompts):
        last.append(int(_both(regular, graphs, StepInput(p, [slot], [0], [len(p)])).argmax(-1)[-1]))
    seen = set()
    for i in range(10):
        if i % 3 == 2:  # a verification block on request 0, two of its four drafts accepted
            drafts = [last[0], 11, 12, 13]
            logits = _both(regular, graphs, StepInput(drafts, [0], [lengths[0]], [4]))
            seen.add(graphs.graphs.fits([lengths[0]], [4]))
            lengths[0] += 2  # rollback: the next step writes over the last two positions
            last[0] = int(logits[1].argmax())
            continue
        q_lens = [1, 1, 1] if i % 2 else [1, 5, 1]  # T = 3 (bucket 4) or 7 (bucket 8): padded
        tokens = [last[0]] + [last[1]] * q_lens[1] + [last[2]]
        step = StepInput(tokens, [0, 1, 2], list(lengths), q_lens)
        seen.add(graphs.graphs.fits(step.starts, q_lens))
        logits = _both(regular, graphs, step)
        ends = torch.tensor(q_lens).cumsum(0) - 1
        last = logits[ends].argmax(-1).tolist()
        lengths = [n + q for n, q in zip(lengths, q_lens)]
    assert {t for t, _ in seen} >= {4, 8} and {k for _, k in seen} >= {64, 128}, seen
    # One request alone: a one-token step (bucket 1, no padding) and a two-token one (bucket 2).
    for q in (1, 2):
        step = StepInput([last[2]] * q, [2], [lengths[2]], [q])
        assert graphs.graphs.fits(step.starts, step.q_lens)[0] == q
        _both(regular, graphs, step)
        lengths[2] += q
    # The real slots hold the same keys and values; the scratch slot is the only extra row.
    n = min(regular.cache.capacity, graphs.cache.capacity)
    assert graphs.cache.k.shape[1] == N_SLOTS + 1 == graphs.graphs.scratch + 1
    torch.testing.assert_close(graphs.cache.k[:, :N_SLOTS, :, :n], regular.cache.k[:, :, :, :n], atol=1e-4, rtol=0)
    torch.testing.assert_close(graphs.cache.v[:, :N_SLOTS, :, :n], regular.cache.v[:, :, :, :n], atol=1e-4, rtol=0)
    assert graphs.cache.lengths == regular.cache.lengths
    assert graphs.graphs.served == 12  # every decode and verification step took the graph-safe path


@torch.inference_mode()
def test_padding_rows_are_dropped_and_logits_rows_and_features_follow_the_real_tokens(model_fp32):
    """A 3-token step in the 4-token bucket: only the real rows come back, in order, and the
    chosen logits rows and feature layers are those of the regular path."""
    regular, graphs = _pair(model_fp32.model)
    ids = list(range(300, 320))
    for r in (regular, graphs):
        r.forward(StepInput(ids, [0], [0], [20]))
        r.forward(StepInput(ids[:18], [1], [0], [18]))
    step = StepInput([7, 8, 9], [1, 0], [18, 20], [2, 1], logits_rows=[2, 0], feature_layers=(3, 7))
    a, b = regular.forward(step), graphs.forward(step)
    assert b.logits.shape == (2, model_fp32.model.args.vocab_size)
    torch.testing.assert_close(b.logits, a.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(b.features, a.features, atol=1e-4, rtol=0)
    none = graphs.forward(StepInput([5], [0], [21], [1], logits_rows=[]))
    assert none.logits is None


def test_steps_that_fit_no_bucket_take_the_regular_path(model_fp32):
    regular, graphs = _pair(model_fp32.model)
    g: GraphStep = graphs.graphs
    assert g.fits([0], [MAX_Q + 1]) is None  # a prefill chunk
    assert g.fits([0] * 40, [16] * 40) is None  # 640 tokens > the largest bucket
    assert g.fits([250], [10]) is None  # past the largest key bucket (max_seq 256)
    assert g.fits([200] * 32, [2] * 32) == (64, 256)
    g.max_token_keys = 64 * 128  # the gather budget: (64 tokens, 256 keys) is past it
    assert g.fits([200] * 32, [2] * 32) is None and g.fits([100] * 32, [2] * 32) == (64, 128)
    g.max_token_keys = MAX_TOKEN_KEYS
    with pytest.raises(ValueError, match="fits no graph bucket"):
        g.run(list(range(MAX_Q + 1)), [0], [0], [MAX_Q + 1])
    # The runner takes the regular path for it (the graph step above refused it), and for an
    # early exit (layer-skip drafting) that would fit.
    step = StepInput(list(range(400, 400 + MAX_Q + 1)), [0], [0], [MAX_Q + 1])
    early = StepInput([5, 6], [0], [MAX_Q + 1], [2], n_layers=4)
    with torch.inference_mode():
        for s in (step, early):
            torch.testing.assert_close(graphs.forward(s).logits, regular.forward(s).logits, atol=0, rtol=0)
    assert g.served == 0


def test_buckets():
    assert key_buckets(2048) == (64, 128, 256, 512, 1024, 2048)
    assert key_buckets(100) == (64, 100)
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def test_graph_config_refusals():
    with pytest.raises(ValueError, match="slot KV layout"):
        RunnerConfig(cuda_graphs=True, kv_layout="paged")
    with pytest.raises(ValueError, match="deterministic"):
        RunnerConfig(cuda_graphs=True, deterministic=True)


def _greedy(tok, spec: EngineSpec) -> tuple[list[list[int]], int]:
    """Greedy outputs of two prompts, and how many steps took the graph-safe path."""
    served = lambda engine: 0 if engine.runner.graphs is None else engine.runner.graphs.served  # noqa: E731
    return greedy_outputs(tok, spec, served, 40, ["Write a haiku about the sea.", "List three prime numbers."])


def test_graph_step_greedy_equals_regular_fp32_plain_and_speculative(model_fp32):
    tok = model_fp32.tokenizer
    plain, _ = _greedy(tok, EngineSpec(dtype="fp32", runner=RunnerConfig(n_slots=2, max_seq=512)))
    for draft in ("none", "ngram"):
        cfg = RunnerConfig(n_slots=2, max_seq=512, cuda_graphs=True)
        out, served = _greedy(tok, EngineSpec(dtype="fp32", draft=draft, block_len=4, runner=cfg))
        assert out == plain, draft
        assert served >= 20, (draft, served)  # the decode and verification steps took it
