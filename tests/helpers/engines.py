"""Greedy outputs of an engine built from an :class:`EngineSpec`, and a figure read off it."""

from __future__ import annotations

from typing import Callable

from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.request import SamplingParams

PROMPTS = ["Write a haiku about the sea.", "List three prime numbers and explain why they are prime."]


def greedy_outputs(tok, spec: EngineSpec, read: Callable = lambda engine: None, max_tokens: int = 40,
                   prompts: list[str] = PROMPTS) -> tuple[list[list[int]], object]:
    """The chat prompts' greedy output ids, and ``read(engine)`` taken before the engine closes."""
    built = build_engine(spec, progress=False)
    try:
        ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        seqs = built.engine.generate(ids, SamplingParams(max_tokens=max_tokens))
        return [s.output_ids for s in seqs], read(built.engine)
    finally:
        built.close()


def shipped_serving_head():
    """(the default model in bf16, the shipped DSpark head packed as the serving drafter packs it:
    its draft vocabulary, int8 products); skips the test where no head ships."""
    import pytest

    from dspark.models.dspark_head import default_head_path, load_head
    from dspark.models.loader import load_model

    loaded = load_model(None, dtype="bf16", progress=False)
    path = default_head_path(loaded.name)
    if not path.exists():
        pytest.skip("no shipped head")
    head = load_head(path, loaded.model)
    head.use_draft_vocab(head.cfg.draft_vocab or 8192)
    head.pack_for_inference(weights="int8")
    return loaded, head
