"""The ``eagle3`` drafter: DeepSpec's EAGLE-3 checkpoints, drafting one token at a time.

EAGLE-3 (Li et al., 2025) drafts autoregressively with one decoder layer whose input at each
position is the embedding of a token next to a hidden state: for the accepted context, the
target's features (several target layers' outputs concatenated and projected by ``fc``); for the
drafted positions, the draft layer's own previous output (``dspark.models.eagle3_format`` has
the format and the math).

Per request the drafter keeps the keys/values of the accepted context in a slot of its own KV
cache.  ``observe`` projects the target features of the tokens that entered the target's cache;
``propose`` first writes the keys/values of those positions (feature i goes with token i + 1, so
a position is written once the token after it is known: the anchor for the last one), then drafts
every ready request together: step k runs the layer at position c - 1 + k (c = cached tokens)
over the cached context and the block's own earlier positions, whose keys/values live only for
the block (rejected drafts leave nothing behind).

Proposals: each draft d_k is sampled from q_k = softmax(logits_k / T) truncated to its top
``proposal_top_k`` entries and renormalised (greedy: the argmax, q one-hot); q_k is exactly the
law d_k was drawn from, so rejection sampling stays exact.  With a reduced draft vocabulary
(``draft_vocab_size`` with ``d2t``) the columns map to vocabulary ids and q is zero elsewhere.

Confidences (what the verification budget reads): the largest probability of the draft's law
at each position, max softmax(logits_k / T) over its whole vocabulary before truncation (T = 1
for greedy requests, where it is the drafted token's); the budget forms survival products of
them.  Not the drawn token's own probability: a budget that verified likely draws and dropped
unlikely ones would bias the output towards the draft's mode.

Under a grammar (structured outputs) drafts are not masked: the engine cuts a block after a draft
the grammar forbids, so output is unchanged.  Options: head=PATH (a DeepSpec EAGLE-3 folder,
Qwen3Eagle3Model or, for a Gemma 4 target, Gemma4Eagle3Model; required), proposal_top_k=8.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dspark.kernels.markov import masked_position_sample
from dspark.models.eagle3_format import Eagle3Head, load_eagle3_head, read_eagle3_config
from dspark.models.kv_cache import KVCache
from dspark.workers.drafters.base import DraftBlock, draft_generator, proposal_top_k
from dspark.workers.drafters.registry import DrafterKind, DraftOption, proposal_top_k_option, text
from dspark.workers.request import Sequence


@dataclass
class _Request:
    """A request's context in the drafter: its cache slot and the observed positions not yet written."""

    slot: int
    pending: list[torch.Tensor] = field(default_factory=list)  # projected features g [n, D], in order
    n_pending: int = 0
    last_g: torch.Tensor | None = None  # g of the last written position [D]
    overflow: bool = False  # observed past the drafter's context: no more blocks


def _tokens(seq: Sequence, start: int, end: int) -> list[int]:
    """``seq.all_ids[start:end]`` without building the whole list."""
    p = len(seq.prompt_ids)
    head = seq.prompt_ids[start:end] if start < p else []
    return head + seq.output_ids[max(start - p, 0) : max(end - p, 0)]


class Eagle3Drafter:
    """EAGLE-3 drafting from target features (see the module docstring)."""

    name = "eagle3"

    def __init__(self, head: Eagle3Head, n_slots: int, max_seq: int, proposal_top_k: int = 8) -> None:
        if proposal_top_k < 1:
            raise ValueError(f"proposal_top_k must be >= 1 (got {proposal_top_k})")
        self.head = head
        self.cfg = head.cfg
        self.feature_layers = tuple(head.cfg.feature_layers)
        self.top_k = proposal_top_k
        dev, dtype = head.fc.weight.device, head.fc.weight.dtype
        self.cache = KVCache(1, n_slots, head.nkv, max_seq, head.hd, dtype, dev)
        self._req: dict[str, _Request] = {}
        self._gens: dict[str, torch.Generator] = {}

    @property
    def device(self) -> torch.device:
        return self.cache.device

    # -- context -------------------------------------------------------------------------------
    def _observed(self, r: _Request) -> int:
        return self.cache.lengths[r.slot] + r.n_pending

    @torch.inference_mode()
    def observe(self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None,
                num_verified: int | None = None) -> None:
        if features is None or not token_ids:
            return
        r = self._req.get(seq.request_id)
        if r is None:
            r = self._req[seq.request_id] = _Request(self.cache.allocate())
        n = len(token_ids)
        if r.overflow or self._observed(r) + n > self.cache.max_seq:
            r.overflow = True  # past the drafter's context: propose() gives empty blocks
            return
        r.pending.append(self.head.project(features.to(self.device)))
        r.n_pending += n

    def _write_pending(self, seq: Sequence, r: _Request) -> None:
        """Keys/values of the observed positions s..c-1: feature i with token i + 1 (the anchor last)."""
        if not r.n_pending:
            return
        s = self.cache.lengths[r.slot]
        c = s + r.n_pending
        g = torch.cat(r.pending) if len(r.pending) > 1 else r.pending[0]  # [n, D]
        nxt = torch.tensor(_tokens(seq, s + 1, c + 1), device=self.device)  # [n]
        _, k, v = self.head.qkv(g, nxt, torch.arange(s, c, device=self.device), with_q=False)  # [n, nkv, hd]
        self.cache.reserve(c)
        self.cache.k[0, r.slot, :, s:c] = k.transpose(0, 1)
        self.cache.v[0, r.slot, :, s:c] = v.transpose(0, 1)
        self.cache.lengths[r.slot] = c
        r.last_g = g[-1].clone()  # not a view: the pending rows are freed
        r.pending, r.n_pending = [], 0

    def release(self, request_id: str) -> None:
        r = self._req.pop(request_id, None)
        if r is not None:
            self.cache.free(r.slot)
        self._gens.pop(request_id, None)

    # -- drafting ------------------------------------------------------------------------------
    def _ready(self, seq: Sequence) -> bool:
        """Everything cached by the target was observed, and the anchor after it is known."""
        r = self._req.get(seq.request_id)
        return (r is not None and not r.overflow and seq.num_cached >= 1
                and self._observed(r) == seq.num_cached and seq.num_tokens == seq.num_cached + 1)

    @torch.inference_mode()
    def draft_logits(self, batch: list[Sequence], block_len: int, choose) -> list[torch.Tensor]:
        """Run the draft for ``block_len`` steps; ``choose(k, logits [B, N]) -> vocabulary ids [B]``
        picks each step's drafts.  Returns the logits of every step (each [B, N], float32)."""
        head, dev = self.head, self.device
        for s in batch:
            self._write_pending(s, self._req[s.request_id])
        B = len(batch)
        slots = torch.tensor([self._req[s.request_id].slot for s in batch], device=dev)
        ctx = torch.tensor([s.num_cached for s in batch], device=dev)  # [B] cached positions
        S = int(ctx.max())
        ctx_k, ctx_v = self.cache.k[0][slots, :, :S], self.cache.v[0][slots, :, :S]  # [B, nkv, S, hd]
        valid = torch.arange(S, device=dev) < ctx.unsqueeze(1)  # [B, S]
        h = torch.stack([self._req[s.request_id].last_g for s in batch])  # g_{c-1}: [B, D]
        tokens = torch.tensor([s.last_token for s in batch], device=dev)  # the anchors x_c
        spec_k: list[torch.Tensor] = []  # the block's own keys/values, [B, nkv, hd] per drafted position
        spec_v: list[torch.Tensor] = []
        out = []
        for k in range(block_len):
            q, kk, vv = head.qkv(h, tokens, ctx - 1 + k)  # q [B, nh, hd]
            if k:  # step 0's position c - 1 is the context's last, already cached
                spec_k.append(kk)
                spec_v.append(vv)
            keys = torch.cat([ctx_k, torch.stack(spec_k, 2)], 2) if spec_k else ctx_k  # [B, nkv, S + k, hd]
            values = torch.cat([ctx_v, torch.stack(spec_v, 2)], 2) if spec_v else ctx_v
            mask = torch.cat([valid, valid.new_ones(B, k)], 1)[:, None, None, :]  # [B, 1, 1, S + k]
            attn = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=head.scale,
                                                  enable_gqa=True)
            h = head.finish(h, attn.reshape(B, head.nh * head.hd))
            logits = head.logits(h)  # [B, N]
            out.append(logits)
            tokens = choose(k, logits)
        return out

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        t0 = time.perf_counter()
        out = [DraftBlock.empty() for _ in seqs]
        ready = [i for i, s in enumerate(seqs) if self._ready(s)]
        if block_len <= 0 or not ready:
            return out
        batch = [seqs[i] for i in ready]
        dev, B, G = self.device, len(batch), block_len
        temps = torch.tensor([s.params.temperature for s in batch], dtype=torch.float32, device=dev)
        greedy = temps <= 0
        all_greedy = bool(greedy.all())
        t_conf = torch.where(greedy, 1.0, temps).unsqueeze(1)  # confidences at T (1 for greedy)
        uniforms = torch.stack([
            torch.rand(G, dtype=torch.float64, generator=self._gens.setdefault(s.request_id, draft_generator(s)))
            for s in batch
        ]).to(dev)  # [B, G]
        ids = self.head.draft_ids  # [N] vocabulary id per column, or None
        rows = torch.arange(B, device=dev)
        toks, qs, cands, confs = [], [], [], []

        def choose(k: int, logits: torch.Tensor) -> torch.Tensor:
            if all_greedy:
                col = logits.argmax(-1)  # lowest column on ties
                q, cand = torch.ones(B, 1, device=dev), col.unsqueeze(1)
            else:
                allowed = torch.ones_like(logits, dtype=torch.bool)
                col, q, cand = masked_position_sample(logits, allowed, temps, self.top_k, uniforms[:, k])
            # The largest probability, not the drawn token's: whether the budget verifies d_k
            # must not depend on d_k itself (it may depend on the drafts before it).
            confs.append(torch.softmax(logits / t_conf, dim=-1).amax(-1))
            tok, cand = (col, cand) if ids is None else (ids[col], ids[cand])
            toks.append(tok)
            qs.append(q)
            cands.append(cand)
            return tok

        self.draft_logits(batch, G, choose)
        tokens = torch.stack(toks, 1).tolist()  # [B, G]
        probs, prob_ids = torch.stack(qs, 1), torch.stack(cands, 1)  # [B, G, K]
        conf = torch.stack(confs, 1).tolist()
        seconds = (time.perf_counter() - t0) / B
        for j, i in enumerate(ready):
            out[i] = DraftBlock(token_ids=tokens[j], probs=probs[j], prob_ids=prob_ids[j], confidence=conf[j],
                                draft_seconds=seconds)
        return out


def make_eagle3_drafter(loaded, opts: dict, spec) -> Eagle3Drafter:
    """Build the drafter for ``loaded`` (the target) from ``opts``; ``spec.runner`` sizes its cache."""
    top_k = proposal_top_k(opts)
    if not opts.get("head"):
        raise ValueError("drafter eagle3 needs --draft-option head=PATH (an EAGLE-3 checkpoint folder)")
    head = load_eagle3_head(opts["head"], loaded.model, target_name=loaded.name)
    return Eagle3Drafter(head, n_slots=spec.runner.n_slots, max_seq=spec.runner.max_seq, proposal_top_k=top_k)


def _feature_layers(opts: dict, target_name: str) -> tuple[int, ...]:
    if not opts.get("head"):
        raise ValueError("drafter eagle3 needs --draft-option head=PATH (an EAGLE-3 checkpoint folder)")
    return read_eagle3_config(opts["head"])[0].feature_layers


KIND = DrafterKind(
    name="eagle3",
    doc="DeepSpec's EAGLE-3 checkpoints: one draft layer over target features, drafting token by token",
    build=lambda ctx, o: make_eagle3_drafter(ctx.loaded, o, ctx),
    options=(
        DraftOption("head", text, None, "EAGLE-3 checkpoint folder (DeepSpec's format)"),
        proposal_top_k_option(),
    ),
    remote=True,
    needs_weights=True,
    feature_layers=_feature_layers,
)


__all__ = ["Eagle3Drafter", "make_eagle3_drafter"]
