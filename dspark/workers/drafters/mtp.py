"""The ``mtp`` drafter: DeepSeek-V4's own MTP (next-n) layer, the V4 paper's MTP-1 baseline.

The layer (:mod:`dspark.models.deepseek_v4_mtp`) reads, for each position i, the target's
last-block hyper-connection streams h_i and the token t_{i+1}, and predicts t_{i+2}.  So the
drafter asks the verifier for one feature layer, the target's last block (its output streams,
[T, N * hidden]), and keeps per request one slot of the layer's own V4 state:

* ``observe`` (the tokens that just entered the target's cache, positions p..p+n-1, with their
  streams) queues those positions with the tokens that follow them, known by then
  (``seq.all_ids``; the last one is the new anchor).  The queue is run as one varlen pass of
  the layer over every request (at the next ``propose``, or sooner once it holds
  ``FLUSH_TOKENS``); the output at a request's last position is its first draft's
  distribution, kept with that position's output streams.
* ``propose``: draft 1 comes from the kept distribution; draft j > 1 runs the layer one more
  position, fed its own previous output streams and draft j - 1 (batched over requests).  Those
  positions are speculative: the next pass starts again at the first position the target has
  not confirmed, and the state rolls back by length (:mod:`deepseek_v4_state`).

Each draft is sampled from the top-``proposal_top_k`` truncated softmax of the layer's logits at
the request's temperature and that q is reported (greedy: argmax, one-hot q), so verification
stays exact.  Confidence: the layer's top probability at the position (it does not depend on
the drawn token, as the budget requires).

Options: depth=1 (drafts per block: 1 is MTP-1; more feed the layer its own output), proposal_top_k=8.
A target other than DeepSeek-V4, or a V4 checkpoint without ``mtp.0.*`` weights, is refused.
"""

from __future__ import annotations

import time

import torch

from dspark.kernels.sampling import sample_proposal
from dspark.models.deepseek_v4_mtp import DeepseekV4MTP, load_mtp
from dspark.models.kv_cache import make_batch
from dspark.workers.drafters.base import DraftBlock, draft_generator
from dspark.workers.drafters.registry import DraftContext, DrafterKind, DraftOption, integer, proposal_top_k_option
from dspark.workers.request import Sequence

FLUSH_TOKENS = 4096  # queued positions that trigger a pass before the next propose (bounds the queued streams)


class MTPDrafter:
    """V4's MTP layer drafting ``depth`` tokens per block (see the module docstring)."""

    name = "mtp"

    def __init__(self, mtp: DeepseekV4MTP, n_slots: int, max_seq: int, depth: int = 1, proposal_top_k: int = 8) -> None:
        if depth < 1 or proposal_top_k < 1:
            raise ValueError(f"mtp drafter: depth and proposal_top_k must be >= 1 (got {depth}, {proposal_top_k})")
        self.mtp = mtp
        self.depth, self.top_k = depth, proposal_top_k
        self.feature_layers = (mtp.target_cfg.num_hidden_layers - 1,)  # the streams of the target's last block
        self.state = mtp.make_state(n_slots, max_seq)
        self._slot: dict[str, int] = {}
        self._done: dict[str, int] = {}  # positions observed (run or queued) with the target's own streams
        # Per request, observed positions not yet run: (first position, streams [n, N, hidden], next tokens [n]).
        self._queue: dict[str, list[tuple[int, torch.Tensor, list[int]]]] = {}
        self._queued = 0
        # The last observed position's output streams [N, hidden] and logits [V]: draft 1's source.
        self._next: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._gens: dict[str, torch.Generator] = {}

    @property
    def device(self) -> torch.device:
        return self.mtp.device

    # -- context -------------------------------------------------------------------------------
    @torch.inference_mode()
    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        rid = seq.request_id
        if features is None or not token_ids:
            return
        if rid not in self._slot:
            self._slot[rid] = self.state.allocate()
            self._done[rid] = 0
        p, n = self._done[rid], len(token_ids)
        ids = seq.all_ids
        if ids[p : p + n] != list(token_ids) or len(ids) < p + n + 1 or p + n > self.state.max_seq:
            self._forget(rid)  # out of step with the target (or past the state): plain decoding from here
            return
        streams = features.to(self.device).view(n, self.mtp.n_streams, self.mtp.hidden)
        self._queue.setdefault(rid, []).append((p, streams, ids[p + 1 : p + n + 1]))
        self._queued += n
        self._done[rid] = p + n
        self._next.pop(rid, None)  # drafts wait for the pass over these positions
        if self._queued >= FLUSH_TOKENS:
            self._run_queue()

    def _run_queue(self) -> None:
        """One varlen pass of the layer over every request's queued positions."""
        if not self._queue:
            return
        rids = list(self._queue)
        slots, q_lens, streams, nxt = [], [], [], []
        for rid in rids:
            parts = self._queue[rid]
            slot = self._slot[rid]
            self.state.lengths[slot] = parts[0][0]  # back to the first unconfirmed position
            slots.append(slot)
            q_lens.append(sum(len(t) for _, _, t in parts))
            streams += [s for _, s, _ in parts]
            nxt += [tok for _, _, t in parts for tok in t]
        self._queue.clear()
        self._queued = 0
        batch = make_batch(self.state, slots, q_lens, 1)
        last = torch.tensor(q_lens, device=self.device).cumsum(0) - 1  # [B] each request's last row
        out, logits = self.mtp(torch.cat(streams), torch.tensor(nxt, device=self.device), self.state, batch, last)
        for b, rid in enumerate(rids):
            self._next[rid] = (out[last[b]], logits[b])

    def _forget(self, rid: str) -> None:
        slot = self._slot.pop(rid, None)
        if slot is not None:
            self.state.free(slot)
        self._done.pop(rid, None)
        self._next.pop(rid, None)
        parts = self._queue.pop(rid, None)
        self._queued -= sum(len(t) for _, _, t in parts or ())

    def release(self, request_id: str) -> None:
        self._forget(request_id)
        self._gens.pop(request_id, None)

    # -- drafting ------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        t0 = time.perf_counter()
        self._run_queue()
        out = [DraftBlock.empty() for _ in seqs]
        k = min(block_len, self.depth)
        ready = [i for i, s in enumerate(seqs)
                 if s.request_id in self._next and self._done[s.request_id] == s.num_cached
                 and s.num_cached + k <= self.state.max_seq]  # fmt: skip
        if k <= 0 or not ready:
            return out
        batch_seqs = [seqs[i] for i in ready]
        dev = self.device
        rids = [s.request_id for s in batch_seqs]
        slots = [self._slot[r] for r in rids]
        streams = torch.stack([self._next[r][0] for r in rids])  # [B, N, hidden]
        logits = torch.stack([self._next[r][1] for r in rids])  # [B, V]
        temps = torch.tensor([s.params.temperature for s in batch_seqs], device=dev)
        gens = [self._gens.setdefault(r, draft_generator(s)) for r, s in zip(rids, batch_seqs)]
        tokens, qs, q_ids, confs = [], [], [], []
        for j in range(k):
            if j > 0:  # one more position per request, fed the layer's own streams and the last draft
                for slot, s in zip(slots, batch_seqs):
                    self.state.lengths[slot] = s.num_cached + j - 1
                batch = make_batch(self.state, slots, [1] * len(slots), 1)
                streams, logits = self.mtp(streams, tokens[-1], self.state, batch)
            noise = torch.stack([torch.empty(self.top_k).exponential_(generator=g) for g in gens]).to(dev)
            tok, q, ids, _ = sample_proposal(logits, temps, self.top_k, noise)
            tokens.append(tok)
            qs.append(q)
            q_ids.append(ids)
            confs.append(torch.softmax(logits.float(), dim=-1).amax(dim=-1))
        tok_rows = torch.stack(tokens, dim=1).tolist()  # [B, k]
        conf_rows = torch.stack(confs, dim=1).tolist()
        seconds = (time.perf_counter() - t0) / len(batch_seqs)
        for b, (i, seq) in enumerate(zip(ready, batch_seqs)):
            greedy = seq.params.greedy  # a greedy draft is a one-hot proposal (probs None)
            out[i] = DraftBlock(
                token_ids=tok_rows[b],
                probs=None if greedy else torch.stack([q[b] for q in qs]),
                prob_ids=None if greedy else torch.stack([ids[b] for ids in q_ids]),
                confidence=conf_rows[b],
                draft_seconds=seconds,
            )
        return out


def make_mtp_drafter(ctx: DraftContext, opts: dict) -> MTPDrafter:
    """The drafter for the V4 target in ``ctx`` (its MTP layer read from the target's folder)."""
    from dspark.models.deepseek_v4 import DeepseekV4Transformer

    loaded = ctx.loaded
    if loaded is None or not isinstance(loaded.model, DeepseekV4Transformer):
        name = "no target" if loaded is None else type(loaded.model).__name__
        raise ValueError(f"drafter mtp needs a DeepSeek-V4 target (its checkpoint's MTP layer); got {name}")
    mtp = load_mtp(loaded.source, loaded.model)
    return MTPDrafter(mtp, ctx.runner.n_slots, ctx.runner.max_seq, depth=opts["depth"],
                      proposal_top_k=opts["proposal_top_k"])  # fmt: skip


KIND = DrafterKind(
    name="mtp",
    doc="DeepSeek-V4's own MTP (next-n) layer from the target checkpoint: the MTP-1 baseline (depth=1)",
    build=make_mtp_drafter,
    options=(
        DraftOption("depth", integer(1), 1, "drafts per block: 1 is MTP-1; more feed the layer its own output"),
        proposal_top_k_option(),
    ),
    remote=False,  # reads the target's last-block streams in the verifier's process
    needs_weights=True,
    takes_target_shard=True,  # load_mtp reads the whole embedding and LM head from the folder
)


__all__ = ["MTPDrafter", "make_mtp_drafter"]
