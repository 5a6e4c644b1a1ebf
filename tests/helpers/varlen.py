"""One check shared by every model family: a variable-length batch equals each request alone."""

from __future__ import annotations

import torch

from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput


def assert_varlen_batch_equals_alone(model, prompts: list[list[int]], tol: float = 1e-5) -> None:
    """Three prompts (the first two longer than 3 tokens): each fed alone as a prefix then its
    last 3 tokens, against one runner that prefills part of the first two, then runs one step
    mixing their continuations with the third's whole prefill.  Relative error below ``tol``."""
    assert len(prompts) == 3
    alone = []
    runner = LocalRunner(model, RunnerConfig(n_slots=3, max_seq=128))
    for i, p in enumerate(prompts):
        runner.forward(StepInput(p[:-3], [i], [0], [len(p) - 3]))
        alone.append(runner.forward(StepInput(p[-3:], [i], [len(p) - 3], [3])).logits)
    a, b, c = prompts
    # Part of the first two prefixes only, so the mixed step starts them at other positions.
    ha, hb = (len(a) - 3) // 2, (len(b) - 3) // 2
    together = LocalRunner(model, RunnerConfig(n_slots=3, max_seq=128))
    together.forward(StepInput(a[:ha] + b[:hb], [0, 1], [0, 0], [ha, hb]))
    out = together.forward(StepInput(a[ha:] + b[hb:] + c, [0, 1, 2], [ha, hb, 0],
                                     [len(a) - ha, len(b) - hb, len(c)])).logits
    ends = torch.tensor([len(a) - ha, len(a) - ha + len(b) - hb, len(a) - ha + len(b) - hb + len(c)])
    for end, want in zip(ends.tolist(), alone):
        got = out[end - 3 : end].float()
        err = ((got - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
        assert err < tol, f"relative error {err:.2e}"
