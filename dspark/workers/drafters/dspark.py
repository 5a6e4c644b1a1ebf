"""The ``dspark`` drafter: block drafting from target features with a Markov head and confidences.

Per request the drafter keeps the *context* keys/values of every draft layer (one slot of a small
KV cache).  ``observe`` keeps the target features of the tokens that just entered the target's
cache (prefill chunks, then anchor + accepted drafts); the next block to be drafted for the request
first projects them and appends their keys/values, in one pass per request, so
drafting a block costs one pass over G tokens, whatever the context length.  Projecting at
``observe`` cost a call per request and step even in the steps that draft nothing (measured in one
process at 16 requests with every step plain: 46 ms a step against 37 ms for requests that never
draft, 0.6 ms per request and step in ``observe``).

``propose`` drafts all requests at once: one backbone pass over a [B, G] batch (anchor embedding +
G-1 mask vectors, attending to each request's context), the frozen LM head, then the Markov loop
(``dspark.kernels.markov``), which samples x_k from the exact top-k-truncated softmax of
U_k + W1[x_{k-1}] W2 at the request's temperature and reports that q (greedy: argmax, one-hot q).
Confidences are the head's conditional survival estimates after STS calibration.

With a draft vocabulary (the head's frequency-ranked id map, first N ids) the LM head and the
Markov head's W2 cover only those N ids, so q's support is inside the map; tokens and q's ids are
reported as vocabulary ids and verification is unchanged (the rejection sampler takes sparse q).

Options (``--draft-option KEY=VALUE``): head=PATH (default: the head shipped for the target; a
folder with a config.json is read as a DeepSpec checkpoint, ``dspark.models.deepspec_format``, or,
with ``speculators_model_type`` in it, as a speculators one, ``dspark.models.speculators_format``),
draft_vocab=N (draft over the map's first N ids; 0 = the full vocabulary; default: the head's
config), proposal_top_k=8, markov=1 (0: drop the Markov bias, DFlash-style ablation with the same
weights), calibrated=1 (0: raw confidences), trace=0 (1: keep per-block confidence/acceptance records),
short_block=0 (1: a shorter block runs the draft layers over its own positions only; see ``block_logits``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark.kernels.markov import MarkovMix, markov_block_sample, markov_latent, masked_position_sample, pack_w2
from dspark.kernels.short_attention import BlockSpans, kernel_for
from dspark.models.deepspec_format import is_deepspec_checkpoint, load_deepspec_head, read_deepspec_config
from dspark.models.dspark_head import (DraftLayer, DSparkHead, DSparkHeadConfig, block_attention_mask, default_head_path,
                                       load_head)
from dspark.models.speculators_format import is_speculators_checkpoint, load_speculators_head, read_speculators_config
from dspark.models.kv_cache import KVCache
from dspark.workers.drafters.base import DraftBlock, count_accepted, draft_generator, proposal_top_k
from dspark.workers.drafters.registry import (
    DrafterKind, DraftOption, flag, optional_integer, proposal_top_k_option, text,
)
from dspark.workers.request import Sequence


@dataclass
class BlockTrace:
    """One proposed block and what verification made of it (for calibration and benchmarks)."""

    conf_logits: list[float]  # raw confidence logits z_k
    greedy: bool
    num_verifiable: int  # positions the engine could verify (block length, capped by max_tokens)
    num_accepted: int = -1  # filled in by observe()


class DSparkDrafter:
    """The DSpark head as a drafter: one block per request per pass (see the module docstring).

    Each request's draft-layer context lives in a slot of the drafter's own KV cache: ``observe``
    appends the target features of the tokens that entered the target's cache, ``propose`` drafts
    every request whose context is complete (the others get an empty block: plain decoding this
    step), ``release`` frees the slot.  With ``trace``, ``traces`` collects one ``BlockTrace``
    per proposed block with what verification kept of it (calibration and benchmarks read them).
    """

    name = "dspark"

    def __init__(self, head: DSparkHead, n_slots: int, max_seq: int, proposal_top_k: int = 8,
                 markov: bool = True, calibrated: bool = True, trace: bool = False, grammar_mask: bool = True,
                 short_block: bool = False) -> None:
        if proposal_top_k < 1:
            raise ValueError(f"proposal_top_k must be >= 1 (got {proposal_top_k})")
        cfg = head.cfg
        self.head = head
        self.cfg = cfg
        self.feature_layers = tuple(cfg.feature_layers)
        self.top_k = proposal_top_k
        self.markov = markov and cfg.markov_rank > 0
        self.calibrated = calibrated
        self.trace = trace
        self.grammar_mask = grammar_mask  # draw a constrained request's drafts among what its grammar allows
        # Whether the backbone runs only the positions a block drafts, not the whole trained
        # block (see ``block_logits``): cheaper when the budget verifies shallow; another q, as exact.
        self.short_block = short_block
        self.traces: list[BlockTrace] = []
        dev, dtype = head.fc.weight.device, head.fc.weight.dtype
        # Contexts of up to max_seq positions, and room past the longest for one trained block:
        # the kernel path writes each block after its context (``block_logits``), and it must
        # serve every ready request, or a request's bits would depend on who shares its batch.
        self.max_seq = max_seq
        self.cache = KVCache(cfg.n_layers, n_slots, cfg.n_kv_heads, max_seq + cfg.block_len, cfg.head_dim, dtype, dev)
        # Blocks attend in our kernel where it runs (see ``block_logits``).
        self._kernel = kernel_for(dev, dtype, cfg.head_dim)
        self._slot: dict[str, int] = {}
        # Features observed but not yet projected into the slot, per request (see ``flush_context``).
        self._backlog: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self._gens: dict[str, torch.Generator] = {}
        self._pending: dict[str, tuple[list[int], BlockTrace | None]] = {}
        # Draft vocabulary: [N] vocabulary id of each logit column, None = the full vocabulary.
        self.draft_ids = head.draft_ids
        n_cols = cfg.vocab_size if head.draft_ids is None else int(head.draft_ids.numel())
        # The kernel always adds a bias; without the Markov head it adds W1[x] @ W2 = 0.
        self._zero_w1 = torch.zeros(cfg.vocab_size, 1, dtype=dtype, device=dev)
        self._zero_w2 = torch.zeros(1, n_cols, dtype=dtype, device=dev)
        # W2 over the drafted columns, once.  On a CPU in float32: there the one-row product of
        # a block's left-to-right loop is faster than in bf16 (about 68 against 105 us for
        # [1, 128] x [128, 8192]) and adds into the float32 logits in the same call.
        w2 = head.markov_w2_draft.detach() if self.markov else self._zero_w2
        self._w2 = w2.float().contiguous() if dev.type == "cpu" else w2
        # The same W2 packed for the greedy kernel (``kernels.markov.pack_w2``; None where it does
        # not serve): an all-greedy block's loop in one call.
        vanilla = self.markov and cfg.markov_kind == "vanilla"
        self._w2_pairs = pack_w2(head.markov_w1, w2) if vanilla else None
        self._sts: dict[tuple[bool, int], torch.Tensor] = {}  # (greedy, G) -> STS temperatures [G]

    @property
    def device(self) -> torch.device:
        return self.cache.device

    # -- context -------------------------------------------------------------------------------
    @torch.inference_mode()
    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        rid = seq.request_id
        pending = self._pending.pop(rid, None)
        if pending is not None and pending[1] is not None:
            if num_verified is not None:  # the budget may have verified only a prefix
                pending[1].num_verifiable = min(pending[1].num_verifiable, num_verified)
            pending[1].num_accepted = count_accepted(pending[0], token_ids)
            self.traces.append(pending[1])
        if features is None or not token_ids:
            return
        if rid not in self._slot:
            self._slot[rid] = self.cache.allocate()
        start, n = self.context_len(rid), len(token_ids)
        if start + n > self.max_seq:
            return  # past the drafter's context: propose() falls back to empty blocks
        # A copy: ``features`` is usually a view of the whole step's features, which a request that
        # drafts nothing for many steps would otherwise keep alive, step after step.
        self._backlog.setdefault(rid, []).append((start, features.clone()))

    def context_len(self, request_id: str) -> int:
        """Tokens of the request's context observed so far (projected or not)."""
        slot = self._slot.get(request_id)
        if slot is None:
            return 0
        backlog = self._backlog.get(request_id)
        if not backlog:
            return self.cache.lengths[slot]
        start, feats = backlog[-1]
        return start + feats.shape[0]

    @torch.inference_mode()
    def flush_context(self, seqs: list[Sequence]) -> None:
        """Project the features each of ``seqs`` observed since its last block and append their
        context keys/values to its slot.  One pass for all of them where the head's context
        products are row-invariant (``DSparkHead.rows_independent``: our AMX kernels), else one
        pass per request: a product's rounding may then depend on its row count, and a request's
        drafts (so a seeded sampled request's tokens) would depend on which requests it shares
        steps with."""
        todo = []
        for s in seqs:
            chunks = self._backlog.pop(s.request_id, None)
            if chunks:
                feats = chunks[0][1] if len(chunks) == 1 else torch.cat([f for _, f in chunks])  # [n, m W]
                todo.append((self._slot[s.request_id], chunks[0][0], feats))
        groups = [todo] if len(todo) > 1 and getattr(self.head, "rows_independent", False) else [[t] for t in todo]
        for group in groups:
            feats = group[0][2] if len(group) == 1 else torch.cat([f for _, _, f in group])
            pos = torch.cat([torch.arange(start, start + f.shape[0]) for _, start, f in group]).to(self.device)
            kv = self.head.context_kv(self.head.context(feats.to(self.device)), pos)
            row = 0
            for slot, start, f in group:
                end = start + f.shape[0]
                self.cache.reserve(end)
                for i, (k, v) in enumerate(kv):
                    self.cache.k[i, slot, :, start:end] = k[row : row + f.shape[0]].transpose(0, 1)  # [n, nkv, hd] -> [nkv, n, hd]
                    self.cache.v[i, slot, :, start:end] = v[row : row + f.shape[0]].transpose(0, 1)
                self.cache.lengths[slot] = end
                row += f.shape[0]

    def release(self, request_id: str) -> None:
        slot = self._slot.pop(request_id, None)
        if slot is not None:
            self.cache.free(slot)
        self._backlog.pop(request_id, None)
        self._gens.pop(request_id, None)
        self._pending.pop(request_id, None)

    # -- drafting ------------------------------------------------------------------------------
    def block_logits(self, batch: list[Sequence], anchors: torch.Tensor, block_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The parallel stage for requests whose context is cached: (h [B, G, D], base logits [B, G, N]).

        The block positions attend to each other, so the backbone runs the block length the head
        was trained for (as in training) and a shorter ``block_len`` keeps its first rows: the
        first drafts do not change with how many are asked for, only the output layer and the
        Markov steps of the positions nobody will verify are skipped.  With ``short_block`` it
        runs the ``block_len`` positions asked for, as a head trained at that length would: at
        two drafts for sixty-four requests that halves drafting, at the same held-out acceptance
        and at the same speed at one request (docs/DRAFTER.md).  It is off by default: through
        the cluster it has not measured ahead, and the confidences' calibration and published
        checkpoints were fitted on whole blocks.
        """
        dev, head = self.device, self.head
        self.flush_context(batch)
        slot_ids = [self._slot[s.request_id] for s in batch]
        lens = [s.num_cached for s in batch]  # anchor positions
        ctx_lens = torch.tensor(lens, device=dev)  # [B]
        S = max(lens)
        # The cache holds max_seq + the trained block (see __init__).
        G = block_len if self.short_block else max(block_len, self.cfg.block_len)
        rows_independent = getattr(self.head, "rows_independent", False) and isinstance(self.head.layers[0], DraftLayer)
        per_request = len(batch) > 1 and rows_independent
        spans = None
        if rows_independent and self._kernel:
            # Every request's block in one kernel call per layer, written after its context in
            # its own slot (positions the next context tokens overwrite).  Alone or batched, a
            # request's rows are the same bits.  Room: a ready request has num_cached +
            # block_len <= max_seq, so S + G <= max_seq + the trained block length.
            self.cache.reserve(S + G)
            spans = BlockSpans.of(slot_ids, lens, G)
            ctx_kv = [((self.cache.k[i], self.cache.v[i]), spans) for i in range(self.cfg.n_layers)]
        elif len(batch) == 1:  # one request: its slot as a view, no gather
            ctx_kv = [(self.cache.k[i][slot_ids[0] : slot_ids[0] + 1, :, :S],
                       self.cache.v[i][slot_ids[0] : slot_ids[0] + 1, :, :S]) for i in range(self.cfg.n_layers)]
        elif per_request:  # each request attends to its own slot's view, alone; the products stay batched
            ctx_kv = [([self.cache.k[i][sl : sl + 1, :, :n] for sl, n in zip(slot_ids, lens)],
                       [self.cache.v[i][sl : sl + 1, :, :n] for sl, n in zip(slot_ids, lens)])
                      for i in range(self.cfg.n_layers)]
        else:
            slots = torch.tensor(slot_ids, device=dev)
            ctx_kv = [(self.cache.k[i][slots, :, :S], self.cache.v[i][slots, :, :S]) for i in range(self.cfg.n_layers)]
        x = head.block_inputs(anchors, G)  # [B, G, D]
        qpos = ctx_lens.unsqueeze(1) + torch.arange(G, device=dev)  # [B, G]
        # One block per request, anchored at position ctx_lens: it sees the whole cached context
        # (all of it precedes the anchor) and the whole block; the mask training uses.  When
        # every context is S long that mask is all True, and attention runs without one.
        mask = None if min(lens) == S or per_request or spans is not None else block_attention_mask(
            ctx_lens, ctx_lens.unsqueeze(1), G, S)  # [B, G, S + G]
        h = head.backbone(x, qpos, ctx_kv, mask)[:, :block_len]
        return h, head.base_logits(h)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        t0 = time.perf_counter()
        out = [DraftBlock.empty() for _ in seqs]
        # Requests whose context is complete: everything before the anchor has been observed.
        ready = [i for i, s in enumerate(seqs)
                 if s.request_id in self._slot and self.context_len(s.request_id) == s.num_cached
                 and s.num_cached + block_len <= self.max_seq]
        if block_len <= 0 or not ready:
            return out
        G, dev, head = block_len, self.device, self.head
        batch = [seqs[i] for i in ready]
        anchors = torch.tensor([s.last_token for s in batch], device=dev)  # [B]
        h, base = self.block_logits(batch, anchors, G)  # [B, G, D], [B, G, N]
        temps = torch.tensor([s.params.temperature for s in batch], device=dev)
        if all(s.params.greedy for s in batch):  # greedy blocks draw nothing
            uniforms = torch.zeros(len(batch), G, dtype=torch.float64, device=dev)
        else:
            uniforms = torch.stack([
                torch.rand(G, dtype=torch.float64, generator=self._gens.setdefault(s.request_id, draft_generator(s)))
                for s in batch
            ]).to(dev)  # [B, G]
        w1, w2 = (head.markov_w1 if self.markov else self._zero_w1), self._w2
        mix = None
        if self.markov and self.cfg.markov_kind != "vanilla":  # gated / RNN heads also read h_k
            mix = MarkovMix(self.cfg.markov_kind, head.markov_mix.weight, head.markov_mix.bias, h)
        draft = markov_block_sample(base, anchors, w1, w2, temps, self.top_k, uniforms, vocab_ids=self.draft_ids, mix=mix,
                                    w2_pairs=self._w2_pairs)
        tokens = draft.tokens.tolist()
        probs = list(draft.draft_probs)
        prob_ids = [None] * len(batch) if draft.draft_prob_ids is None else list(draft.draft_prob_ids)
        redrawn = False
        for j, seq in enumerate(batch):
            if seq.grammar is not None and self.grammar_mask:  # structured output: draft what the grammar allows
                tokens[j], probs[j], prob_ids[j] = self._constrained_block(
                    seq.grammar, base[j], anchors[j], w1, w2, temps[j], uniforms[j], mix, j)
                redrawn = True
        confs, z_rows = self.block_confidences(batch, h, anchors, tokens, G, None if redrawn else draft.tokens)
        seconds = (time.perf_counter() - t0) / len(batch)
        for j, (i, seq) in enumerate(zip(ready, batch)):
            out[i] = DraftBlock(
                token_ids=tokens[j],
                probs=probs[j],
                prob_ids=prob_ids[j],
                confidence=confs[j],
                draft_seconds=seconds,
            )
            trace = None
            if self.trace:
                room = seq.params.max_tokens - len(seq.output_ids) - 1
                trace = BlockTrace(z_rows[j], seq.params.greedy, max(0, min(G, room)))
            self._pending[seq.request_id] = (tokens[j], trace)
        return out

    def block_confidences(self, batch: list[Sequence], h: torch.Tensor, anchors: torch.Tensor,
                          tokens: list[list[int]], G: int,
                          drafted: torch.Tensor | None = None) -> tuple[list[list[float]], list[list[float]]]:
        """Per block the confidence of each draft, and the raw confidence logits z [G] (for traces).

        The head's c_k = sigmoid(z_k / T_k) over [h_k ; W1[x_{k-1}]], T_k the STS temperature.
        h: [B, G, D]; anchors: [B]; tokens: the drafts of each block (a shorter block is padded
        for the head; the padding's confidence is dropped).
        """
        head, dev = self.head, self.device
        full = drafted  # [B, G], the sampled tensor when no block was redrawn (the usual step)
        if full is None:
            full = torch.tensor([t + [t[-1] if t else int(anchors[j])] * (G - len(t)) for j, t in enumerate(tokens)],
                                device=dev)
        prev = torch.cat([anchors.unsqueeze(1), full[:, :-1]], dim=1)  # [B, G] x_{k-1}
        z = head.confidence_logit(h, head.markov_embedding(prev))  # [B, G]
        if not self.calibrated:
            c = torch.sigmoid(z)
        elif len(batch) == 1:
            c = torch.sigmoid(z / self._sts_row(batch[0].params.greedy, G))
        else:
            c = torch.sigmoid(z / torch.stack([self._sts_row(s.params.greedy, G) for s in batch]))
        confs = [row[: len(t)] for row, t in zip(c.tolist(), tokens)]
        return confs, z.tolist()

    def _sts_row(self, greedy: bool, G: int) -> torch.Tensor:
        """The STS temperatures of G positions [G] (float32, on the drafter's device), made once."""
        row = self._sts.get((greedy, G))
        if row is None:
            row = torch.tensor(self.cfg.sts_temperatures(greedy, G), dtype=torch.float32, device=self.device)
            self._sts[(greedy, G)] = row
        return row


    def _constrained_block(self, matcher, base: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor,
                           w2: torch.Tensor, temp: torch.Tensor, uniforms: torch.Tensor, mix: MarkovMix | None,
                           row: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """One request's block drawn among the tokens its grammar allows at each position.

        base: [G, N] its backbone logits; the Markov loop runs as in ``markov_block_sample`` but
        each position's q is restricted to the grammar's allowed columns (``masked_position_sample``),
        walking the request's grammar state tentatively (rolled back after: the engine owns it).
        The block stops early where the grammar ends (a stop token) or allows no column of the
        draft vocabulary.  Returns (tokens, q [n, K], ids [n, K]) with the exact proposal.
        """
        G, n_cols = base.shape
        vocab = self.cfg.vocab_size
        ids = self.draft_ids  # [N] vocabulary id per column, or None
        ids_cpu = None if ids is None else ids.cpu()  # the grammar fills masks on the host
        full = torch.zeros(vocab, dtype=torch.bool)
        tokens, qs, cands = [], [], []
        prev, state = anchor.view(1), None
        mix_row = None if mix is None else MarkovMix(mix.kind, mix.weight, mix.bias, mix.hidden[row : row + 1])
        walked = 0
        for k in range(G):
            emb = w1[prev]  # [1, r]
            latent, state = markov_latent(mix_row, emb, k, state)
            logits = base[k : k + 1].float() + (latent.to(w2.dtype) @ w2).float()  # [1, N]
            matcher.fill_mask(full)
            allowed = (full if ids is None else full[ids_cpu]).view(1, n_cols).to(logits.device)
            if not bool(allowed.any()):
                break  # what the grammar wants next is outside the draft vocabulary: stop here
            col, q, cand = masked_position_sample(logits, allowed, temp.view(1), self.top_k, uniforms[k : k + 1])
            tok = int(col) if ids is None else int(ids[col])
            tokens.append(tok)
            qs.append(q[0])
            cands.append(cand[0] if ids is None else ids[cand[0]])
            if not matcher.accept(tok):  # cannot happen for an allowed token; stop rather than guess
                tokens.pop(), qs.pop(), cands.pop()
                break
            walked += 1
            if matcher.done:
                break
            prev = torch.tensor([tok], device=base.device)
        matcher.rollback(walked)
        if not tokens:
            return [], torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.long)
        return tokens, torch.stack(qs), torch.stack(cands)


def make_dspark_drafter(loaded, opts: dict, spec) -> DSparkDrafter:
    """Build the drafter for ``loaded`` (the target) from ``opts``; see the module docstring.

    ``spec.runner`` sizes the drafter's context cache (a ``DraftContext`` or an ``EngineSpec``).
    """
    top_k = proposal_top_k(opts)  # validated before the head is loaded
    path = opts.get("head") or default_head_path(loaded.name)
    if not opts.get("head") and not path.exists():
        if _ships_v4_draft(loaded):
            raise ValueError(f"{loaded.name} ships its own DSpark draft (mtp.*, dspark_* fields): serve it with "
                             f"--draft v4-dspark, or pass a trained head with --draft-option head=PATH")  # fmt: skip
        raise FileNotFoundError(
            f"no DSpark head is shipped for {loaded.name}; train one with `dspark train-draft` and pass "
            f"--draft-option head=PATH"
        )
    n = opts.get("draft_vocab")
    if n not in (None, "") and not str(n).strip().isdigit():
        raise ValueError(f"draft_vocab={n!r}: expected a whole number of ids (0 = the full vocabulary)")
    n = None if n in (None, "") else int(n)
    head = load_drafter_head(path, loaded, draft_vocab=n)
    head.pack_for_inference(weights=opts.get("weights") or "int8")
    return DSparkDrafter(
        head,
        n_slots=spec.runner.n_slots,
        max_seq=spec.runner.max_seq,
        proposal_top_k=top_k,
        markov=flag(opts.get("markov", True)),
        calibrated=flag(opts.get("calibrated", True)),
        trace=flag(opts.get("trace", False)),
        grammar_mask=flag(opts.get("grammar_mask", True)),
        short_block=flag(opts.get("short_block", False)),
    )


def weight_format(raw) -> str:
    """``int8`` or ``float`` (how a CPU holds the head's matrices while serving)."""
    value = str(raw).strip().lower()
    if value not in ("int8", "float"):
        raise ValueError("int8 or float")
    return value


def _ships_v4_draft(loaded) -> bool:
    """Whether the target's folder is a V4 checkpoint with its own DSpark draft (``--draft v4-dspark``)."""
    import json

    cfg = Path(str(loaded.source)) / "config.json"
    try:
        return "dspark_block_size" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def head_feature_layers(opts: dict, target_name: str) -> tuple[int, ...]:
    """Target layers the head of ``opts`` (default: the shipped one) reads, from its config alone."""
    return read_drafter_head_config(opts.get("head") or default_head_path(target_name)).feature_layers


def load_drafter_head(path, loaded, draft_vocab: int | None = None, dflash: bool = False) -> DSparkHead:
    """The head at ``path`` bound to target ``loaded``, in whichever format it is (docs/MODELS.md):
    our file, a DeepSpec folder or a speculators folder.  ``dflash``: for the DFlash drafter
    (folders without Markov and confidence heads; our files are DSpark heads)."""
    if is_speculators_checkpoint(path):
        return load_speculators_head(path, loaded.model, target_name=loaded.name, draft_vocab=draft_vocab, dflash=dflash)
    if is_deepspec_checkpoint(path):
        return load_deepspec_head(path, loaded.model, target_name=loaded.name, draft_vocab=draft_vocab, dflash=dflash)
    if dflash:
        raise ValueError(f"{Path(path).name}: a DSpark head file; --draft dflash reads DFlash checkpoint folders "
                         f"(DeepSpec's or speculators'); serve it with --draft dspark")
    return load_head(path, loaded.model, target_name=loaded.name, draft_vocab=draft_vocab)


def read_drafter_head_config(path, dflash: bool = False) -> DSparkHeadConfig:
    """The head config at ``path`` in whichever format it is, without loading weights or a target."""
    from dspark.models.dspark_head import read_head_config

    if is_speculators_checkpoint(path):
        return read_speculators_config(path, dflash)[0]
    if is_deepspec_checkpoint(path):
        return read_deepspec_config(path, dflash)[0]
    return read_head_config(path)[0]


# The options a DSpark head takes (the hybrid drafter reuses them).
HEAD_OPTIONS = (
    DraftOption("head", text, None, "head checkpoint: our .safetensors, a DeepSpec or a speculators folder "
                "(default: the head shipped for the target)"),
    DraftOption("draft_vocab", optional_integer(0), None, "draft over the id map's first N ids; 0: full vocabulary "
                "(default: the head's config)"),
    proposal_top_k_option(),
    DraftOption("markov", flag, True, "0: drop the Markov bias (DFlash-style ablation, same weights)"),
    DraftOption("calibrated", flag, True, "0: raw confidences instead of the STS-calibrated ones"),
    DraftOption("trace", flag, False, "1: keep per-block confidence/acceptance records"),
    DraftOption("weights", weight_format, "int8", "int8: the head's draft layers and drafted LM-head rows in int8 on a "
                "CPU (half the bytes a draft reads); float: the head's dtype, packed as the target's"),
    DraftOption("grammar_mask", flag, True, "0: under a grammar, draft unconstrained (the verifier then rejects "
                "what the grammar forbids) instead of drawing drafts among the allowed tokens"),
    DraftOption("short_block", flag, False, "1: a block shorter than the trained one runs the draft layers over its "
                "own positions only (cheaper for many requests at shallow depths; other drafts than the trained "
                "block's first ones)"),
)

KIND = DrafterKind(
    name="dspark",
    doc="block drafting from target features with a Markov head and calibrated confidences",
    build=lambda ctx, o: make_dspark_drafter(ctx.loaded, o, ctx),
    options=HEAD_OPTIONS,
    remote=True,
    needs_weights=True,
    feature_layers=head_feature_layers,
)


__all__ = [
    "DSparkDrafter", "BlockTrace", "HEAD_OPTIONS", "head_feature_layers", "load_drafter_head", "make_dspark_drafter",
    "read_drafter_head_config",
]
