"""DeepSeek-V4's MTP layer as the ``mtp`` drafter, on a tiny random V4 folder (fp32).

The folder is the phase-2 target (transformers' ``save_pretrained``, published names) plus an
MTP layer under ``mtp.0.*`` in a shard of its own.  The independent computation of the layer is
a one-block transformers ``DeepseekV4ForCausalLM`` whose block, hyper head and final norm are
the MTP layer's, with the target's embedding and head, its block input replaced (a forward
pre-hook) by h_proj(hnorm(h)) + e_proj(enorm(embed(next token))) written out by hand.  Two
layer kinds: sliding window (what V4-Flash ships) and CSA (compressed state in the MTP block,
so drafts past the anchor close windows that rollback must undo).
"""

from __future__ import annotations

import collections
import shutil

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf  # noqa: E402

from dspark.models.deepseek_v4_config import CSA, SLIDING  # noqa: E402
from dspark.models.deepseek_v4_mtp import load_mtp  # noqa: E402
from dspark.models.kv_cache import make_batch  # noqa: E402
from dspark.models.loader import load_model  # noqa: E402
from dspark.workers.budget_policy import AdaptiveBudget, CostModel  # noqa: E402
from dspark.workers.drafters import registry  # noqa: E402
from dspark.workers.drafters.mtp import MTPDrafter  # noqa: E402
from dspark.workers.budget_policy import fixed_budget  # noqa: E402
from dspark.workers.engine import Engine, EngineConfig  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from dspark.workers.runner import LocalRunner, RunnerConfig  # noqa: E402
from dspark.workers.scheduling import VerifyPolicy  # noqa: E402
from helpers.tiny_deepseek_v4 import (  # noqa: E402
    mtp_checkpoint_tensors, randomise, release_kv_norm_spelling, tiny_hf_config, tiny_mtp_layer, write_mtp,
)
from helpers.spec_stats import capture_first_blocks, chisquare_pvalue, second_token_law  # noqa: E402
from helpers.tiny_hf import write_byte_tokenizer  # noqa: E402

VOCAB = 260
EPS = 1e-6


@pytest.fixture(scope="module", params=[SLIDING, CSA])
def v4(request, tmp_path_factory):
    """(folder, transformers target, MTP reference model, MTP's own tensors, ours, our MTP)."""
    cfg = tiny_hf_config(vocab_size=VOCAB)
    cfg._attn_implementation = "eager"
    target = randomise(hf.DeepseekV4ForCausalLM(cfg), 26)
    with torch.no_grad():
        target.model.embed_tokens.weight.normal_(generator=torch.Generator().manual_seed(27))
    one, own = tiny_mtp_layer(target, request.param, seed=31, vocab_size=VOCAB)
    path = tmp_path_factory.mktemp(f"v4mtp_{request.param[:3]}")
    target.save_pretrained(path)
    assert release_kv_norm_spelling(path) == 3  # the target's loader reads the release's names too
    write_byte_tokenizer(path, VOCAB)
    write_mtp(path, mtp_checkpoint_tensors(one, own), request.param)
    ours = load_model(path, dtype="fp32")
    return path, target, one, own, ours, load_mtp(path, ours.model)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def target_streams(target, tokens: list[int]) -> torch.Tensor:
    """transformers' last decoder block output for a prefill: [S, N, hidden]."""
    got = {}
    hook = target.model.layers[-1].register_forward_hook(lambda m, a, out: got.setdefault("h", out))
    with torch.no_grad():
        target(input_ids=torch.tensor([tokens]), use_cache=False)
    hook.remove()
    return got["h"][0]


def reference_mtp(one, own, streams: torch.Tensor, next_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP layer over positions 0..S-1, no cache: (logits [S, V], output streams [S, N, hidden])."""
    emb = one.model.embed_tokens.weight[torch.tensor(next_tokens)]  # [S, hidden]
    x = rms(streams, own["hnorm.weight"]) @ own["h_proj.weight"].T
    x = x + (rms(emb, own["enorm.weight"]) @ own["e_proj.weight"].T).unsqueeze(1)  # [S, N, hidden]
    got = {}
    block = one.model.layers[0]
    pre = block.register_forward_pre_hook(lambda m, args: (x[None], *args[1:]))
    post = block.register_forward_hook(lambda m, a, out: got.setdefault("s", out))
    with torch.no_grad():
        logits = one(input_ids=torch.tensor([next_tokens]), use_cache=False).logits[0]
    pre.remove(), post.remove()
    return logits, got["s"][0]


def reference_chain(v4, context: list[int], depth: int) -> list[int]:
    """Greedy drafts of the layer after ``context`` (its last token is the anchor), fed its own
    streams and drafts beyond the first, each step recomputed from scratch."""
    _, target, one, own, _, _ = v4
    streams = target_streams(target, context[:-1])
    nxt, drafts = list(context[1:]), []
    for _ in range(depth):
        logits, out = reference_mtp(one, own, streams, nxt)
        drafts.append(int(logits[-1].argmax()))
        streams, nxt = torch.cat([streams, out[-1:]]), nxt + [drafts[-1]]
    return drafts


def test_mtp_logits_match_an_independent_computation(v4):
    _, target, one, own, ours, mtp = v4
    ctx = ids(41, 1)
    model, n = ours.model, ours.model.cfg.num_hidden_layers
    cache = model.make_cache(1, 128)
    with torch.no_grad():
        out = model(torch.tensor(ctx[:40]), cache, make_batch(cache, [0], [40], 1), feature_layers=(n - 1,))
    want_streams = target_streams(target, ctx[:40])
    torch.testing.assert_close(out.features.view(40, 3, -1), want_streams, rtol=1e-4, atol=1e-4)
    want, want_out = reference_mtp(one, own, want_streams, ctx[1:41])
    assert want.abs().max() > 1.0
    # Ours in uneven chunks (windows of the CSA variant close inside and across them).
    state, got, o = mtp.make_state(1, 128), [], 0
    for q in (7, 1, 13, 19):
        s, logits = mtp(out.features[o : o + q].view(q, 3, -1), torch.tensor(ctx[o + 1 : o + q + 1]), state,
                        make_batch(state, [0], [q], 1))  # fmt: skip
        got.append(logits)
        o += q
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s[-1], want_out[-1], rtol=1e-4, atol=1e-4)
    # A second draft: the layer's own streams and the first draft at position 40.
    d1 = int(want[-1].argmax())
    want2, _ = reference_mtp(one, own, torch.cat([want_streams, want_out[-1:]]), ctx[1:41] + [d1])
    _, got2 = mtp(s[-1:], torch.tensor([d1]), state, make_batch(state, [0], [1], 1))
    torch.testing.assert_close(got2[0], want2[-1], rtol=1e-4, atol=1e-4)


class SteeredMTP(MTPDrafter):
    """The mtp drafter, keeping (context, its own block) of every proposal; with ``scripts``
    (prompt -> plain greedy output) a pseudo-random prefix of each block is then replaced by the
    true continuation.  A random layer's drafts are almost never accepted; steered blocks are
    partly accepted, so the layer observes anchor + accepted tokens and rolls back its own
    speculative positions, as it would with real weights."""

    log: list
    scripts: dict
    gen: torch.Generator

    def propose(self, seqs, block_len):
        blocks = super().propose(seqs, block_len)
        for seq, b in zip(seqs, blocks):
            self.log.append((list(seq.all_ids), list(b.token_ids)))
            script = self.scripts.get(tuple(seq.prompt_ids))
            if script and b.token_ids:
                n = len(seq.output_ids)
                right = int(torch.randint(0, len(b.token_ids) + 1, (1,), generator=self.gen))
                b.token_ids[:right] = script[n : n + right]
        return blocks


def engines(ours, drafter_opts: dict, n_slots: int = 2):
    runner = LocalRunner(ours.model, RunnerConfig(n_slots=n_slots, max_seq=512))
    ctx = registry.DraftContext(loaded=ours, args=ours.args, target_runner=runner, runner=runner.cfg)
    drafter = registry.build_drafter("mtp", ctx, drafter_opts)
    drafter.__class__ = SteeredMTP
    drafter.log, drafter.scripts, drafter.gen = [], {}, torch.Generator().manual_seed(11)
    spec = Engine(runner, ours.tokenizer, EngineConfig(max_batch=n_slots, block_len=3, prefix_caching=False),
                  drafter=drafter)  # fmt: skip
    plain = Engine(LocalRunner(ours.model, RunnerConfig(n_slots=n_slots, max_seq=512)), ours.tokenizer,
                   EngineConfig(max_batch=n_slots, prefix_caching=False))  # fmt: skip
    return spec, plain, drafter


@pytest.mark.parametrize("steer", [False, True])
@pytest.mark.parametrize("depth", [1, 3])
def test_greedy_decoding_with_mtp_equals_plain_and_drafts_equal_the_reference(v4, depth, steer):
    ours = v4[4]
    spec, plain, drafter = engines(ours, {"depth": depth})
    prompts = [ids(12, 2), ids(23, 3)]  # two requests of different lengths in every step
    # 300+ tokens with random acceptance patterns in the steered depth-3 case (the windows of the
    # CSA variant close every 4 tokens: a rejected draft often closed one), 150 elsewhere.
    params = SamplingParams(max_tokens=320 if steer and depth == 3 else 150, ignore_eos=True)
    want = [s.output_ids for s in plain.generate(prompts, params)]
    if steer:
        drafter.scripts = {tuple(p): w for p, w in zip(prompts, want)}
    got = [s.output_ids for s in spec.generate(prompts, params)]
    assert got == want
    m = spec.metrics
    assert m.num_draft_tokens >= 2 * 100 * depth // 3  # a block for (nearly) every step
    assert all(len(o) == params.max_tokens for o in got)
    if steer:  # partly accepted blocks: the layer's state saw acceptances and rollbacks
        assert 0 < m.num_accepted_tokens < m.num_draft_tokens
    # The layer's own blocks are its greedy chain after the tokens the target confirmed:
    # spot-check early ones and ones drafted after many rollbacks of its own state.
    blocks = [(c, b) for c, b in drafter.log if b]
    for context, block in blocks[:2] + blocks[-3:]:
        assert block == reference_chain(v4, context, depth)


def test_sampled_drafts_report_the_layer_softmax(v4):
    _, _, _, _, ours, _ = v4
    spec, _, drafter = engines(ours, {"depth": 2, "proposal_top_k": 5}, n_slots=1)
    prompt = ids(15, 4)
    captured = capture_first_blocks(drafter)
    spec.generate([prompt], SamplingParams(max_tokens=4, temperature=0.7, seed=5, ignore_eos=True))
    context, block = next((c, b) for c, b in captured if b.token_ids)
    # q of the first draft: the top-5 softmax of the layer's logits at T = 0.7, renormalised.
    _, target, one, own, _, _ = v4
    logits, _ = reference_mtp(one, own, target_streams(target, context[:-1]), context[1:])
    top = torch.topk(logits[-1], 5)
    torch.testing.assert_close(block.prob_ids[0], top.indices)
    torch.testing.assert_close(block.probs[0], torch.softmax(top.values / 0.7, dim=-1), rtol=1e-4, atol=1e-5)
    assert block.token_ids[0] in top.indices.tolist() and block.probs.shape == (2, 5)


def test_checkpoint_without_mtp_weights_is_refused(v4, tmp_path):
    path, _, _, _, ours, _ = v4
    for f in path.iterdir():
        if f.name != "mtp.safetensors":
            shutil.copy(f, tmp_path / f.name)
    runner = LocalRunner(ours.model, RunnerConfig(n_slots=1, max_seq=64))
    ours_there = type(ours)(model=ours.model, tokenizer=ours.tokenizer, args=ours.args, source=str(tmp_path),
                            name=tmp_path.name)  # fmt: skip
    ctx = registry.DraftContext(loaded=ours_there, args=ours.args, target_runner=runner, runner=runner.cfg)
    with pytest.raises(ValueError, match="has no MTP layer") as err:
        registry.build_drafter("mtp", ctx, {})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="needs a DeepSeek-V4 target"):
        registry.build_drafter("mtp", registry.DraftContext(loaded=None, args=None, target_runner=None,
                                                            runner=runner.cfg), {})  # fmt: skip


# -- sampled: the token that comes out of the first speculative step follows the target ----------
POLICIES = ("fixed", "algorithm1", "production")
# Extra tokens nearly free: the random layer's confidences are low, and the adaptive budgets
# must still admit some of its drafts for the case not to be vacuous.
COSTS = CostModel(token_counts=[1, 256], step_seconds=[1.0, 1.01])


@pytest.mark.parametrize("policy", POLICIES)
def test_sampled_second_token_follows_the_target(v4, policy):
    if v4[0].name.startswith("v4mtp_com"):
        pytest.skip("one layer kind suffices for the sampled check (the greedy ones cover both)")
    ours = v4[4]
    runner = LocalRunner(ours.model, RunnerConfig(n_slots=32, max_seq=64))
    ctx = registry.DraftContext(loaded=ours, args=ours.args, target_runner=runner, runner=runner.cfg)
    budget = fixed_budget if policy == "fixed" else AdaptiveBudget(COSTS, VerifyPolicy(budget_mode=policy), learn=False)
    eng = Engine(runner, ours.tokenizer, EngineConfig(max_batch=32, block_len=2, prefix_caching=False),
                 drafter=registry.build_drafter("mtp", ctx, {"depth": 2}), budget=budget)  # fmt: skip
    prompt, temp, n = ids(8, 14), 0.5, 256  # a prompt whose first token is likely at T = 0.5
    x1, p = second_token_law(runner, prompt, temp)
    params = [SamplingParams(max_tokens=3, temperature=temp, seed=1000 * POLICIES.index(policy) + s, ignore_eos=True)
              for s in range(n)]  # fmt: skip
    counts: collections.Counter = collections.Counter()
    for seq in eng.generate([prompt] * n, params):
        if seq.output_ids[0] == x1:
            counts[seq.output_ids[1]] += 1
    assert sum(counts.values()) > 0.3 * n
    pval = chisquare_pvalue(counts, p)
    assert pval > 1e-3, f"{policy}: p = {pval:.2e}, observed {counts.most_common(5)}"
    # A random layer's drafts are mostly rejected (1-3 of ~250 accepted here): the law is then
    # the residual max(p - q, 0), which is exact only with the q the drafter reports.
    m = eng.metrics
    assert m.num_draft_tokens > 0.8 * n and 0 < m.num_accepted_tokens < m.num_draft_tokens


def test_release_config_with_a_dspark_draft_reads_as_a_target():
    """V4-Flash-0731's config (trimmed): three draft layers after 43 blocks, DSpark fields."""
    from dspark.models.deepseek_v4_config import deepseek_v4_config_from_hf
    from dspark.models.deepseek_v4_mtp import mtp_block_config

    raw = {"model_type": "deepseek_v4", "num_hidden_layers": 43, "num_hash_layers": 3,
           "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0, 0, 0], "num_nextn_predict_layers": 3,
           "dspark_block_size": 5, "dspark_markov_rank": 256, "dspark_target_layer_ids": [40, 41, 42],
           "dspark_noise_token_id": 128799}  # fmt: skip
    cfg = deepseek_v4_config_from_hf(raw)
    assert len(cfg.layer_types) == 43 and cfg.layer_types[-1] == CSA and cfg.num_nextn_predict_layers == 3
    assert mtp_block_config(cfg, raw).layer_types == (SLIDING,)
    with pytest.raises(ValueError, match="dspark_tree_size: unknown"):
        deepseek_v4_config_from_hf({**raw, "dspark_tree_size": 4})


def test_a_sharded_target_gets_the_whole_embedding_and_head_from_the_folder(v4):
    """A tensor-parallel target holds vocabulary shards: the layer reads the whole tensors."""
    from dspark.models.llama import TPHooks

    path, _, _, _, ours, mtp = v4
    model = ours.model
    saved = model.tp
    model.tp = TPHooks(rank=0, world_size=2)
    try:
        sharded = load_mtp(path, model)
    finally:
        model.tp = saved
    assert sharded.head.data_ptr() != model.head.weight.data_ptr()
    assert sharded.embed.data_ptr() != model.embed.weight.data_ptr()
    torch.testing.assert_close(sharded.head, model.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(sharded.embed, model.embed.weight, rtol=0, atol=0)
    assert mtp.head.data_ptr() == model.head.weight.data_ptr()  # one device: shared, not copied


def test_queue_run_at_every_observe_gives_the_same_drafts(v4, monkeypatch):
    """The layer's pass over observed positions, run per observe instead of once per propose."""
    import dspark.workers.drafters.mtp as mtp_drafter

    monkeypatch.setattr(mtp_drafter, "FLUSH_TOKENS", 1)
    spec, plain, drafter = engines(v4[4], {"depth": 3})
    prompts = [ids(12, 2), ids(23, 3)]
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    want = [s.output_ids for s in plain.generate(prompts, params)]
    drafter.scripts = {tuple(p): w for p, w in zip(prompts, want)}
    assert [s.output_ids for s in spec.generate(prompts, params)] == want
    blocks = [(c, b) for c, b in drafter.log if b]
    for context, block in blocks[:1] + blocks[-2:]:
        assert block == reference_chain(v4, context, 3)
