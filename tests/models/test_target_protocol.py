"""Every target family serves the one interface the runner, tensor parallelism and the drafters
use (``dspark.models.target``): the same forward signature, a cache with the slot bookkeeping,
and a step that runs through a LocalRunner."""

from __future__ import annotations

import inspect

import pytest

from dspark.models.loader import load_model
from dspark.models.target import TargetCache, TargetModel
from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput
from helpers.tiny_deepseek_v4 import write_tiny_folder
from helpers.tiny_hf import tiny_gemma4, tiny_qwen3
from helpers.tiny_models import tiny_target


def _llama(tmp_path):
    return tiny_target()


def _qwen3(tmp_path):
    tiny_qwen3(tmp_path / "qwen3")
    return load_model(tmp_path / "qwen3", dtype="fp32", progress=False).model


def _gemma4(tmp_path):
    tiny_gemma4(tmp_path / "gemma4")
    return load_model(tmp_path / "gemma4", dtype="fp32", progress=False).model


def _deepseek_v4(tmp_path):
    write_tiny_folder(tmp_path / "v4", 300, 3)
    return load_model(tmp_path / "v4", dtype="fp32", progress=False).model


@pytest.mark.parametrize("build", [_llama, _qwen3, _gemma4, _deepseek_v4])
def test_each_family_is_a_target_model(build, tmp_path):
    model = build(tmp_path)
    assert isinstance(model, TargetModel), type(model).__name__
    expected = inspect.signature(TargetModel.forward).parameters
    got = inspect.signature(type(model).forward).parameters
    assert [(n, p.default) for n, p in got.items()] == [(n, p.default) for n, p in expected.items()], type(model)
    runner = LocalRunner(model, RunnerConfig(n_slots=2, max_seq=64))
    assert isinstance(runner.cache, TargetCache)
    slot = runner.cache.allocate()
    out = runner.forward(StepInput([1, 2, 3], [slot], [0], [3]))
    assert out.logits.shape == (3, model.args.vocab_size) and runner.cache.lengths[slot] == 3
    runner.cache.truncate(slot, 1)
    assert runner.cache.lengths[slot] == 1
