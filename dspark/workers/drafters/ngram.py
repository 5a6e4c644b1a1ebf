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

    n = 0 and no tokens when no suffix of length >= ``min_ngram`` occurs earlier.

    Example: ids = [1 2 3 4 1 2], block 2 -> suffix [1 2] matched at 0 -> ([3, 4], 2).
    """
    n_total = len(ids)
    for n in range(min(max_ngram, n_total - 1), min_ngram - 1, -1):
        suffix = ids[n_total - n :]
        # windows[i] = ids[i : i + n] for every start i whose match is strictly earlier.
        windows = np.lib.stride_tricks.sliding_window_view(ids[: n_total - 1], n)
        hits = np.nonzero((windows == suffix).all(axis=1))[0]
        hits = hits[hits + n < n_total]  # must be followed by at least one token
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start : start + block_len].tolist(), n
    return [], 0


def find_continuation(ids: np.ndarray, block_len: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Tokens following the most recent earlier match of the longest matching suffix n-gram.

    Example: ids = [1 2 3 4 1 2], block 2 -> suffix [1 2] matched at 0 -> propose [3, 4].
    """
    return find_match(ids, block_len, max_ngram, min_ngram)[0]


class NgramDrafter:
    """Prompt lookup with an online confidence per request.

    ``by_order``: also keep one confidence table per match length n (a 4-token match is usually
    far more reliable than a 1-token one), whose prior is the request's pooled table: a request
    whose short matches keep failing still gets its own estimate when long matches appear, and a
    length never tried starts from what the request's other blocks showed.  Either way the
    tables learn only from this drafter's own verified blocks.
    """

    name = "ngram"
    feature_layers: tuple[int, ...] = ()

    prefix_reuse = True  # drafts from seq.all_ids: a reused prefix needs no observe()

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, by_order: bool = False) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.by_order = by_order
        self.conf = OnlineConfidence(prior_accept=0.5)
        self._last: dict[str, tuple[list[int], str]] = {}  # request -> (proposed block, confidence key)

    def _key(self, request_id: str, n: int) -> str:
        return f"{request_id}/{n}" if self.by_order else request_id

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        out = []
        for seq in seqs:
            ids = np.asarray(seq.all_ids, dtype=np.int64)
            toks, n = find_match(ids, block_len, self.max_ngram, self.min_ngram)
            key = self._key(seq.request_id, n)
            self._last[seq.request_id] = (toks, key)
            pooled = self.conf.confidences(seq.request_id, len(toks))
            conf = self.conf.confidences(key, len(toks), prior=pooled) if self.by_order else pooled
            out.append(DraftBlock(token_ids=toks, confidence=conf))
        return out

    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        last, key = self._last.pop(seq.request_id, ([], ""))
        if last and num_verified:
            verified = last[: min(len(last), num_verified)]
            accepted = count_accepted(verified, token_ids)
            self.conf.update(seq.request_id, len(verified), accepted)
            if key != seq.request_id:
                self.conf.update(key, len(verified), accepted)

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
