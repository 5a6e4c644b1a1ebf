"""The ``v4-dspark`` drafter: the DSpark draft shipped inside a DeepSeek-V4 checkpoint (``mtp.*``).

The draft (:mod:`dspark.models.deepseek_v4_dspark`, read by :mod:`deepseek_v4_dspark_format`)
drafts a block of ``dspark_block_size`` tokens from the anchor and a window of context keys made
from the target's streams at ``dspark_target_layer_ids``.  It runs in the verifier's process,
next to the target (``remote=False``), and asks the verifier for the streams of the blocks that
produce those layers' inputs (``features=entering``, the default) or outputs.

Per request it keeps one :class:`ContextWindow` slot: each stage's keys of the last W committed
positions (W = the target's sliding window, 128 in the release).  ``observe`` receives the
tokens that entered the target's cache (prefill chunks, then anchor + accepted drafts) with their
streams and adds their keys; those tokens are committed, so rejected drafts never reach the
window and nothing rolls back.  ``propose`` runs the S stages over one [B, G] block per request
(G = dspark_block_size, what the draft was trained on; min(block_len, G) drafts are kept), the
target's LM head, and the vanilla Markov loop of ``dspark.kernels.markov``,
which samples x_k from the exact top-k-truncated softmax of U_k + markov_w1[x_{k-1}] . markov_w2
at the request's temperature and reports that q (greedy: argmax, one-hot q).  Confidences:
sigmoid(proj [x_k ; markov_w1[x_{k-1}]]), uncalibrated (the release ships no STS temperatures).

Cost of a step: ``observe``, per committed position, one main_proj (m * hidden -> hidden) and S
key projections (hidden -> D); ``propose``, S full V4 blocks (attention over W + G keys,
hyper-connections, MoE) over B * G tokens, one LM head over B * block_len rows, and block_len
Markov steps.  Memory per request: S * W * D key values.

Options: the readings of the format's open points (``query_norm``, ``features``, ``collapse``,
``confidence_input``, ``window_feed``, ``experts_per_token``; :class:`V4DSparkOptions`,
docs/DEEPSEEK_V4.md) and ``proposal_top_k``.  Refused, one line: a target that is not V4, and
whatever :func:`load_v4_dspark` refuses (fields, tensors, Markov head type).
"""

from __future__ import annotations

import time

import torch

from dspark.kernels.markov import markov_block_sample
from dspark.models.deepseek_v4_dspark import (
    COLLAPSES, CONFIDENCE_INPUTS, FEATURES, WINDOW_FEEDS, ContextWindow, DeepseekV4DSpark, V4DSparkOptions,
)
from dspark.workers.drafters.base import DraftBlock, draft_generator, proposal_top_k
from dspark.workers.drafters.registry import DraftContext, DrafterKind, DraftOption, flag, integer, proposal_top_k_option
from dspark.workers.request import Sequence


class V4DSparkDrafter:
    """A V4 checkpoint's own DSpark draft (see the module docstring)."""

    name = "v4-dspark"

    def __init__(self, model: DeepseekV4DSpark, n_slots: int, proposal_top_k: int = 8) -> None:
        if proposal_top_k < 1:
            raise ValueError(f"proposal_top_k must be >= 1 (got {proposal_top_k})")
        self.model, self.top_k = model, proposal_top_k
        self.feature_layers = model.feature_layers
        cfg = model.cfg
        self.window = ContextWindow(model.dcfg.n_stages, n_slots, model.dcfg.window, cfg.head_dim, model.dtype,
                                    model.device)  # fmt: skip
        self._slot: dict[str, int] = {}
        self._done: dict[str, int] = {}  # committed positions observed per request
        self._gens: dict[str, torch.Generator] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- context -------------------------------------------------------------------------------
    @torch.inference_mode()
    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        rid = seq.request_id
        if features is None or not token_ids:
            return
        if rid not in self._slot:
            self._slot[rid] = self.window.allocate()
            self._done[rid] = 0
        p, n = self._done[rid], len(token_ids)
        if seq.all_ids[p : p + n] != list(token_ids):
            self._forget(rid)  # out of step with the target: plain decoding for this request from here
            return
        rows = torch.arange(n)
        if self.model.opts.window_feed == "last" and p + n > len(seq.prompt_ids):
            # One context position per decoding step (the prompt enters whole): the step's last.
            prompt_rows = rows[p + rows < len(seq.prompt_ids)]
            rows = torch.cat([prompt_rows, rows[-1:]])
        positions = p + rows
        keys = self.model.context_keys(features[rows.to(features.device)], positions)  # [S, n', D]
        self.window.add(self._slot[rid], keys, positions)
        self._done[rid] = p + n

    def _forget(self, rid: str) -> None:
        slot = self._slot.pop(rid, None)
        if slot is not None:
            self.window.free(slot)
        self._done.pop(rid, None)

    def release(self, request_id: str) -> None:
        self._forget(request_id)
        self._gens.pop(request_id, None)

    # -- drafting ------------------------------------------------------------------------------
    def block_logits(self, seqs: list[Sequence], anchors: torch.Tensor, n: int):
        """(x, normed [B, n, hidden], base logits [B, n, V]) for requests whose context is observed,
        n <= G.  The stages always run the G = dspark_block_size positions the draft was trained
        on (the block attends both ways: more noise positions would change the first drafts too);
        rows past ``n`` are dropped before the head."""
        m = self.model
        keys, valid = self.window.gather([self._slot[s.request_id] for s in seqs])
        starts = torch.tensor([s.num_cached for s in seqs], device=self.device)  # [B] anchor positions
        x, normed = m.block_states(anchors, starts, keys, valid, m.dcfg.block_size)
        x, normed = x[:, :n], normed[:, :n]
        return x, normed, m.base_logits(normed)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        t0 = time.perf_counter()
        out = [DraftBlock.empty() for _ in seqs]
        ready = [i for i, s in enumerate(seqs) if s.request_id in self._slot and self._done[s.request_id] == s.num_cached]
        if block_len <= 0 or not ready:
            return out
        batch, dev, m = [seqs[i] for i in ready], self.device, self.model
        block_len = min(block_len, m.dcfg.block_size)  # at most G drafts: a longer --block gets blocks of G
        anchors = torch.tensor([s.last_token for s in batch], device=dev)  # [B]
        x, normed, base = self.block_logits(batch, anchors, block_len)
        temps = torch.tensor([s.params.temperature for s in batch], device=dev)
        uniforms = torch.stack([
            torch.rand(block_len, dtype=torch.float64, generator=self._gens.setdefault(s.request_id, draft_generator(s)))
            for s in batch
        ]).to(dev)  # [B, block_len]
        draft = markov_block_sample(base, anchors, m.w.markov_w1.weight, m.markov_w2(), temps, self.top_k, uniforms)
        conf = torch.sigmoid(m.confidence_logit(x, normed, draft.prev_embeddings)).tolist()  # [B, block_len]
        tokens = draft.tokens.tolist()
        seconds = (time.perf_counter() - t0) / len(batch)
        for j, i in enumerate(ready):
            out[i] = DraftBlock(token_ids=tokens[j], probs=draft.draft_probs[j], prob_ids=draft.draft_prob_ids[j],
                                confidence=conf[j], draft_seconds=seconds)  # fmt: skip
        return out


def _choice(allowed: tuple[str, ...]):
    def parse(raw) -> str:
        if str(raw) not in allowed:
            raise ValueError(" or ".join(allowed))
        return str(raw)

    return parse


def make_v4_dspark_drafter(ctx: DraftContext, opts: dict) -> V4DSparkDrafter:
    """The drafter for the V4 target in ``ctx``, its draft read from the target's own folder."""
    from dspark.models.deepseek_v4 import DeepseekV4Transformer
    from dspark.models.deepseek_v4_dspark_format import load_v4_dspark

    top_k = proposal_top_k(opts)
    loaded = ctx.loaded
    if loaded is None or not isinstance(loaded.model, DeepseekV4Transformer):
        name = "no target" if loaded is None else type(loaded.model).__name__
        raise ValueError(f"drafter v4-dspark needs a DeepSeek-V4 target (its checkpoint's DSpark draft); got {name}")
    readings = V4DSparkOptions(query_norm=opts["query_norm"], features=opts["features"], collapse=opts["collapse"],
                               confidence_input=opts["confidence_input"], window_feed=opts["window_feed"],
                               experts_per_token=opts["experts_per_token"])  # fmt: skip
    return V4DSparkDrafter(load_v4_dspark(loaded.source, loaded.model, readings), ctx.runner.n_slots, top_k)


_DEFAULTS = V4DSparkOptions()
KIND = DrafterKind(
    name="v4-dspark",
    doc="the DSpark draft shipped in a DeepSeek-V4 checkpoint (mtp.* blocks, Markov and confidence heads)",
    build=make_v4_dspark_drafter,
    options=(
        DraftOption("query_norm", flag, _DEFAULTS.query_norm, "per-head RMS norm of the draft queries (V4's "
                    "attention does it; 0: V4.1's text)"),
        DraftOption("features", _choice(FEATURES), _DEFAULTS.features, "target streams entering the "
                    "dspark_target_layer_ids layers, or leaving them"),
        DraftOption("collapse", _choice(COLLAPSES), _DEFAULTS.collapse, "last stage's streams -> x_k: its "
                    "hc_head, or their mean"),
        DraftOption("confidence_input", _choice(CONFIDENCE_INPUTS), _DEFAULTS.confidence_input, "the confidence "
                    "head reads x_k before the final norm (collapsed) or after it (normed)"),
        DraftOption("window_feed", _choice(WINDOW_FEEDS), _DEFAULTS.window_feed, "every committed position "
                    "enters the context window, or only each step's last"),
        DraftOption("experts_per_token", integer(0), _DEFAULTS.experts_per_token, "routed experts per draft "
                    "token; 0: the target's num_experts_per_tok"),
        proposal_top_k_option(),
    ),
    remote=False,  # reads the target's streams in the verifier's process
    needs_weights=True,
    takes_target_shard=True,  # load_v4_dspark reads the whole embedding and LM head from the folder
)


__all__ = ["V4DSparkDrafter", "make_v4_dspark_drafter"]
