"""Wire a model, a runner (single device or TP group), a drafter, a budget and an engine together.

``build_engine`` is the one place that assembles an engine; the in-process CLI, the benchmarks
and the cluster's verifier groups all call it.  What a caller must make itself (a TP group of Ray
actors, a drafter that talks to remote draft workers) comes in as ``EngineParts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from dspark.models.loader import LoadedModel, default_model_path, load_model, load_tokenizer
from dspark.models.tokenizer import Tokenizer
from dspark.workers.budget_policy import AdaptiveBudget, CostModel, VerifyBudget, fixed_budget, profile_step_costs
from dspark.workers.drafters import registry
from dspark.workers.drafters.base import Drafter
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.runner import LocalRunner, RunnerConfig, TPGroup, TPSpec
from dspark.workers.scheduling import VerifyPolicy
from dspark.workers.spec_gate import SpeculationGate

VERIFY_POLICIES = ("fixed", "adaptive")


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build an engine in this process."""

    model: str | None = None  # GGUF file or HF folder; None = the embedded default model
    dtype: str = "bf16"  # bf16 | fp32 | fp16
    weights: str = "dense"  # dense | q4: a GGUF file's 4-bit layer matrices as stored (dspark.models.q4)
    device: str = "cpu"  # cpu | cuda
    tp: int = 1  # tensor-parallel ranks (spawned processes on this host unless EngineParts.tp_group)
    draft: str = "none"  # "none" or a registered drafter kind (dspark.workers.drafters.registry)
    block_len: int = 4  # draft tokens per block
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    max_prefill_tokens: int = 512  # chunked-prefill budget per step
    draft_options: tuple[tuple[str, object], ...] = ()  # drafter settings, checked against the kind's options
    # fixed: verify whole blocks; adaptive: AdaptiveBudget over step costs profiled at build time,
    # plus the SpeculationGate (speculate or not, by measured throughput) when there is a drafter.
    verify_policy: str = "fixed"
    speculation_gate: bool = True  # adaptive verification only; False: speculate every step


class TensorParallelGroup(Protocol):
    """Rank 0 (``driver``, the engine's runner) of a group whose other ranks run elsewhere."""

    driver: LocalRunner

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineParts:
    """What a caller makes itself; ``build_engine`` makes everything else from the spec.

    tp_group: makes the TP group from its ``TPSpec`` (e.g. ranks as Ray actors in a placement
      group); None: ranks are processes spawned on this host.  Either way this process holds only
      rank 0's shard, unless the drafter reuses the whole target's weights.
    drafter: builds the drafter of ``spec.draft`` instead of the registry (e.g. the verifier
      group's RemoteDrafter, which drafts on draft workers); the options are still checked.
    """

    tp_group: Callable[[TPSpec], TensorParallelGroup] | None = None
    drafter: Callable[[registry.DraftContext], Drafter] | None = None


@dataclass
class BuiltEngine:
    engine: Engine
    # The target as this process holds it: the whole model, or with a tensor-parallel group rank
    # 0's shard (a whole copy instead when the drafter reuses the whole target's weights).
    loaded: LoadedModel
    tokenizer: Tokenizer
    model_name: str  # the target's short name
    tp_group: TensorParallelGroup | None = None
    costs: CostModel | None = None  # profiled step costs (adaptive verification)
    adaptive: AdaptiveBudget | None = None  # the engine's budget under adaptive verification
    closers: list = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()
        if self.tp_group is not None:
            self.tp_group.close()
            self.tp_group = None


def build_engine(
    spec: EngineSpec, budget: VerifyBudget = fixed_budget, progress: bool = True, parts: EngineParts = EngineParts()
) -> BuiltEngine:
    if spec.draft != "none":  # unknown kinds and options are refused before anything loads
        registry.parse_options(spec.draft, spec.draft_options)
    if spec.verify_policy not in VERIFY_POLICIES:
        raise ValueError(f"verify_policy must be one of {', '.join(VERIFY_POLICIES)} (got {spec.verify_policy!r})")
    if spec.verify_policy == "adaptive" and budget is not fixed_budget:
        raise ValueError("pass a budget or verify_policy='adaptive', not both")
    if spec.weights != "dense" and spec.tp > 1:
        raise ValueError(f"--weights {spec.weights} serves one rank (no tensor-parallel cut of its blocks); use --tp 1")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    local_kind = registry.get(spec.draft) if spec.draft != "none" and parts.drafter is None else None
    tp_group = None
    if spec.tp > 1:
        tp_spec = TPSpec(spec.model, spec.dtype, spec.device, spec.tp, spec.runner)
        tp_group = parts.tp_group(tp_spec) if parts.tp_group is not None else TPGroup(tp_spec)
        runner = tp_group.driver
        # Rank 0's shard stands for the target in this process (its tokenizer; the drafters that
        # build from a shard, takes_target_shard); a drafter that reuses the whole target's
        # weights gets a whole copy loaded beside the group.
        if local_kind is not None and local_kind.needs_weights and not local_kind.takes_target_shard:
            device = "cpu" if spec.device == "cpu" else "cuda:0"
            loaded = load_model(spec.model, dtype=spec.dtype, device=device, progress=False)
            tokenizer, args, name = loaded.tokenizer, loaded.args, loaded.name
        else:
            tokenizer, args, name = load_tokenizer(spec.model)
            source = str(spec.model or default_model_path())
            loaded = LoadedModel(model=runner.model, tokenizer=tokenizer, args=args, source=source, name=name)
    else:
        loaded = load_model(spec.model, dtype=spec.dtype, device=spec.device, progress=progress, weights=spec.weights)
        runner = LocalRunner(loaded.model, spec.runner)
        tokenizer, args, name = loaded.tokenizer, loaded.args, loaded.name
    drafter = None
    if spec.draft != "none":
        ctx = registry.DraftContext(loaded=loaded, args=args, target_runner=runner, runner=spec.runner,
                                    model=spec.model, dtype=spec.dtype, device=runner.device, name=name)
        drafter = parts.drafter(ctx) if parts.drafter is not None else registry.build_drafter(
            spec.draft, ctx, spec.draft_options)
    costs = adaptive = gate = None
    if spec.verify_policy == "adaptive":
        # Profile before serving, while every cache slot is free.
        costs = profile_step_costs(runner)
        # The local policy until a scheduler publishes one: Algorithm 1 over whole blocks.
        local = VerifyPolicy(max_block_len=max(1, spec.block_len), budget_mode="algorithm1")
        budget = adaptive = AdaptiveBudget(costs, local)
        # Adaptive verification also decides whether to speculate at all, by measured throughput.
        gate = SpeculationGate() if spec.speculation_gate and drafter is not None else None
    cfg = EngineConfig(
        max_batch=spec.runner.n_slots, max_prefill_tokens=spec.max_prefill_tokens, block_len=spec.block_len
    )
    engine = Engine(runner, tokenizer, cfg, drafter=drafter, budget=budget, gate=gate)
    return BuiltEngine(engine=engine, loaded=loaded, tokenizer=tokenizer, model_name=name, tp_group=tp_group,
                       costs=costs, adaptive=adaptive)


__all__ = ["BuiltEngine", "EngineParts", "EngineSpec", "TensorParallelGroup", "build_engine"]
