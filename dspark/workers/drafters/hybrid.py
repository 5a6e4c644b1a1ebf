"""The ``hybrid`` drafter: per request and step, prompt lookup or the DSpark head, whichever block
is expected to be accepted further.

Prompt lookup (``ngram``) costs nothing and wins where the answer copies from its context (code
edits, extraction, reformatting); the head wins on new text.  Each step, for each request:

1. the n-gram drafter proposes (or not) a block n with confidences from its online tables, one
   per request and match length, each starting from the drafter's lifetime table for that
   length (all requests' blocks), learned from its own verified blocks only; its expected
   accepted length is E_ng = sum_j prod_{i<=j} c_i;
2. the head runs only for requests where it is expected to pay for itself: tokens per step are
   1 + E and drafting with the head lengthens a step by ``head_cost`` (its measured share), so it
   runs when 1 + E_head > (1 + E_ng)(1 + head_cost), with E_head the running mean of the head's
   expected length on the request's earlier steps (and at least every ``refresh_every`` steps,
   so that mean stays current).  Skipping it is what keeps copy-heavy requests as cheap as plain
   prompt lookup, and open-ended ones where the head barely beats nothing as cheap as plain
   decoding (no block at all when neither drafter pays);
3. the head's expected length E_head is compared with E_ng and the larger one's block is
   proposed, whole, with the q and confidences of the drafter that produced it (one-hot q for
   the n-gram block, the head's sparse top-k q for its block).  Ties go to the n-gram block.

   * greedy requests (temperature 0): E_head is the head's calibrated survival sum over its block;
   * sampled requests: E_head = c_1 * (1 + T), where c_1 is the head's calibrated first-position
     confidence and T the running mean, over the request's earlier head blocks, of the survival
     sum beyond position 1 given position 1 (sum_{j>=2} prod_{2<=i<=j} c_i); 0 before any.

Why the output distribution stays exactly the target's
------------------------------------------------------
Verification of a block (x_1..x_n, q_1..q_n) is exact when, conditioned on everything the
engine knows before the step (the history H: context, all earlier drafts, confidences and
random draws) and on the block having been chosen, each x_k is distributed as q_k(. | x_<k).
The verifier's own randomness is fresh each step, so per-step exactness given H makes every
output token follow the target.

* The n-gram block is a deterministic function of the context.  Conditioned on any event at
  all (in particular on "the n-gram block was chosen", whatever that choice depended on), its
  tokens are the ones its one-hot q puts all mass on.  Choosing it can never bias.
* The head's block is random (sampled requests).  Whether it runs and whether it is chosen is a
  function of: the context, the n-gram block and its confidences (functions of the context and
  of H), the running means (functions of H) and c_1.  c_1 is computed from the head's hidden
  state at the first block position (anchor embedding and mask vectors attending to the
  context: no drafted token enters it) and the Markov embedding of the anchor, so it too is a
  function of the context alone.  None of these depends on this step's draft uniforms, which
  are the only source of randomness in x_1..x_n.  The event "the head's block is chosen" is
  therefore independent of x_1..x_n given H, and conditioned on it, x_k ~ q_k(. | x_<k) still.
  The head's confidences at positions 2..n (which depend on x_1..x_{n-1}) are never used to
  choose the current block; they enter the running mean T only after the choice, for later
  steps, where they are part of H.
* Greedy requests: every block (n-gram or head) is a deterministic function of the context and
  the verifier accepts a draft iff it equals the target's argmax.  Any choice between
  deterministic blocks, including one that looks at all of the head's confidences, emits the
  target's greedy tokens.

What would bias: choosing the head's sampled block by confidences that depend on its own
sampled tokens (c_2.. or q(x_k)) in a sampled request.  Conditioned on "chosen", the tokens then
lean towards those with high follow-up confidence, while the verifier divides by the untilted q.
That is why sampled requests look only at c_1 and the history.

Feedback: the head observes every token that enters the target's cache, with its features
(its context cache must stay complete); it is told ``num_verified = 0`` for a block it drafted
but that was not chosen, so its traces record no verification.  The n-gram drafter is told the
real ``num_verified`` for its own chosen block.  When the head's block was chosen for a greedy
request, its accepted drafts are the target's own greedy tokens, so the n-gram block is checked
against them as far as they go (as if verified that far), and where the head's draft was
verified and rejected, an n-gram draft equal to it counts as rejected (any other n-gram draft
there is not evidence: the target's token is not known yet); otherwise its tables would stay
where they were for as long as the head's blocks are chosen, and a request that starts copying
would keep getting the head's blocks.  For a sampled request it is told 0: an accepted head
draft leans towards the head's q (it is distributed as min(p, q), normalised), so matching the
n-gram block against it would not estimate the n-gram's own acceptance.  Either way the tables
are history, never this step's drafts.

Options (``--draft-option KEY=VALUE``): those of ``dspark`` (head, draft_vocab, proposal_top_k,
markov, calibrated, trace), those of ``ngram`` (max_ngram, min_ngram), and head_cost (a fixed
share instead of the measured one).  The choice of source and whether the head runs read the
measured cost, a function of past steps' timing only.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from dspark.workers.drafters.base import DraftBlock
from dspark.workers.drafters.dspark import HEAD_OPTIONS, DSparkDrafter, head_feature_layers, make_dspark_drafter
from dspark.workers.drafters.ngram import KIND as NGRAM_KIND
from dspark.workers.drafters.ngram import NgramDrafter
from dspark.workers.drafters.registry import DrafterKind, DraftOption
from dspark.workers.request import Sequence

SOURCES = ("ngram", "dspark")


def expected_length(confidence: list[float]) -> float:
    """Expected accepted drafts of a block from its conditional confidences: sum_j prod_{i<=j} c_i.

    Example:
        >>> expected_length([0.5, 0.5, 1.0])
        1.0
    """
    total, survive = 0.0, 1.0
    for c in confidence:
        survive *= c
        total += survive
    return total


class RunningMean:
    """Exponential moving average per request; ``get`` returns ``default`` before any update."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self._v: dict[str, float] = {}

    def get(self, request_id: str, default: float) -> float:
        return self._v.get(request_id, default)

    def update(self, request_id: str, x: float) -> None:
        old = self._v.get(request_id)
        self._v[request_id] = x if old is None else old + self.weight * (x - old)

    def release(self, request_id: str) -> None:
        self._v.pop(request_id, None)


class HybridDrafter:
    name = "hybrid"

    def __init__(self, head: DSparkDrafter, ngram: NgramDrafter, mean_weight: float = 0.3,
                 head_cost: float | None = None, refresh_every: int = 8) -> None:
        self.head = head
        self.ngram = ngram
        self.feature_layers = head.feature_layers
        self.refresh_every = refresh_every
        self._head_len = RunningMean(mean_weight)  # the head's E over whole blocks (decides whether it runs)
        self._head_tail = RunningMean(mean_weight)  # its E beyond position 1, given position 1 (sampled choice)
        self._idle: dict[str, int] = {}  # request -> steps since the head last drafted for it
        # Drafting a head block costs this share of the rest of a step: measured unless given,
        # starting from 0.3 (see ``_measure_cost``).
        self.measure_cost = head_cost is None
        self.head_cost = 0.3 if head_cost is None else head_cost
        self._last_call: dict[str, tuple[float, float]] = {}  # request -> (end of its last propose, head seconds in it)
        self._source: dict[str, str] = {}  # request -> source of the block proposed this step
        # Greedy requests given the head's block: (n-gram block, head block), to check the former
        # against what verification kept of the latter (see ``observe``).
        self._shadow: dict[str, tuple[list[int], list[int]]] = {}
        # Non-empty blocks proposed per source (the engine verifies them unless its budget cuts
        # them to nothing), for tests and benchmarks.
        self.source_counts: dict[str, int] = dict.fromkeys(SOURCES, 0)

    def _head_pays(self, request_id: str, e_ng: float) -> bool:
        """Whether drafting with the head is expected to beat the n-gram block (or none) per second.

        Tokens per step (1 + E) over step time: the head adds ``head_cost`` of a step, so it runs
        when (1 + E_head) > (1 + E_ng) (1 + head_cost), E_head from the request's earlier head
        blocks (unknown: it runs); every ``refresh_every`` steps it runs anyway, so the estimate
        follows the request.  A function of the history only.
        """
        idle = self._idle.get(request_id, 0)
        est = self._head_len.get(request_id, math.inf)
        return idle + 1 >= self.refresh_every or 1.0 + est > (1.0 + e_ng) * (1.0 + self.head_cost)

    def _measure_cost(self, seqs: list[Sequence], t0: float) -> None:
        """Update ``head_cost`` from these requests' last blocks: the head seconds of the call that
        drafted each, over the time from that call's end to now (its verification and everything
        else in its step), the median over the requests whose call ran the head.

        Per request, not between successive calls: calls for different requests can follow each
        other closely (several verifiers on one worker, or a verifier's requests drafted in two
        batches), and the short gap between two such calls, read as the rest of a step, made the
        head look several times dearer than it was (through the cluster at four requests, when a
        step's requests reached the worker in two batches, the hybrid's acceptance length was 1.70;
        with one batch per step, 1.98)."""
        shares = sorted(head_s / (t0 - end) for end, head_s in (self._last_call.get(s.request_id, (t0, 0.0)) for s in seqs)
                        if head_s > 0 and t0 > end)  # fmt: skip
        if shares:
            self.head_cost += 0.1 * (shares[len(shares) // 2] - self.head_cost)

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        t0 = time.perf_counter()
        if self.measure_cost:
            self._measure_cost(seqs, t0)
        out = self.ngram.propose(seqs, block_len)
        ngram_blocks = [b.token_ids for b in out]
        e_ng = [expected_length(b.confidence) for b in out]
        ngram_seconds = (time.perf_counter() - t0) / max(1, len(seqs))
        run = [i for i, s in enumerate(seqs) if self._head_pays(s.request_id, e_ng[i])]
        running = set(run)
        for i, s in enumerate(seqs):
            self._idle[s.request_id] = 0 if i in running else self._idle.get(s.request_id, 0) + 1
        # The head's timed cost includes projecting the context observed since it last ran for
        # these requests (``DSparkDrafter.flush_context``): a projection costs mostly its call, so
        # running the head every step pays one each step, and running it every few steps pays
        # one for all of them.
        t_head = time.perf_counter()
        drafted = self.head.propose([seqs[i] for i in run], block_len) if run else []
        t_end = time.perf_counter()
        for s in seqs:  # each waited for the whole call's head
            self._last_call[s.request_id] = (t_end, t_end - t_head if run else 0.0)
        source = ["ngram"] * len(seqs)
        for i, hb in zip(run, drafted):
            rid = seqs[i].request_id
            if not hb.token_ids:
                continue
            full, tail = expected_length(hb.confidence), expected_length(hb.confidence[1:])
            if seqs[i].params.greedy:
                e_head = full  # deterministic blocks: any function of them may choose
            else:
                e_head = hb.confidence[0] * (1.0 + self._head_tail.get(rid, 0.0))  # context and history only
            if e_head > e_ng[i] or not out[i].token_ids:
                out[i], source[i] = hb, "dspark"
            # After the choice: this block's statistics are history for later steps.
            self._head_len.update(rid, full)
            self._head_tail.update(rid, tail)
        for i, s in enumerate(seqs):
            blk = out[i]
            if blk.token_ids:
                self._source[s.request_id] = source[i]
                if source[i] == "dspark" and s.params.greedy and ngram_blocks[i]:
                    self._shadow[s.request_id] = (ngram_blocks[i], blk.token_ids)
                self.source_counts[source[i]] += 1
            out[i] = dataclasses.replace(blk, draft_seconds=blk.draft_seconds + ngram_seconds)
        return out

    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        src = self._source.pop(seq.request_id, None)
        pair = self._shadow.pop(seq.request_id, None)
        # A sub-drafter whose block was not proposed verified nothing this step.  Except that a
        # greedy request's accepted head drafts are the target's own tokens: the n-gram block
        # is checked against them as if verified that far (deterministic on both sides), and
        # its tables keep learning while the head's blocks are chosen.
        if src == "dspark" and pair is not None:
            ngram_block, head_block = pair
            shadow = max(0, len(token_ids) - 1)  # the accepted drafts (token_ids: the anchor first)
            # Where the head's draft was checked and rejected, an n-gram draft equal to it was
            # rejected too: that position is evidence as well (leaving it out would count the
            # n-gram's matches up to the hard token and never its miss there).
            if (num_verified is not None and shadow < min(num_verified, len(ngram_block), len(head_block))
                    and ngram_block[shadow] == head_block[shadow]):
                shadow += 1
        else:
            shadow = num_verified if src in ("ngram", None) else 0
        self.ngram.observe(seq, token_ids, None, shadow)
        self.head.observe(seq, token_ids, features, num_verified if src in ("dspark", None) else 0)

    def release(self, request_id: str) -> None:
        self._source.pop(request_id, None)
        self._shadow.pop(request_id, None)
        self._head_len.release(request_id)
        self._head_tail.release(request_id)
        self._idle.pop(request_id, None)
        self._last_call.pop(request_id, None)
        self.ngram.release(request_id)
        self.head.release(request_id)


def make_hybrid_drafter(ctx, opts: dict) -> HybridDrafter:
    """The hybrid of the shipped (or ``head=``) DSpark head and prompt lookup; see the module docstring."""
    head = make_dspark_drafter(ctx.loaded, {o.name: opts[o.name] for o in HEAD_OPTIONS}, ctx)
    ngram = NgramDrafter(max_ngram=opts["max_ngram"], min_ngram=opts["min_ngram"], by_order=True)
    return HybridDrafter(head, ngram, head_cost=opts["head_cost"])


def _share(raw) -> float | None:
    """A number >= 0 (an empty string: not set)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        x = float(raw)
    except (TypeError, ValueError):
        raise ValueError("a number >= 0") from None
    if isinstance(raw, bool) or not x >= 0 or math.isinf(x):
        raise ValueError("a number >= 0")
    return x


KIND = DrafterKind(
    name="hybrid",
    doc="per request and step, the prompt-lookup block or the DSpark head's, whichever is expected to be accepted further",
    build=make_hybrid_drafter,
    options=(*HEAD_OPTIONS, *NGRAM_KIND.options,
             DraftOption("head_cost", _share, None, "a head block's drafting time as a share of the rest of a step "
                         "(default: measured while serving)")),
    remote=True,
    needs_weights=True,
    feature_layers=head_feature_layers,
)


__all__ = ["HybridDrafter", "KIND", "expected_length", "make_hybrid_drafter"]
