"""DeepSpec's DSpark checkpoint format: loading, refusals, the q the verifier receives, export.

``write_deepspec_checkpoint`` (helpers/drafter_checkpoints.py) writes a random-weight folder the
way DeepSpec's ``save_pretrained`` does.  ``deepspec_hidden`` recomputes a block from those tensors alone,
following DeepSpec's Qwen3 DSpark forward and Markov / confidence heads, as an independent reference.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dspark.models.deepspec_format import export_deepspec, load_deepspec_head
from dspark.models.dspark_head import DSparkHead, save_head
from dspark.workers.drafters.dspark import DSparkDrafter
from helpers.drafter_checkpoints import write_deepspec_checkpoint
from helpers.tiny_models import D, TINY_HEAD, V, make_seq, tiny_head, tiny_target


# ------------------------------------------------------------------------------------------------
# Independent reference: DeepSpec's math on its own tensor names
# ------------------------------------------------------------------------------------------------
def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, hd, theta):
    ang = pos.double().unsqueeze(-1) / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()  # [P, hd]
    half = hd // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def deepspec_hidden(t, cfg, feats, anchor, G):
    """Hidden states of one block anchored after ``feats`` [S, m D]: DeepSpec's Qwen3 DSpark forward."""
    S = feats.shape[0]
    nh, nkv, hd, theta = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rope_theta"]
    ctx = _rms(feats @ t["fc.weight"].T, t["hidden_norm.weight"])
    x = t["embed_tokens.weight"][torch.tensor([anchor] + [cfg["mask_token_id"]] * (G - 1))]
    pos = torch.arange(S + G)
    for i in range(cfg["num_hidden_layers"]):
        a, m, o = f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"layers.{i}."
        xn = _rms(x, t[o + "input_layernorm.weight"])
        both = torch.cat([ctx, xn])  # keys/values: projected context, then the block
        q = (xn @ t[a + "q_proj.weight"].T).view(G, nh, hd)
        k = (both @ t[a + "k_proj.weight"].T).view(S + G, nkv, hd)
        v = (both @ t[a + "v_proj.weight"].T).view(S + G, nkv, hd)
        if a + "q_norm.weight" in t:
            q, k = _rms(q, t[a + "q_norm.weight"]), _rms(k, t[a + "k_norm.weight"])
        q, k = _rope(q, pos[S:], hd, theta), _rope(k, pos, hd, theta)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd), -1)  # block sees all context
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(G, nh * hd) @ t[a + "o_proj.weight"].T
        xn = _rms(x, t[o + "post_attention_layernorm.weight"])
        x = x + (F.silu(xn @ t[m + "gate_proj.weight"].T) * (xn @ t[m + "up_proj.weight"].T)) @ t[m + "down_proj.weight"].T
    return _rms(x, t["norm.weight"])


def deepspec_logits_and_conf(t, cfg, h, prev):
    """Markov-corrected logits [G, V] and confidence probabilities [G] for previous tokens ``prev`` [G]."""
    base = h @ t["lm_head.weight"].T
    w1, w2 = t["markov_head.markov_w1.weight"], t["markov_head.markov_w2.weight"]
    kind, r = cfg["markov_head_type"], cfg["markov_rank"]
    state = torch.zeros(r)
    out = []
    for k in range(h.shape[0]):
        e = w1[prev[k]]
        if kind == "vanilla":
            u = e
        elif kind == "gated":
            u = torch.sigmoid(torch.cat([h[k], e]) @ t["markov_head.gate_proj.weight"].T + t["markov_head.gate_proj.bias"]) * e
        else:
            z = torch.cat([state, e, h[k]]) @ t["markov_head.joint_proj.weight"].T + t["markov_head.joint_proj.bias"]
            g, c, o = z.chunk(3)
            state = torch.sigmoid(g) * state + (1 - torch.sigmoid(g)) * torch.tanh(c)
            u = torch.tanh(o)
        out.append(base[k] + u @ w2.T)
    feats = torch.cat([h, w1[prev]], -1) if cfg["confidence_head_with_markov"] else h
    conf = torch.sigmoid(feats @ t["confidence_head.proj.weight"].T + t["confidence_head.proj.bias"]).squeeze(-1)
    return torch.stack(out), conf


def _propose(head, feats, anchor, G, temperature, top_k=8, n=1):
    drafter = DSparkDrafter(head, n_slots=n, max_seq=64, proposal_top_k=top_k)
    seqs = [make_seq(f"r{i}", list(range(1, feats.shape[0] + 1)), anchor=anchor, temperature=temperature, seed=i)
            for i in range(n)]
    with torch.no_grad():
        for s in seqs:
            drafter.observe(s, s.prompt_ids, feats)
        return drafter.propose(seqs, G), drafter


# ------------------------------------------------------------------------------------------------
# The q the verifier receives, per Markov head type
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,with_markov,qk_norm", [("vanilla", True, True), ("gated", True, True),
                                                      ("rnn", True, True), ("vanilla", False, False)])
def test_proposal_matches_deepspec_math(tmp_path, kind, with_markov, qk_norm):
    target = tiny_target()
    t = write_deepspec_checkpoint(tmp_path / "ck", target.tok_embeddings.weight, target.output.weight, 4,
                                  markov_head_type=kind, with_markov=with_markov, qk_norm=qk_norm)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    head = load_deepspec_head(tmp_path / "ck", target, dtype=torch.float32)
    assert head.cfg.markov_kind == kind and head.cfg.qk_norm == qk_norm and head.cfg.block_len == 4
    G, anchor, top_k, temp = 4, 11, 8, 0.9
    feats = torch.randn(7, 2 * D, generator=torch.Generator().manual_seed(3))
    h_ref = deepspec_hidden(t, cfg, feats, anchor, G)
    for temperature in (temp, 0.0):
        blocks, drafter = _propose(head, feats, anchor, G, temperature, top_k, n=3)
        with torch.no_grad():
            h, _ = drafter.block_logits([make_seq("r0", list(range(1, 8)), anchor)], torch.tensor([anchor]), G)
        assert torch.allclose(h[0], h_ref, atol=1e-4), (h[0] - h_ref).abs().max()
        for b in blocks:
            prev = torch.tensor([anchor] + b.token_ids[:-1])
            logits, conf = deepspec_logits_and_conf(t, cfg, h_ref, prev)
            assert torch.allclose(torch.tensor(b.confidence), conf, atol=1e-5)
            for k in range(G):
                if temperature == 0.0:  # greedy: one-hot on the argmax
                    assert b.token_ids[k] == int(logits[k].argmax()) and b.probs[k, 0].item() == 1.0
                    continue
                vals, ids = torch.topk(logits[k], top_k)
                want = dict(zip(ids.tolist(), torch.softmax(vals / temperature, -1).tolist()))
                got = dict(zip(b.prob_ids[k].tolist(), b.probs[k].tolist()))
                assert got.keys() == want.keys()
                assert all(abs(got[i] - want[i]) < 1e-5 for i in want)
                assert b.token_ids[k] in want


# ------------------------------------------------------------------------------------------------
# Refusals, each naming the field
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,field", [
    ({"layer_ids": (1, 7)}, "target_layer_ids"),
    ({"layer_ids": (1, 3)}, "target_layer_ids"),  # the last layer: DeepSpec reads the final-normed state
    ({"layer_ids": (-1, 2)}, "target_layer_ids"),
    ({"config_overrides": {"vocab_size": V + 8}}, "vocab_size"),
    ({"config_overrides": {"hidden_size": D * 2}}, "hidden_size"),
    ({"config_overrides": {"num_target_layers": 36}}, "num_target_layers"),
    ({"markov_head_type": "lstm"}, "markov_head_type"),
    ({"config_overrides": {"architectures": ["MistralDSparkModel"]}}, "architectures"),
    ({"config_overrides": {"architectures": ["Gemma4DSparkModel"]}}, "model_type"),  # a Qwen3 config under that name
    ({"config_overrides": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}, "rope_scaling"),
    ({"config_overrides": {"enable_confidence_head": False}}, "enable_confidence_head"),
    ({"config_overrides": {"mask_token_id": V}}, "mask_token_id"),
])
def test_misfit_checkpoint_is_refused_naming_the_field(tmp_path, change, field):
    target = tiny_target()
    kwargs = dict(change)
    emb = target.tok_embeddings.weight
    write_deepspec_checkpoint(tmp_path / "ck", emb, target.output.weight, 4, **kwargs)
    with pytest.raises(ValueError, match=field) as err:
        load_deepspec_head(tmp_path / "ck", target)
    assert "\n" not in str(err.value)


def test_checkpoint_for_another_target_and_unknown_weights_are_refused(tmp_path):
    target, other = tiny_target(0), tiny_target(1)
    write_deepspec_checkpoint(tmp_path / "a", other.tok_embeddings.weight, other.output.weight, 4)
    with pytest.raises(ValueError, match="embed_tokens"):
        load_deepspec_head(tmp_path / "a", target)
    write_deepspec_checkpoint(tmp_path / "b", target.tok_embeddings.weight, target.output.weight, 4)
    state = load_file(str(tmp_path / "b" / "model.safetensors"))
    state["layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_deepspec_head(tmp_path / "b", target)


# ------------------------------------------------------------------------------------------------
# Export: our head in DeepSpec's format, loaded back identically
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,qk_norm", [("vanilla", False), ("gated", True), ("rnn", False)])
def test_export_round_trip_identical(tmp_path, kind, qk_norm):
    target = tiny_target()
    cfg = TINY_HEAD.replace(feature_layers=(1, 2), markov_kind=kind, qk_norm=qk_norm, sts={"greedy": [1.3, 0.8], "sampled": [1.1]})
    head = tiny_head(target, cfg).float()
    export_deepspec(head, tmp_path / "out", mask_token_id=5, dtype=torch.float32)
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "markov_head.markov_w2.weight" in saved and saved["markov_head.markov_w2.weight"].shape == (V, 8)
    back = load_deepspec_head(tmp_path / "out", target, dtype=torch.float32)
    assert back.cfg.replace(target_name="") == head.cfg.replace(target_name="")
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    feats = torch.randn(6, 2 * D, generator=torch.Generator().manual_seed(1))
    for temperature in (0.0, 0.8):
        a, _ = _propose(head, feats, 9, 5, temperature, n=3)
        b, _ = _propose(back, feats, 9, 5, temperature, n=3)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids and x.confidence == y.confidence
            assert torch.equal(x.probs, y.probs) and torch.equal(x.prob_ids, y.prob_ids)


def test_export_refuses_a_reduced_vocabulary_head(tmp_path):
    target = tiny_target()
    head = tiny_head(target, TINY_HEAD.replace(feature_layers=(1, 2)))
    head.cfg = head.cfg.replace(trained_vocab=16)
    with pytest.raises(ValueError, match="trained_vocab"):
        export_deepspec(head, tmp_path / "out", mask_token_id=5)
    with pytest.raises(ValueError, match="feature_layers"):  # TINY_HEAD reads the last of 4 layers
        export_deepspec(tiny_head(target), tmp_path / "out", mask_token_id=5)


# ------------------------------------------------------------------------------------------------
# The real default target (SmolLM2-135M-Instruct: dim 576, vocabulary 49152, 30 layers)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_checkpoints(model_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspec")
    m = model_fp32.model
    out = {}
    for kind in ("vanilla", "rnn"):
        write_deepspec_checkpoint(root / kind, m.tok_embeddings.weight, m.output.weight, 30, layer_ids=(3, 14, 25),
                                  markov_head_type=kind, n_layers=1, n_heads=9, n_kv=3, head_dim=64, inter=256,
                                  rank=32, block_size=7, mask_token_id=2, seed=4, dtype=torch.bfloat16)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def smol_plain(model_fp32, prompts20):
    """(4 chat prompts, plain greedy decoding of 24 tokens of each), shared by both kinds."""
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import LocalRunner, RunnerConfig

    prompts = [model_fp32.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in prompts20[:4]]
    plain = Engine(LocalRunner(model_fp32.model, RunnerConfig(n_slots=4, max_seq=512)), model_fp32.tokenizer,
                   EngineConfig(max_batch=4))
    return prompts, [s.output_ids for s in plain.generate(prompts, SamplingParams(max_tokens=24))]


@pytest.mark.parametrize("kind", ["vanilla", "rnn"])
def test_greedy_drafting_from_deepspec_checkpoint_identical_to_plain(smol_plain, smol_checkpoints, kind):
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    prompts, want = smol_plain
    params = SamplingParams(max_tokens=24)
    built = build_engine(EngineSpec(dtype="fp32", draft="dspark", block_len=4, runner=RunnerConfig(n_slots=4, max_seq=512),
                                    draft_options=(("head", str(smol_checkpoints[kind])),)), progress=False)
    try:
        assert [s.output_ids for s in built.engine.generate(prompts, params)] == want
        assert built.engine.metrics.num_drafts > 0
    finally:
        built.close()


def test_export_draft_cli_round_trip(model_fp32, tmp_path):
    from dspark.cli import main
    from dspark.models.dspark_head import DSparkHeadConfig

    cfg = DSparkHeadConfig(n_layers=1, intermediate_size=256, markov_rank=16, feature_layers=(3, 14, 25))
    head = DSparkHead(cfg)
    head.reset_parameters(model_fp32.model, seed=2)
    with torch.no_grad():
        head.markov_w1.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    path = save_head(head, tmp_path / "ours.safetensors", dtype=torch.float32)
    result = CliRunner().invoke(main, ["export-draft", "--head", str(path), "--out", str(tmp_path / "ds"),
                                       "--dtype", "fp32", "--mask-token-id", "2"])
    assert result.exit_code == 0, result.output
    raw = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert raw["target_layer_ids"] == [3, 14, 25] and raw["mask_token_id"] == 2 and raw["num_target_layers"] == 30
    back = load_deepspec_head(tmp_path / "ds", model_fp32.model, dtype=torch.float32)
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.float()), k
