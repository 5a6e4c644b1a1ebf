"""Checks shared by every model family: a variable-length batch equals each request alone, greedy
decoding equals transformers', and the engine's batched requests equal each alone."""

from __future__ import annotations

import torch

from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def prefill(runner: LocalRunner, ids: list[int]) -> torch.Tensor:
    """Logits of every position of ``ids`` fed whole into slot 0 (from position 0)."""
    return runner.forward(StepInput(ids, [0], [0], [len(ids)])).logits


def assert_greedy_decode_matches_transformers(path, hf, prompts: list[list[int]], steps: int) -> None:
    """Two requests decoded together by our engine give transformers' greedy ids; fed those ids
    one at a time through our KV cache, every decode step's logits match transformers'."""
    from dspark.models.loader import load_model
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.request import SamplingParams

    lm = load_model(path, dtype="fp32", progress=False)
    engine = Engine(LocalRunner(lm.model, RunnerConfig(n_slots=2, max_seq=512)), lm.tokenizer, EngineConfig(max_batch=2))
    ours = engine.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))
    runner = LocalRunner(lm.model, RunnerConfig(n_slots=1, max_seq=512))
    for ids, seq in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
            ref_ids = ref.sequences[0, len(ids):].tolist()
            assert len(ref_ids) == steps and len(set(ref_ids)) > 5  # a real continuation, not one token
            assert seq.output_ids == ref_ids
            logits = [prefill(runner, ids)[-1:]]
            for i, t in enumerate(ref_ids[:-1]):
                logits.append(runner.forward(StepInput([t], [0], [len(ids) + i], [1])).logits)
        assert rel_err(torch.cat(logits), torch.cat(ref.logits).float()) < 1e-5


def assert_engine_batch_equals_alone(path, prompts: list[list[int]]) -> None:
    """The varlen check on the model, then the engine's greedy outputs batched equal each alone."""
    from dspark.models.loader import load_model
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.request import SamplingParams

    lm = load_model(path, dtype="fp32", progress=False)
    model, tok = lm.model, lm.tokenizer
    assert_varlen_batch_equals_alone(model, prompts)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    batched = Engine(LocalRunner(model, RunnerConfig(n_slots=3, max_seq=256)), tok,
                     EngineConfig(max_batch=3)).generate(prompts, params)
    for p, seq in zip(prompts, batched):
        one = Engine(LocalRunner(model, RunnerConfig(n_slots=1, max_seq=256)), tok,
                     EngineConfig(max_batch=1)).generate([p], params)[0]
        assert seq.output_ids == one.output_ids


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
