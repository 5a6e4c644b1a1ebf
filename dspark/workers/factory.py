"""Wire a model, a runner (single device or TP group), a drafter and an engine together."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dspark.models.loader import LoadedModel, load_model
from dspark.workers.engine import Engine, EngineConfig, VerifyBudget, fixed_budget
from dspark.workers.runner import LocalRunner, RunnerConfig, TPGroup, TPSpec

@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build an engine in this process."""

    model: str | None = None  # GGUF file or HF folder; None = the embedded default model
    dtype: str = "bf16"  # bf16 | fp32 | fp16
    device: str = "cpu"  # cpu | cuda
    tp: int = 1  # tensor-parallel ranks (spawned processes on this host)
    draft: str = "none"  # "none" or a registered drafter kind (dspark.workers.drafters.registry)
    block_len: int = 4  # draft tokens per block
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    max_prefill_tokens: int = 512  # chunked-prefill budget per step
    draft_options: tuple[tuple[str, object], ...] = ()  # drafter settings, checked against the kind's options


@dataclass
class BuiltEngine:
    engine: Engine
    loaded: LoadedModel
    tp_group: TPGroup | None = None
    closers: list = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()
        if self.tp_group is not None:
            self.tp_group.close()
            self.tp_group = None


def build_engine(spec: EngineSpec, budget: VerifyBudget = fixed_budget, progress: bool = True) -> BuiltEngine:
    from dspark.workers.drafters import registry

    if spec.draft != "none":  # unknown kinds and options are refused before anything loads
        registry.parse_options(spec.draft, spec.draft_options)
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    tp_group = None
    if spec.tp > 1:
        tp_group = TPGroup(TPSpec(spec.model, spec.dtype, spec.device, spec.tp, spec.runner))
        runner = tp_group.driver
        # Rank 0 holds a sharded model; the drafters that reuse target weights need a whole copy.
        loaded = load_model(spec.model, dtype=spec.dtype, device="cpu" if spec.device == "cpu" else "cuda:0", progress=False)
    else:
        loaded = load_model(spec.model, dtype=spec.dtype, device=spec.device, progress=progress)
        runner = LocalRunner(loaded.model, spec.runner)
    cfg = EngineConfig(
        max_batch=spec.runner.n_slots, max_prefill_tokens=spec.max_prefill_tokens, block_len=spec.block_len
    )
    drafter = None
    if spec.draft != "none":
        ctx = registry.DraftContext(loaded=loaded, args=loaded.args, target_runner=runner, runner=spec.runner,
                                    model=spec.model, dtype=spec.dtype, device=runner.device)
        drafter = registry.build_drafter(spec.draft, ctx, spec.draft_options)
    engine = Engine(runner, loaded.tokenizer, cfg, drafter=drafter, budget=budget)
    return BuiltEngine(engine=engine, loaded=loaded, tp_group=tp_group)
