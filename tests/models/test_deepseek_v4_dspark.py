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

from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf  # noqa: E402

from dspark.models.kv_cache import make_batch  # noqa: E402
from dspark.models.loader import load_model  # noqa: E402
from dspark.workers.budget_policy import AdaptiveBudget, CostModel, fixed_budget  # noqa: E402
from dspark.workers.drafters import registry  # noqa: E402
from dspark.workers.drafters.v4_dspark import V4DSparkDrafter  # noqa: E402
from dspark.workers.engine import Engine, EngineConfig  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from dspark.workers.runner import LocalRunner, RunnerConfig  # noqa: E402
from dspark.workers.scheduling import VerifyPolicy  # noqa: E402
from helpers.tiny_deepseek_v4 import randomise, release_kv_norm_spelling, tiny_hf_config  # noqa: E402
from helpers.tiny_hf import write_byte_tokenizer  # noqa: E402
from helpers.tiny_v4_dspark import draft_tensors, write_v4_dspark  # noqa: E402

VOCAB = 260
BLOCK = 4
LAYER_IDS = (1, 2)
RANK = 16
NOISE = 259
POLICIES = ("fixed", "algorithm1", "production")
COSTS = CostModel(token_counts=[1, 256], step_seconds=[1.0, 1.01])  # extra tokens nearly free


def write_folder(path, markov_rank: int = RANK, seed: int = 40):
    """(transformers target, draft tensors) of a tiny V4 folder with its DSpark draft at ``path``."""
    cfg = tiny_hf_config(vocab_size=VOCAB)
    cfg._attn_implementation = "eager"
    target = randomise(hf.DeepseekV4ForCausalLM(cfg), seed)
    with torch.no_grad():
        target.model.embed_tokens.weight.normal_(generator=torch.Generator().manual_seed(seed + 1))
    target.save_pretrained(path)
    release_kv_norm_spelling(path)
    write_byte_tokenizer(path, VOCAB)
    tensors = draft_tensors(cfg, layer_ids=LAYER_IDS, rank=markov_rank, seed=seed + 2)
    write_v4_dspark(path, tensors, block_size=BLOCK, layer_ids=LAYER_IDS, rank=markov_rank, noise_token_id=NOISE)
    return target, tensors


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


def steered(ours, opts: dict | None = None, budget=fixed_budget, n_slots: int = 2):
    runner, ctx = context(ours, n_slots)
    drafter = registry.build_drafter("v4-dspark", ctx, opts or {})
    drafter.__class__ = SteeredV4DSpark
    drafter.log, drafter.scripts, drafter.gen = [], {}, torch.Generator().manual_seed(11)
    eng = Engine(runner, ours.tokenizer, EngineConfig(max_batch=n_slots, block_len=BLOCK, prefix_caching=False),
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
