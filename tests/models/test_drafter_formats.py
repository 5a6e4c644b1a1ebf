"""DFlash checkpoints (DeepSpec's, ``--draft dflash``) and speculators-format DSpark checkpoints.

The folders are written by ``write_dflash_checkpoint`` and ``write_speculators_checkpoint``
(helpers/drafter_checkpoints.py) under each format's published names and fields.  The proposals are checked against
an independent computation of each format's math from those tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.models.deepspec_format import load_deepspec_head
from dspark.models.speculators_format import load_speculators_head
from dspark.workers.drafters.dflash import PRIOR_ACCEPT, DFlashDrafter
from dspark.workers.drafters.dspark import DSparkDrafter
from helpers.drafter_checkpoints import write_deepspec_checkpoint, write_dflash_checkpoint, write_speculators_checkpoint
from helpers.tiny_models import D, V, make_seq, tiny_target
from test_deepspec_format import deepspec_hidden


def _propose(drafter, feats, anchor, G, temperature, n=2):
    seqs = [make_seq(f"r{i}", list(range(1, feats.shape[0] + 1)), anchor=anchor, temperature=temperature, seed=i)
            for i in range(n)]
    with torch.no_grad():
        for s in seqs:
            drafter.observe(s, s.prompt_ids, feats)
        return drafter.propose(seqs, G), seqs


def _check_q(block, logits, ids, temperature, top_k):
    """block's tokens and sparse q against logits [G, N] over vocabulary ids ``ids`` [N]."""
    for k, tok in enumerate(block.token_ids):
        if temperature == 0.0:
            assert tok == int(ids[logits[k].argmax()]) and block.probs[k, 0].item() == 1.0
            continue
        vals, cols = torch.topk(logits[k], top_k)
        want = dict(zip(ids[cols].tolist(), torch.softmax(vals / temperature, -1).tolist()))
        got = dict(zip(block.prob_ids[k].tolist(), block.probs[k].tolist()))
        assert got.keys() == want.keys() and all(abs(got[i] - want[i]) < 1e-5 for i in want)
        assert tok in want


# ------------------------------------------------------------------------------------------------
# DFlash: q = softmax(U_k / T), independent per position; confidences from the online estimate
# ------------------------------------------------------------------------------------------------
def test_dflash_proposal_matches_deepspec_math_and_confidence_is_online(tmp_path):
    target = tiny_target()
    t = write_dflash_checkpoint(tmp_path / "ck", target.tok_embeddings.weight, target.output.weight, 4)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    head = load_deepspec_head(tmp_path / "ck", target, dtype=torch.float32, dflash=True)
    assert head.cfg.markov_rank == 0
    G, anchor, top_k = 4, 11, 8
    feats = torch.randn(7, 2 * D, generator=torch.Generator().manual_seed(3))
    logits = deepspec_hidden(t, cfg, feats, anchor, G) @ t["lm_head.weight"].T  # [G, V]: no Markov bias
    for temperature in (0.9, 0.0):
        drafter = DFlashDrafter(head, n_slots=2, max_seq=64, proposal_top_k=top_k)
        blocks, seqs = _propose(drafter, feats, anchor, G, temperature)
        for b in blocks:
            _check_q(b, logits, torch.arange(V), temperature, top_k)
            assert b.confidence == [PRIOR_ACCEPT] * G  # no evidence yet: the prior
    # Verification kept the first draft of r0's block only: position 0 up, position 1 down.
    kept = [anchor, blocks[0].token_ids[0], (blocks[0].token_ids[1] + 1) % V]  # anchor, accepted, recovered
    drafter.observe(seqs[0], kept, feats[:3], num_verified=G)
    c = drafter.conf.confidences("r0", G)  # what r0's next block carries
    assert c[0] > PRIOR_ACCEPT > c[1] and c[2:] == [PRIOR_ACCEPT] * 2
    assert drafter.conf.confidences("r1", G) == [PRIOR_ACCEPT] * G  # per request


def test_dflash_and_dspark_refuse_each_others_checkpoints(tmp_path):
    target = tiny_target()
    emb, out = target.tok_embeddings.weight, target.output.weight
    write_dflash_checkpoint(tmp_path / "dflash", emb, out, 4)
    write_deepspec_checkpoint(tmp_path / "dspark", emb, out, 4)
    with pytest.raises(ValueError, match="enable_confidence_head false .*--draft dflash"):
        load_deepspec_head(tmp_path / "dflash", target)
    with pytest.raises(ValueError, match="markov_rank 8"):
        load_deepspec_head(tmp_path / "dspark", target, dflash=True)
    write_deepspec_checkpoint(tmp_path / "conf", emb, out, 4, rank=0, with_markov=False,
                              config_overrides={"markov_head_type": None})
    with pytest.raises(ValueError, match="enable_confidence_head true"):
        load_deepspec_head(tmp_path / "conf", target, dflash=True)
    assert load_deepspec_head(tmp_path / "conf", target).cfg.markov_rank == 0  # DSpark without Markov: --draft dspark


# ------------------------------------------------------------------------------------------------
# speculators: reduced vocabulary through d2t, W2 over N ids
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,with_embed", [("vanilla", True), ("gated", False)])
def test_speculators_proposal_matches_its_math(tmp_path, kind, with_embed):
    target = tiny_target()
    t = write_speculators_checkpoint(tmp_path / "ck", target.tok_embeddings.weight, target.output.weight,
                                     markov_head_type=kind, with_embed=with_embed)
    head = load_speculators_head(tmp_path / "ck", target, dtype=torch.float32)
    ids = t["ids"]
    assert head.cfg.feature_layers == (1, 2) and head.cfg.trained_vocab == 24 and torch.equal(head.draft_ids, ids)
    # The same backbone math as DeepSpec's, on speculators' names; the mask row is the target's.
    ref = dict(t, **{"embed_tokens.weight": target.tok_embeddings.weight.float()})
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rope_theta": 10000.0,
           "mask_token_id": 3, "num_hidden_layers": 2}
    G, anchor, top_k = 4, 11, 6
    feats = torch.randn(7, 2 * D, generator=torch.Generator().manual_seed(3))
    h = deepspec_hidden(ref, cfg, feats, anchor, G)
    w1, w2 = t["markov_head.markov_w1.weight"], t["markov_head.markov_w2.weight"]  # [V, r], [N, r]
    for temperature in (0.8, 0.0):
        blocks, _ = _propose(DSparkDrafter(head, n_slots=2, max_seq=64, proposal_top_k=top_k), feats, anchor, G, temperature)
        for b in blocks:
            prev = torch.tensor([anchor] + b.token_ids[:-1])
            e = w1[prev]  # [G, r]
            if kind == "gated":
                e = torch.sigmoid(torch.cat([h, e], -1) @ t["markov_head.gate_proj.weight"].T + t["markov_head.gate_proj.bias"]) * e
            logits = h @ t["lm_head.weight"].T + e @ w2.T  # [G, N]
            _check_q(b, logits, ids, temperature, top_k)
            conf = torch.sigmoid(torch.cat([h, w1[prev]], -1) @ t["confidence_head.proj.weight"].T
                                 + t["confidence_head.proj.bias"]).squeeze(-1)
            assert torch.allclose(torch.tensor(b.confidence), conf, atol=1e-5)


@pytest.mark.parametrize("change,field", [
    ({"config_overrides": {"sample_from_anchor": False}}, "sample_from_anchor"),
    ({"layer_ids": (0, 2)}, "aux_hidden_state_layer_ids"),
    ({"layer_ids": (2, 4)}, "aux_hidden_state_layer_ids"),  # 4 layers: ids 1..3
    ({"config_overrides": {"speculators_model_type": "eagle3"}}, "speculators_model_type"),
    ({"config_overrides": {"target_hidden_size": 64}}, "target_hidden_size"),
    ({"config_overrides": {"markov_head_type": "lstm"}}, "markov_head_type"),
    ({"config_overrides": {"draft_vocab_size": V + 1}}, "draft_vocab_size"),
    ({"config_overrides": {"mask_token_id": None}}, "mask_token_id"),
])
def test_speculators_misfit_is_refused_naming_the_field(tmp_path, change, field):
    target = tiny_target()
    write_speculators_checkpoint(tmp_path / "ck", target.tok_embeddings.weight, target.output.weight, **change)
    with pytest.raises(ValueError, match=field) as err:
        load_speculators_head(tmp_path / "ck", target)
    assert "\n" not in str(err.value)


def test_speculators_layer_config_vocab_ids_and_target_are_checked(tmp_path):
    target, other = tiny_target(0), tiny_target(1)
    emb, out = target.tok_embeddings.weight, target.output.weight
    cases = {
        "vocab_size": {"config_overrides": {"transformer_layer_config": {"model_type": "qwen3", "hidden_size": D,
                                                                          "vocab_size": V * 2}}},
        "rope type 'yarn'": {"config_overrides": {"transformer_layer_config": {
            "model_type": "qwen3", "hidden_size": D, "vocab_size": V, "num_hidden_layers": 2,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}}},
    }
    for field, change in cases.items():
        write_speculators_checkpoint(tmp_path / field, emb, out, **change)
        with pytest.raises(ValueError, match=field):
            load_speculators_head(tmp_path / field, target)
    write_speculators_checkpoint(tmp_path / "other", emb, other.output.weight)
    with pytest.raises(ValueError, match="lm_head"):
        load_speculators_head(tmp_path / "other", target)
    write_speculators_checkpoint(tmp_path / "t2d", emb, out)
    state = load_file(str(tmp_path / "t2d" / "model.safetensors"))
    state["t2d"] = state["t2d"].roll(1)
    save_file(state, str(tmp_path / "t2d" / "model.safetensors"))
    with pytest.raises(ValueError, match="t2d"):
        load_speculators_head(tmp_path / "t2d", target)
    write_speculators_checkpoint(tmp_path / "ok", emb, out)
    with pytest.raises(ValueError, match="draft_vocab=8"):
        load_speculators_head(tmp_path / "ok", target, draft_vocab=8)
    with pytest.raises(ValueError, match="enable_confidence_head false"):  # both heads off: a DFlash checkpoint
        write_speculators_checkpoint(tmp_path / "df", emb, out, rank=0)
        load_speculators_head(tmp_path / "df", target)
    assert load_speculators_head(tmp_path / "df", target, dflash=True).cfg.markov_rank == 0


# ------------------------------------------------------------------------------------------------
# The real default target through the engine: greedy fp32 drafting identical to plain decoding
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_folders(model_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    m = model_fp32.model
    emb, out = m.tok_embeddings.weight, m.output.weight
    common = dict(n_layers=1, n_heads=9, n_kv=3, head_dim=64, inter=256, block_size=5, mask_token_id=2, seed=4)
    write_dflash_checkpoint(root / "dflash", emb, out, 30, layer_ids=(3, 14, 25), dtype=torch.bfloat16, **common)
    write_speculators_checkpoint(root / "speculators", emb, out, layer_ids=(4, 15, 26), draft_vocab=4096, rank=32,
                                 with_embed=False, dtype=torch.bfloat16, **common)
    return root


@pytest.mark.parametrize("draft,folder", [("dflash", "dflash"), ("dspark", "speculators")])
def test_greedy_drafting_identical_to_plain(model_fp32, prompts20, smol_folders, draft, folder):
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import LocalRunner, RunnerConfig

    prompts = [model_fp32.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in prompts20[:4]]
    params = SamplingParams(max_tokens=24)
    plain = Engine(LocalRunner(model_fp32.model, RunnerConfig(n_slots=4, max_seq=256)), model_fp32.tokenizer,
                   EngineConfig(max_batch=4))
    want = [s.output_ids for s in plain.generate(prompts, params)]
    built = build_engine(EngineSpec(dtype="fp32", draft=draft, draft_options=(("head", str(smol_folders / folder)),),
                                    runner=RunnerConfig(n_slots=4, max_seq=256)), progress=False)
    try:
        assert [s.output_ids for s in built.engine.generate(prompts, params)] == want
        assert built.engine.metrics.num_drafts > 0
    finally:
        built.close()
