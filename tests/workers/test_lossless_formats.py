"""Sampled losslessness with published drafter checkpoints on a Qwen3 target.

Heads read from DeepSpec DSpark folders (Markov heads vanilla, gated, RNN), a speculators-format
DSpark folder (a reduced draft vocabulary of N = V / 2 ids: the other ids reach the output only
through the verifier's residual) and a DeepSpec DFlash folder (no Markov head) draft for a
random-weight Qwen3 HF folder (``helpers.tiny_hf``) through the engine the factory builds.  At
T = 0.3 (the tiny target is too flat at T = 1 for a test with power) the second and third
output tokens of 1,500 sampled sequences are tested by chi-square against the target's own
exact marginal laws, computed by transformers from the same folder:

    p2(x) = sum_a p(a | prompt) p(x | prompt a)
    p3(x) = sum_{a, b} p(a | prompt) p(b | prompt a) p(x | prompt a b)   (pairs below 1e-6 dropped)

x2 comes from the first draft of the first speculative step and x3 from the second (drawn after
the first: the Markov head's x_{k-1} input, the RNN head's state) or from a recovered / bonus
token.  The DSpark heads' Markov W2 holds the target's own next-token logits given the previous
token alone (rank V, W1 = I) and their final norm is scaled down, so q is close to p without
equalling it: about a third of the drafts are accepted, and a q that reaches the verifier wrong
biases the output visibly (sending q^2 renormalised instead of q, while drafting from q, gave
p < 1e-6 on x2 for each of the four DSpark heads; ``test_a_wrong_q_would_show`` keeps that check
for the vanilla head).  The DFlash head (no Markov head to align)
drafts tokens the target rarely keeps: its case checks mostly the residual path.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.request import SamplingParams
from dspark.workers.runner import RunnerConfig
from helpers.drafter_checkpoints import write_deepspec_checkpoint, write_dflash_checkpoint, write_speculators_checkpoint
from helpers.spec_stats import chisquare_pvalue
from helpers.tiny_hf import VOCAB, tiny_qwen3

TEMPERATURE = 0.3
PROMPT = [(i * 37 + 11) % 256 for i in range(7)]
N_SEQS = 1500
BLOCK = 4
MAX_TOKENS = 5  # x1 from the prefill, then a whole block of BLOCK - 1 drafts + 1
DRAFT_VOCAB = VOCAB // 2  # the speculators head's N
# name -> (drafter kind, checkpoint writer, Markov kind)
HEADS = {
    "deepspec-vanilla": ("dspark", "deepspec", "vanilla"),
    "deepspec-gated": ("dspark", "deepspec", "gated"),
    "deepspec-rnn": ("dspark", "deepspec", "rnn"),
    "speculators-reduced-vocab": ("dspark", "speculators", "vanilla"),
    "deepspec-dflash": ("dflash", "dflash", None),
}


@dataclasses.dataclass(frozen=True)
class Target:
    folder: Path
    laws: tuple[torch.Tensor, torch.Tensor]  # exact marginals of x2, x3 at TEMPERATURE, float64 [V]
    next_logits: torch.Tensor  # [V, V]: row a = the target's logits after PROMPT + [a]


@torch.no_grad()
def _exact_laws(hf) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p2, p3, next_logits) of the module docstring, from transformers' forward of the folder."""
    prompt = torch.tensor([PROMPT])

    def last_logits(ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, V] float64
        return hf(ids).logits[:, -1].double()

    p1 = torch.softmax(last_logits(prompt)[0] / TEMPERATURE, -1)  # [V]
    after1 = torch.cat([prompt.repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], 1)  # [V, L + 1]
    l2 = last_logits(after1)  # [V, V]
    joint = p1[:, None] * torch.softmax(l2 / TEMPERATURE, -1)  # [V(a), V(b)]
    p2 = joint.sum(0)
    pairs = (joint > 1e-6).nonzero()  # [P, 2]
    assert joint[pairs[:, 0], pairs[:, 1]].sum() > 0.999
    after2 = torch.cat([prompt.repeat(len(pairs), 1), pairs], 1)  # [P, L + 2]
    p3 = joint[pairs[:, 0], pairs[:, 1]] @ torch.softmax(last_logits(after2) / TEMPERATURE, -1)
    return p2, p3 / p3.sum(), l2.float()


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Target:
    folder = tmp_path_factory.mktemp("lossless") / "Qwen3-tiny"
    hf = tiny_qwen3(folder, initializer_range=0.2)  # peakier than the default 0.1
    p2, p3, next_logits = _exact_laws(hf)
    assert (p2 * N_SEQS >= 5).sum() >= 10 and (p3 * N_SEQS >= 5).sum() >= 10, "too few chi-square cells"
    return Target(folder, (p2, p3), next_logits)


def _target_markov(folder: Path, next_logits: torch.Tensor, ids: torch.Tensor | None) -> None:
    """Make the written head's Markov term the target's logits given the previous token alone
    (W1 = I of rank V; W2[n, a] = logit of draft id n after a) and shrink its own base logits
    (final norm x 0.1), so that q resembles the target's law.  An RNN head's output gate reads
    mostly the previous token's embedding: o = 3 e + (its written weights on the state) / 2."""
    state = load_file(str(folder / "model.safetensors"))
    cols = next_logits.t() if ids is None else next_logits.t()[ids]  # [V or N, V(prev)]
    state["markov_head.markov_w1.weight"] = torch.eye(VOCAB)
    state["markov_head.markov_w2.weight"] = cols.contiguous()
    if "markov_head.joint_proj.weight" in state:  # [3r, 2r + D] over [s ; e ; h] -> [g ; c ; o]
        w, b, r = state["markov_head.joint_proj.weight"], state["markov_head.joint_proj.bias"], VOCAB
        w[2 * r:, :r] *= 0.5
        w[2 * r:, r:] = torch.cat([3.0 * torch.eye(r), torch.zeros(r, w.shape[1] - 2 * r)], 1)
        b[2 * r:] = 0.0
    state["norm.weight"] = state["norm.weight"] * 0.1
    save_file(state, str(folder / "model.safetensors"))


def _write_head(name: str, target: Target, root: Path) -> Path:
    import transformers

    _, fmt, markov = HEADS[name]
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(target.folder))
    emb, lm_head = hf.model.embed_tokens.weight.detach(), hf.lm_head.weight.detach()
    folder = root / name
    common = dict(block_size=BLOCK, mask_token_id=VOCAB - 1, seed=5)
    if fmt == "deepspec":
        write_deepspec_checkpoint(folder, emb, lm_head, 3, layer_ids=(0, 1), rank=VOCAB, markov_head_type=markov, **common)
        _target_markov(folder, target.next_logits, None)
    elif fmt == "speculators":
        t = write_speculators_checkpoint(folder, emb, lm_head, layer_ids=(1, 2), draft_vocab=DRAFT_VOCAB, rank=VOCAB,
                                         markov_head_type=markov, **common)
        _target_markov(folder, target.next_logits, t["ids"])
    else:
        write_dflash_checkpoint(folder, emb, lm_head, 3, layer_ids=(0, 1), **common)
    return folder


@pytest.mark.parametrize("name", list(HEADS))
def test_sampled_tokens_follow_the_target(name, target, tmp_path):
    kind = HEADS[name][0]
    head = _write_head(name, target, tmp_path)
    built = build_engine(EngineSpec(model=str(target.folder), dtype="fp32", draft=kind, block_len=BLOCK,
                                    draft_options=(("head", str(head)),), runner=RunnerConfig(n_slots=256, max_seq=32)),
                         progress=False)
    try:
        if name.startswith("speculators"):
            assert built.engine.drafter.draft_ids.numel() == DRAFT_VOCAB
        eng = built.engine
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=s, ignore_eos=True) for s in range(N_SEQS)]
        outs = [s.output_ids for s in eng.generate([PROMPT] * N_SEQS, params)]
        m = eng.metrics
    finally:
        built.close()
    assert all(len(o) == MAX_TOKENS for o in outs)
    assert m.num_draft_tokens >= 2 * N_SEQS, "too few drafts verified: the case would be vacuous"
    assert m.num_accepted_tokens > 0
    for pos, law in zip((1, 2), target.laws):
        counts = collections.Counter(o[pos] for o in outs)
        pval = chisquare_pvalue(counts, law)
        assert pval > 1e-3, f"{name}: x{pos + 1} p = {pval:.2e}, observed {counts.most_common(5)}"


def test_a_wrong_q_would_show(target, tmp_path):
    """The power of the cases above: the vanilla DeepSpec head drafting from q but reporting q^2
    (renormalised) to the verifier biases x2 far past the threshold."""
    name = next(n for n, (_, fmt, markov) in HEADS.items() if fmt == "deepspec" and markov == "vanilla")
    head = _write_head(name, target, tmp_path)
    built = build_engine(EngineSpec(model=str(target.folder), dtype="fp32", draft=HEADS[name][0], block_len=BLOCK,
                                    draft_options=(("head", str(head)),), runner=RunnerConfig(n_slots=256, max_seq=32)),
                         progress=False)
    try:
        eng = built.engine
        right = eng.drafter.propose

        def squared_q(seqs, block_len):
            blocks = right(seqs, block_len)
            for b in blocks:
                if len(b) and b.probs is not None:
                    sq = b.probs.double() ** 2
                    b.probs = (sq / sq.sum(-1, keepdim=True)).to(b.probs.dtype)
            return blocks

        eng.drafter.propose = squared_q
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=s, ignore_eos=True) for s in range(N_SEQS)]
        outs = [s.output_ids for s in eng.generate([PROMPT] * N_SEQS, params)]
    finally:
        built.close()
    assert chisquare_pvalue(collections.Counter(o[1] for o in outs), target.laws[0]) < 1e-6
