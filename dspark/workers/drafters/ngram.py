"""Prompt-lookup drafting: continue the most recent earlier occurrence of the current suffix.

Zero model cost.  For the last n tokens (n from ``max_ngram`` down to ``min_ngram``) we look for
the latest earlier position where the same n tokens occur, and propose what followed them.
Proposals are deterministic (q one-hot), so verification accepts token x with probability p(x).
"""

from __future__ import annotations

import numpy as np
import torch

from dspark.workers.drafters.base import DraftBlock, OnlineConfidence, count_accepted
from dspark.workers.drafters.registry import DrafterKind, DraftOption, integer
from dspark.workers.request import Sequence


def find_match(ids: np.ndarray, block_len: int, max_ngram: int, min_ngram: int) -> tuple[list[int], int]:
    """(tokens following the most recent earlier match of the longest matching suffix n-gram, n).

    n = 0 and no tokens when no suffix of length >= ``min_ngram`` occurs earlier.  A match is an
    earlier occurrence followed by at least one token; n is at most ``max_ngram`` and ``len(ids) - 1``.

    One pass over the context: the earlier positions holding the last token are the candidate
    match ends, and each is extended backwards while it keeps matching (at most ``max_ngram``
    tokens), instead of one scan of the context per suffix length.

    Example: ids = [1 2 3 4 1 2], block 2 -> suffix [1 2] matched at 0 -> ([3, 4], 2).
    """
    n_total = len(ids)
    longest = min(max_ngram, n_total - 1)
    if longest < max(min_ngram, 1):
        return [], 0
    ends = np.flatnonzero(ids[: n_total - 1] == ids[n_total - 1])  # e <= n_total - 2, ascending
    if not ends.size:
        return [], 0
    length = np.ones(ends.size, dtype=np.int64)  # how many tokens ending at each e match the suffix
    for j in range(1, longest):
        before = ends - j
        grow = (length == j) & (before >= 0) & (ids[np.maximum(before, 0)] == ids[n_total - 1 - j])
        if not grow.any():
            break
        length[grow] = j + 1
    n = int(length.max())
    if n < min_ngram:
        return [], 0
    start = int(ends[np.flatnonzero(length == n)[-1]]) + 1  # the latest of the longest
    return ids[start : start + block_len].tolist(), n


def find_continuation(ids: np.ndarray, block_len: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Tokens following the most recent earlier match of the longest matching suffix n-gram.

    Example: ids = [1 2 3 4 1 2], block 2 -> suffix [1 2] matched at 0 -> propose [3, 4].
    """
    return find_match(ids, block_len, max_ngram, min_ngram)[0]


class NgramDrafter:
    """Prompt lookup with an online confidence per request.

    ``by_order``: keep one confidence table per request and match length n instead (a 4-token
    match is usually far more reliable than a 1-token one), whose prior is this drafter's
    lifetime table for length n, learned from every request's blocks of that length (halved
    every ``LIFETIME_HORIZON`` tries, so it follows the traffic).  A request's first blocks
    then start from what such matches did on earlier requests rather than from a flat 0.5, and
    its own blocks take over as they come in.  Either way the tables learn only from this
    drafter's own verified blocks.
    """

    name = "ngram"
    feature_layers: tuple[int, ...] = ()

    prefix_reuse = True  # drafts from seq.all_ids: a reused prefix needs no observe()
    LIFETIME_HORIZON = 1000

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, by_order: bool = False) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.by_order = by_order
        self.conf = OnlineConfidence(prior_accept=0.5)
        self.lifetime = OnlineConfidence(prior_accept=0.5, horizon=self.LIFETIME_HORIZON)  # by_order: key n
        self._last: dict[str, tuple[list[int], str, int]] = {}  # request -> (proposed block, its table, n)

    def _key(self, request_id: str, n: int) -> str:
        return f"{request_id}/{n}" if self.by_order else request_id

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        out = []
        for seq in seqs:
            ids = np.asarray(seq.all_ids, dtype=np.int64)
            toks, n = find_match(ids, block_len, self.max_ngram, self.min_ngram)
            key = self._key(seq.request_id, n)
            self._last[seq.request_id] = (toks, key, n)
            prior = self.lifetime.confidences(str(n), len(toks)) if self.by_order else None
            out.append(DraftBlock(token_ids=toks, confidence=self.conf.confidences(key, len(toks), prior=prior)))
        return out

    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        last, key, n = self._last.pop(seq.request_id, ([], "", 0))
        if last and num_verified:
            verified = last[: min(len(last), num_verified)]
            accepted = count_accepted(verified, token_ids)
            self.conf.update(key, len(verified), accepted)
            if self.by_order:
                self.lifetime.update(str(n), len(verified), accepted)

    def release(self, request_id: str) -> None:
        self._last.pop(request_id, None)
        for n in range(self.min_ngram, self.max_ngram + 1) if self.by_order else ():
            self.conf.release(self._key(request_id, n))
        self.conf.release(request_id)


KIND = DrafterKind(
    name="ngram",
    doc="prompt lookup: continue the latest earlier occurrence of the current suffix (no model)",
    build=lambda ctx, o: NgramDrafter(max_ngram=o["max_ngram"], min_ngram=o["min_ngram"]),
    options=(
        DraftOption("max_ngram", integer(1), 4, "longest suffix looked up"),
        DraftOption("min_ngram", integer(1), 1, "shortest suffix looked up"),
    ),
    remote=True,
)
