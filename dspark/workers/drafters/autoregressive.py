"""Drafters that run a language model left to right: ``layerskip`` and ``draft_model``.

Both feed the anchor, sample a token, feed it back, ``block_len`` times, batched over requests.

* ``layerskip`` is self-speculation: the first L layers of the target, its final norm and LM head.
  It writes into the *target's* KV cache (layers < L) at the positions the verifier is about to
  fill: those entries are exactly what the verifier would compute for the same tokens, and the
  verification pass overwrites them anyway, so the drafter needs no cache or weights of its own.
* ``draft_model`` is an independent smaller model (same tokenizer) with its own KV cache; it keeps
  the tokens it has cached per request and re-syncs with the accepted tokens at each proposal.

Proposals are sampled from the top-k of the drafter's softmax at the request's temperature
(greedy requests: argmax, one-hot q).  Confidence is the drafter's top probability at that
position (for greedy requests, the probability of the drafted token).
"""

from __future__ import annotations

import torch

from dspark.kernels.sampling import sample_proposal
from dspark.workers.drafters.base import DraftBlock, draft_generator
from dspark.workers.drafters.registry import (
    DraftContext, DrafterKind, DraftOption, integer, optional_integer, proposal_top_k_option, text,
)
from dspark.workers.request import Sequence
from dspark.workers.runner import StepInput


class AutoregressiveDrafter:
    name = "autoregressive"
    feature_layers: tuple[int, ...] = ()
    prefix_reuse = True  # reads seq.all_ids and the target's (or its own) cache, never observe()d tokens

    def __init__(self, runner, n_layers: int | None, proposal_top_k: int = 8) -> None:
        self.runner = runner
        self.n_layers = n_layers
        self.top_k = proposal_top_k
        self._gens: dict[str, torch.Generator] = {}

    # Subclasses say where each request's tokens go and what must be (re)fed.
    def _placement(self, seq: Sequence) -> tuple[int, int, list[int]]:
        """(slot, start position, tokens to feed before the first draft token)."""
        raise NotImplementedError

    def _drafted(self, seq: Sequence, fed_tail: list[int]) -> None:
        """Called after drafting with the block tokens that were fed (all but the last)."""

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        if block_len <= 0 or not seqs:
            return [DraftBlock.empty() for _ in seqs]
        dev = self.runner.device
        places = [self._placement(s) for s in seqs]
        slots = [p[0] for p in places]
        starts = [p[1] for p in places]
        feeds = [p[2] for p in places]
        temps = torch.tensor([s.params.temperature for s in seqs], device=dev)
        gens = [self._gens.setdefault(s.request_id, draft_generator(s)) for s in seqs]
        tokens: list[list[int]] = [[] for _ in seqs]
        q_vals, q_ids, confs = [[] for _ in seqs], [[] for _ in seqs], [[] for _ in seqs]
        for k in range(block_len):
            flat = [t for f in feeds for t in f]
            q_lens = [len(f) for f in feeds]
            rows, acc = [], 0
            for n in q_lens:
                acc += n
                rows.append(acc - 1)
            out = self.runner.forward(StepInput(flat, slots, starts, q_lens, rows, n_layers=self.n_layers))
            noise = torch.stack([torch.empty(self.top_k).exponential_(generator=g) for g in gens]).to(dev)
            tok, q, ids, _ = sample_proposal(out.logits, temps, self.top_k, noise)
            # Confidence must not depend on the sampled token itself (only on what came before it),
            # or pruning blocks by confidence would bias acceptance (DSpark paper, Appendix A):
            # the drafter's top probability qualifies, the probability of the drawn token does not.
            conf = torch.softmax(out.logits.float(), dim=-1).amax(dim=-1)
            tok_l, conf_l = tok.tolist(), conf.tolist()
            for i in range(len(seqs)):
                tokens[i].append(tok_l[i])
                q_vals[i].append(q[i])
                q_ids[i].append(ids[i])
                confs[i].append(conf_l[i])
                starts[i] += q_lens[i]
            feeds = [[t] for t in tok_l]
        blocks = []
        for i, seq in enumerate(seqs):
            self._drafted(seq, tokens[i][:-1])
            greedy = seq.params.greedy  # a greedy draft is a one-hot proposal (probs None)
            blocks.append(
                DraftBlock(
                    token_ids=tokens[i],
                    probs=None if greedy else torch.stack(q_vals[i]),
                    prob_ids=None if greedy else torch.stack(q_ids[i]),
                    confidence=confs[i],
                )
            )
        return blocks

    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        return None

    def release(self, request_id: str) -> None:
        self._gens.pop(request_id, None)


class LayerSkipDrafter(AutoregressiveDrafter):
    """Early exit of the target itself: no extra weights, shares the target's KV cache."""

    name = "layerskip"

    def __init__(self, target_runner, n_layers: int, proposal_top_k: int = 8) -> None:
        super().__init__(target_runner, n_layers, proposal_top_k)

    def _placement(self, seq: Sequence) -> tuple[int, int, list[int]]:
        return seq.slot, seq.num_cached, [seq.last_token]


class DraftModelDrafter(AutoregressiveDrafter):
    """An independent small model with its own KV cache and slot per request."""

    name = "draft_model"

    def __init__(self, runner, proposal_top_k: int = 8) -> None:
        super().__init__(runner, None, proposal_top_k)
        self._slot: dict[str, int] = {}
        self._cached: dict[str, list[int]] = {}

    def _placement(self, seq: Sequence) -> tuple[int, int, list[int]]:
        rid = seq.request_id
        if rid not in self._slot:
            self._slot[rid] = self.runner.cache.allocate()
            self._cached[rid] = []
        ids = seq.all_ids
        cached = self._cached[rid]
        common = 0
        for a, b in zip(cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always feed the anchor to get its logits
        self._cached[rid] = ids[:]  # after this proposal the cache holds ids + drafted[:-1]
        return self._slot[rid], common, ids[common:]

    def _drafted(self, seq: Sequence, fed_tail: list[int]) -> None:
        self._cached[seq.request_id].extend(fed_tail)

    def release(self, request_id: str) -> None:
        super().release(request_id)
        slot = self._slot.pop(request_id, None)
        self._cached.pop(request_id, None)
        if slot is not None:
            self.runner.cache.free(slot)


def _layerskip(ctx: DraftContext, o: dict) -> LayerSkipDrafter:
    n_layers = o["layers"] if o["layers"] is not None else max(1, ctx.args.n_layers // 2)
    return LayerSkipDrafter(ctx.target_runner, n_layers, proposal_top_k=o["proposal_top_k"])


def _draft_model(ctx: DraftContext, o: dict) -> DraftModelDrafter:
    from dspark.models.loader import load_model
    from dspark.workers.runner import LocalRunner

    draft = load_model(o["draft_model"] or ctx.model, dtype=ctx.dtype, device=ctx.device, progress=False)
    if draft.tokenizer.vocab_size != ctx.loaded.tokenizer.vocab_size:
        raise ValueError("the draft model must share the target's tokenizer")
    if o["draft_layers"]:  # a smaller independent model: keep only the first layers
        draft.model.layers = draft.model.layers[: o["draft_layers"]]
    return DraftModelDrafter(LocalRunner(draft.model, ctx.runner), proposal_top_k=o["proposal_top_k"])


LAYERSKIP = DrafterKind(
    name="layerskip",
    doc="self-speculation: the target's first layers, final norm and LM head, in its own KV cache",
    build=_layerskip,
    options=(
        DraftOption("layers", integer(1), None, "target layers the drafter runs (default: half of them)"),
        proposal_top_k_option(),
    ),
)
DRAFT_MODEL = DrafterKind(
    name="draft_model",
    doc="an independent smaller model with the target's tokenizer and its own KV cache",
    build=_draft_model,
    options=(
        DraftOption("draft_model", text, None, "GGUF file or HF folder of the draft model (default: the target's)"),
        DraftOption("draft_layers", optional_integer(0), None, "keep only the draft model's first N layers (default: all)"),
        proposal_top_k_option(),
    ),
    remote=True,
    needs_weights=True,
)
