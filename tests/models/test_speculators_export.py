"""Export to vLLM's speculators DSpark format (``dspark export-draft --format speculators``) and
back through our speculators reader: the same tokens, q and confidences.

Heads over the full vocabulary and heads trained over N ids of a frequency-ranked map (written
in ascending id order with d2t / t2d, as speculators builds its maps) for each Markov kind; the
refusals (no QK-norm, the target's last layer as a feature, a mask id outside the vocabulary);
the command line on the real default model, including its one-line refusal of the shipped head.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dspark.models.dspark_head import DSparkHead, DSparkHeadConfig, save_head
from dspark.models.speculators_format import export_speculators, load_speculators_head
from dspark.workers.drafters.dspark import DSparkDrafter
from helpers.tiny_models import D, TINY_HEAD, V, make_seq, tiny_head, tiny_target

N = 24  # ids of the reduced heads' map they were trained over


def _ranked_head(target, cfg: DSparkHeadConfig, n: int) -> DSparkHead:
    """``tiny_head`` trained over the first ``n`` ids of a (random) frequency-ranked map."""
    head = tiny_head(target, cfg.replace(trained_vocab=n, draft_vocab=n))
    head.vocab_ids = torch.randperm(V, generator=torch.Generator().manual_seed(7))
    return head.use_draft_vocab(n)


def _proposals(head, feats, anchor=9, G=5, temperature=0.0, n=3):
    drafter = DSparkDrafter(head, n_slots=n, max_seq=64, proposal_top_k=6)
    seqs = [make_seq(f"r{i}", list(range(1, feats.shape[0] + 1)), anchor=anchor, temperature=temperature, seed=i)
            for i in range(n)]
    with torch.no_grad():
        for s in seqs:
            drafter.observe(s, s.prompt_ids, feats)
        return drafter.propose(seqs, G)


def _assert_same_proposals(a: DSparkHead, b: DSparkHead) -> None:
    feats = torch.randn(6, 2 * D, generator=torch.Generator().manual_seed(1))
    for temperature in (0.0, 0.8):
        for x, y in zip(_proposals(a, feats, temperature=temperature), _proposals(b, feats, temperature=temperature)):
            assert x.token_ids == y.token_ids
            assert torch.equal(x.prob_ids, y.prob_ids)
            assert torch.allclose(x.probs, y.probs, atol=1e-6, rtol=0)
            assert x.confidence == pytest.approx(y.confidence, abs=1e-6)


@pytest.mark.parametrize("kind,reduced", [("vanilla", False), ("vanilla", True), ("gated", True), ("rnn", True)])
def test_export_round_trip_identical_proposals(tmp_path, kind, reduced):
    target = tiny_target()
    cfg = TINY_HEAD.replace(feature_layers=(1, 2), qk_norm=True, markov_kind=kind,
                            sts={"greedy": [1.3, 0.8], "sampled": [1.1]})
    head = _ranked_head(target, cfg, N) if reduced else tiny_head(target, cfg)
    export_speculators(head, tmp_path / "out", mask_token_id=5, dtype=torch.float32)

    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["speculators_model_type"] == "dspark" and raw["aux_hidden_state_layer_ids"] == [2, 3]
    assert raw["draft_vocab_size"] == (N if reduced else V) and raw["markov_head_type"] == kind
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved["lm_head.weight"].shape == (raw["draft_vocab_size"], D)
    assert saved["markov_head.markov_w2.weight"].shape == (raw["draft_vocab_size"], 8)
    if reduced:  # ascending ids: draft index n is id n + d2t[n], marked in t2d
        ids = torch.arange(N) + saved["d2t"]
        assert saved["d2t"].dtype == torch.int64 and saved["t2d"].dtype == torch.bool
        assert torch.equal(ids, head.vocab_ids[:N].sort().values) and torch.equal(saved["t2d"].nonzero().flatten(), ids)
    else:
        assert "d2t" not in saved and "t2d" not in saved

    back = load_speculators_head(tmp_path / "out", target, dtype=torch.float32)
    keep = ("feature_layers", "block_len", "markov_rank", "markov_kind", "qk_norm", "sts", "trained_vocab", "n_layers")
    assert {k: getattr(back.cfg, k) for k in keep} == {k: getattr(head.cfg, k) for k in keep}
    assert torch.equal(back.mask_embedding, head.mask_embedding)
    _assert_same_proposals(head, back)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    target = tiny_target()
    with pytest.raises(ValueError, match="qk_norm false"):  # speculators' draft layers always have QK-norm
        export_speculators(tiny_head(target, TINY_HEAD.replace(feature_layers=(1, 2))), tmp_path / "a", mask_token_id=5)
    with pytest.raises(ValueError, match="feature_layers"):  # TINY_HEAD reads the last of 4 layers
        export_speculators(tiny_head(target, TINY_HEAD.replace(qk_norm=True)), tmp_path / "b", mask_token_id=5)
    with pytest.raises(ValueError, match="mask_token_id"):
        export_speculators(tiny_head(target, TINY_HEAD.replace(feature_layers=(1, 2), qk_norm=True)), tmp_path / "c",
                           mask_token_id=V)
    assert not any(tmp_path.iterdir())  # nothing written for a refused head


def test_export_draft_cli_speculators_round_trip(model_fp32, tmp_path):
    from dspark.cli import main

    m = model_fp32.model
    cfg = DSparkHeadConfig(n_layers=1, intermediate_size=256, markov_rank=16, feature_layers=(3, 14, 25),
                           qk_norm=True, trained_vocab=512, draft_vocab=512)
    head = DSparkHead(cfg)
    head.reset_parameters(m, seed=2)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    head.vocab_ids = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(4))
    head = head.bind_target(m).use_draft_vocab(512)
    path = save_head(head, tmp_path / "ours.safetensors", dtype=torch.float32)
    result = CliRunner().invoke(main, ["export-draft", "--head", str(path), "--format", "speculators",
                                       "--out", str(tmp_path / "sp"), "--dtype", "fp32", "--mask-token-id", "2"])
    assert result.exit_code == 0, result.output
    raw = json.loads((tmp_path / "sp" / "config.json").read_text())
    assert raw["aux_hidden_state_layer_ids"] == [4, 15, 26] and raw["draft_vocab_size"] == 512
    back = load_speculators_head(tmp_path / "sp", m, dtype=torch.float32)
    assert torch.equal(back.draft_ids, head.vocab_ids[:512].sort().values)
    for name in ("fc.weight", "layers.0.wqkv.weight", "markov_w1", "confidence.weight", "mask_embedding"):
        assert torch.equal(back.state_dict()[name], head.state_dict()[name]), name

    # The shipped head has no QK-norm: refused in one line, nothing written.
    result = CliRunner().invoke(main, ["export-draft", "--format", "speculators", "--out", str(tmp_path / "shipped")])
    assert result.exit_code != 0 and "qk_norm false" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "shipped").exists()
