"""The batched decoding engine: continuous batching, plain and speculative decoding.

One ``step()`` runs one target forward pass over a flattened variable-length batch that mixes
prefill chunks, plain decode tokens and verification blocks (anchor + draft tokens) of many
requests.  Every request then goes through the same rejection sampler: a request without drafts
simply samples its next token from the target (the "bonus" of an empty block), so plain and
speculative decoding share one code path for sampling, stop handling and metrics.

Drafting is pluggable (``dspark.workers.drafters``); how many of a block's tokens are verified
is a per-request variable chosen by a ``VerifyBudget`` (fixed depth by default; the
confidence-scheduled policies plug in there).  ``step()`` follows the paper's Algorithm 1:
draft, trim each block to what its request may still emit, survival and budget, one batched
verification, accept.  Each request's part of a step is one record (``step_plan.Scheduled``).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch

from dspark.models.tokenizer import Tokenizer
from dspark.models.kv_cache import KVCache
from dspark.workers.budget_policy import DepthAwareBudget, VerifyBudget, fixed_budget
from dspark.workers.drafters.base import AsyncDrafter, DraftBlock, Drafter, PrefixReusingDrafter, StepBatchingDrafter
from dspark.workers.prefix_cache import prefix_cache_for
from dspark.workers.request import RequestOutput, SamplingParams, Sequence, SpecMetrics, make_detokenizer
from dspark.workers.runner import StepInput
from dspark.workers.spec_gate import SpeculationGate
from dspark.workers.step_plan import Scheduled, StepPlan

# Steps a batch-size dip is bridged for when the speculation gate is asked (``Engine._gate_batch``).
# Under a closed loop a finished request is replaced two steps later, not one: the step after it
# finished and the step its successor prefills in both decode one request fewer (traced through
# the cluster at 4 requests).  Judged by their own size, both went by the 2-3 bucket, which had
# no plain steps of its own (a prefill step is not measured) and borrowed one-request figures, so
# the arrival step speculated: it waited for every block at once, emitted fewer tokens than a
# plain step, and cost a settling step each way.  At 16 requests (short answers, so one finishes
# every three steps or so) dips overlap: traced through the cluster, 12 to 15 requests decoded
# for up to 12 steps in a row with a step of 16 among them, and with a window of four steps the
# 8-15 bucket (measured in the slices' ramps and drains, where speculation leads) took some of
# them: single speculative steps among plain ones, each costing a settling step each way.
# Eight steps bridge those; a lasting change of load is judged by its own size eight steps
# later (half a second at 16 requests).  A dip's steps that fall into a smaller bucket are
# measured in that bucket, not the full batch's.  Charged to the full batch's bucket, their few
# requests' tokens read as that arm's slowness (traced through the cluster at 16 requests: plain
# steps of a dip ran at 221 tok/s against 284 for steps of 16, which made the arm that ran more
# dips look slower); left unmeasured, they starved the buckets a closed loop's ramp and drain
# pass through: at 64 requests, 3 of 23 speculative and 9 of 19 plain steps of 32-63 requests were
# measured in one level, and the gate speculated there at about 0.8x of plain decoding.
GATE_WINDOW = 8


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling knobs of one engine (one verifier group)."""

    max_batch: int = 32  # running requests at most (<= cache slots)
    max_prefill_tokens: int = 512  # prompt tokens fed per step, over all requests (chunked prefill)
    block_len: int = 4  # draft tokens requested per block (gamma)
    # Longest wait for in-flight remote blocks before a step starts; the late requests' share of
    # the last step bounds it first (Engine._draft).  At 16 requests through the cluster a step's
    # blocks took over 50 ms to come back (the worker drafts all sixteen at once), and a 50 ms cap
    # ran 9% of the steps for the one request whose block was there.
    max_block_wait_s: float = 0.2
    prefix_caching: bool = True  # reuse cached prompt prefixes (workers/prefix_cache.py)


class Runner(Protocol):
    device: torch.device
    cache: KVCache  # the target's KV cache (its slots and length bound the engine's)

    def forward(self, step: StepInput): ...

    def copy_prefix(self, src: int, dst: int, n: int) -> None: ...


class Engine:
    """Continuous batching over one runner: requests take cache slots, each step is one target forward.

    ``add_request`` queues a request, ``step`` runs one forward pass for the running requests
    (prefill chunks, plain decode tokens and verification blocks together) and returns what each
    produced, ``abort`` ends one.  With a ``drafter``, decoding requests get draft blocks,
    ``budget`` chooses how many drafts of each to verify and ``gate`` (optional) whether a step
    speculates at all; the output distribution is plain decoding's either way.  Not thread-safe:
    one thread drives it (``VerifierWorker`` in a server).
    """

    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer | None,
        cfg: EngineConfig = EngineConfig(),
        drafter: Drafter | None = None,
        budget: VerifyBudget = fixed_budget,
        n_slots: int | None = None,
        max_seq: int | None = None,
        gate: SpeculationGate | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.drafter = drafter
        self.budget = budget
        self.gate = gate  # None: always speculate when a drafter is configured
        self.gate_enabled = True  # False: the gate is set aside (a policy that turns it off); it keeps its counts
        # The batch size the gate judges a step by: the largest of the step's and the last
        # GATE_WINDOW steps', so a short dip (a finished request not yet replaced) keeps its bucket.
        self._gate_recent: deque[int] = deque(maxlen=GATE_WINDOW)  # empty when idle or the gate was set aside
        self._gate_size = 0  # the size the coming step was decided with (its record() uses it; 0: not asked)
        self.n_slots = n_slots or runner.cache.n_slots
        self.max_seq = max_seq or runner.cache.max_seq
        # Prefix reuse, with drafters that need no observe() of the reused tokens (not those that
        # read the target's features of every context token, nor remote ones fed by observe()).
        reuse = cfg.prefix_caching and (drafter is None or (isinstance(drafter, PrefixReusingDrafter)
                                                            and drafter.prefix_reuse))
        self.prefix = prefix_cache_for(runner, self.n_slots, enabled=reuse)  # by slot, or by block when paged
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.metrics = SpecMetrics()
        self.max_batch = min(cfg.max_batch, self.n_slots)  # the scheduler may lower it at run time
        self.last_draft_seconds = 0.0
        self.last_drafted_requests = 0
        self.last_draft_depth = 0  # drafts per block asked of the drafter at the last speculative step
        self.num_steps = 0
        self.last_step_tokens = 0
        self.last_step_seconds = 0.0
        self.grammar_seconds = 0.0  # time spent computing grammar masks (structured outputs)
        self.grammar_forbidden_blocks = 0  # verified blocks with a draft the grammar forbids (drafter unmasked)
        self._next_speculate: bool | None = None  # the gate's choice for the coming step, made after the last
        self._awaited_seconds = 0.0  # steps since the last forward that only waited for blocks (the gate's)
        # The last step's work after it was measured for the gate (the drafter hearing its tokens:
        # features copied, sent, the next blocks asked for): the next step's seconds carry it.
        self._tail_seconds = 0.0
        # (start, forward + drafting seconds, decoding requests) of the last forward step, for
        # the budget's per-step overhead; None after idling.
        self._loop_mark: tuple[float, float, int] | None = None
        self._ids = itertools.count()
        self.stop_ids = tokenizer.stop_token_ids if tokenizer is not None else frozenset()
        self._grammars = None  # GrammarCompiler, made on the first constrained request
        self._grammar_lock = threading.Lock()  # validate() compiles on the caller's thread

    # What the drafter and the budget can do, checked once per assignment: ``isinstance`` against
    # a runtime-checkable protocol inspects the object's members each time (10-40 us here), and
    # the step loop asks up to four times a step.
    @property
    def drafter(self) -> Drafter | None:
        return self._drafter

    @drafter.setter
    def drafter(self, drafter: Drafter | None) -> None:
        self._drafter = drafter
        self._async_drafter = isinstance(drafter, AsyncDrafter)
        self._batching_drafter = isinstance(drafter, StepBatchingDrafter)

    @property
    def budget(self) -> VerifyBudget:
        return self._budget

    @budget.setter
    def budget(self, budget: VerifyBudget) -> None:
        self._budget = budget
        self._depth_aware = isinstance(budget, DepthAwareBudget)

    @property
    def grammars(self):
        """The grammar compiler of structured outputs (its engine is imported on first use)."""
        with self._grammar_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer")
                from dspark.workers.grammar import GrammarCompiler

                self._grammars = GrammarCompiler(self.tokenizer, self.tokenizer.vocab_size, self.stop_ids)
            return self._grammars

    def _matcher(self, params: SamplingParams):
        """A fresh grammar state for a constrained request (compiled once per grammar, cached)."""
        compiler = self.grammars
        with self._grammar_lock:
            return compiler.matcher(params.grammar)

    # -- request management -----------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request this engine cannot serve (no state is touched)."""
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be SamplingParams")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.tokenizer.vocab_size if self.tokenizer is not None else None
        if vocab is not None and any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise ValueError("prompt token id out of the vocabulary")
        limit = self.max_context
        if len(prompt_ids) >= limit:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model serves at most {limit - 1}")
        most = min(self.cfg.max_batch, self.n_slots)
        if params.n > most:
            raise ValueError(f"n is {params.n}; this server runs at most {most} sequences at once")
        if params.grammar is not None:
            self._matcher(params)  # compiles (and caches) the grammar: a bad one fails here, not mid-step

    @property
    def max_context(self) -> int:
        """Longest prompt + output a request may reach (one draft block of headroom kept)."""
        return self.max_seq - self.cfg.block_len - 1

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Queue a request; with ``params.n`` > 1 its other sequences follow the returned one.

        Sequence i of n (``index``) seeds its generator with ``seed + i`` (a seeded request is
        reproducible and its sequences differ); sequences 1..n-1 share the first one's prefill
        (``leader``/``followers``) and have request ids ``<request_id>#<i>``.
        """
        self.validate(prompt_ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seqs = []
        for i in range(params.n):
            seqs.append(Sequence(
                request_id=rid if i == 0 else f"{rid}#{i}",
                prompt_ids=list(prompt_ids),
                params=params,
                generator=torch.Generator(device=self.runner.device),
                detok=make_detokenizer(self.tokenizer),
                draft_enabled=params.speculative,
                group_id=rid,
                index=i,
                grammar=self._matcher(params) if params.grammar is not None else None,
            ))
        for seq in seqs:
            seq.generator.manual_seed(seq.seed if seq.seed is not None else random.getrandbits(63))
        leader = seqs[0]
        leader.followers = seqs[1:]
        for f in leader.followers:
            f.leader = leader
        self.waiting.append(leader)
        return leader

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """End every sequence of the request ``request_id`` (its group id)."""
        found = False
        for q in (self.waiting, self.running):
            for s in list(q):
                if s.group_id == request_id:
                    for f in s.followers:  # still waiting with their leader, or shadowing its prefill
                        self._finish(f, reason)
                    self._finish(s, reason)
                    found = True
        return found

    def cache_stats(self) -> dict:
        """Prefix reuse counters and how full the KV cache is (positions held by running requests)."""
        held = sum(s.num_cached for s in self.running)
        return {**self.prefix.stats(), "kv_cache_usage": held / (self.n_slots * self.max_seq),
                "kv_cache_slots_in_use": len(self.running), **self.grammar_stats()}

    def speculation_stats(self) -> dict:
        """Whether steps speculate (the gate's choices; with no gate every step with a drafter
        speculates), how deep the last blocks were drafted, and the gate's measured tokens per
        second of each arm per batch-size range."""
        g = self.gate
        return {"speculative_steps": g.speculative_steps if g is not None else 0,
                "plain_steps": g.plain_steps if g is not None else 0,
                "draft_depth": self.last_draft_depth,
                "gate_rates": g.rates_by_batch() if g is not None else {}}

    def grammar_stats(self) -> dict:
        """Structured outputs: time spent computing grammar masks and how many (zeros before any)."""
        g = self._grammars
        return {"grammar_mask_seconds": g.mask_seconds if g is not None else 0.0,
                "grammar_masks": g.masks if g is not None else 0,
                "grammar_forbidden_blocks": self.grammar_forbidden_blocks}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_active(self) -> int:
        return len(self.running)

    def _admit(self) -> None:
        """Give waiting requests cache slots, first come first served; a request's n sequences enter together."""
        while self.waiting:
            seq = self.waiting[0]
            n = 1 + len(seq.followers)
            # A group larger than the scheduler's current batch limit still enters an idle engine.
            if self.prefix.num_free < n or (self.running and len(self.running) + n > self.max_batch):
                return
            self.waiting.pop(0)
            # Prompt logprobs need every prompt row computed: such a request reuses no prefix.
            reuse = self.prefix.allocate(seq.prompt_ids if seq.params.prompt_logprobs is None else [])
            seq.slot = reuse.slot
            if reuse.tokens and reuse.source != reuse.slot:
                self.runner.copy_prefix(reuse.source, reuse.slot, reuse.tokens)
            seq.num_cached = reuse.tokens
            seq.num_reused = reuse.tokens
            self.running.append(seq)
            for f in seq.followers:  # an empty slot each: the leader's prompt is copied in once computed
                f.slot = self.prefix.allocate([]).slot
                self.running.append(f)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            self.prefix.release(seq.slot, seq.all_ids[: seq.num_cached])
            seq.slot = -1
        if seq.leader is not None and seq in seq.leader.followers:
            seq.leader.followers.remove(seq)
        if self.drafter is not None:
            self.drafter.release(seq.request_id)

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one target forward for the running requests; returns an output per request that sampled.

        The decoding requests go through the paper's Algorithm 1 around one batched forward:
        draft a block each, trim each block to what its request may still emit, let the budget
        choose each verified prefix from the drafts' survivals, verify every block (with the
        prefill chunks) in one forward pass and one rejection-sampling pass, then accept.
        """
        if not self.running:
            self._loop_mark = None  # the engine idled since its last step: that is no step's overhead
            self._tail_seconds = 0.0
        self._admit()
        if not self.running:
            self._gate_recent.clear()  # idle: the next batch is judged by its own size
            return []
        t0 = time.perf_counter()
        prefill, decode = self._partition()
        # A step in which no request drafts (all have speculation off, or no room left for a draft)
        # is no choice of the gate's and no step it measures: counted as speculative, such steps
        # gave the speculative arm plain decoding's speed (traced through the cluster: 481 of 713
        # steps of plain requests).
        gated = any(map(self._wants_drafts, decode))
        speculate, n_decode = self._speculate(decode, gated), len(decode)  # the gate counts late blocks' requests

        # 1. Draft: one block per decoding request; None when this step does not speculate.
        blocks = self._draft(decode, bool(prefill)) if speculate else None
        verify_lens: list[int] = []
        if blocks is not None:
            decode, blocks = self._without_late_blocks(decode, blocks)
            if not prefill and not decode:
                return self._await_blocks(t0)
            # 2. Trim: max_tokens and cache room, so the budget costs only drafts that can be verified.
            blocks = [b.prefix(self._draft_room(s)) for s, b in zip(decode, blocks)]
            # 3. Survival -> budget: how many drafts of each block to verify (AdaptiveBudget forms
            #    the survivals a_rj = prod_{i<=j} c_ri from the confidences and runs Algorithm 1).
            verify_lens = self.budget(blocks, self.cfg.block_len) if blocks else []
            self._report_drafting()

        # 4. Batched verify: one target forward over every request's tokens, one rejection pass.
        plan = self._plan(prefill, decode, blocks, verify_lens)
        constrained = any(e.seq.grammar is not None for e in plan.sampling)
        if constrained:
            t_mask = time.perf_counter()
            self.grammar_forbidden_blocks += plan.constrain(self.tokenizer.vocab_size)  # cuts after a forbidden draft
            self.grammar_seconds += time.perf_counter() - t_mask
        feature_layers = self.drafter.feature_layers if self.drafter is not None else ()
        t_fwd = time.perf_counter()
        out = self.runner.forward(plan.step_input(feature_layers))
        fwd_seconds = time.perf_counter() - t_fwd
        self._report_step(plan.num_tokens, fwd_seconds, None if plan.has_prefill else len(plan.fed))
        n_rows = sum(e.num_rows for e in plan.sampling)
        if out.logits is not None and n_rows < out.logits.shape[0]:
            plan.fill_prompt_logprobs(out.logits[n_rows:])  # the rows after the sampling ones
        if plan.sampling:
            logits = out.logits[:n_rows]  # [R, V]
            logits = plan.mask_logits(logits) if constrained else logits
            plan.set_emitted(plan.verify(logits))
            plan.fill_logprobs(logits)

        # 5. Accept: each request keeps its accepted tokens and appends what it emitted.
        self._copy_to_followers(plan)
        outputs = [o for o in map(self._accept, plan.entries) if o is not None]
        self.num_steps += 1
        self.last_step_tokens = plan.num_tokens
        self.last_step_seconds = time.perf_counter() - t0
        self._report_overhead(t0)
        drafted = self.last_draft_seconds if blocks is not None and self.last_drafted_requests else 0.0
        self._loop_mark = (t0, fwd_seconds + drafted, len(decode))
        gate = self._gate()
        if gate is not None and gated:  # waits for blocks are the speculative arm's; see the gate
            # A step of a dip into a smaller bucket than the size it was judged by is measured in
            # the bucket of the batch it ran, not the one that chose its arm (see GATE_WINDOW).
            size = self._gate_size or n_decode
            if gate.bucket(n_decode) < gate.bucket(size):
                size = n_decode
            emitted = sum(len(e.emitted) for e in plan.decoding)
            gate.record(size, speculate and self.drafter is not None, emitted,
                        self.last_step_seconds + self._awaited_seconds + self._tail_seconds,
                        measured=not plan.has_prefill)
        self._awaited_seconds = 0.0
        t_tail = time.perf_counter()
        # The size the next step is judged by starts from this step's (0 while the gate is set aside).
        self._gate_size = 0
        if gate is not None:
            self._gate_recent.append(n_decode)
        else:
            self._gate_recent.clear()
        # The next step's arm is chosen before the drafter hears this step's tokens: a remote
        # drafter reads seq.wants_block then, to draft only ahead of a speculative step.
        self._choose_next()
        for e, feats in zip(plan.entries, plan.split_features(out.features)):
            self._observe(e, feats)
        if self._batching_drafter:
            self.drafter.flush_steps()
        for e in plan.entries:
            if e.seq.leader is not None and not e.tokens:  # a follower with its prompt cached: on its own now
                if e.seq in e.seq.leader.followers:
                    e.seq.leader.followers.remove(e.seq)
                e.seq.leader = None
        # Nothing while the gate is set aside: the next step's arm was not chosen before this work
        # (every request was told to draft), so it belongs to neither arm.
        self._tail_seconds = time.perf_counter() - t_tail if gate is not None else 0.0
        return outputs

    @staticmethod
    def _plan(
        prefill: list[tuple[Sequence, list[int]]],
        decode: list[Sequence],
        blocks: list[DraftBlock] | None,
        verify_lens: list[int],
    ) -> StepPlan:
        """Prefill chunks first, then each decoding request with the drafts it verifies."""
        entries = []
        for seq, chunk in prefill:
            entries.append(Scheduled.prefill_chunk(seq, chunk))
            if entries[-1].samples:  # the prompt's last chunk: its followers sample from the same row
                entries += [Scheduled.follower(f) for f in seq.followers]
        if blocks is None:  # a plain step: each request feeds its anchor alone
            entries += [Scheduled.decode(seq, [], None) for seq in decode]
        else:
            entries += [Scheduled.decode(s, b.token_ids[:n], b) for s, b, n in zip(decode, blocks, verify_lens)]
        return StepPlan(entries)

    def _without_late_blocks(
        self, decode: list[Sequence], blocks: list[DraftBlock | None]
    ) -> tuple[list[Sequence], list[DraftBlock]]:
        """The requests whose blocks are here, with their blocks.

        A remote drafter may not have a request's block yet: that request sits this step out
        instead of stalling everybody else (the verifier never waits on one drafter).
        """
        ready = [i for i, b in enumerate(blocks) if b is not None]
        return [decode[i] for i in ready], [blocks[i] for i in ready]

    def _await_blocks(self, t0: float) -> list[RequestOutput]:
        """The step when every decoding request's block is still in flight and nothing else runs.

        No forward pass: wait briefly for a block, keep speculating next step (the gate is not
        asked again) and add the time to the next forward step's, which the gate measures.
        """
        self._next_speculate = True
        if self._async_drafter:
            self.drafter.wait_for_blocks(0.05)
        self._awaited_seconds += time.perf_counter() - t0
        return []

    def _accept(self, e: Scheduled) -> RequestOutput | None:
        """Advance the request's cache over the tokens it keeps and append what it emitted."""
        if not e.tokens:  # a follower: its prompt was copied in by _copy_to_followers
            e.seq.prompt_logprobs = e.seq.leader.prompt_logprobs
            return self._append(e.seq, e.emitted, 0, 0, e.logprobs)
        before = e.seq.num_cached
        e.seq.num_cached += len(e.kept)
        if before < len(e.seq.prompt_ids) <= e.seq.num_cached:  # its prompt is cached: others may reuse it
            self.prefix.index(e.seq.slot, e.seq.prompt_ids)
        if e.emitted is None:  # a prompt chunk before the last: nothing sampled yet
            return None
        return self._append(e.seq, e.emitted, len(e.drafts), e.num_accepted, e.logprobs)

    def _speculate(self, decode: list[Sequence], gated: bool) -> bool:
        """Whether this step drafts: the choice made at the end of the last step, else the gate's now.

        The gate sees only past steps, so whether a step speculates never depends on its drafts.
        ``gated``: some decoding request drafts (else the gate is not asked).
        """
        chosen, self._next_speculate = self._next_speculate, None
        gate = self._gate()
        if gate is None or not decode:
            return True
        if not gated:
            return False
        return chosen if chosen is not None else gate.speculate(self._gate_batch(len(decode)))

    def _gate_batch(self, n: int) -> int:
        """The batch size the gate decides the coming step by: the largest of ``n`` and the
        decoding requests of the last ``GATE_WINDOW`` steps the gate was in force for (see
        ``_gate_size``)."""
        self._gate_size = max([n, *self._gate_recent])
        return self._gate_size

    def _gate(self) -> SpeculationGate | None:
        """The speculation gate in force: None without one or while a policy sets it aside."""
        return self.gate if self.gate_enabled else None

    def _choose_next(self) -> None:
        """Ask the gate now about the next step, and tell each request whether a block is wanted.

        A remote drafter reads ``seq.wants_block`` and ``seq.draft_len`` when it is told the step's
        tokens: for a plain next step, or a request with no draft left to verify, it keeps them and
        drafts nothing, instead of drafting a block nobody verifies, and it drafts no deeper than
        the budget will verify.  Every request of a step is asked for the same depth, so the
        worker drafts them in one batch (it drafts each block length apart); the step trims each
        block to what its request may still emit (``step``).
        """
        if self.drafter is None:
            return
        nxt = [s for s in self.running if not s.finished and s.num_cached >= len(s.prompt_ids)]
        if not nxt:
            return
        gate = self._gate()
        if gate is not None and any(map(self._wants_drafts, nxt)):
            self._next_speculate = gate.speculate(self._gate_batch(len(nxt)))
        depth = self._draft_depth()
        for s in nxt:
            # A request with no draft left to verify (its last token, or a full cache) drafts
            # nothing next step: the worker used to draft it a block anyway, for nobody.
            room = self._draft_room(s) if s.draft_enabled else 0
            s.wants_block = self._next_speculate is not False and room > 0
            # Not min(depth, room): a request near its end asked for fewer drafts was a second
            # batch on the worker, which drafts each block length apart (at sixty-four requests
            # through the cluster most steps had one such request).
            s.draft_len = depth

    def _copy_to_followers(self, plan: StepPlan) -> None:
        """Copy each prompt that a leader finished caching this step into its followers' slots.

        Runs before any request of the step is accepted (a leader that finishes at its first token
        frees its slot then).
        """
        for e in plan.entries:
            if not e.tokens:
                leader, n = e.seq.leader, len(e.seq.prompt_ids)
                self.runner.copy_prefix(leader.slot, e.seq.slot, n)
                e.seq.num_cached = n
                self.prefix.index(e.seq.slot, e.seq.prompt_ids)

    def _observe(self, e: Scheduled, feats: torch.Tensor | None) -> None:
        """Tell the drafter which tokens entered the target cache (after the new anchor is known).

        ``feats``: the target's features for the request's tokens this step, [len(e.tokens), F].
        """
        if self.drafter is None or not e.tokens:
            return  # a follower's prompt was observed with its leader's
        kept = e.kept
        feats = None if feats is None else feats[: len(kept)]
        # A request that never drafts (``speculative: false``, or its drafter gone) is not shown to
        # the drafter: a remote one would otherwise draft a block for it every step, on cores the
        # verifier may share, and receive its features for nothing.  The leader goes first, so a
        # drafter that places requests in order of arrival (``RemoteDrafter``'s local drafting)
        # sees an n-request's sequences in their own order.
        if not e.seq.finished and e.seq.draft_enabled:
            self.drafter.observe(e.seq, kept, feats, e.num_verified)
        for f in e.seq.followers if e.prefill else ():  # they share this prefill: same tokens and features
            if not f.finished and f.draft_enabled:
                self.drafter.observe(f, kept, feats, None)

    def _partition(self) -> tuple[list[tuple[Sequence, list[int]]], list[Sequence]]:
        prefill, decode = [], []
        budget = self.cfg.max_prefill_tokens
        for seq in self.running:
            if seq.leader is not None:
                continue  # shares its leader's prefill
            if seq.num_cached < len(seq.prompt_ids):
                if budget <= 0:
                    continue  # waits for the next step's prefill budget
                chunk = seq.prompt_ids[seq.num_cached : seq.num_cached + budget]
                budget -= len(chunk)
                prefill.append((seq, chunk))
            else:
                decode.append(seq)
        return prefill, decode

    def _wants_drafts(self, seq: Sequence) -> bool:
        """The request drafts and may still verify a draft."""
        return seq.draft_enabled and self._draft_room(seq) > 0

    def _draft_room(self, seq: Sequence) -> int:
        """Draft tokens this request may still verify (output and cache limits)."""
        left_out = seq.params.max_tokens - len(seq.output_ids) - 1
        left_cache = self.max_seq - seq.num_cached - 1
        return max(0, min(left_out, left_cache))

    def _draft(self, decode: list[Sequence], has_prefill: bool = False) -> list[DraftBlock | None] | None:
        """One block per decoding request (None: still in flight); None when nothing can draft.
        ``has_prefill``: the step runs a prompt chunk whatever the blocks do."""
        if self.drafter is None or not decode or self.cfg.block_len <= 0:
            return None
        want = [s for s in decode if self._wants_drafts(s)]
        self.last_drafted_requests = len(want)
        if not want:
            self.last_draft_seconds = 0.0
            return [DraftBlock.empty() for _ in decode]
        t0 = time.perf_counter()
        depth = self.last_draft_depth = self._draft_depth()
        proposed = dict(zip((s.request_id for s in want), self.drafter.propose(want, depth)))
        late = [s for s in want if proposed[s.request_id] is None]
        if late and (len(late) < len(decode) or has_prefill) and self._async_drafter:
            # Blocks still in flight usually land within a fraction of a step; waiting that long
            # beats making those requests sit a whole step out.  With none here, a step that runs
            # something anyway waits too (one that would run nothing waits in ``_await_blocks``):
            # a new request's prompt chunk used to go alone while every block sat in flight,
            # drafted at once on the worker, so every decoding request sat that step out (through
            # the cluster at four requests, 10-13 such steps in each 11-second slice, 9% of its
            # time, 0 tokens); so did a request that drafts nothing this step (its last token, or
            # speculation off), 6% of the steps at four requests, each a full step for one token.
            # The wait is bounded by the late requests' share of the last step: a late request
            # sitting out loses a step, the others lose what the step waits, so waiting pays
            # while it is shorter than a step times late over waiting-for requests; this bound
            # is the smaller.  (A quarter of a step, whatever the share, let 9% of the steps at
            # four requests run one request's last token while three blocks drafted together
            # landed a few milliseconds into the step.)
            share = len(late) / len(decode)
            deadline = t0 + min(self.cfg.max_block_wait_s, share * self.last_step_seconds)
            while late and time.perf_counter() < deadline:
                self.drafter.wait_for_blocks(max(0.0, deadline - time.perf_counter()))
                again = self.drafter.propose(late, depth)
                for seq, blk in zip(late, again):
                    proposed[seq.request_id] = blk
                late = [s for s in late if proposed[s.request_id] is None]
        self.last_draft_seconds = time.perf_counter() - t0
        return [proposed.get(s.request_id, DraftBlock.empty()) for s in decode]

    def _report_step(self, num_tokens: int, seconds: float, num_requests: int | None) -> None:
        """Tell a budget that corrects its step costs by real steps what this forward took
        (``num_requests``: the decoding requests it fed; None when it ran a prompt chunk)."""
        observe = getattr(self.budget, "observe_step", None)
        if observe is not None:
            observe(num_tokens, seconds, num_requests)

    # Time outside forward and drafting beyond this many times the step's own forward and
    # drafting (and beyond STALL_FLOOR_S) is taken for a stall of the host, not the step's work.
    STALL_FACTOR = 4.0
    STALL_FLOOR_S = 0.1

    def _report_overhead(self, t0: float) -> None:
        """Tell a budget that counts it what the last forward step cost beyond its forward pass
        and drafting: the time from its start to this step's (``t0``) less those and the waits for
        blocks in between.  Not after the engine idled (``step`` drops the mark when it finds no
        request running), nor a stall (see ``STALL_FACTOR``)."""
        observe = getattr(self.budget, "observe_overhead", None)
        mark = self._loop_mark
        if observe is None or mark is None or not mark[2]:
            return
        start, accounted, n_decode = mark
        over = (t0 - start) - accounted - self._awaited_seconds
        if 0.0 <= over <= max(self.STALL_FACTOR * accounted, self.STALL_FLOOR_S):
            observe(n_decode, over)

    def _report_drafting(self) -> None:
        """Tell a budget that weighs drafting what this step's drafting cost the verifier, after
        it chose this step's verification (so no choice ever depends on its own drafts, even
        through their timing).  Drafting in this process adds its own time to the step.  A remote
        drafter's costs what the verifier waited for its blocks: the steps that only waited and
        the wait inside this one.  Under load its drafting overlaps the other requests' steps and
        that is about nothing; at one request the next block needs this step's tokens, so the
        verifier waits for the whole round trip, which the budget must count as it counts
        in-process drafting, or it takes each verified draft for dearer than it is."""
        observe = getattr(self.budget, "observe_drafting", None)
        if observe is not None and self.last_drafted_requests:
            waited = self._awaited_seconds if self._async_drafter else 0.0
            observe(self.last_drafted_requests, self.last_draft_seconds + waited)

    def _draft_depth(self) -> int:
        """Drafts per block for the coming step: the block length, or less when the budget would
        verify no deeper (it decides from past steps only)."""
        if self._depth_aware:
            return max(1, min(self.cfg.block_len, self.budget.draft_depth(self.cfg.block_len)))
        return self.cfg.block_len

    def _append(
        self, seq: Sequence, emitted: list[int], n_draft: int, n_accepted: int, logprobs: list | None = None
    ) -> RequestOutput:
        """Append verified tokens one at a time, applying stop tokens, max_tokens and stop strings.

        Every check runs after each token, exactly as plain decoding (one token per step) runs
        it, so a block ends where plain decoding would have: at the first token that is a stop
        token, reaches a length limit or completes a stop string; the tokens after it are
        dropped (the request finishes, so the cache positions they took are never read).
        """
        seq.metrics.record(n_draft, n_accepted)
        self.metrics.record(n_draft, n_accepted)
        new: list[int] = []
        delta = ""
        reason = None
        stops = () if seq.params.ignore_eos else self.stop_ids
        for t in emitted:
            new.append(t)
            seq.output_ids.append(t)
            if seq.grammar is not None and not seq.grammar.done and not seq.grammar.accept(t):
                raise RuntimeError(f"request {seq.request_id}: token {t} breaks its grammar")  # a masking bug
            if t in stops or t in seq.params.stop_token_ids:
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens:
                reason = "length"
            elif seq.num_tokens + 1 + self.cfg.block_len > self.max_seq:
                reason = "length"  # the cache cannot hold another block
            if seq.detok is not None:
                piece = seq.detok.push(t)
                if reason is not None:
                    piece += seq.detok.flush()
                out, hit = self._release_text(seq, piece, final=reason is not None)
                delta += out
                if hit:
                    reason = "stop"
            if reason is not None:
                break
        seq.text += delta
        if reason is not None:
            self._finish(seq, reason)
        return RequestOutput(
            request_id=seq.group_id,
            index=seq.index,
            logprobs=None if logprobs is None else logprobs[: len(new)],
            prompt_logprobs=seq.prompt_logprobs if len(seq.output_ids) == len(new) else None,  # first output
            new_token_ids=new,
            text_delta=delta,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=len(seq.output_ids),
            metrics=seq.metrics,
        )

    @staticmethod
    def _release_text(seq: Sequence, piece: str, final: bool) -> tuple[str, bool]:
        """Text that may be sent now, and whether a stop string was hit.

        Called once per token with that token's text, so the first stop string found is the
        one completed earliest (as in plain decoding); when one token completes several, the
        text is cut at the start of the earliest.  Text that could be the beginning of a stop
        string is held back until it is known not to be one, so a client never receives part
        of a stop string.
        """
        stops = seq.params.stop
        if not stops:
            return piece, False
        seq.held += piece
        cut = min((i for i in (seq.held.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            out, seq.held = seq.held[:cut], ""
            return out, True
        if final:
            out, seq.held = seq.held, ""
            return out, False
        # Keep the longest suffix of the held text that is a proper prefix of a stop string.
        keep = 0
        for s in stops:
            for n in range(min(len(s) - 1, len(seq.held)), keep, -1):
                if seq.held.endswith(s[:n]):
                    keep = n
                    break
        out = seq.held[: len(seq.held) - keep]
        seq.held = seq.held[len(seq.held) - keep :]
        return out, False

    # -- convenience --------------------------------------------------------------------------
    def run_until_done(self, on_output: Callable[[RequestOutput], None] | None = None) -> None:
        while self.has_work:
            for o in self.step():
                if on_output is not None:
                    on_output(o)

    def generate(self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run a batch of prompts to completion (continuous batching inside)."""
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        self.run_until_done()
        return seqs

