"""Draft vocabulary: the id map, the reduced Markov block sampling, the head file, the drafter, training.

Pure tests use hand-made tensors and the tiny random target of helpers/tiny_models.py; the model-level
test uses the real default model and the head shipped for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dspark.kernels.markov import markov_block_sample
from dspark.models.dspark_head import (
    default_head_path,
    load_head,
    read_vocab_map,
    save_head,
    vocab_map_path,
    write_vocab_map,
)
from dspark.train.config import OptimConfig, RunConfig, TrainConfig
from dspark.train.loss import dspark_loss
from dspark.train.vocab import count_tokens, coverage, rank_ids
from dspark.workers.drafters.dspark import DSparkDrafter
from helpers.tiny_models import TINY_HEAD, V, make_seq, synthetic_store, tiny_head, tiny_target

D_FEATS = 2 * TINY_HEAD.dim  # two feature layers


# ------------------------------------------------------------------------------------------------
# Counting and ranking
# ------------------------------------------------------------------------------------------------
def test_rank_is_by_count_then_id_and_covers_every_id():
    rows = [{"output_ids": [5, 5, 5, 2, 2, 9]}, {"output_ids": [9, 9, 1]}]
    counts = count_tokens(rows, 12)
    ids = rank_ids(counts)
    assert ids[:4].tolist() == [5, 9, 2, 1]  # 3, 3 (tie: lower id first), 2, 1
    assert sorted(ids.tolist()) == list(range(12))  # unseen ids follow, so any N is a prefix
    assert ids[4:].tolist() == [0, 3, 4, 6, 7, 8, 10, 11]
    cov = coverage(ids, torch.tensor([5, 9, 0, 2]), [1, 3, 12])
    assert cov == {1: 0.25, 3: 0.75, 12: 1.0}


# ------------------------------------------------------------------------------------------------
# The Markov loop over a draft vocabulary
# ------------------------------------------------------------------------------------------------
def _case(seed: int, b: int = 3, g: int = 5, v: int = 20, r: int = 4, n: int = 7):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(b, g, v, generator=gen) * 2
    w1 = torch.randn(v, r, generator=gen)
    w2 = torch.randn(r, v, generator=gen)
    ids = torch.randperm(v, generator=gen)[:n]
    anchor = torch.randint(0, v, (b,), generator=gen)
    u = torch.rand(b, g, generator=gen, dtype=torch.float64)
    return base, w1, w2, ids, anchor, u


@pytest.mark.parametrize("top_k", [0, 1, 3])
@pytest.mark.parametrize("temps", [(0.0, 0.0, 0.0), (1.0, 0.0, 0.7)])
def test_reduced_columns_equal_the_full_kernel_masked_outside_the_map(top_k, temps):
    """Drafting over columns ``ids`` is drafting over the full vocabulary with every other logit at -inf."""
    base, w1, w2, ids, anchor, u = _case(0)
    v = base.shape[-1]
    temp = torch.tensor(temps)
    red = markov_block_sample(base[..., ids], anchor, w1, w2[:, ids], temp, top_k, u, vocab_ids=ids)
    outside = torch.ones(v, dtype=torch.bool)
    outside[ids] = False
    masked = base.masked_fill(outside, float("-inf"))
    full = markov_block_sample(masked, anchor, w1, w2, temp, top_k, u)
    assert torch.equal(red.tokens, full.tokens)
    assert torch.equal(red.prev_embeddings, full.prev_embeddings)
    assert set(red.tokens.flatten().tolist()) <= set(ids.tolist())

    def dense(d):  # [B, G, V] law of each position
        if d.draft_prob_ids is None:
            return d.draft_probs
        return torch.zeros(*d.draft_probs.shape[:2], v).scatter_add_(-1, d.draft_prob_ids, d.draft_probs)

    qr, qf = dense(red), dense(full)
    assert torch.allclose(qr, qf, atol=1e-6)
    assert float(qr[..., outside].abs().sum()) == 0.0  # zero mass outside the map
    assert torch.allclose(qr.sum(-1), torch.ones(qr.shape[:2]), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The head file: the map travels with it and the loader refuses a mismatch
# ------------------------------------------------------------------------------------------------
def _saved(tmp_path: Path, ids: torch.Tensor, **cfg_changes):
    target = tiny_target()
    head = tiny_head(target, TINY_HEAD.replace(**cfg_changes))
    head.vocab_ids = ids
    return target, save_head(head, tmp_path / "h")


def test_map_round_trip_and_draft_vocab_option(tmp_path: Path):
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    target, path = _saved(tmp_path, ids, draft_vocab=16)
    meta = json.loads(path.with_suffix(".json").read_text())["config"]
    assert meta["vocab_map"]["size"] == V and meta["draft_vocab"] == 16
    assert torch.equal(read_vocab_map(vocab_map_path(path)), ids)
    head = load_head(path, target)
    assert torch.equal(head.draft_ids, ids[:16])
    assert head.base_logits(torch.randn(3, TINY_HEAD.dim)).shape == (3, 16)
    assert torch.equal(head._out_rows, target.output.weight[ids[:16]])
    assert torch.equal(head.markov_w2_draft, head.markov_w2[:, ids[:16]])
    assert load_head(path, target, draft_vocab=0).draft_ids is None
    assert load_head(path, target, draft_vocab=V).draft_ids.numel() == V
    with pytest.raises(ValueError, match="draft_vocab"):
        load_head(path, target, draft_vocab=V + 1)


def test_attach_gives_an_existing_head_its_map(tmp_path: Path):
    from dspark.train.vocab import attach_vocab_map

    target = tiny_target()
    path = save_head(tiny_head(target), tmp_path / "h")  # a head saved without a map
    with pytest.raises(ValueError, match="needs the head's id map"):
        load_head(path, target, draft_vocab=8)
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(7))
    write_vocab_map(tmp_path / "counted.safetensors", ids)
    attach_vocab_map(path, tmp_path / "counted.safetensors", 8, {"tokens": 123})
    head = load_head(path, target)
    assert torch.equal(head.draft_ids, ids[:8])
    assert json.loads(path.with_suffix(".json").read_text())["config"]["vocab_map"]["tokens"] == 123


def _expect_refusal(path: Path, target, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        load_head(path, target)
    assert "\n" not in str(err.value)


def test_loader_refuses_a_map_that_does_not_match(tmp_path: Path):
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(2))
    target, path = _saved(tmp_path, ids, draft_vocab=8)
    vmap = vocab_map_path(path)
    good = vmap.read_bytes()
    # Hash mismatch: same size, other order.
    write_vocab_map(vmap, ids.flip(0))
    _expect_refusal(path, target, "sha256")
    # Wrong size.
    write_vocab_map(vmap, ids[:-1])
    _expect_refusal(path, target, "ids, the head's config says")
    # Ids out of range (the config's hash made to match, so only the range check can catch it).
    bad = ids.clone()
    bad[3] = V + 5
    rec = write_vocab_map(vmap, bad)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"]["vocab_map"] = rec
    path.with_suffix(".json").write_text(json.dumps(meta))
    _expect_refusal(path, target, "outside the vocabulary")
    # Missing file.
    vmap.unlink()
    _expect_refusal(path, target, "missing")
    vmap.write_bytes(good)
    # A map for another vocabulary size (the head's config says V; the target has 2 V).
    from dspark.models.config import ModelArgs
    from dspark.models.llama import Transformer

    wide_vocab = Transformer(ModelArgs(vocab_size=2 * V, dim=TINY_HEAD.dim, n_layers=4, n_heads=4, n_kv_heads=2,
                                       head_dim=8, intermediate_size=48, name="tiny"))
    with pytest.raises(ValueError, match="vocab"):
        load_head(path, wide_vocab)


# ------------------------------------------------------------------------------------------------
# The drafter
# ------------------------------------------------------------------------------------------------
def _propose(head, temps: list[float], top_k: int = 8, seed: int = 3):
    feats = torch.randn(9, D_FEATS, generator=torch.Generator().manual_seed(seed))
    drafter = DSparkDrafter(head, n_slots=len(temps), max_seq=32, proposal_top_k=top_k)
    seqs = [make_seq(f"r{i}", list(range(1, 10)), anchor=7 + i, temperature=t, seed=i) for i, t in enumerate(temps)]
    with torch.no_grad():
        for s in seqs:
            drafter.observe(s, s.prompt_ids, feats)
    return drafter.propose(seqs, TINY_HEAD.block_len)


def test_full_size_map_drafts_exactly_what_the_full_vocabulary_does(tmp_path: Path):
    """N = V through the map (gathered rows, sliced W2, column -> id) vs the untouched full path."""
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(4))
    target, path = _saved(tmp_path, ids)
    full = load_head(path, target, dtype=torch.float32)
    mapped = load_head(path, target, dtype=torch.float32, draft_vocab=V)
    assert full.draft_ids is None and mapped.draft_ids.numel() == V
    for temps, top_k in (([0.0, 0.0], 8), ([0.0, 1.0], 8), ([1.0, 0.8], 1), ([1.0, 1.2], 64)):
        a, b = _propose(full, temps, top_k), _propose(mapped, temps, top_k)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            qx = torch.zeros(len(x), V).scatter_add_(1, x.prob_ids, x.probs)
            qy = torch.zeros(len(y), V).scatter_add_(1, y.prob_ids, y.probs)
            assert torch.allclose(qx, qy, atol=1e-6)
            assert torch.allclose(torch.tensor(x.confidence), torch.tensor(y.confidence), atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 8, 64])
def test_reduced_drafter_q_has_no_mass_outside_the_map(tmp_path: Path, top_k):
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(5))
    target, path = _saved(tmp_path, ids, draft_vocab=12)
    head = load_head(path, target, dtype=torch.float32)
    allowed = set(ids[:12].tolist())
    for blk in _propose(head, [0.0, 1.0, 1.5], top_k):
        assert set(blk.token_ids) <= allowed
        support = blk.prob_ids[blk.probs > 0]
        assert set(support.tolist()) <= allowed
        assert torch.allclose(blk.probs.sum(-1), torch.ones(len(blk)), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Training over a draft vocabulary
# ------------------------------------------------------------------------------------------------
def test_loss_over_a_draft_vocabulary_by_hand():
    # One row, S = ids {0, 1} of a 3-id vocabulary; p_t = (0.5, 0.3, 0.2), so p_t(S) = 0.8.
    logits = torch.log(torch.tensor([[0.6, 0.4]])).requires_grad_()
    p_s = torch.tensor([[0.5, 0.3]]) / 0.8
    parts = dspark_loss(logits, torch.zeros(1), p_s, torch.tensor([-1]), torch.tensor([0]),
                        target_mass=torch.tensor([0.8]))
    assert torch.allclose(parts.l1, (torch.tensor([0.6, 0.4]) - p_s[0]).abs().sum())
    assert torch.allclose(parts.accept, torch.tensor([0.5 + 0.3]))  # min(0.6, 0.5) + min(0.4, 0.3)
    assert float(parts.ce) == 0.0  # the target's token is outside S: no CE
    # p_S itself is the best proposal on S: L1 zero, acceptance p_t(S).
    best = dspark_loss(torch.log(p_s), torch.zeros(1), p_s, torch.tensor([0]), torch.tensor([0]),
                       target_mass=torch.tensor([0.8]))
    assert float(best.l1) < 1e-6 and torch.allclose(best.accept, torch.tensor([0.8]))


def test_trainer_trains_and_exports_a_reduced_vocabulary_head(tmp_path: Path):
    from dspark.train.trainer import evaluate, export_head, train

    target = tiny_target()
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(6))
    N = 24
    cfg = TrainConfig(
        head=TINY_HEAD.replace(init_from_layers=(2, 3), trained_vocab=N),
        optim=OptimConfig(steps=3, seqs_per_step=2, anchors_per_seq=3, warmup_steps=1, lr=3e-3),
        run=RunConfig(log_every=1, eval_every=10**6, checkpoint_every=10**6, eval_blocks=8),
    )
    store = synthetic_store()
    with pytest.raises(ValueError, match="id map"):
        train(cfg, tmp_path / "none", target, store, None, progress=False)
    head = train(cfg, tmp_path / "run", target, store, None, progress=False, vocab_ids=ids)
    assert head.markov_w2.shape == (TINY_HEAD.markov_rank, N)
    ev = evaluate(head, target, store, cfg, n_blocks=8)
    assert 0.0 <= ev["accept_per_pos"][0] <= 1.0
    path = export_head(head, tmp_path / "run" / "head", cfg)
    loaded = load_head(path, target, dtype=torch.float32)
    assert torch.equal(loaded.draft_ids, ids[:N])
    assert torch.equal(loaded.markov_w2_draft, head.markov_w2.detach().bfloat16().float())
    assert load_head(path, target, draft_vocab=N // 2).markov_w2_draft.shape[1] == N // 2
    with pytest.raises(ValueError, match="trained over"):
        load_head(path, target, draft_vocab=0)
    for blk in _propose(loaded, [0.0, 1.0]):
        assert set(blk.token_ids) <= set(ids[:N].tolist())


# ------------------------------------------------------------------------------------------------
# The real default model
# ------------------------------------------------------------------------------------------------
SHIPPED = default_head_path("SmolLM2-135M-Instruct")


def test_reduced_vocabulary_greedy_spec_equals_plain_fp32():
    """fp32 greedy speculative decoding with a small draft vocabulary is token-identical to plain."""
    if not vocab_map_path(SHIPPED).exists():
        pytest.skip("the shipped head has no id map")
    from dspark.models.dspark_head import read_head_config
    from dspark.train.data import chat_ids, held_out_prompts
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    _, meta = read_head_config(SHIPPED)
    data = TrainConfig.from_json(meta["training"]["config"]).data
    out = {}
    for draft, opts in (("none", ()), ("dspark", (("draft_vocab", 4096),))):
        built = build_engine(EngineSpec(dtype="fp32", draft=draft, block_len=7, draft_options=opts,
                                        runner=RunnerConfig(n_slots=3, max_seq=1024)), progress=False)
        prompts = [chat_ids(built.loaded.tokenizer, p.text) for p in held_out_prompts(data, "test", 3)]
        seqs = built.engine.generate(prompts, SamplingParams(max_tokens=32))
        out[draft] = [s.output_ids for s in seqs]
        if draft == "dspark":
            assert built.engine.drafter.draft_ids.numel() == 4096
            # Drafts mapped to the wrong ids would almost never be accepted (about 1.0).
            assert built.engine.metrics.mean_acceptance_length >= 1.2, built.engine.metrics.to_dict()
        built.close()
    assert out["dspark"] == out["none"]


def test_draft_vocab_option_refuses_a_non_number(model_fp32):
    from dspark.workers.drafters.dspark import make_dspark_drafter

    with pytest.raises(ValueError, match="draft_vocab='many'"):
        make_dspark_drafter(model_fp32, {"draft_vocab": "many"}, None)


def test_stored_logsumexp_gives_the_same_loss_as_the_full_vocabulary():
    """With ``lse`` / ``top1`` stored per token, the trainer computes the target's logits over the
    draft vocabulary only; loss, confidence labels and greedy matches equal the full computation."""
    import dataclasses

    from dspark.models.dspark_head import DSparkHead
    from dspark.train.features import logit_stats
    from dspark.train.trainer import forward_batch, sample_batch

    target = tiny_target()
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(6))
    N = 24
    cfg = TrainConfig(head=TINY_HEAD.replace(init_from_layers=(2, 3), trained_vocab=N),
                      optim=OptimConfig(seqs_per_step=2, anchors_per_seq=3, autocast_bf16=False))
    head = DSparkHead(cfg.head)
    head.reset_parameters(target, seed=0)
    head.bind_target(target)
    head.vocab_ids = ids
    head.use_draft_vocab(N)
    full = synthetic_store()
    lse, top1 = logit_stats(target, full.final)
    stored = dataclasses.replace(full, lse=lse, top1=top1.long())
    batch = sample_batch(full, torch.Generator().manual_seed(3), 2, 3, cfg.head.block_len, full_blocks=True)
    a = forward_batch(head, target, full, batch, cfg, with_top1=True)
    full_head, calls = target.lm_head, []
    target.lm_head = lambda h: calls.append(h.shape) or full_head(h)
    b = forward_batch(head, target, stored, batch, cfg, with_top1=True)
    del target.lm_head
    assert calls == []  # the stored path never computes logits over the whole vocabulary
    for x, y in ((a.loss.total, b.loss.total), (a.loss.l1, b.loss.l1), (a.loss.ce, b.loss.ce), (a.loss.conf, b.loss.conf)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.loss.accept, b.loss.accept, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.target_top1, b.target_top1)
