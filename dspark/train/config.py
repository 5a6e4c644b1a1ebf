"""Training configuration: frozen dataclasses per concern, composed into one ``TrainConfig``.

A config file per target model lives in ``dspark/train/configs/`` (JSON, one object per section);
missing fields take the defaults below.  Derived copies use ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from dspark.models.dspark_head import DSparkHeadConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    """Self-distillation data: which prompts, how they are split, how responses are generated."""

    prompts: str = "all"  # prompt set: wizardlm | mbpp | all | a JSONL path (see dspark.datasets)
    split_seed: int = 0  # seed of the hash that assigns each prompt to a split
    valid_fraction: float = 0.07  # held-out prompts for validation loss and STS calibration
    test_fraction: float = 0.10  # held-out prompts for benchmarks and tests (never trained or calibrated on)
    greedy_responses: int = 1  # responses per training prompt at temperature 0
    sampled_responses: int = 1  # responses per training prompt sampled at ``sample_temperature``
    sample_temperature: float = 1.0  # temperature of the sampled responses
    self_prompts: int = 0  # extra prompts written by the target itself (train / valid only, never test)
    self_prompt_max_tokens: int = 128  # length cap of a self-written prompt
    self_prompt_temperature: float = 1.0  # sampling temperature when the target writes a prompt
    self_prompt_top_p: float = 0.95  # nucleus for the self-written prompts (cuts the rare garbage tail)
    max_new_tokens: int = 256  # response length cap
    max_prompt_tokens: int = 640  # longer prompts are skipped
    gen_batch: int = 48  # concurrent requests while generating
    dtype: str = "bf16"  # target dtype for generation and features (the serving default)
    compile: bool = True  # generation runs the compiled step (RunnerConfig.compile): same output law, faster


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule."""

    steps: int = 3000  # optimiser steps
    seqs_per_step: int = 4  # sequences per batch
    anchors_per_seq: int = 16  # random anchors (blocks) per sequence
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay floor, relative to lr
    warmup_steps: int = 100  # linear warmup
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0  # global gradient-norm clip
    autocast_bf16: bool = True  # bf16 autocast on CPU (AMX/AVX512-BF16 matmuls)


@dataclass(frozen=True)
class LossConfig:
    """0.1 CE + 0.9 L1(p_draft, p_target) + 1.0 BCE(confidence, 1 - TV), position weights exp(-k/decay)."""

    ce_weight: float = 0.1  # cross-entropy on the target's sampled token
    l1_weight: float = 0.9  # distribution matching, ||p_draft - p_target||_1
    conf_weight: float = 1.0  # confidence head BCE against 1 - TV
    decay: float = 4.0  # position weight w_k = exp(-k / decay), k 0-based


@dataclass(frozen=True)
class RunConfig:
    """Bookkeeping of a run."""

    seed: int = 0  # model init and anchor sampling
    device: str = "cpu"  # cpu | cuda: where every stage runs (anchor sampling stays on the CPU, so both draw alike)
    threads: int = 2  # torch intra-op threads
    log_every: int = 10  # steps between progress lines
    eval_every: int = 250  # steps between validation passes
    checkpoint_every: int = 100  # steps between checkpoints
    eval_blocks: int = 512  # validation blocks per pass
    calib_prompts: int = 0  # validation prompts used for STS calibration (0 = all)
    calib_max_tokens: int = 128  # tokens generated per calibration prompt


@dataclass(frozen=True)
class TrainConfig:
    head: DSparkHeadConfig = field(default_factory=DSparkHeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    model: str | None = None  # target GGUF / HF folder; None = the embedded default model
    name: str = "SmolLM2-135M-Instruct"  # name of the shipped head file
    vocab_map: str | None = None  # id map file (dspark.train.vocab); None = <run>/vocab.safetensors (vocab stage)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        def sub(kind, key):
            raw = dict(d.get(key, {}))
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(raw) - names
            if unknown:
                raise ValueError(f"unknown {key} fields in the config: {sorted(unknown)}")
            if kind is OptimConfig and "betas" in raw:
                raw["betas"] = tuple(raw["betas"])
            return kind(**raw)

        head = DSparkHeadConfig.from_json(d.get("head", {}))
        return cls(
            head=head, data=sub(DataConfig, "data"), optim=sub(OptimConfig, "optim"),
            loss=sub(LossConfig, "loss"), run=sub(RunConfig, "run"),
            model=d.get("model"), name=d.get("name", cls.name), vocab_map=d.get("vocab_map"),
        )

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_json(json.loads(Path(path).read_text()))


__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "LossConfig", "RunConfig", "CONFIG_DIR"]
