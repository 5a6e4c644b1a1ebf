"""The draft link's block codec: ``DraftBlock`` <-> ``draft_pb2.DraftBlock``.

Both ends of the link import it (the draft worker encodes, the verifier's remote drafter
decodes), so neither imports the other.
"""

from __future__ import annotations

import torch

from dspark.proto.dspark.v1 import draft_pb2
from dspark.workers.drafters.base import DraftBlock


def block_to_proto(request_id: str, step_id: int, blk: DraftBlock, draft_us: int) -> draft_pb2.DraftBlock:
    k = 0 if blk.probs is None else int(blk.probs.shape[-1])
    msg = draft_pb2.DraftBlock(
        request_id=request_id,
        step_id=step_id,
        draft_token_ids=blk.token_ids,
        proposal_k=k,
        confidences=[float(c) for c in blk.confidence],
        draft_time_us=draft_us,
    )
    if k:
        n = len(blk.token_ids)
        msg.proposal_token_ids.extend(blk.prob_ids[:n].reshape(-1).tolist())
        msg.proposal_probs.extend(blk.probs[:n].float().reshape(-1).tolist())
    return msg


def block_from_proto(msg: draft_pb2.DraftBlock) -> DraftBlock:
    n, k = len(msg.draft_token_ids), msg.proposal_k
    probs = ids = None
    if k:
        if len(msg.proposal_probs) != n * k or len(msg.proposal_token_ids) != n * k:
            raise ValueError("proposal arrays do not match draft length x proposal_k")
        probs = torch.tensor(list(msg.proposal_probs), dtype=torch.float32).view(n, k)
        ids = torch.tensor(list(msg.proposal_token_ids), dtype=torch.long).view(n, k)
    conf = list(msg.confidences) or [1.0] * n
    return DraftBlock(token_ids=list(msg.draft_token_ids), probs=probs, prob_ids=ids, confidence=conf,
                      draft_seconds=msg.draft_time_us / 1e6)
