"""DeepSpec's EAGLE-3 drafter checkpoints (``--draft eagle3``): loading, refusals, q, losslessness.

``write_eagle3_checkpoint`` writes a random-weight folder the way DeepSpec's ``save_pretrained`` of
a ``Qwen3Eagle3Model`` does: config.json = the target's config fields, then what its
``build_draft_config`` adds (architectures, num_target_layers, num_hidden_layers 1, layer_types,
target_layer_ids, ttt_length, step_loss_decay, draft_num_hidden_layers, ...); model.safetensors
under its module names (``fc``, ``layers.0.{hidden_norm, input_layernorm, self_attn.*, mlp.*,
post_attention_layernorm}``, ``norm``, the frozen ``embed_tokens`` / ``lm_head``), optionally
with a SpecForge-style reduced vocabulary (``draft_vocab_size``, ``d2t``, ``t2d``).
``eagle3_logits`` recomputes the drafts' logits from those tensors alone, the straightforward
way: the whole sequence through the layer with a causal mask at every step, nothing cached.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import stats

from dspark.models.eagle3_format import load_eagle3_head
from dspark.workers.drafters.eagle3 import Eagle3Drafter
from helpers.tiny_models import D, V, make_seq, tiny_target


def write_eagle3_checkpoint(folder: Path, emb: torch.Tensor, lm_head: torch.Tensor, n_target_layers: int, *,
                            layer_ids=(1, 2), n_heads=4, n_kv=2, head_dim=8, inter=48, draft_vocab: int | None = None,
                            seed=0, weights: dict | None = None, config_overrides: dict | None = None,
                            dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A random DeepSpec EAGLE-3 checkpoint for a target with embedding ``emb`` and LM head ``lm_head``
    (both [V, D]); ``weights`` replaces some tensors.  Returns the tensors as float32 (+ "ids")."""
    g = torch.Generator().manual_seed(seed)
    Vt, Dt = emb.shape

    def lin(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    def norm(n):
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    a, m, o = "layers.0.self_attn.", "layers.0.mlp.", "layers.0."
    t = {"embed_tokens.weight": emb.float().clone(), "fc.weight": lin(Dt, len(layer_ids) * Dt),
         o + "hidden_norm.weight": norm(Dt), o + "input_layernorm.weight": norm(Dt),
         a + "q_proj.weight": lin(n_heads * head_dim, 2 * Dt), a + "k_proj.weight": lin(n_kv * head_dim, 2 * Dt),
         a + "v_proj.weight": lin(n_kv * head_dim, 2 * Dt), a + "o_proj.weight": lin(Dt, n_heads * head_dim),
         a + "q_norm.weight": norm(head_dim), a + "k_norm.weight": norm(head_dim),
         o + "post_attention_layernorm.weight": norm(Dt),
         m + "gate_proj.weight": lin(inter, Dt), m + "up_proj.weight": lin(inter, Dt), m + "down_proj.weight": lin(Dt, inter),
         "norm.weight": norm(Dt), "lm_head.weight": lm_head.float().clone()}
    ids = torch.arange(Vt)
    if draft_vocab is not None:  # SpecForge's layout: lm_head over N ids, d2t offsets, t2d mask
        ids = torch.randperm(Vt, generator=g)[:draft_vocab].sort().values
        t["lm_head.weight"] = lm_head.float()[ids].clone()
        t["d2t"] = ids - torch.arange(draft_vocab)
        t["t2d"] = torch.zeros(Vt, dtype=torch.bool)
        t["t2d"][ids] = True
    t.update(weights or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in t.items()},
              str(folder / "model.safetensors"))
    config = {
        # The target's own config fields (Qwen3), as DeepSpec deep-copies them.
        "architectures": ["Qwen3Eagle3Model"], "model_type": "qwen3", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": Dt,
        "head_dim": head_dim, "initializer_range": 0.02, "intermediate_size": inter, "max_position_embeddings": 4096,
        "max_window_layers": 28, "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "rms_norm_eps": 1e-6,
        "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": None, "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1", "use_cache": True, "use_sliding_window": False, "vocab_size": Vt,
        # What DeepSpec's eagle3 build_draft_config sets.
        "num_target_layers": n_target_layers, "num_hidden_layers": 1, "layer_types": ["full_attention"],
        "target_model_name_or_path": "tiny", "target_layer_ids": list(layer_ids), "ttt_length": 7,
        "step_loss_decay": 0.8, "draft_num_hidden_layers": 1, "tie_word_embeddings": False,
        **({} if draft_vocab is None else {"draft_vocab_size": draft_vocab}),
        **(config_overrides or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in t.items()} | {"ids": ids}


# ------------------------------------------------------------------------------------------------
# Independent reference: DeepSpec's Qwen3Eagle3Model on its own tensor names, recomputed in full
# ------------------------------------------------------------------------------------------------
def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta=10000.0):
    hd = x.shape[-1]
    ang = pos.double().unsqueeze(-1) / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()  # [P, hd]
    half = hd // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def _layer(t, hidden, embeds, nh, nkv):
    """Qwen3Eagle3DecoderLayer over positions 0..P-1 with a causal mask: hidden, embeds [P, D] -> [P, D]."""
    a, m, o = "layers.0.self_attn.", "layers.0.mlp.", "layers.0."
    P = hidden.shape[0]
    u = torch.cat([_rms(embeds, t[o + "input_layernorm.weight"]), _rms(hidden, t[o + "hidden_norm.weight"])], -1)
    q = _rms((u @ t[a + "q_proj.weight"].T).view(P, nh, -1), t[a + "q_norm.weight"])
    k = _rms((u @ t[a + "k_proj.weight"].T).view(P, nkv, -1), t[a + "k_norm.weight"])
    v = (u @ t[a + "v_proj.weight"].T).view(P, nkv, -1)
    pos = torch.arange(P)
    q, k = _rope(q, pos), _rope(k, pos)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(P, P, dtype=torch.bool).tril(), float("-inf"))
    x = hidden + torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v).reshape(P, -1) @ t[a + "o_proj.weight"].T
    xn = _rms(x, t[o + "post_attention_layernorm.weight"])
    return x + (F.silu(xn @ t[m + "gate_proj.weight"].T) * (xn @ t[m + "up_proj.weight"].T)) @ t[m + "down_proj.weight"].T


def eagle3_logits(t, feats, context, drafts, nh=4, nkv=2):
    """Logits [len(drafts) + 1, N] of each drafted position after ``context`` (x_0..x_c) with
    target features ``feats`` [c, m D] of x_0..x_{c-1}, the drafts ``drafts`` fed back.

    Position i < c pairs fc(F_i) with E[x_{i+1}]; the drafted position c - 1 + k pairs the layer's
    output at the previous position with E[d_k].  Every step reruns the layer over all positions.
    """
    E = t["embed_tokens.weight"]
    hidden = feats @ t["fc.weight"].T  # [c, D]
    toks = list(context[1:])
    out = []
    for k in range(len(drafts) + 1):
        h = _layer(t, hidden, E[torch.tensor(toks)], nh, nkv)[-1]
        out.append(_rms(h, t["norm.weight"]) @ t["lm_head.weight"].T)
        if k < len(drafts):
            hidden = torch.cat([hidden, h[None]])
            toks.append(drafts[k])
    return torch.stack(out)


def _check_block(block, logits, ids, temperature, top_k):
    """A block's tokens, sparse q and confidences against reference logits [G, N] over ids [N]."""
    for k, tok in enumerate(block.token_ids):
        law = torch.softmax(logits[k] / (temperature or 1.0), -1)
        assert abs(block.confidence[k] - float(law.max())) < 1e-5  # the law's top probability
        if temperature == 0.0:  # greedy: one-hot on the argmax
            assert tok == int(ids[logits[k].argmax()]) and block.probs[k].tolist() == [1.0]
            continue
        vals, cols = torch.topk(logits[k], top_k)
        want = dict(zip(ids[cols].tolist(), torch.softmax(vals / temperature, -1).tolist()))
        got = dict(zip(block.prob_ids[k].tolist(), block.probs[k].tolist()))
        assert got.keys() == want.keys() and all(abs(got[i] - want[i]) < 1e-5 for i in want)
        assert tok in want


# ------------------------------------------------------------------------------------------------
# The q the verifier receives, through prefill, verification and the next block
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft_vocab", [None, 24])
def test_proposal_matches_eagle3_math_across_verification(tmp_path, draft_vocab):
    target = tiny_target()
    t = write_eagle3_checkpoint(tmp_path / "ck", target.tok_embeddings.weight, target.output.weight, 4,
                                draft_vocab=draft_vocab)
    head = load_eagle3_head(tmp_path / "ck", target, dtype=torch.float32)
    ids = t["ids"]
    assert head.cfg.feature_layers == (1, 2) and head.cfg.ttt_length == 7
    assert (head.draft_ids is None) == (draft_vocab is None)
    G, top_k = 4, 6
    gen = torch.Generator().manual_seed(3)
    for temperature in (0.8, 0.0):
        drafter = Eagle3Drafter(head, n_slots=3, max_seq=64, proposal_top_k=top_k)
        # Three requests of different lengths drafted together; prefill observed in two chunks.
        seqs, feats = [], []
        for r, n in enumerate((5, 9, 1)):
            prompt = torch.randint(0, V, (n,), generator=gen).tolist()
            s = make_seq(f"r{r}", prompt, anchor=int(torch.randint(0, V, (1,), generator=gen)),
                         temperature=temperature, seed=r)
            f = torch.randn(n, 2 * D, generator=gen)
            cut = n // 2
            with torch.no_grad():
                if cut:
                    drafter.observe(s, prompt[:cut], f[:cut])
                drafter.observe(s, prompt[cut:], f[cut:])
            seqs.append(s)
            feats.append(f)
        for _ in range(2):  # a block, a verification that keeps part of it, the next block
            blocks = drafter.propose(seqs, G)
            for s, f, b in zip(seqs, feats, blocks):
                assert len(b) == G
                _check_block(b, eagle3_logits(t, f, s.all_ids, b.token_ids[:-1]), ids, temperature, top_k)
            for j, (s, b) in enumerate(zip(seqs, blocks)):  # request j keeps j drafts, then a bonus token
                kept = [s.last_token] + b.token_ids[:j]
                s.output_ids += b.token_ids[:j] + [int(torch.randint(0, V, (1,), generator=gen))]
                s.num_cached += len(kept)
                new = torch.randn(len(kept), 2 * D, generator=gen)
                feats[j] = torch.cat([feats[j], new])
                drafter.observe(s, kept, new, num_verified=G)


def test_drafted_tokens_follow_the_reported_q(tmp_path):
    """The law the drafts are drawn from is the q sent with them (chi-square over many draws)."""
    target = tiny_target()
    write_eagle3_checkpoint(tmp_path / "ck", target.tok_embeddings.weight, target.output.weight, 4)
    head = load_eagle3_head(tmp_path / "ck", target, dtype=torch.float32)
    feats = torch.randn(6, 2 * D, generator=torch.Generator().manual_seed(5))
    n = 256
    drafter = Eagle3Drafter(head, n_slots=n, max_seq=16, proposal_top_k=8)
    seqs = [make_seq(f"r{i}", [3, 9, 4, 1, 7, 2], anchor=11, temperature=1.3, seed=i) for i in range(n)]
    for s in seqs:
        drafter.observe(s, s.prompt_ids, feats)
    blocks = drafter.propose(seqs, 2)
    q = dict(zip(blocks[0].prob_ids[0].tolist(), blocks[0].probs[0].tolist()))  # the same first q for all
    assert all(dict(zip(b.prob_ids[0].tolist(), b.probs[0].tolist())) == q for b in blocks)
    counts = collections.Counter(b.token_ids[0] for b in blocks)
    assert set(counts) <= set(q)
    cells = sorted(q)
    total = sum(q.values())  # 1 up to float32 rounding
    assert stats.chisquare([counts[c] for c in cells], [q[c] / total * n for c in cells]).pvalue > 1e-3


# ------------------------------------------------------------------------------------------------
# Refusals, each naming the field
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,field", [
    ({"layer_ids": (1, 3)}, "target_layer_ids"),  # the last layer: DeepSpec reads the final-normed state
    ({"layer_ids": (-1, 2)}, "target_layer_ids"),
    ({"layer_ids": (2, 1)}, "target_layer_ids"),
    ({"layer_ids": (2,)}, "target_layer_ids"),  # one id: DeepSpec's fc would also take the fed-back state
    ({"config_overrides": {"hidden_size": 2 * D}}, "hidden_size"),
    ({"config_overrides": {"vocab_size": V + 8}}, "vocab_size"),
    ({"config_overrides": {"num_target_layers": 36}}, "num_target_layers"),
    ({"config_overrides": {"architectures": ["Gemma4Eagle3Model"]}}, "model_type 'qwen3' .*Gemma4Eagle3Model"),
    ({"config_overrides": {"architectures": ["Qwen3DSparkModel"]}}, "architectures .*--draft dspark"),
    ({"config_overrides": {"num_hidden_layers": 2}}, "num_hidden_layers"),
    ({"config_overrides": {"draft_num_hidden_layers": 2}}, "draft_num_hidden_layers"),
    ({"config_overrides": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}, "rope_scaling"),
    ({"config_overrides": {"attention_bias": True}}, "attention_bias"),
    ({"config_overrides": {"hidden_act": "gelu"}}, "hidden_act"),
    ({"config_overrides": {"layer_types": ["sliding_attention"]}}, "layer_types"),
    ({"config_overrides": {"final_logit_softcapping": 30.0}}, "final_logit_softcapping"),
    ({"config_overrides": {"draft_vocab_size": V + 1}}, "draft_vocab_size"),
    ({"config_overrides": {"draft_vocab_size": 24}}, "d2t"),  # a reduced vocabulary needs its id map
    ({"weights": {"layers.0.self_attn.q_proj.bias": torch.zeros(32)}}, "q_proj.bias"),
    ({"weights": {"layers.1.hidden_norm.weight": torch.ones(D)}}, "layers.1.hidden_norm"),
    ({"weights": {"fc.weight": torch.zeros(D, 3 * D)}}, "fc.weight"),
])
def test_misfit_checkpoint_is_refused_naming_the_field(tmp_path, change, field):
    target = tiny_target()
    write_eagle3_checkpoint(tmp_path / "ck", target.tok_embeddings.weight, target.output.weight, 4, **change)
    with pytest.raises(ValueError, match=field) as err:
        load_eagle3_head(tmp_path / "ck", target)
    assert "\n" not in str(err.value)


def test_checkpoint_for_another_target_and_a_wrong_id_map_are_refused(tmp_path):
    target, other = tiny_target(0), tiny_target(1)
    write_eagle3_checkpoint(tmp_path / "a", other.tok_embeddings.weight, target.output.weight, 4)
    with pytest.raises(ValueError, match="embed_tokens"):
        load_eagle3_head(tmp_path / "a", target)
    write_eagle3_checkpoint(tmp_path / "b", target.tok_embeddings.weight, other.output.weight, 4, draft_vocab=24)
    with pytest.raises(ValueError, match="lm_head"):
        load_eagle3_head(tmp_path / "b", target)
    write_eagle3_checkpoint(tmp_path / "c", target.tok_embeddings.weight, target.output.weight, 4, draft_vocab=24)
    state = load_file(str(tmp_path / "c" / "model.safetensors"))
    state["t2d"] = state["t2d"].roll(1)
    save_file(state, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(ValueError, match="t2d"):
        load_eagle3_head(tmp_path / "c", target)


def test_the_drafter_kind_needs_a_head_and_refuses_other_formats(tmp_path):
    from dspark.workers.drafters import registry
    from dspark.workers.runner import RunnerConfig
    from test_deepspec_format import write_deepspec_checkpoint

    ctx = registry.DraftContext(loaded=None, args=None, target_runner=None, runner=RunnerConfig())
    with pytest.raises(ValueError, match="head=PATH"):
        registry.build_drafter("eagle3", ctx, {})
    target = tiny_target()
    write_deepspec_checkpoint(tmp_path / "dspark", target.tok_embeddings.weight, target.output.weight, 4)
    with pytest.raises(ValueError, match="Qwen3DSparkModel.*--draft dspark"):
        registry.feature_layers("eagle3", {"head": str(tmp_path / "dspark")}, "tiny")
    write_eagle3_checkpoint(tmp_path / "e3", target.tok_embeddings.weight, target.output.weight, 4)
    assert registry.feature_layers("eagle3", {"head": str(tmp_path / "e3")}, "tiny") == (1, 2)
    assert registry.get("eagle3").remote and registry.get("eagle3").needs_weights


# ------------------------------------------------------------------------------------------------
# Through the engine: greedy fp32 identical to plain decoding, sampled output distributed as the target's
# ------------------------------------------------------------------------------------------------
def _engine(path, head, block_len=4, n_slots=4, top_k=8):
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig

    return build_engine(EngineSpec(model=str(path), dtype="fp32", draft="eagle3", block_len=block_len,
                                   draft_options=(("head", str(head)), ("proposal_top_k", top_k)),
                                   runner=RunnerConfig(n_slots=n_slots, max_seq=128)), progress=False)


def _plain_and_drafted(engine, prompts, params):
    """(outputs without the drafter, outputs with it) of the same engine."""
    saved, engine.drafter = engine.drafter, None
    try:
        plain = [s.output_ids for s in engine.generate(prompts, params)]
    finally:
        engine.drafter = saved
    return plain, [s.output_ids for s in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def bigram_qwen3(tmp_path_factory):
    """A tiny Qwen3 target whose next-token law depends on the current token only (its layers add
    nothing: o_proj and down_proj are zero), and an EAGLE-3 checkpoint whose first draft after a
    one-token prompt computes exactly that law: fc = 0, so the single cached position's value
    (v_proj = [I | 0] on the normed embedding, o_proj = I) carries E[x_1] normed, the MLP adds
    nothing and the output norm is the target's.  Its drafts are accepted ~90% of the time, so a
    wrong q would show in the sampled law.  Returns (target folder, draft folder, transformers model)."""
    from helpers.tiny_hf import tiny_qwen3

    root = tmp_path_factory.mktemp("eagle3_bigram")
    hf = tiny_qwen3(root / "target")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf.lm_head.weight.mul_(4.0)  # a peaked law: chi-square cells with enough mass
    hf.save_pretrained(str(root / "target"), safe_serialization=True)
    Dt = hf.config.hidden_size
    exact = {"fc.weight": torch.zeros(Dt, 2 * Dt), "layers.0.input_layernorm.weight": torch.ones(Dt),
             "layers.0.self_attn.v_proj.weight": torch.cat([torch.eye(Dt), torch.zeros(Dt, Dt)], 1),
             "layers.0.self_attn.o_proj.weight": torch.eye(Dt), "layers.0.mlp.down_proj.weight": torch.zeros(Dt, 96),
             "norm.weight": hf.model.norm.weight.detach().clone()}
    write_eagle3_checkpoint(root / "eagle3", hf.model.embed_tokens.weight.detach(), hf.lm_head.weight.detach(), 3,
                            layer_ids=(0, 1), n_heads=4, n_kv=4, head_dim=16, inter=96, weights=exact)
    return root / "target", root / "eagle3", hf


def test_sampled_second_token_follows_the_target_under_the_adaptive_budget(bigram_qwen3):
    """The budget verifies a draft only where its survival pays for it: the confidences it reads
    must not depend on the drafted token itself (the probability of the drawn token would verify
    the likely draws and drop the unlikely ones, and the output law would lean to the mode)."""
    from dspark.workers.budget_policy import AdaptiveBudget, CostModel
    from dspark.workers.request import SamplingParams
    from dspark.workers.scheduling import VerifyPolicy
    from helpers.spec_stats import chisquare_pvalue

    target, draft, hf = bigram_qwen3
    x0, n = 65, 600
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([[x0]])).logits[0, -1].double(), -1)
        p2 = torch.softmax(hf(torch.tensor([[x0, v] for v in range(p1.numel())])).logits[:, 1].double(), -1)
    law = p1 @ p2
    built = _engine(target, draft, block_len=3, n_slots=64)
    try:
        eng = built.engine
        # 64 requests per step: 32 ms for their 64 tokens, 0.25 ms per verified draft, so a draft
        # pays when its survival is above ~0.5.
        eng.budget = AdaptiveBudget(CostModel([1, 64, 128], [0.020, 0.032, 0.048]),
                                    VerifyPolicy(budget_mode="algorithm1", max_block_len=3), learn=False)
        params = [SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True) for s in range(n)]
        seqs = eng.generate([[x0]] * n, params)
        assert chisquare_pvalue(collections.Counter(s.output_ids[1] for s in seqs), law) > 1e-3
        assert eng.metrics.num_draft_tokens > 0.3 * n  # the budget did verify drafts
    finally:
        built.close()


def test_sampled_second_token_follows_the_target_and_a_wrong_q_would_show(bigram_qwen3):
    from dspark.workers.request import SamplingParams
    from helpers.spec_stats import chisquare_pvalue

    target, draft, hf = bigram_qwen3
    x0, n = 65, 600
    with torch.no_grad():  # the law of x_2: sum over x_1 of p(x_1 | x_0) p(x_2 | x_0, x_1), from transformers
        p1 = torch.softmax(hf(torch.tensor([[x0]])).logits[0, -1].double(), -1)
        p2 = torch.softmax(hf(torch.tensor([[x0, v] for v in range(p1.numel())])).logits[:, 1].double(), -1)
    law = p1 @ p2
    built = _engine(target, draft, block_len=3, n_slots=64)
    try:
        eng = built.engine

        def sampled_law_pvalue() -> float:
            params = [SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True) for s in range(n)]
            return chisquare_pvalue(collections.Counter(s.output_ids[1] for s in eng.generate([[x0]] * n, params)), law)

        assert sampled_law_pvalue() > 1e-3
        m = eng.metrics
        assert m.num_draft_tokens >= n and m.num_accepted_tokens > 0.7 * m.num_draft_tokens  # drafts matter here
        right = eng.drafter.propose

        def wrong_q(seqs, block_len):  # the same drafts, reported with a uniform q over their candidates
            blocks = right(seqs, block_len)
            for b in blocks:
                if len(b):
                    b.probs = torch.full_like(b.probs, 1.0 / b.probs.shape[-1])
            return blocks

        eng.drafter.propose = wrong_q
        assert sampled_law_pvalue() < 1e-6
    finally:
        built.close()


def test_greedy_identical_to_plain_on_qwen3_targets(bigram_qwen3, tmp_path):
    from helpers.tiny_hf import PROMPTS, tiny_qwen3
    from dspark.workers.request import SamplingParams

    params = SamplingParams(max_tokens=24, ignore_eos=True)
    # The bigram target: the first draft after a one-token prompt is its argmax, accepted.
    target, draft, _ = bigram_qwen3
    built = _engine(target, draft)
    try:
        plain, drafted = _plain_and_drafted(built.engine, [[5], [77], [200], PROMPTS[0]], params)
        assert drafted == plain and built.engine.metrics.accepted_per_pos[0] >= 3
    finally:
        built.close()
    # A random tiny Qwen3 target and draft: prompts of three lengths drafted together.
    hf = tiny_qwen3(tmp_path / "qwen3")
    write_eagle3_checkpoint(tmp_path / "eagle3", hf.model.embed_tokens.weight.detach(), hf.lm_head.weight.detach(), 3,
                            layer_ids=(0, 1), n_heads=4, n_kv=2, head_dim=16, inter=96, seed=2)
    built = _engine(tmp_path / "qwen3", tmp_path / "eagle3", n_slots=3)
    try:
        plain, drafted = _plain_and_drafted(built.engine, PROMPTS, params)
        assert drafted == plain and built.engine.metrics.num_draft_tokens > 0
    finally:
        built.close()


def test_greedy_identical_to_plain_on_the_default_llama_target(model_fp32, prompts20, tmp_path):
    """SmolLM2-135M (30 layers): five feature layers as DeepSpec's configs, a bf16 checkpoint."""
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import LocalRunner, RunnerConfig

    m = model_fp32.model
    write_eagle3_checkpoint(tmp_path / "eagle3", m.tok_embeddings.weight, m.output.weight, 30,
                            layer_ids=(1, 8, 15, 22, 28), n_heads=9, n_kv=3, head_dim=64, inter=256, seed=4,
                            dtype=torch.bfloat16)
    drafter = Eagle3Drafter(load_eagle3_head(tmp_path / "eagle3", m, dtype=torch.float32), n_slots=4, max_seq=256)
    prompts = [model_fp32.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in prompts20[:4]]
    params = SamplingParams(max_tokens=16)
    runner = LocalRunner(m, RunnerConfig(n_slots=4, max_seq=256))
    plain = [s.output_ids for s in Engine(runner, model_fp32.tokenizer, EngineConfig(max_batch=4)).generate(prompts, params)]
    engine = Engine(runner, model_fp32.tokenizer, EngineConfig(max_batch=4, block_len=4), drafter=drafter)
    assert [s.output_ids for s in engine.generate(prompts, params)] == plain
    assert engine.metrics.num_drafts > 0 and not drafter._req  # every request released


def test_remote_draft_worker_serves_eagle3(bigram_qwen3):
    """On a draft worker (the cluster's remote path) the drafter reads its context from the
    worker's mirror of the request: greedy output equals plain decoding, drafts are accepted."""
    from dspark.models.loader import load_model
    from dspark.workers.draft_worker import DraftWorkerServer
    from dspark.workers.drafters import registry
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import LocalRunner, RunnerConfig

    target, draft, _ = bigram_qwen3
    lm = load_model(target, dtype="fp32", progress=False)
    runner_cfg = RunnerConfig(n_slots=4, max_seq=128)
    ctx = registry.DraftContext(loaded=lm, args=lm.args, target_runner=None, runner=runner_cfg, name=lm.name)
    server = DraftWorkerServer(lambda: registry.build_drafter("eagle3", ctx, {"head": str(draft)})).start()
    layers = registry.feature_layers("eagle3", {"head": str(draft)}, lm.name)
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="eagle3", feature_layers=layers), block_len=3)
    prompts, params = [[5], [77], [200]], SamplingParams(max_tokens=12, ignore_eos=True)
    try:
        eng = Engine(LocalRunner(lm.model, runner_cfg), lm.tokenizer, EngineConfig(max_batch=4, block_len=3),
                     drafter=drafter)
        out = [s.output_ids for s in eng.generate(prompts, params)]
        plain = Engine(LocalRunner(lm.model, runner_cfg), lm.tokenizer, EngineConfig(max_batch=4))
        assert out == [s.output_ids for s in plain.generate(prompts, params)]
        assert server.servicer.blocks_served > 0 and eng.metrics.accepted_per_pos[0] >= 1
    finally:
        drafter.close()
        server.stop()
