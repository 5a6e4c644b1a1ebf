"""Shared statistics for the sampled losslessness tests (imported by test modules).

The pattern: a prompt whose first output token x1 is nearly certain; the second token comes out
of the first speculative step, and its empirical law must match p(x2 | prompt, x1) from plain
forward passes of the target.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from scipy import stats

from dspark.workers.runner import StepInput


def second_token_law(runner, prompt: list[int], temperature: float = 1.0) -> tuple[int, torch.Tensor]:
    """(x1 = argmax of the first step, p(x2 | prompt, x1) at ``temperature``), float64 [V]."""
    with torch.inference_mode():
        x1 = int(runner.forward(StepInput(prompt, [0], [0], [len(prompt)], [len(prompt) - 1])).logits[0].argmax())
        logits = runner.forward(StepInput(prompt + [x1], [0], [0], [len(prompt) + 1], [len(prompt)])).logits[0]
    return x1, torch.softmax(logits.double() / temperature, -1)


def chisquare_pvalue(counts: Mapping[int, int], p: torch.Tensor) -> float:
    """Chi-square p-value of token counts against the law p: tokens whose expected count is at
    least 5 are cells of their own, the rest are pooled into one cell."""
    total = sum(counts.values())
    big = [int(t) for t in torch.nonzero(p * total >= 5).flatten()]
    obs = [counts.get(t, 0) for t in big]
    exp = [float(p[t]) * total for t in big]
    obs.append(total - sum(obs))
    exp.append(total - sum(exp))
    if exp[-1] < 1e-9:  # nothing left to pool
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


def capture_first_blocks(drafter) -> list:
    """Wrap ``drafter.propose`` so each call records (the first request's ids, its block); returns
    the list the records go to."""
    captured, orig = [], drafter.propose

    def propose(seqs, block_len):
        blocks = orig(seqs, block_len)
        captured.append((list(seqs[0].all_ids), blocks[0]))
        return blocks

    drafter.propose = propose
    return captured
