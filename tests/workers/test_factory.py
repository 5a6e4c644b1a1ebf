"""build_engine is the one assembly path: callers bring only what they must make themselves."""

from __future__ import annotations

import pytest

from dspark.workers.budget_policy import AdaptiveBudget
from dspark.workers.drafters.ngram import NgramDrafter
from dspark.workers.factory import EngineParts, EngineSpec, build_engine
from dspark.workers.request import SamplingParams
from dspark.workers.runner import RunnerConfig
from dspark.workers.spec_gate import SpeculationGate

SMALL = RunnerConfig(n_slots=2, max_seq=256)


def test_adaptive_policy_with_a_callers_drafter():
    made = []

    def drafter(ctx):
        assert ctx.target_runner is not None and ctx.name and ctx.loaded is not None
        made.append(NgramDrafter(max_ngram=3))
        return made[0]

    spec = EngineSpec(dtype="fp32", draft="ngram", block_len=3, runner=SMALL, verify_policy="adaptive")
    built = build_engine(spec, progress=False, parts=EngineParts(drafter=drafter))
    try:
        eng = built.engine
        assert eng.drafter is made[0]
        assert isinstance(eng.budget, AdaptiveBudget) and eng.budget is built.adaptive and built.costs is not None
        assert isinstance(eng.gate, SpeculationGate)
        ids = built.tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
        (seq,) = eng.generate([ids], SamplingParams(max_tokens=4))
        assert len(seq.output_ids) == 4
    finally:
        built.close()


def test_fixed_policy_has_no_gate_and_adaptive_refuses_a_second_budget():
    built = build_engine(EngineSpec(dtype="fp32", draft="ngram", runner=SMALL), progress=False)
    try:
        assert built.engine.gate is None and built.adaptive is None and built.model_name
    finally:
        built.close()
    with pytest.raises(ValueError, match="not both"):
        build_engine(EngineSpec(dtype="fp32", verify_policy="adaptive"), budget=lambda b, n: [0] * len(b))
    with pytest.raises(ValueError, match="verify_policy must be one of fixed, adaptive"):
        build_engine(EngineSpec(dtype="fp32", verify_policy="dynamic"))
