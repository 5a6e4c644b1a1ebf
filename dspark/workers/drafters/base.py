"""The drafter protocol: one contract for every way of proposing draft blocks.

A drafter proposes, for each decoding request, a block of candidate tokens that continue the
request's accepted tokens (``seq.all_ids``, whose last element is the *anchor*).  With each token
comes the exact proposal distribution it was sampled from (sparse: the drafter sampled from a
truncated, renormalised distribution and reports only those entries; or None for a
deterministic proposal, i.e. one-hot on the token) and a confidence in [0, 1]: the drafter's
estimate that the token survives verification given that the previous ones did.

After each verification the engine reports which tokens entered the target's KV cache
(``observe``), with the target's context features for them when the drafter asked for any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from dspark.workers.request import Sequence


@dataclass
class DraftBlock:
    """Draft tokens for one request.

    token_ids: [n]; probs/prob_ids: [n, K] sparse proposal distribution (rows sum to 1) or both
    None for one-hot proposals; confidence: [n] floats in [0, 1].
    """

    token_ids: list[int]
    probs: torch.Tensor | None = None
    prob_ids: torch.Tensor | None = None
    confidence: list[float] = field(default_factory=list)
    draft_seconds: float = 0.0

    def __post_init__(self) -> None:
        if (self.probs is None) != (self.prob_ids is None):
            raise ValueError("probs and prob_ids come together")
        if self.probs is not None and self.probs.shape[0] < len(self.token_ids):
            raise ValueError("one proposal row per draft token")
        if not self.confidence:
            self.confidence = [1.0] * len(self.token_ids)

    @staticmethod
    def empty() -> "DraftBlock":
        return DraftBlock(token_ids=[])

    def __len__(self) -> int:
        return len(self.token_ids)

    def prefix(self, n: int) -> "DraftBlock":
        """The block's first ``n`` drafts with their proposals and confidences (itself if no longer).

        Example:
            >>> DraftBlock([5, 6, 7], confidence=[0.9, 0.5, 0.2]).prefix(2).confidence
            [0.9, 0.5]
        """
        if len(self.token_ids) <= n:
            return self
        return DraftBlock(
            token_ids=self.token_ids[:n],
            probs=None if self.probs is None else self.probs[:n],
            prob_ids=None if self.prob_ids is None else self.prob_ids[:n],
            confidence=self.confidence[:n],
            draft_seconds=self.draft_seconds,
        )


@runtime_checkable
class Drafter(Protocol):
    """What the engine uses of every drafter; ``AsyncDrafter`` adds the one optional capability."""

    name: str
    feature_layers: tuple[int, ...]  # target layers whose hidden states observe() must receive

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock | None]:
        """One entry per sequence: a block of at most ``block_len`` tokens, or None.

        An empty block means "no drafts": the request decodes one plain token this step.  None
        means "the block is still being drafted": the request sits this step out and keeps its
        place.  Only an ``AsyncDrafter`` returns None (in-process drafters always answer).
        """
        ...

    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        """``token_ids`` were just written to the target cache (features: [n, F] or None).

        ``num_verified``: how many drafts of this request's last proposed block verification
        checked (a prefix; the budget may cut it); None when no block was verified (prefill).
        ``token_ids`` is the anchor followed by the accepted ones among them.
        """
        ...

    def release(self, request_id: str) -> None:
        """The request ended: drop its state."""
        ...


@runtime_checkable
class PrefixReusingDrafter(Drafter, Protocol):
    """A drafter that may declare it needs no ``observe()`` of a prompt prefix the engine reuses
    from another request's cache (it reads ``seq.all_ids`` or the target's cache): n-gram,
    layer-skip, draft model.  Drafters without the attribute never get reused prefixes."""

    prefix_reuse: bool


@runtime_checkable
class StepBatchingDrafter(Drafter, Protocol):
    """A drafter that holds what ``observe`` hands it until ``flush_steps``, which the engine calls
    once every request of a step has been observed (the remote drafter: one message per draft
    worker, which drafts it as one batch)."""

    def flush_steps(self) -> None:
        """Every request of the step has been observed: pass on what was held."""
        ...


@runtime_checkable
class AsyncDrafter(Drafter, Protocol):
    """A drafter whose blocks arrive in the background (the remote drafter of a verifier group).

    ``propose`` returns None for a request whose block has not arrived; the engine then waits
    at most a fraction of a step on ``wait_for_blocks`` before leaving that request out.
    """

    def wait_for_blocks(self, timeout: float) -> None:
        """Return when a block has arrived, or after ``timeout`` seconds."""
        ...


class StatelessDrafter:
    """Base for drafters that keep nothing per request and need no features (scripted drafters).

    ``observe`` and ``release`` do nothing; a subclass writes ``name`` and ``propose``.
    """

    name = "base"
    feature_layers: tuple[int, ...] = ()

    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        return None

    def release(self, request_id: str) -> None:
        return None


def proposal_top_k(opts: dict, default: int = 8) -> int:
    """The ``proposal_top_k`` drafter option, validated: an integer >= 1.

    Sampled drafts travel with the top-k entries of the distribution they were drawn from, so
    the verifier can apply the exact acceptance rule.  A dense q over the whole vocabulary
    (k = 0) would put ~V floats per draft token on the wire and is refused.

    Example:
        >>> proposal_top_k({"proposal_top_k": "4"})
        4
    """
    from dspark.workers.drafters.registry import integer

    raw = opts.get("proposal_top_k", default)
    try:
        return integer(1)(raw)
    except ValueError as exc:
        raise ValueError(f"drafter option proposal_top_k must be {exc} (got {raw!r})") from None


def draft_generator(seq: Sequence, device: torch.device | str = "cpu") -> torch.Generator:
    """The drafter's own RNG for a request: seeded from the request seed when there is one.

    Drafting randomness never touches the verifier's stream, so a remote drafter and an
    in-process one behave alike, and the target-side sampling stays reproducible per seed.
    """
    g = torch.Generator(device=device)
    if seq.seed is not None:
        g.manual_seed((seq.seed * 1_000_003 + 0x5EED) % (2**63))
    else:
        g.seed()
    return g


class OnlineConfidence:
    """Per-request estimate of P(draft at position k accepted | positions < k accepted).

    For drafters without a confidence head (n-gram, draft model): counts of accepted / tried
    per block position with a Beta(prior_a, prior_b) prior, updated from what verification kept.
    """

    def __init__(self, prior_accept: float = 0.5, prior_weight: float = 2.0, horizon: int | None = None) -> None:
        self.a0 = prior_accept * prior_weight
        self.b0 = (1 - prior_accept) * prior_weight
        # horizon: a position's counts are halved whenever its tries reach it, so a long-lived
        # table (one per drafter, not per request) keeps following what it estimates.
        self.horizon = horizon
        self._tried: dict[str, list[float]] = {}
        self._accepted: dict[str, list[float]] = {}

    def update(self, request_id: str, num_verified: int, num_accepted: int) -> None:
        """Record one verified block: its first ``num_verified`` drafts were checked and the first
        ``num_accepted`` of them accepted.  Drafts the budget did not verify are not evidence
        either way and must not be passed in (they would count as rejections and, under an
        adaptive budget, pull the confidence down and the verified depth with it)."""
        num_accepted = min(num_accepted, num_verified)
        tried = self._tried.setdefault(request_id, [])
        acc = self._accepted.setdefault(request_id, [])
        # Position k was "tried" iff it was verified and all earlier ones were accepted.
        reached = min(num_verified, num_accepted + 1)
        while len(tried) < reached:
            tried.append(0)
            acc.append(0)
        for k in range(reached):
            tried[k] += 1
            if k < num_accepted:
                acc[k] += 1
            if self.horizon is not None and tried[k] >= self.horizon:
                tried[k] /= 2
                acc[k] /= 2

    def confidences(self, request_id: str, n: int, prior: list[float] | None = None) -> list[float]:
        """Posterior means for positions 0..n-1; ``prior``: per-position prior means replacing
        ``prior_accept`` (same weight), e.g. a lifetime table's estimates for a request's."""
        tried = self._tried.get(request_id, [])
        acc = self._accepted.get(request_id, [])
        w = self.a0 + self.b0
        out = []
        for k in range(n):
            t = tried[k] if k < len(tried) else 0
            a = acc[k] if k < len(acc) else 0
            a0 = self.a0 if prior is None else prior[k] * w
            out.append((a + a0) / (t + w))
        return out

    def release(self, request_id: str) -> None:
        self._tried.pop(request_id, None)
        self._accepted.pop(request_id, None)


def count_accepted(proposed: list[int], fed: list[int]) -> int:
    """Accepted drafts, from the proposal and the tokens the verifier kept (anchor first)."""
    n = 0
    for a, b in zip(proposed, fed[1:]):
        if a != b:
            break
        n += 1
    return n
