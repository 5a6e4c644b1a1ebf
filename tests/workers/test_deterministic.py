"""Deterministic mode on the real default model in bf16: row-invariant logits, and greedy
speculative output token-identical to plain decoding.

Without the mode both tests fail on a CPU with oneDNN bf16 kernels: a verification pass over k
tokens rounds differently from k one-token steps, and the 135M model has near-ties.
"""

from __future__ import annotations

import pytest
import torch

from dspark.models.dspark_head import default_head_path
from dspark.models.loader import DEFAULT_MODEL_NAME, load_model
from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput

DETERMINISTIC = True  # the mode under test (False shows what the tests catch without it)


@pytest.fixture(scope="module")
def runner_bf16():
    torch.manual_seed(0)
    lm = load_model(dtype="bf16", progress=False)
    return lm, LocalRunner(lm.model, RunnerConfig(n_slots=4, max_seq=256, deterministic=DETERMINISTIC))


def _prompt(lm, text: str) -> list[int]:
    return lm.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_logits_do_not_depend_on_rows_or_neighbours(runner_bf16):
    lm, r = runner_bf16
    ids = _prompt(lm, "Explain in two sentences why the sky is blue.")
    other = _prompt(lm, "List five fruits and one fact about each.")
    P = len(ids)
    # Alone: the prompt in one pass, then 12 one-token decode steps (greedy).
    first = r.forward(StepInput(ids, [0], [0], [P], [P - 1])).logits
    tokens, alone = [int(first[0].argmax())], []
    for i in range(12):
        row = r.forward(StepInput([tokens[-1]], [0], [P + i], [1])).logits
        alone.append(row)
        tokens.append(int(row[0].argmax()))
    alone = torch.cat(alone)  # [12, V]

    # Together: the same prompt in two chunks next to another request's prefill, then the same
    # tokens verified in blocks of 1, 3, 5 and 3 beside that request's decode steps.
    r.forward(StepInput(other[:9] + ids[:10], [1, 2], [0, 0], [9, 10], []))
    last = len(other) - 9 + P - 10 - 1
    again = r.forward(StepInput(other[9:] + ids[10:], [1, 2], [9, 10], [len(other) - 9, P - 10], [last])).logits
    assert torch.equal(again[0], first[0])
    together, pos = [], 0
    for k in (1, 3, 5, 3):
        step = StepInput([tokens[0]] + tokens[pos : pos + k], [1, 2], [len(other) + pos, P + pos], [1, k])
        together.append(r.forward(step).logits[1:])
        pos += k
    together = torch.cat(together)
    mismatched = [i for i in range(12) if not torch.equal(together[i], alone[i])]
    assert mismatched == [], f"rows {mismatched} differ from one-token decoding"


PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences why the sky is blue.",
    "List five fruits and one fact about each.",
    "Write a function to find the shared elements from two lists.",
    "Give three tips for writing clean code.",
    "Summarize the plot of Hamlet in three sentences.",
]
MAX_TOKENS = 48


def _generate(draft: str, block: int, prompts: list[list[int]]) -> list[list[int]]:
    spec = EngineSpec(dtype="bf16", draft=draft, block_len=block,
                      runner=RunnerConfig(n_slots=len(prompts), max_seq=256, deterministic=DETERMINISTIC))
    built = build_engine(spec, progress=False)
    try:
        seqs = built.engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        if draft != "none":
            assert built.engine.metrics.num_accepted_tokens > 0  # speculation really happened
        return [s.output_ids for s in seqs]
    finally:
        built.close()


@pytest.fixture(scope="module")
def chat_prompts(runner_bf16):
    return [_prompt(runner_bf16[0], t) for t in PROMPTS]


@pytest.fixture(scope="module")
def plain_bf16(chat_prompts):
    return _generate("none", 0, chat_prompts)


@pytest.mark.parametrize("draft,block", [("ngram", 4), ("dspark", 7)])
def test_bf16_greedy_speculative_equals_plain(draft, block, chat_prompts, plain_bf16):
    if draft == "dspark" and not default_head_path(DEFAULT_MODEL_NAME).exists():
        pytest.skip("no DSpark head ships for the default model")
    spec = _generate(draft, block, chat_prompts)
    differing = [i for i, (a, b) in enumerate(zip(spec, plain_bf16)) if a != b]
    assert differing == [], f"prompts {differing} differ from plain decoding"
