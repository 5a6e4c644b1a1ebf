"""Prompt sets for tests, benchmarks and drafter training, read from the shared data folder.

The folder is ``$DSPARK_DATA_DIR`` or ``<repo>/../shared/data``; its files are never copied
into the project.  Each prompt keeps its category (WizardLM skill, or "code" for MBPP+), so
benchmarks can report per category.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

FILES = {"wizardlm": "wizardlm_testset.jsonl", "mbpp": "mbppplus_prompts.jsonl"}


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str
    source: str


def data_dir() -> Path:
    env = os.environ.get("DSPARK_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


# Used only when the shared data folder is absent (e.g. a bare checkout): prompts written for
# this project, half code, half general, so tests and demos still have something to chew on.
BUILTIN = [
    ("code", "Write a Python function that returns the largest element of a list."),
    ("general", "Explain why the sky is blue in two sentences."),
    ("code", "Write a function to reverse the words in a sentence."),
    ("general", "List three benefits of regular exercise."),
    ("code", "Write a Python function that checks whether a number is prime."),
    ("general", "What is the difference between weather and climate?"),
    ("code", "Write a function to count how often each character appears in a string."),
    ("general", "Give a short definition of photosynthesis."),
    ("code", "Write a Python function that merges two sorted lists into one sorted list."),
    ("general", "Describe a cat to someone who has never seen one."),
    ("code", "Write a function that returns the n-th Fibonacci number iteratively."),
    ("general", "Name five countries in Europe and their capitals."),
    ("code", "Write a function to remove duplicates from a list while keeping the order."),
    ("general", "Why do we have seasons on Earth?"),
    ("code", "Write a Python function that converts Celsius to Fahrenheit."),
    ("general", "Suggest a healthy breakfast and explain why it is healthy."),
    ("code", "Write a function that checks whether two strings are anagrams."),
    ("general", "What are the three states of matter? Give an example of each."),
    ("code", "Write a Python function that flattens a list of lists."),
    ("general", "Write a haiku about the ocean."),
]


def load_prompts(source: str | Path = "all", limit: int | None = None) -> list[Prompt]:
    """Prompts from ``wizardlm``, ``mbpp``, ``all`` (interleaved) or a JSONL file path."""
    if str(source) in ("all", *FILES) and not data_dir().exists():
        warnings.warn(f"shared prompt data not found at {data_dir()}; using the built-in prompt sample")
        out = [Prompt(id=f"builtin-{i}", text=t, category=c, source="builtin") for i, (c, t) in enumerate(BUILTIN)]
        return out[:limit] if limit else out
    if source == "all":
        a, b = load_prompts("wizardlm"), load_prompts("mbpp")
        mixed = [p for pair in zip(a, b) for p in pair] + a[len(b):] + b[len(a):]
        return mixed[:limit] if limit else mixed
    path = Path(source) if str(source) not in FILES else data_dir() / FILES[str(source)]
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} not found (set DSPARK_DATA_DIR to the shared data folder)")
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        text = row.get("Instruction") or row.get("prompt") or row.get("text")
        if not isinstance(text, str):
            continue
        cat = row.get("Skill") or ("code" if "prompt" in row else "general")
        out.append(Prompt(id=str(row.get("idx", row.get("id", i))), text=text, category=str(cat), source=path.stem))
    return out[:limit] if limit else out


def split_prompts(prompts: list[Prompt], held_out_every: int = 5) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic train / held-out split: every ``held_out_every``-th prompt is held out."""
    train = [p for i, p in enumerate(prompts) if i % held_out_every != 0]
    held = [p for i, p in enumerate(prompts) if i % held_out_every == 0]
    return train, held
