"""DSpark draft head, drafter, training loss, checkpoints and STS calibration.

Pure tests use a tiny randomly initialised Llama as the target; the model-level tests use the real
default model and the head shipped for it, on held-out prompts of its training split.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy import stats

from dspark.models.config import ModelArgs
from dspark.models.dspark_head import (
    DSparkHead,
    block_attention_mask,
    default_head_path,
    load_head,
    save_head,
)
from dspark.models.llama import Transformer
from dspark.train.calibrate import calibration_report, ece, fit_sts, survival
from dspark.train.config import LossConfig, OptimConfig, RunConfig, TrainConfig
from dspark.train.loss import confidence_target, dspark_loss, position_weights
from dspark.workers.drafters.dspark import DSparkDrafter
from dspark.workers.request import SamplingParams
from helpers.tiny_models import D, TINY_HEAD, V, make_seq, synthetic_store, tiny_head, tiny_target


def train_form(head: DSparkHead, feats: torch.Tensor, anchors: torch.Tensor, anchor_ids: torch.Tensor, G: int) -> torch.Tensor:
    """Block hidden states computed the way the trainer does.  feats [1, S, F]; anchors/anchor_ids [1, A]."""
    B, S = feats.shape[:2]
    A = anchors.shape[1]
    ctx = head.context(feats)
    kv = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in head.context_kv(ctx, torch.arange(S).expand(B, -1))]
    x = head.block_inputs(anchor_ids, G).reshape(B, A * G, -1)
    qpos = (anchors.unsqueeze(-1) + torch.arange(G)).reshape(B, A * G)
    mask = block_attention_mask(torch.full((B,), S), anchors, G, S)
    return head.backbone(x, qpos, kv, mask).view(B, A, G, -1)


# ------------------------------------------------------------------------------------------------
# Shapes and masks
# ------------------------------------------------------------------------------------------------
def test_block_attention_mask_pattern():
    m = block_attention_mask(torch.tensor([5]), torch.tensor([[2, 4]]), block_len=2, ctx_size=5)
    T, F = True, False
    expected = [
        # context 0..4          block 0 (anchor 2)  block 1 (anchor 4)
        [T, T, F, F, F, T, T, F, F],
        [T, T, F, F, F, T, T, F, F],
        [T, T, T, T, F, F, F, T, T],
        [T, T, T, T, F, F, F, T, T],
    ]
    assert m.shape == (1, 4, 9)
    assert m[0].tolist() == expected


def test_block_sees_earlier_context_and_whole_block_only():
    target = tiny_target()
    head = tiny_head(target)
    G, S = 3, 10
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, S, 2 * D, generator=g)
    anchors, ids = torch.tensor([[4, 7]]), torch.tensor([[5, 9]])
    with torch.no_grad():
        h = train_form(head, feats, anchors, ids, G)
        assert h.shape == (1, 2, G, D)
        later = feats.clone()
        later[:, 7:] += 5.0  # at or after both anchors: invisible to both blocks
        assert torch.allclose(train_form(head, later, anchors, ids, G), h, atol=1e-6)
        mid = feats.clone()
        mid[:, 5] += 5.0  # before anchor 7, after anchor 4
        h2 = train_form(head, mid, anchors, ids, G)
        assert torch.allclose(h2[0, 0], h[0, 0], atol=1e-6)
        assert not torch.allclose(h2[0, 1], h[0, 1], atol=1e-4)
        # Another anchor token changes every position of its own block (non-causal), not the other block.
        h3 = train_form(head, feats, anchors, torch.tensor([[5, 10]]), G)
        assert torch.allclose(h3[0, 0], h[0, 0], atol=1e-6)
        assert all(not torch.allclose(h3[0, 1, k], h[0, 1, k], atol=1e-4) for k in range(G))


def test_drafter_cached_context_matches_training_form():
    target = tiny_target()
    head = tiny_head(target)
    G, S = 4, 9
    feats = torch.randn(S, 2 * D, generator=torch.Generator().manual_seed(5))
    drafter = DSparkDrafter(head, n_slots=2, max_seq=32)
    seq = make_seq("r0", list(range(1, S + 1)), anchor=7)
    with torch.no_grad():
        drafter.observe(seq, seq.prompt_ids[:5], feats[:5])  # two prefill chunks
        drafter.observe(seq, seq.prompt_ids[5:], feats[5:])
        h, base = drafter.block_logits([seq], torch.tensor([7]), G)
        ref = train_form(head, feats.unsqueeze(0), torch.tensor([[S]]), torch.tensor([[7]]), G)[0, 0]
    assert h.shape == (1, G, D) and base.shape == (1, G, V)
    assert torch.allclose(h[0], ref, atol=1e-5)
    blocks = drafter.propose([seq], G)
    b = blocks[0]
    assert len(b.token_ids) == G and b.probs.shape[0] == G and len(b.confidence) == G
    assert all(0.0 <= c <= 1.0 for c in b.confidence)
    # Greedy: the first draft is the argmax of U_1 + W1[anchor] W2, proposed with a one-hot q.
    first = base[0, 0] + head.markov_bias(head.markov_embedding(torch.tensor(7)))
    assert b.token_ids[0] == int(first.argmax())
    assert b.probs[0, 0].item() == 1.0 and b.prob_ids[0, 0].item() == b.token_ids[0]


def test_observed_features_are_projected_when_a_block_is_drafted():
    """``observe`` only keeps a request's features; the next block drafted for it projects all of
    them in one pass of its own (a step that drafts nothing costs no projection), with the keys a
    projection at every ``observe`` gives."""
    target = tiny_target()
    head = tiny_head(target)
    G = 4
    feats = torch.randn(14, 2 * D, generator=torch.Generator().manual_seed(8))
    lazy, eager = DSparkDrafter(head, n_slots=2, max_seq=32), DSparkDrafter(head, n_slots=2, max_seq=32)
    a, b = make_seq("a", list(range(1, 10)), anchor=7), make_seq("b", list(range(1, 6)), anchor=4)
    calls = []
    context = head.context
    head.context = lambda f: calls.append(f.shape[0]) or context(f)
    with torch.no_grad():
        for drafter in (lazy, eager):
            for seq, chunks in ((a, ((0, 5), (5, 8), (8, 9))), (b, ((9, 12), (12, 14)))):
                for lo, hi in chunks:
                    drafter.observe(seq, list(range(hi - lo)), feats[lo:hi])
                    if drafter is eager:
                        drafter.flush_context([seq])
            if drafter is lazy:
                assert calls == [] and lazy.context_len("a") == 9 and lazy.context_len("b") == 5
                kept = [f for chunks in lazy._backlog.values() for _, f in chunks]
                assert all(f.untyped_storage().nbytes() == f.nbytes for f in kept)  # not views of feats
        assert calls == [5, 3, 1, 3, 2]  # the eager drafter's: one per observe
        calls.clear()
        h, base = lazy.block_logits([a], torch.tensor([7]), G)
        assert calls == [9]  # a's backlog in one pass; b's still waits
        h2, base2 = eager.block_logits([a], torch.tensor([7]), G)
        assert torch.allclose(h, h2, atol=1e-5) and torch.allclose(base, base2, atol=1e-4)
        lazy.release("b")
        assert lazy.context_len("b") == 0 and lazy.propose([b], G)[0].token_ids == []  # nothing of b is left


def test_a_batch_of_contexts_drafts_what_each_drafts_alone():
    """Two requests with contexts of different lengths in one pass (a gather and a mask) give
    each one's hidden states and logits of a pass of its own (a view of its slot, no mask)."""
    target = tiny_target()
    head = tiny_head(target)
    G = 4
    feats = torch.randn(12, 2 * D, generator=torch.Generator().manual_seed(6))
    drafter = DSparkDrafter(head, n_slots=3, max_seq=32)
    drafter.observe(make_seq("pad", [1, 2], anchor=3), [1, 2], feats[:2])  # the others are not in slot 0
    a, b = make_seq("a", list(range(1, 10)), anchor=7), make_seq("b", list(range(1, 6)), anchor=4)
    with torch.no_grad():
        drafter.observe(a, a.prompt_ids, feats[:9])
        drafter.observe(b, b.prompt_ids, feats[7:12])
        h, base = drafter.block_logits([a, b], torch.tensor([7, 4]), G)
        alone = [drafter.block_logits([s], torch.tensor([t]), G) for s, t in ((a, 7), (b, 4))]
    for j, (h1, base1) in enumerate(alone):
        assert torch.allclose(h[j], h1[0], atol=1e-5) and torch.allclose(base[j], base1[0], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# The Markov loop samples exactly what it reports
# ------------------------------------------------------------------------------------------------
def test_markov_block_sampling_matches_reported_distribution():
    target = tiny_target()
    head = tiny_head(target)
    with torch.no_grad():
        head.markov_w1.mul_(10.0)  # a strong transition bias, so position 2 clearly depends on x_1
    N, G, top_k, temp = 6000, 2, 6, 0.8
    drafter = DSparkDrafter(head, n_slots=N, max_seq=16, proposal_top_k=top_k)
    feats = torch.randn(6, 2 * D, generator=torch.Generator().manual_seed(9))
    seqs = [make_seq(f"r{i}", [1, 2, 3, 4, 5, 6], anchor=11, temperature=temp, seed=i) for i in range(N)]
    with torch.no_grad():
        for s in seqs:
            drafter.observe(s, s.prompt_ids, feats)
        blocks = drafter.propose(seqs, G)
        _, base = drafter.block_logits(seqs[:1], torch.tensor([11]), G)

    def reported(b, k):
        return dict(zip(b.prob_ids[k].tolist(), b.probs[k].tolist()))

    # The reported q is the top-k softmax of U_k + W1[x_{k-1}] W2 at the request's temperature.
    for b in blocks[:20]:
        for k, prev in enumerate([11, b.token_ids[0]]):
            logits = base[0, k] + head.markov_bias(head.markov_embedding(torch.tensor(prev)))
            vals, ids = torch.topk(logits, top_k)
            q = torch.softmax(vals / temp, -1)
            got = reported(b, k)
            assert sorted(got) == sorted(ids.tolist())
            assert all(abs(got[i] - p) < 1e-5 for i, p in zip(ids.tolist(), q.tolist()))

    # Position 1: one distribution for all requests.  Position 2: one per sampled x_1.
    chi2, dof = 0.0, 0
    groups: dict[tuple, list] = {}
    q1 = reported(blocks[0], 0)
    counts = {i: 0 for i in q1}
    for b in blocks:
        counts[b.token_ids[0]] += 1
        groups.setdefault((b.token_ids[0],), []).append(b)
    obs = torch.tensor([counts[i] for i in q1], dtype=torch.float64)
    exp = torch.tensor([q1[i] * N for i in q1], dtype=torch.float64)
    keep = exp > 5
    chi2 += float(((obs - exp)[keep] ** 2 / exp[keep]).sum())
    dof += int(keep.sum()) - 1
    for group in groups.values():
        if len(group) < 300:
            continue
        q2 = reported(group[0], 1)
        c2 = {i: 0 for i in q2}
        for b in group:
            c2[b.token_ids[1]] += 1
        obs = torch.tensor([c2[i] for i in q2], dtype=torch.float64)
        exp = torch.tensor([q2[i] * len(group) for i in q2], dtype=torch.float64)
        keep = exp > 5
        chi2 += float(((obs - exp)[keep] ** 2 / exp[keep]).sum())
        dof += int(keep.sum()) - 1
    assert dof >= 5
    assert stats.chi2.sf(chi2, dof) > 1e-3, (chi2, dof)


# ------------------------------------------------------------------------------------------------
# Loss terms on hand-made tensors
# ------------------------------------------------------------------------------------------------
def test_confidence_target_is_one_minus_tv():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.3, 0.5]])
    assert torch.allclose(confidence_target(p, q), torch.tensor([0.8, 1.0]))
    assert torch.allclose(position_weights(torch.tensor([0, 1, 4]), 4.0), torch.tensor([1.0, math.exp(-0.25), math.exp(-1.0)]))


def test_loss_terms_by_hand():
    p_draft = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    logits = p_draft.log()
    target = torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.1, 0.8]])
    ids = torch.tensor([2, 0])
    pos = torch.tensor([0, 4])
    z = torch.tensor([0.0, 2.0])
    parts = dspark_loss(logits, z, target, ids, pos, LossConfig())
    w = torch.tensor([1.0, math.exp(-1.0)])
    ce = torch.tensor([-math.log(0.25), -math.log(0.1)])
    l1 = torch.tensor([0.5, 0.0])
    c_star = torch.tensor([0.75, 1.0])  # 1 - TV
    c = torch.sigmoid(z)
    bce = -(c_star * c.log() + (1 - c_star) * (1 - c).log())
    wm = lambda x: float((w * x).sum() / w.sum())  # noqa: E731
    assert torch.allclose(parts.accept, c_star)
    assert parts.ce.item() == pytest.approx(wm(ce), rel=1e-5)
    assert parts.l1.item() == pytest.approx(wm(l1), rel=1e-5, abs=1e-6)
    assert parts.conf.item() == pytest.approx(wm(bce), rel=1e-5)
    assert parts.total.item() == pytest.approx(0.1 * wm(ce) + 0.9 * wm(l1) + 1.0 * wm(bce), rel=1e-5)
    # The confidence label is not differentiated through: only z gets the BCE gradient.
    lg = logits.clone().requires_grad_(True)
    zz = z.clone().requires_grad_(True)
    dspark_loss(lg, zz, target, ids, pos, LossConfig(ce_weight=0.0, l1_weight=0.0)).total.backward()
    assert lg.grad is None or float(lg.grad.abs().sum()) == 0.0
    assert float(zz.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------------
# Checkpoint resume
# ------------------------------------------------------------------------------------------------
def test_checkpoint_resume_gives_the_same_state(tmp_path: Path):
    from dspark.train.trainer import train

    target = tiny_target()
    store = synthetic_store()
    cfg = TrainConfig(
        head=TINY_HEAD.replace(init_from_layers=(2, 3)),
        optim=OptimConfig(steps=4, seqs_per_step=2, anchors_per_seq=3, warmup_steps=2, lr=3e-3),
        run=RunConfig(log_every=1, eval_every=10**6, checkpoint_every=2, eval_blocks=8),
    )
    straight = train(cfg, tmp_path / "a", target, store, None, progress=False)
    train(cfg, tmp_path / "b", target, store, None, max_steps=2, progress=False)
    resumed = train(cfg, tmp_path / "b", target, store, None, resume=True, progress=False)
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    from safetensors.torch import load_file

    oa = load_file(str(tmp_path / "a" / "checkpoints" / "last" / "optim.safetensors"))
    ob = load_file(str(tmp_path / "b" / "checkpoints" / "last" / "optim.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    changed = [k for k in sa if not torch.equal(sa[k], tiny_head_init(cfg, target)[k])]
    assert changed  # training moved the weights


def tiny_head_init(cfg: TrainConfig, target) -> dict:
    h = DSparkHead(cfg.head)
    h.reset_parameters(target, seed=cfg.run.seed)
    return h.state_dict()


# ------------------------------------------------------------------------------------------------
# STS calibration
# ------------------------------------------------------------------------------------------------
def test_sts_reduces_ece_on_overconfident_scores():
    g = torch.Generator().manual_seed(0)
    N, G = 4000, 5
    true_logit = torch.randn(N, G, generator=g) * 1.2 + 1.0
    p = torch.sigmoid(true_logit)  # true conditional acceptance probabilities
    accepted = torch.rand(N, G, generator=g) < p
    survived = accepted.int().cumprod(1).float()
    z = 3.0 * true_logit  # overconfident scores: right ranking, too sharp
    known = torch.ones(N, G, dtype=torch.bool)
    temps = fit_sts(z, survived, known)
    rep = calibration_report(z, survived, known, temps)
    assert rep["ece_sts"] < 0.5 * rep["ece_raw"], rep
    assert all(t > 1.5 for t in temps[:3])  # it cooled the over-sharp logits
    a = survival(z, temps)
    assert ece(a[:, 0], survived[:, 0]) < ece(torch.sigmoid(z[:, 0]), survived[:, 0])


# ------------------------------------------------------------------------------------------------
# The head file and the real default model
# ------------------------------------------------------------------------------------------------
def test_load_head_checks_the_target(tmp_path: Path):
    target = tiny_target()
    head = tiny_head(target)
    path = save_head(head, tmp_path / "h")
    loaded = load_head(path, target)
    assert torch.allclose(loaded.markov_w2.float(), head.markov_w2.bfloat16().float())
    other = Transformer(ModelArgs(vocab_size=V, dim=2 * D, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                                  intermediate_size=48, name="wide"))
    with pytest.raises(ValueError, match="dim"):
        load_head(path, other)
    shallow = Transformer(ModelArgs(vocab_size=V, dim=D, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                    intermediate_size=48, name="shallow"))
    with pytest.raises(ValueError, match="feature layers"):
        load_head(path, shallow)


SHIPPED = default_head_path("SmolLM2-135M-Instruct")
# Measured on held-out prompts: about 1.65 (fp32/bf16 greedy, block 7; docs/DRAFTER.md).  A head
# that learned nothing scores about 1.0; the floor sits between, below the measured figure.
ACCEPTANCE_FLOOR = 1.3


@pytest.fixture(scope="module")
def greedy_runs():
    """fp32 greedy decoding of a few held-out prompts with draft none and draft dspark."""
    if not SHIPPED.exists():
        pytest.skip("no shipped head")
    from dspark.models.dspark_head import read_head_config
    from dspark.train.data import chat_ids, held_out_prompts
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is fastest on a shared 2-core host
    try:
        _, meta = read_head_config(SHIPPED)
        cfg = TrainConfig.from_json(meta["training"]["config"])
        out = {}
        for draft in ("none", "dspark"):
            built = build_engine(EngineSpec(dtype="fp32", draft=draft, block_len=7,
                                            runner=RunnerConfig(n_slots=4, max_seq=1024)), progress=False)
            prompts = [chat_ids(built.loaded.tokenizer, p.text) for p in held_out_prompts(cfg.data, "test", 4)]
            seqs = built.engine.generate(prompts, SamplingParams(max_tokens=48))
            out[draft] = ([s.output_ids for s in seqs], built.engine.metrics)
            built.close()
        return out
    finally:
        torch.set_num_threads(threads)


def test_greedy_dspark_is_token_identical_to_plain_fp32(greedy_runs):
    plain, _ = greedy_runs["none"]
    spec, metrics = greedy_runs["dspark"]
    assert spec == plain
    assert metrics.num_drafts > 0


def test_shipped_head_acceptance_above_floor(greedy_runs):
    _, metrics = greedy_runs["dspark"]
    assert metrics.mean_acceptance_length >= ACCEPTANCE_FLOOR, metrics.to_dict()


def test_shipped_head_fits_the_default_model():
    if not SHIPPED.exists():
        pytest.skip("no shipped head")
    from dspark.models.dspark_head import read_head_config

    cfg, meta = read_head_config(SHIPPED)
    assert cfg.target_name == "SmolLM2-135M-Instruct" and cfg.block_len == 7
    assert set(meta["config"]["sts"]) == {"greedy", "sampled"}
    assert SHIPPED.stat().st_size < 64 * 2**20
    assert cfg.feature_layers[-1] >= 20  # the last feature layer sits near the top


def test_packed_head_drafts_what_the_unpacked_head_drafts():
    """Serving packs the head's matrices for oneDNN (``pack_for_inference``, bf16 on CPU): the
    same context gives the same greedy block and the same proposal at T = 1."""
    if not SHIPPED.exists():
        pytest.skip("no shipped head")
    from dspark.models.loader import load_model
    from dspark.models.packing import packing_supported
    from dspark.train.features import target_features

    loaded = load_model(None, dtype="bf16", progress=False)
    if not packing_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no oneDNN bf16 products on this CPU")
    plain, packed = load_head(SHIPPED, loaded.model), load_head(SHIPPED, loaded.model)
    assert packed.pack_for_inference() > 0 and plain.fc.weight is not None
    ids = loaded.tokenizer.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    feats, _ = next(iter(target_features(loaded.model, [ids], plain.cfg.feature_layers)))
    out = {}
    for name, head in (("plain", plain), ("packed", packed)):
        drafter = DSparkDrafter(head, n_slots=2, max_seq=128)
        seqs = [make_seq(f"r{t}", ids[:-1], anchor=ids[-1], temperature=t, seed=3) for t in (0.0, 1.0)]
        with torch.inference_mode():
            for s in seqs:
                drafter.observe(s, s.prompt_ids, feats[:-1])
            _, base = drafter.block_logits(seqs[:1], torch.tensor([ids[-1]]), 7)
            out[name] = (drafter.propose(seqs, 7), base)
    (greedy, sampled), base = out["plain"]
    (greedy_p, sampled_p), base_p = out["packed"]
    assert torch.allclose(base, base_p, atol=0.05, rtol=0.01), (base - base_p).abs().max()
    assert greedy.token_ids == greedy_p.token_ids
    assert sampled.token_ids == sampled_p.token_ids
    assert torch.allclose(sampled.probs, sampled_p.probs, atol=1e-2)
