"""The hybrid drafter (prompt lookup or the DSpark head, per request and step).

* the expected-length rule and the choice's independence from the head's sampled tokens, with
  hand-made sub-drafters;
* greedy, fp32, real default model: output token-identical to plain decoding, and the block
  sources: n-gram blocks on a copy-heavy prompt, head blocks on an open-ended one;
* sampled, T = 1: the first token out of a speculative step follows the target's law (chi-square),
  once where the head's block is chosen and once where the n-gram's is.
"""

from __future__ import annotations

import collections
import time

import pytest
import torch

from dspark.models.dspark_head import default_head_path
from dspark.models.loader import DEFAULT_MODEL_NAME
from dspark.workers.drafters.base import DraftBlock, OnlineConfidence
from dspark.workers.drafters.hybrid import HybridDrafter, expected_length
from dspark.workers.drafters.ngram import NgramDrafter
from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.request import SamplingParams, Sequence
from dspark.workers.runner import RunnerConfig
from helpers.spec_stats import chisquare_pvalue, second_token_law

needs_head = pytest.mark.skipif(not default_head_path(DEFAULT_MODEL_NAME).exists(), reason="no DSpark head shipped")


def test_expected_length():
    assert expected_length([]) == 0.0
    assert expected_length([0.5, 0.5, 1.0]) == pytest.approx(1.0)
    assert expected_length([1.0] * 4) == pytest.approx(4.0)
    assert expected_length([0.0, 1.0, 1.0]) == 0.0


class _TiltedHead:
    """A head whose block is x_1 ~ uniform{7, 8} from the drafter's own RNG, with a follow-up
    confidence that depends on x_1 (high after 7, low after 8): the case where a selector that
    reads confidences of sampled positions would prefer x_1 = 7 and bias verification."""

    feature_layers = (1,)

    def __init__(self, c1: float) -> None:
        self.c1 = c1
        self.gen = torch.Generator().manual_seed(0)
        self.observed: list[int | None] = []

    def propose(self, seqs, block_len):
        out = []
        for _ in seqs:
            x1 = 7 if torch.rand(1, generator=self.gen).item() < 0.5 else 8
            conf = [self.c1] + [0.99 if x1 == 7 else 0.01] * (block_len - 1)
            out.append(DraftBlock(token_ids=[x1] + [9] * (block_len - 1), probs=torch.full((block_len, 2), 0.5),
                                  prob_ids=torch.tensor([[7, 8]] * block_len), confidence=conf))
        return out

    def observe(self, seq, token_ids, features, num_verified=None):
        self.observed.append(num_verified)

    def release(self, request_id):
        pass


def _seq(rid: str, temperature: float) -> Sequence:
    # [5 6 1 2 3 5 6]: the suffix [5 6] recurs, so prompt lookup proposes [1 2 3 5 6 ...].
    return Sequence(request_id=rid, prompt_ids=[5, 6, 1, 2, 3, 5, 6], params=SamplingParams(temperature=temperature),
                    generator=torch.Generator())


@pytest.mark.parametrize("c1", [0.3, 0.95])
def test_sampled_choice_ignores_the_heads_sampled_tokens(c1):
    """Sampled requests: which block is proposed must not depend on the head's sampled tokens.
    With x_1-dependent follow-up confidences, a survival-sum rule would pick the head's block
    only when x_1 = 7 (E ~ 3.9 against the n-gram's 0.99 from its prior) and the n-gram's when x_1 = 8."""
    head = _TiltedHead(c1)
    hybrid = HybridDrafter(head, NgramDrafter(by_order=True))
    chosen = collections.Counter()
    for i in range(64):
        seq = _seq(f"r{i}", temperature=1.0)
        (blk,) = hybrid.propose([seq], 4)
        source = "dspark" if blk.probs is not None else "ngram"
        chosen[(source, blk.token_ids[0] if source == "dspark" else None)] += 1
        hybrid.release(seq.request_id)
    sources = {s for s, _ in chosen}
    assert len(sources) == 1, chosen  # the same source for every draw of the head
    if sources == {"dspark"}:
        assert chosen[("dspark", 7)] > 16 and chosen[("dspark", 8)] > 16, chosen  # both x_1 values kept
    assert sources == ({"dspark"} if c1 > expected_length([0.5] * 4) else {"ngram"})


def test_greedy_choice_reads_the_whole_block():
    """Greedy requests: the blocks are deterministic, so the head's whole survival sum may decide."""
    head = _TiltedHead(0.9)
    hybrid = HybridDrafter(head, NgramDrafter(by_order=True))
    picked = collections.Counter()
    for i in range(32):
        seq = _seq(f"g{i}", temperature=0.0)
        (blk,) = hybrid.propose([seq], 4)
        picked[blk.token_ids[0]] += 1
        hybrid.release(seq.request_id)
    assert set(picked) == {7, 1}  # the head's block after x_1 = 7, the n-gram's (starting with 1) after 8


def test_feedback_goes_to_the_source_only():
    """Sampled requests: the n-gram tables learn from the n-gram's verified blocks only (an
    accepted head draft is not a sample of the target's law: it leans towards the head's q); the
    head is told it verified nothing when its block was not proposed."""
    head = _TiltedHead(0.3)  # below the n-gram's prior: the n-gram block is chosen
    ngram = NgramDrafter(by_order=True)
    hybrid = HybridDrafter(head, ngram)
    seq = _seq("a", temperature=1.0)
    (blk,) = hybrid.propose([seq], 4)
    assert blk.probs is None and blk.token_ids == [1, 2, 3, 5]
    hybrid.observe(seq, [6, 1, 2], None, num_verified=4)  # two accepted
    assert head.observed == [0]
    assert hybrid.source_counts == {"ngram": 1, "dspark": 0}
    assert ngram.conf.confidences("a/2", 3, prior=[0.5] * 3) == pytest.approx([2 / 3, 2 / 3, 1 / 3])  # its 2-gram table
    assert ngram.lifetime.confidences("2", 3) == pytest.approx([2 / 3, 2 / 3, 1 / 3])  # the drafter's 2-gram table

    head2 = _TiltedHead(0.999)  # above: the head's block is chosen
    ngram2 = NgramDrafter(by_order=True)
    hybrid2 = HybridDrafter(head2, ngram2)
    (blk,) = hybrid2.propose([seq], 4)
    assert blk.probs is not None
    hybrid2.observe(seq, [6, 1, 2], None, num_verified=4)  # two accepted: not evidence for a sampled request
    assert head2.observed == [4]
    assert ngram2.conf.confidences("a/2", 4) == [0.5] * 4  # still the prior
    assert ngram2.lifetime.confidences("2", 4) == [0.5] * 4


class _SureHead:
    """A greedy head that always proposes ``tokens`` with confidence 0.99 per draft."""

    feature_layers = (1,)

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def propose(self, seqs, block_len):
        return [DraftBlock(token_ids=self.tokens[:block_len], confidence=[0.99] * block_len) for _ in seqs]

    def observe(self, seq, token_ids, features, num_verified=None):
        pass

    def release(self, request_id):
        pass


class _SlowHead(_SureHead):
    """A head whose every call takes ``seconds``."""

    def __init__(self, tokens: list[int], seconds: float) -> None:
        super().__init__(tokens)
        self.seconds = seconds

    def propose(self, seqs, block_len):
        time.sleep(self.seconds)
        return super().propose(seqs, block_len)


def test_head_cost_is_measured_per_request_not_between_calls():
    """Two verifiers' requests drafted in turn, their calls 2 ms apart, each request's step 60 ms
    long, the head 6 ms a call: the head costs each request about a tenth of its step.  Measured
    between successive calls, the 2 ms gap read as the rest of a step (the head 3x the step)."""
    hybrid = HybridDrafter(_SlowHead([9, 9, 9], 0.006), NgramDrafter())
    a, b = _seq("a", temperature=0.0), _seq("b", temperature=0.0)
    for _ in range(25):
        hybrid.propose([a], 3)
        time.sleep(0.002)
        hybrid.propose([b], 3)
        time.sleep(0.046)
    assert 0.02 < hybrid.head_cost < 0.4, hybrid.head_cost


@pytest.mark.parametrize("head, kept, verified, table", [
    ([1, 2, 4, 4], [6, 1, 2], 4, [2 / 3, 2 / 3, 0.5]),  # two accepted, both match; the rest unknown
    ([1, 2, 4, 4], [6, 1, 4], 4, [2 / 3, 1 / 3, 0.5]),  # the n-gram's 2nd draft differs from the target's
    ([1, 2, 4, 4], [6], 4, [1 / 3, 0.5, 0.5]),  # the head's 1st draft rejected, and the n-gram's is the same
    ([7, 2, 4, 4], [6], 4, [0.5, 0.5, 0.5]),  # ... a different one: no evidence either way
    ([1, 2, 3, 4], [6, 1, 2], 4, [2 / 3, 2 / 3, 1 / 3]),  # rejected at the 3rd, where both drafted 3
    ([1, 2, 3, 4], [6, 1, 2], 2, [2 / 3, 2 / 3, 0.5]),  # the 3rd was not verified: no evidence
])
def test_greedy_ngram_tables_learn_from_the_heads_accepted_drafts(head, kept, verified, table):
    """A greedy request's accepted head drafts are the target's own tokens, so the n-gram block
    (here [1, 2, 3, 5]) is checked against them as far as they go, and where the head's draft
    was rejected an equal n-gram draft counts as rejected: its tables keep learning while the
    head's blocks are chosen instead of staying at the prior."""
    ngram = NgramDrafter(by_order=True)
    hybrid = HybridDrafter(_SureHead(head), ngram, head_cost=0)
    seq = _seq("g", temperature=0.0)
    (blk,) = hybrid.propose([seq], 4)
    assert blk.token_ids == head  # the head's block is chosen
    hybrid.observe(seq, kept, None, num_verified=verified)
    assert ngram.conf.confidences("g/2", 3, prior=[0.5] * 3) == pytest.approx(table)
    assert ngram.lifetime.confidences("2", 3) == pytest.approx(table)


# -- the real default model ------------------------------------------------------------------------
BLOCK = 7
COPY = ("Copy this text exactly, word for word: The committee approved the budget for the new library, "
        "which will open in the spring with a reading room, a children's corner and a small cafe.")
OPEN = "Write a short poem about the sea at night."


@pytest.fixture(scope="module")
def built():
    # Head drafting counted as free: the source is chosen by expected lengths alone, whatever this
    # machine's timing (the measured cost only makes the head run less often).
    b = build_engine(EngineSpec(dtype="fp32", draft="hybrid", block_len=BLOCK, runner=RunnerConfig(n_slots=32, max_seq=320),
                                draft_options=(("head_cost", 0),)), progress=False)
    yield b
    b.close()


def _chat(built, text: str) -> list[int]:
    return built.loaded.tokenizer.encode_chat([{"role": "user", "content": text}])


def _run(eng, prompts, params):
    drafter = eng.drafter
    before = dict(drafter.source_counts)
    seqs = eng.generate(prompts, params)
    return seqs, {k: drafter.source_counts[k] - before[k] for k in before}


@needs_head
def test_greedy_identical_to_plain(built, prompts20):
    eng = built.engine
    prompts = [_chat(built, t) for t in (COPY, OPEN, *[p for p in prompts20 if len(p) < 300][:2])]
    saved, eng.drafter = eng.drafter, None
    try:
        plain = [s.output_ids for s in eng.generate(prompts, SamplingParams(max_tokens=40))]
    finally:
        eng.drafter = saved
    for p, want in zip(prompts, plain):  # one at a time too: batch composition must not matter
        (seq,), _ = _run(eng, [p], SamplingParams(max_tokens=40))
        assert seq.output_ids == want
    seqs, used = _run(eng, prompts, SamplingParams(max_tokens=40))
    assert [s.output_ids for s in seqs] == plain
    assert used["ngram"] > 0 and used["dspark"] > 0, used  # both sources were verified


@needs_head
def test_the_served_head_drafts_with_int8_weights(built):
    """The default ``weights=int8``: the draft layers and drafted rows in int8 where this CPU
    runs int8 products (this module's losslessness tests then run with them); ``weights=float``
    keeps float layers."""
    from dspark.models.int8_weights import Int8Linear, int8_supported
    from dspark.workers.drafters.dspark import make_dspark_drafter

    head = built.engine.drafter.head.head
    assert isinstance(head.layers[0].w13, Int8Linear) == int8_supported(torch.device("cpu"))
    opts = {"head": None, "draft_vocab": None, "proposal_top_k": 8, "weights": "float"}
    other = make_dspark_drafter(built.loaded, opts, EngineSpec(runner=RunnerConfig(n_slots=1, max_seq=64)))
    assert not isinstance(other.head.layers[0].w13, Int8Linear)


@needs_head
def test_sources_follow_the_prompt(built):
    """From a drafter that has seen no request yet (the n-gram tables' lifetime prior, learned
    across requests, would otherwise carry the earlier tests' copying into the first blocks)."""
    eng = built.engine
    eng.drafter.ngram.lifetime = OnlineConfidence(prior_accept=0.5, horizon=NgramDrafter.LIFETIME_HORIZON)
    _, copy = _run(eng, [_chat(built, COPY)], SamplingParams(max_tokens=48))
    _, fresh = _run(eng, [_chat(built, OPEN)], SamplingParams(max_tokens=48))
    assert copy["ngram"] > 2 * copy["dspark"], copy
    assert fresh["dspark"] > 2 * fresh["ngram"], fresh


# Prompts whose first token is nearly certain and whose second is a broad choice.  The repeated
# pattern gives prompt lookup a block whose prior expected length beats the head's first-position
# confidence; the story opening has nothing to look up, so the head's block is proposed.
SAMPLED = {"ngram": "A B C D E F G\nA B C D E F G\nA B C D E F G\nA B C", "dspark": "Once upon a time"}


@needs_head
@pytest.mark.parametrize("source", list(SAMPLED))
def test_sampled_second_token_follows_the_target(built, source):
    eng = built.engine
    prompt = built.loaded.tokenizer.encode(SAMPLED[source])
    x1, p = second_token_law(built.engine.runner, prompt)
    n = 320
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=7000 + s, ignore_eos=True) for s in range(n)]
    seqs, used = _run(eng, [prompt] * n, params)
    assert used[source] > 0.9 * sum(used.values()) and used[source] > n // 2, used  # the case is the one named
    counts = collections.Counter(s.output_ids[1] for s in seqs if s.output_ids[0] == x1)
    total = sum(counts.values())
    assert total > 0.75 * n, "the first token should be nearly deterministic for this prompt"
    pval = chisquare_pvalue(counts, p)
    assert pval > 1e-3, f"{source}: p = {pval:.2e}, observed {counts.most_common(5)}"
