"""What one engine step runs: one record per request, and the batch they make together.

A step feeds the target one flat batch: each request's tokens back to back, prefill chunks
first, then the decoding requests (anchor + the drafts it verifies).  ``Scheduled`` is one
request's part of it, from planning to the tokens the request keeps; ``StepPlan`` turns the
records into the runner's ``StepInput`` and the rejection sampler's ``RejectionInputs``, and
splits the target's per-token features back per request, so no caller keeps offsets into the
flat batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from dspark.kernels.rejection import greedy_verify, rejection_sample
from dspark.kernels.rejection_types import PLACEHOLDER_TOKEN_ID, RejectionInputs, RejectionOutput
from dspark.kernels.sampling import exponential_row, logits_to_probs, token_logprobs
from dspark.workers.drafters.base import DraftBlock
from dspark.workers.request import Sequence, TokenLogprob
from dspark.workers.runner import StepInput


@dataclass
class Scheduled:
    """One request's part of a step: the tokens it feeds the target and what came of them.

    A prefill feeds a prompt chunk and samples one token only when the chunk ends the prompt.
    A decoding request feeds its anchor and the drafts it verifies (none for a plain token) and
    samples from all 1 + len(drafts) of those rows.  Verification sets ``emitted``.
    """

    seq: Sequence
    tokens: list[int]  # fed to the target: a prompt chunk, or the anchor + the verified drafts
    prefill: bool
    samples: bool  # whether it samples this step
    drafts: list[int] = field(default_factory=list)  # the verified drafts; empty for a plain token
    block: DraftBlock | None = None  # their proposals; None: a prefill, or a step that did not draft
    emitted: list[int] | None = None  # accepted drafts + one recovered/bonus token, once verified
    allowed: torch.Tensor | None = None  # [num_rows, V_tok] bool: what its grammar allows at each sampled row
    logprobs: list[TokenLogprob] | None = None  # one per emitted token, when its request asks for them

    @classmethod
    def prefill_chunk(cls, seq: Sequence, chunk: list[int]) -> "Scheduled":
        ends_prompt = seq.num_cached + len(chunk) == len(seq.prompt_ids)
        return cls(seq, chunk, prefill=True, samples=ends_prompt)

    @classmethod
    def decode(cls, seq: Sequence, drafts: list[int], block: DraftBlock | None) -> "Scheduled":
        return cls(seq, [seq.last_token] + drafts, prefill=False, samples=True, drafts=drafts, block=block)

    @classmethod
    def follower(cls, seq: Sequence) -> "Scheduled":
        """One of a request's n sequences sampling its first token from its leader's last prompt row.

        It feeds no tokens: it follows its leader's entry in the plan and shares that entry's last
        logits row, and the engine then copies the leader's prompt cache into its slot.
        """
        return cls(seq, [], prefill=True, samples=True)

    @property
    def num_rows(self) -> int:
        """Logits rows it samples from: the last 1 + len(drafts) positions of its tokens, or none."""
        return 1 + len(self.drafts) if self.samples else 0

    @property
    def num_accepted(self) -> int:
        return len(self.emitted) - 1 if self.emitted else 0

    @property
    def kept(self) -> list[int]:
        """Its tokens that stay in the target cache: a whole prompt chunk, or the anchor + accepted drafts.

        The positions of rejected drafts are overwritten by a later step.
        """
        return self.tokens if self.prefill else self.tokens[: 1 + self.num_accepted]

    @property
    def num_verified(self) -> int | None:
        """Drafts of its block that verification checked; None when no block was verified."""
        return None if self.block is None else len(self.drafts)


@dataclass
class StepPlan:
    """The requests of one step in batch order: prefills, then decodes (logits rows follow it)."""

    entries: list[Scheduled]

    @property
    def num_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries)

    @property
    def has_prefill(self) -> bool:
        return any(e.prefill for e in self.entries)

    @property
    def decoding(self) -> list[Scheduled]:
        return [e for e in self.entries if not e.prefill]

    @property
    def sampling(self) -> list[Scheduled]:
        """The requests that sample this step, in logits-row order."""
        return [e for e in self.entries if e.samples]

    @property
    def fed(self) -> list[Scheduled]:
        """The entries that feed tokens (all but followers, which share their leader's row)."""
        return [e for e in self.entries if e.tokens]

    def prompt_rows(self) -> list[tuple[Scheduled, int]]:
        """Prefill chunks of requests that want prompt logprobs: (entry, rows it adds).

        A chunk's row i predicts prompt token i + 1 of the chunk; the prompt's last row is the
        sampling row already, so a chunk that ends the prompt adds one row fewer.
        """
        return [(e, len(e.tokens) - int(e.samples)) for e in self.entries
                if e.prefill and e.tokens and e.seq.params.prompt_logprobs is not None]

    def step_input(self, feature_layers: tuple[int, ...]) -> StepInput:
        tokens: list[int] = []
        rows: list[int] = []
        extra: list[int] = []  # prompt-logprob rows, after every sampling row
        for e in self.entries:
            tokens.extend(e.tokens)
            # A follower (no tokens) reads its leader's last row, the one just before it.
            rows.extend(range(len(tokens) - e.num_rows, len(tokens)) if e.tokens else [len(tokens) - 1])
            if e.prefill and e.tokens and e.seq.params.prompt_logprobs is not None:
                extra.extend(range(len(tokens) - len(e.tokens), len(tokens) - int(e.samples)))
        rows += extra
        fed = self.fed
        return StepInput(
            tokens,
            [e.seq.slot for e in fed],
            [e.seq.num_cached for e in fed],
            [len(e.tokens) for e in fed],
            rows,
            feature_layers,
        )

    def split_features(self, features: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The target's features [T, F] as one [len(tokens), F] view per request (or Nones)."""
        if features is None:
            return [None] * len(self.entries)
        return list(features.split([len(e.tokens) for e in self.entries]))

    def constrain(self, vocab: int) -> int:
        """Compute each grammar-constrained request's allowed tokens at every row it samples.

        Walks its drafts through its grammar tentatively (rolled back after): the mask of row j is
        the grammar's state after drafts 0..j-1.  The first draft the grammar forbids is still
        verified (the constrained target gives it probability 0, so it is rejected for certain and
        the recovered token comes from the residual max(0, p - q), as the rejection rule needs:
        sampling that position from p instead would favour what q also proposed); the drafts after
        it are cut, a choice that depends only on drafts before them, as every budget's must.
        Returns how many blocks had a draft the grammar forbids.
        """
        forbidden = 0
        for e in self.sampling:
            m = e.seq.grammar
            if m is None:
                continue
            allowed = torch.zeros(e.num_rows, vocab, dtype=torch.bool)  # [1 + drafts, V_tok]
            m.fill_mask(allowed[0])
            walked = 0  # drafts the grammar accepted
            keep = len(e.drafts)
            for d in e.drafts:
                if not (0 <= d < vocab and bool(allowed[walked, d])) or not m.accept(d):
                    keep = walked + 1  # verify the forbidden draft (rejected), nothing after it
                    forbidden += 1
                    allowed[walked + 1] = True  # the row after it: never sampled, any mask
                    break
                walked += 1
                if m.done:  # a stop token the grammar accepted: nothing after it is emitted
                    keep = walked
                    allowed[walked] = True
                    break
                m.fill_mask(allowed[walked])
            m.rollback(walked)
            if keep < len(e.drafts):
                e.drafts = e.drafts[:keep]
                e.tokens = e.tokens[: 1 + keep]
                allowed = allowed[: 1 + keep]
            e.allowed = allowed
        return forbidden

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits`` [R, V] with each grammar-constrained row's forbidden tokens at -inf.

        Verification and logprobs then see the target constrained by the grammar, so the output
        is distributed exactly as that constrained target's.
        """
        logits = logits.clone()  # the runner's output is an inference tensor: not writable in place
        o = 0
        for e in self.sampling:
            if e.allowed is not None:
                n, width = e.num_rows, e.allowed.shape[-1]
                rows = logits[o : o + n]  # [n, V] view
                rows[:, :width].masked_fill_(~e.allowed[:n].to(logits.device), float("-inf"))
                rows[:, width:] = float("-inf")  # ids past the tokenizer's vocabulary are never text
            o += e.num_rows
        return logits

    def fill_prompt_logprobs(self, logits: torch.Tensor) -> None:
        """Append to each prompt-logprob request's ``seq.prompt_logprobs`` the entries of this chunk.

        ``logits``: the rows after the sampling rows, in ``prompt_rows`` order; row i of a chunk
        gives the log-probability of the prompt token after it, under the request's processing.
        """
        o = 0
        for e, n in self.prompt_rows():
            if n:
                p = e.seq.params
                start = e.seq.num_cached  # the chunk's first position (before it is accepted)
                nxt = torch.tensor(e.seq.prompt_ids[start + 1 : start + 1 + n], dtype=torch.long, device=logits.device)
                chosen, top_v, top_i = token_logprobs(
                    logits[o : o + n],
                    torch.full((n,), p.temperature, device=logits.device),
                    torch.full((n,), p.top_k, device=logits.device),
                    torch.full((n,), p.top_p, device=logits.device),
                    nxt, p.prompt_logprobs)
                entries = [TokenLogprob(t, c, tuple(zip(ti[: p.prompt_logprobs], tv[: p.prompt_logprobs])))
                           for t, c, tv, ti in zip(nxt.tolist(), chosen.tolist(), top_v.tolist(), top_i.tolist())]
            else:
                entries = []
            if e.seq.prompt_logprobs is None:
                e.seq.prompt_logprobs = [None]  # the first prompt token: nothing precedes it
            e.seq.prompt_logprobs += entries
            o += n

    def fill_logprobs(self, logits: torch.Tensor) -> None:
        """Give each emitted token of the requests that ask for logprobs its log-probability.

        Row j of a request's rows is the distribution its j-th emitted token came from: an
        accepted draft, or the recovered / bonus token that ends what it emitted.
        """
        want, rows, ids = [], [], []
        o = 0
        for e in self.sampling:
            if e.seq.params.logprobs is not None and e.emitted:
                want.append(e)
                rows.extend(range(o, o + len(e.emitted)))
                ids.extend(e.emitted)
            o += e.num_rows
        if not want:
            return
        dev = logits.device
        params = [e.seq.params for e in want for _ in e.emitted]
        k = max(p.logprobs for p in params)
        chosen, top_v, top_i = token_logprobs(
            logits[torch.tensor(rows, device=dev)],
            torch.tensor([p.temperature for p in params], device=dev),
            torch.tensor([p.top_k for p in params], device=dev),
            torch.tensor([p.top_p for p in params], device=dev),
            torch.tensor(ids, dtype=torch.long, device=dev),
            k,
        )
        chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
        r = 0
        for e in want:
            kk = e.seq.params.logprobs
            e.logprobs = []
            for t in e.emitted:
                top = tuple(zip(top_i[r][:kk], top_v[r][:kk]))
                e.logprobs.append(TokenLogprob(t, chosen[r], top))
                r += 1

    def verify(self, logits: torch.Tensor) -> RejectionOutput:
        """Run the verification rule over the sampled rows ``logits`` [R, V] (batch order).

        A step whose requests are all greedy takes the greedy rule directly; any sampled
        request sends the whole step through the rejection sampler.
        """
        if all(e.seq.params.greedy for e in self.sampling):
            return greedy_verify(logits, [list(e.drafts) for e in self.sampling])
        return rejection_sample(self.rejection_inputs(logits))

    def rejection_inputs(self, logits: torch.Tensor) -> RejectionInputs:
        """The sampling requests' drafts, proposals and target rows in the sampler's flat layout.

        ``logits`` [R, V] holds the sampled rows in batch order (``step_input``'s rows).  Each
        sampled request draws its acceptance uniforms, then its recovery noise, from its own
        generator, so a seeded request samples the same whatever else shares the step; greedy
        requests draw nothing.
        """
        sampling = self.sampling
        dev = logits.device
        n_per = [len(e.drafts) for e in sampling]
        rows_per = [n + 1 for n in n_per]
        params = [e.seq.params for e in sampling]
        temp = torch.tensor([p.temperature for p, n in zip(params, rows_per) for _ in range(n)], device=dev)
        top_k = torch.tensor([p.top_k for p, n in zip(params, rows_per) for _ in range(n)], device=dev)
        top_p = torch.tensor([p.top_p for p, n in zip(params, rows_per) for _ in range(n)], device=dev)
        target_probs = logits_to_probs(logits, temp, top_k, top_p)  # [N + B, V]
        probs, prob_ids = _stack_proposals(sampling, dev)
        uniforms = torch.empty(int(sum(n_per)), device=dev)  # [N]
        noise = torch.ones(len(sampling), logits.shape[-1], device=dev)  # [B, V]
        o = 0
        for b, e in enumerate(sampling):
            d = e.drafts
            if not e.seq.params.greedy:
                if d:
                    uniforms[o : o + len(d)].uniform_(generator=e.seq.generator)
                exponential_row(noise[b], e.seq.generator)
            else:
                uniforms[o : o + len(d)] = 0.5
            o += len(d)
        return RejectionInputs(
            draft_token_ids=torch.tensor([t for e in sampling for t in e.drafts], dtype=torch.long, device=dev),
            cu_num_draft_tokens=torch.tensor(list(itertools.accumulate(n_per)), dtype=torch.long, device=dev),
            draft_probs=probs,
            draft_prob_ids=prob_ids,
            target_probs=target_probs,
            is_greedy=torch.tensor([p.greedy for p in params], device=dev),
            uniforms=uniforms,
            recovery_noise=noise,
        )

    def set_emitted(self, result: RejectionOutput) -> None:
        """Give each sampling request its row of the sampler's output, placeholders dropped."""
        for e, row in zip(self.sampling, result.output_token_ids.tolist()):
            e.emitted = [t for t in row if t != PLACEHOLDER_TOKEN_ID]


def _stack_proposals(sampling: list[Scheduled], dev) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Concatenate the blocks' proposal distributions into the sparse layout of the sampler.

    Blocks without probabilities (deterministic proposals) become one-hot entries, so one
    batch can mix drafters' conventions.  Returns (values [N, K], ids [N, K]) or (None, None)
    when every proposal is one-hot.
    """
    used = [(e.block, len(e.drafts)) for e in sampling if e.drafts]
    if not used or all(blk.probs is None for blk, _ in used):
        return None, None
    K = max(blk.probs.shape[-1] if blk.probs is not None else 1 for blk, _ in used)
    vals, ids = [], []
    for blk, n in used:
        if blk.probs is None:
            v = torch.zeros(n, K, device=dev)
            v[:, 0] = 1.0
            i = torch.zeros(n, K, dtype=torch.long, device=dev)
            i[:, 0] = torch.tensor(blk.token_ids[:n], device=dev)
        else:
            v = blk.probs[:n].to(dev, torch.float32)
            i = blk.prob_ids[:n].to(dev)
            if v.shape[-1] < K:
                pad = K - v.shape[-1]
                v = torch.cat([v, v.new_zeros(n, pad)], -1)
                i = torch.cat([i, i.new_zeros(n, pad)], -1)
        vals.append(v)
        ids.append(i)
    return torch.cat(vals), torch.cat(ids)
