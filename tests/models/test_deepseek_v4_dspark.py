"""The DSpark draft shipped in a V4 checkpoint as the ``v4-dspark`` drafter, on a tiny random V4 folder (fp32).

The folder is the phase-2 target (transformers' ``save_pretrained``, three layers, window 8,
three streams) plus the draft under its published ``mtp.{0,1,2}.*`` names and ``dspark_*`` config
fields (``helpers.tiny_v4_dspark``): three sliding-window blocks with their own MoE size, target
layer ids [1, 2] (the streams entering them are blocks 0 and 1's outputs), block size 4.
A random draft accepts nothing on a random target, so the greedy cases steer a pseudo-random
prefix of each block to the true continuation (partial acceptances: the window sees anchor +
accepted tokens), and the reference for the window is the draft recomputed from one fresh pass
of the target over the whole context.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from dspark.models.kv_cache import make_batch  # noqa: E402
from dspark.models.loader import load_model  # noqa: E402
from dspark.workers.budget_policy import AdaptiveBudget, CostModel, fixed_budget  # noqa: E402
from dspark.workers.drafters import registry  # noqa: E402
from dspark.workers.drafters.v4_dspark import V4DSparkDrafter  # noqa: E402
from dspark.workers.engine import Engine, EngineConfig  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from dspark.workers.runner import LocalRunner, RunnerConfig  # noqa: E402
from dspark.workers.scheduling import VerifyPolicy  # noqa: E402
from helpers.spec_stats import capture_first_blocks  # noqa: E402
from helpers.tiny_v4_dspark import write_v4_dspark_folder  # noqa: E402

VOCAB = 260
BLOCK = 4
LAYER_IDS = (1, 2)
RANK = 16
NOISE = 259
POLICIES = ("fixed", "algorithm1", "production")
COSTS = CostModel(token_counts=[1, 256], step_seconds=[1.0, 1.01])  # extra tokens nearly free


def write_folder(path, markov_rank: int = RANK, seed: int = 40, **over):
    """(transformers target, draft tensors) of a tiny V4 folder with its DSpark draft at ``path``."""
    return write_v4_dspark_folder(path, vocab_size=VOCAB, block_size=BLOCK, layer_ids=LAYER_IDS, rank=markov_rank,
                                  noise_token_id=NOISE, seed=seed, **over)  # fmt: skip


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4dspark")
    write_folder(path)
    return path, load_model(path, dtype="fp32")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def context(ours, n_slots: int = 2, max_seq: int = 512):
    runner = LocalRunner(ours.model, RunnerConfig(n_slots=n_slots, max_seq=max_seq))
    return runner, registry.DraftContext(loaded=ours, args=ours.args, target_runner=runner, runner=runner.cfg)


class SteeredV4DSpark(V4DSparkDrafter):
    """The drafter, logging (context, its own block); with ``scripts`` (prompt -> plain greedy
    output) a pseudo-random prefix of each block is replaced by the true continuation."""

    log: list
    confs: list
    scripts: dict
    gen: torch.Generator

    def propose(self, seqs, block_len):
        blocks = super().propose(seqs, block_len)
        for seq, b in zip(seqs, blocks):
            self.log.append((list(seq.all_ids), list(b.token_ids)))
            self.confs.append(list(b.confidence))
            script = self.scripts.get(tuple(seq.prompt_ids))
            if script and b.token_ids:
                n = len(seq.output_ids)
                right = int(torch.randint(0, len(b.token_ids) + 1, (1,), generator=self.gen))
                b.token_ids[:right] = script[n : n + right]
        return blocks


def steered(ours, opts: dict | None = None, budget=fixed_budget, n_slots: int = 2, block_len: int = BLOCK):
    runner, ctx = context(ours, n_slots)
    drafter = registry.build_drafter("v4-dspark", ctx, opts or {})
    drafter.__class__ = SteeredV4DSpark
    drafter.log, drafter.confs, drafter.scripts, drafter.gen = [], [], {}, torch.Generator().manual_seed(11)
    eng = Engine(runner, ours.tokenizer, EngineConfig(max_batch=n_slots, block_len=block_len, prefix_caching=False),
                 drafter=drafter, budget=budget)  # fmt: skip
    return eng, drafter


def plain_outputs(ours, prompts, params):
    runner, _ = context(ours)
    eng = Engine(runner, ours.tokenizer, EngineConfig(max_batch=2, prefix_caching=False))
    return [s.output_ids for s in eng.generate(prompts, params)]


@torch.no_grad()
def reference_block(ours, drafter: V4DSparkDrafter, all_ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """The greedy block after ``all_ids`` (its last token the anchor) from scratch: one fresh target
    pass over the context, the last W positions' keys, the stages, the head, the argmax Markov chain.
    Returns (tokens, base logits [G, V])."""
    m, model = drafter.model, ours.model
    ctx = all_ids[:-1]
    cache = model.make_cache(1, 512)
    feats = model(torch.tensor(ctx), cache, make_batch(cache, [0], [len(ctx)], 1), feature_layers=m.feature_layers).features
    w = m.dcfg.window
    pos = torch.arange(len(ctx))[-w:]
    keys = m.context_keys(feats[-w:], pos)[:, None]  # [S, 1, n, D]
    valid = torch.ones(1, pos.numel(), dtype=torch.bool)
    anchor = torch.tensor([all_ids[-1]])
    _, normed = m.block_states(anchor, torch.tensor([len(ctx)]), keys, valid, BLOCK)
    base = m.base_logits(normed)[0]  # [G, V]
    w1, w2 = m.w.markov_w1.weight, m.w.markov_w2.weight
    prev, out = all_ids[-1], []
    for k in range(BLOCK):
        prev = int((base[k] + w1[prev] @ w2.T).argmax())
        out.append(prev)
    return out, base


def test_loads_and_drafts_from_the_published_names(v4):
    path, ours = v4
    _, ctx = context(ours)
    drafter = registry.build_drafter("v4-dspark", ctx, {})
    m = drafter.model
    assert m.dcfg.block_size == BLOCK and m.dcfg.n_stages == 3 and m.dcfg.window == 8
    assert drafter.feature_layers == (0, 1)  # the streams entering layers 1 and 2
    assert m.cfg.n_routed_experts == 6 and m.cfg.moe_intermediate_size == 32  # the draft's own MoE size
    assert m.head.data_ptr() == ours.model.head.weight.data_ptr()  # the target's LM head, not a copy
    eng, drafter = steered(ours)
    out = eng.generate([ids(11, 1)], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(out.output_ids) == 12 and eng.metrics.num_draft_tokens > 0
    assert all(len(b) == BLOCK for _, b in drafter.log)
    # A shorter block keeps the first drafts of the G-position pass; a longer one gets G drafts.
    logs = {}
    for block_len in (2, BLOCK + 3):
        eng, d = steered(ours, block_len=block_len)
        eng.generate([ids(11, 1)], SamplingParams(max_tokens=12, ignore_eos=True))
        logs[block_len] = dict((tuple(c), b) for c, b in d.log)
    full = dict((tuple(c), b) for c, b in drafter.log)
    assert set(logs[2]) == set(full) == set(logs[BLOCK + 3])  # nothing accepted: the same contexts
    assert all(logs[2][c] == full[c][:2] and logs[BLOCK + 3][c] == full[c] for c in full)


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_speculative_output_equals_plain_decoding(v4, policy):
    """120 tokens for two requests of different lengths, steered blocks partly accepted, with each
    budget policy; the drafter's own blocks (early, and after many steps of window updates and
    ring wrap-around: window 8) equal the draft recomputed from scratch."""
    _, ours = v4
    budget = fixed_budget if policy == "fixed" else AdaptiveBudget(COSTS, VerifyPolicy(budget_mode=policy), learn=False)
    eng, drafter = steered(ours, budget=budget)
    prompts = [ids(12, 2), ids(23, 3)]
    params = SamplingParams(max_tokens=120, ignore_eos=True)
    want = plain_outputs(ours, prompts, params)
    drafter.scripts = {tuple(p): w for p, w in zip(prompts, want)}
    got = [s.output_ids for s in eng.generate(prompts, params)]
    assert got == want
    m = eng.metrics
    assert m.num_draft_tokens > 100 and 0 < m.num_accepted_tokens < m.num_draft_tokens
    blocks = [(c, b) for c, b in drafter.log if b]
    for ctx, block in blocks[:2] + blocks[-2:]:
        assert block == reference_block(ours, drafter, ctx)[0]


def test_sampled_q_is_the_markov_adjusted_softmax(v4):
    """The q the verifier receives for drafts 1 and 2: top-5 softmax at T = 0.7 of the reference
    base logits plus markov_w1[x_{k-1}] . markov_w2, with x_0 the anchor and x_1 the first draft."""
    _, ours = v4
    eng, drafter = steered(ours, {"proposal_top_k": 5}, n_slots=1)
    captured = capture_first_blocks(drafter)
    eng.generate([ids(15, 4)], SamplingParams(max_tokens=6, temperature=0.7, seed=5, ignore_eos=True))
    ctx, block = next((c, b) for c, b in captured if b.token_ids)
    _, base = reference_block(ours, drafter, ctx)
    w1, w2 = drafter.model.w.markov_w1.weight, drafter.model.w.markov_w2.weight
    for k, prev in enumerate([ctx[-1], block.token_ids[0]]):
        top = torch.topk(base[k] + w1[prev] @ w2.T, 5)
        torch.testing.assert_close(block.prob_ids[k], top.indices)
        torch.testing.assert_close(block.probs[k], torch.softmax(top.values / 0.7, -1), rtol=1e-4, atol=1e-5)
        assert block.token_ids[k] in top.indices.tolist()
    assert block.probs.shape == (BLOCK, 5) and all(0 < c < 1 for c in block.confidence)


# Each option's alternative reading, and what it must change: the drafts, or (confidence_input)
# only the confidences.
ALTERNATIVES = {
    "query_norm": (0, "drafts"), "features": ("leaving", "drafts"), "collapse": ("mean", "drafts"),
    "window_feed": ("last", "drafts"), "experts_per_token": (1, "drafts"),
    "confidence_input": ("normed", "confidences"),
}  # fmt: skip


def test_every_option_changes_the_drafts(v4):
    """Same steered run (same contexts and acceptance pattern: the output is plain decoding's) with
    the default reading and with each alternative: the blocks (or confidences) differ, so each
    option is real; the greedy output stays plain decoding's."""
    _, ours = v4
    prompts = [ids(12, 2), ids(23, 3)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = plain_outputs(ours, prompts, params)

    def run(opts):
        eng, drafter = steered(ours, opts)
        drafter.scripts = {tuple(p): w for p, w in zip(prompts, want)}
        assert [s.output_ids for s in eng.generate(prompts, params)] == want
        return drafter.log, drafter.confs

    default_log, default_confs = run({})
    for name, (value, what) in ALTERNATIVES.items():
        log, confs = run({name: value})
        assert [c for c, _ in log] == [c for c, _ in default_log]  # same contexts, block by block
        if what == "drafts":
            assert log != default_log, f"{name}={value} drafted the same blocks"
        else:
            assert log == default_log and confs != default_confs, f"{name}={value} changed nothing"


# -- sampled: the token out of the first speculative step follows the target -------------------------
N_SAMPLED, TEMP = 400, 0.5
PROMPT = ids(8, 0)  # its greedy first token has probability 0.7 at T = 0.5 (x2: 13 cells)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A folder whose draft's Markov term is the target's own next-token logits after PROMPT + [a]
    (rank V: markov_w1 = I, markov_w2[n, a] = logit of n), its final norm scaled down: q is close to
    the target's law without equalling it, so many drafts are accepted and a wrong q would show."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("v4dspark_aligned")
    target, _ = write_folder(path, markov_rank=VOCAB, seed=26)
    with torch.no_grad():
        after = torch.cat([torch.tensor([PROMPT]).repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], 1)
        next_logits = target(input_ids=after, use_cache=False).logits[:, -1]  # [V(a), V]
    tensors = load_file(str(path / "mtp.safetensors"))
    tensors["mtp.2.markov_head.markov_w1.weight"] = torch.eye(VOCAB)
    tensors["mtp.2.markov_head.markov_w2.weight"] = next_logits.t().contiguous()
    tensors["mtp.2.norm.weight"] = tensors["mtp.2.norm.weight"] * 0.1
    save_file(tensors, str(path / "mtp.safetensors"))
    return load_model(path, dtype="fp32")


def sampled_run(ours, policy: str, wrong_q: bool = False):
    """(counts of x2 among sequences whose x1 is the greedy x1, the target's law of x2, metrics)."""
    import collections

    from helpers.spec_stats import second_token_law

    runner, ctx = context(ours, n_slots=64, max_seq=32)
    budget = fixed_budget if policy == "fixed" else AdaptiveBudget(COSTS, VerifyPolicy(budget_mode=policy), learn=False)
    drafter = registry.build_drafter("v4-dspark", ctx, {})
    if wrong_q:  # draft from q, report q^2 renormalised
        right = drafter.propose

        def squared(seqs, block_len):
            blocks = right(seqs, block_len)
            for b in blocks:
                if len(b) and b.probs is not None:
                    sq = b.probs.double() ** 2
                    b.probs = (sq / sq.sum(-1, keepdim=True)).to(b.probs.dtype)
            return blocks

        drafter.propose = squared
    eng = Engine(runner, ours.tokenizer, EngineConfig(max_batch=64, block_len=2, prefix_caching=False),
                 drafter=drafter, budget=budget)  # fmt: skip
    x1, p = second_token_law(runner, PROMPT, TEMP)
    seed0 = 1000 * POLICIES.index(policy) + (500 if wrong_q else 0)
    params = [SamplingParams(max_tokens=3, temperature=TEMP, seed=seed0 + s, ignore_eos=True) for s in range(N_SAMPLED)]
    counts: collections.Counter = collections.Counter()
    for seq in eng.generate([PROMPT] * N_SAMPLED, params):
        if seq.output_ids[0] == x1:
            counts[seq.output_ids[1]] += 1
    return counts, p, eng.metrics


@pytest.mark.parametrize("policy", POLICIES)
def test_sampled_second_token_follows_the_target(aligned, policy):
    from helpers.spec_stats import chisquare_pvalue

    counts, p, m = sampled_run(aligned, policy)
    assert sum(counts.values()) > 0.3 * N_SAMPLED
    pval = chisquare_pvalue(counts, p)
    assert pval > 1e-3, f"{policy}: p = {pval:.2e}, observed {counts.most_common(5)}"
    # Not vacuous: drafts were verified and many accepted (so the acceptance rule, not only the
    # residual, produced the tokens).
    assert m.num_draft_tokens > 0.8 * N_SAMPLED and m.num_accepted_tokens > 0.2 * m.num_draft_tokens


def test_a_wrong_q_would_show(aligned):
    """The power of the case above: drafting from q but reporting q^2 biases x2 far past its threshold."""
    from helpers.spec_stats import chisquare_pvalue

    counts, p, _ = sampled_run(aligned, "fixed", wrong_q=True)
    assert chisquare_pvalue(counts, p) < 1e-6
