"""Request-level types shared by the engine, the drafters and the servers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dspark.models.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from dspark.workers.grammar import GrammarSpec

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20  # alternatives reported per token at most (OpenAI's chat limit)
MAX_N = 16  # sequences per request at most
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32, ~1.2e-38


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; validated at construction (bad input -> ValueError)."""

    max_tokens: int = 128  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # per-request RNG seed; None = fresh entropy
    stop: tuple[str, ...] = ()  # stop strings (not included in the output text)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the model's end-of-turn ids
    ignore_eos: bool = False  # keep going past end-of-turn tokens (benchmarks)
    speculative: bool = True  # False: plain decoding for this request (A/B comparisons)
    n: int = 1  # sequences sampled for the prompt (prefilled once); sequence i seeds with seed + i
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k best alternatives
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's (from the second on), with k alternatives
    grammar: GrammarSpec | None = None  # constrain the output (structured outputs); None: free text

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if not _finite(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be a number in [0, 100]")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_p < _FLOAT32_TINY:
            # Sampling runs in float32, where 1e-46 is 0 (an empty nucleus).  Any top_p below the
            # argmax's mass (>= 1/V) keeps the argmax alone, so this keeps the request's meaning.
            object.__setattr__(self, "top_p", _FLOAT32_TINY)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError("top_k must be a non-negative integer")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError("seed must be a non-negative 63-bit integer")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}]")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(f"prompt_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.grammar is not None:
            from dspark.workers.grammar import GrammarSpec  # lazily: its engine is imported on first use

            if not isinstance(self.grammar, GrammarSpec):
                raise ValueError("grammar must be a GrammarSpec")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SpecMetrics:
    """Speculative-decoding counters with vLLM's names and meaning.

    num_drafts: verification rounds that carried >= 1 draft token; num_draft_tokens: draft
    tokens verified; num_accepted_tokens: of those, accepted; accepted_per_pos[k]: accepted at
    block position k.  Mean acceptance length counts the bonus/recovered token too:
    1 + accepted / drafts (1.0 when nothing was drafted).
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    drafted_per_pos: list[int] = field(default_factory=list)

    def record(self, num_draft: int, num_accepted: int) -> None:
        if num_draft <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        for arr, n in ((self.accepted_per_pos, num_accepted), (self.drafted_per_pos, num_draft)):
            if len(arr) < num_draft:
                arr.extend([0] * (num_draft - len(arr)))
            for k in range(n):
                arr[k] += 1

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + (self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def to_dict(self) -> dict:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_pos": list(self.accepted_per_pos),
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
        }


@dataclass
class Sequence:
    """Engine-side state of one request.

    Invariant between steps: every token of ``prompt_ids + output_ids`` except the last is in the
    target KV cache (``num_cached`` of them); the last sampled token is the next step's input
    (the *anchor* of the next draft block).
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    slot: int = -1
    num_cached: int = 0
    num_reused: int = 0  # prompt tokens whose cache entries were copied, not computed (prefix reuse)
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    detok: IncrementalDetokenizer | None = None
    text: str = ""  # output text released so far (after stop-string truncation)
    held: str = ""  # decoded text held back because it may start a stop string
    draft_enabled: bool = True  # False: plain decoding for this request (e.g. its drafter is gone)
    wants_block: bool = True  # False: the next step decodes plainly, so no block need be drafted for it
    draft_len: int = 0  # drafts the next step's block needs (0: the drafter's block length)
    group_id: str = ""  # the client's request id, shared by the n sequences of one request ("" = request_id)
    index: int = 0  # which of the request's n sequences (the OpenAI choice index)
    followers: list["Sequence"] = field(default_factory=list)  # the other n - 1, while they share its prefill
    leader: "Sequence | None" = None  # the sequence whose prefill this one shares (until its prompt is cached)
    grammar: object | None = None  # its GrammarMatcher when the request constrains its output
    prompt_logprobs: list | None = None  # TokenLogprob of prompt tokens 1.. as prefill computes them

    def __post_init__(self) -> None:
        if not self.group_id:
            self.group_id = self.request_id

    @property
    def seed(self) -> int | None:
        """This sequence's seed: the request's plus its index among the n (None: unseeded)."""
        return None if self.params.seed is None else (self.params.seed + self.index) % 2**63

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token's log-probability under the distribution it was drawn from, and the best alternatives.

    ``top``: up to k (token id, log-probability) pairs, most likely first; a token that distribution
    excludes (top-k / top-p / grammar) has ``-inf`` (the APIs send -9999.0, as vLLM does).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """What one engine step produced for one of a request's sequences (``index`` of its n)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    metrics: SpecMetrics
    index: int = 0  # the sequence's index among the request's n (the OpenAI choice index)
    logprobs: list[TokenLogprob] | None = None  # one per new token when the request asked for logprobs
    # Set on a sequence's first output when the request asked for prompt logprobs: one per prompt
    # token, None for the first (nothing precedes it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


def make_detokenizer(tokenizer: Tokenizer | None) -> IncrementalDetokenizer | None:
    return IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
