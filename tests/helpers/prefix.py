"""A shared-prefix scenario for the engine: reuse from a live slot, in place, and across turns."""

from __future__ import annotations

from dspark.workers.engine import Engine
from dspark.workers.request import SamplingParams

SYSTEM = ("You are a careful assistant for a travel company. Answer in two short sentences, name one "
          "concrete place in every answer, never invent prices, and say so when you do not know.")


def _chat(tok, question: str) -> list[int]:
    return tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def run_shared_prefix(engine: Engine, tok) -> tuple[list[list[int]], list[int]]:
    """A runs; once its prompt is cached B arrives (copy from a live slot); C comes after both
    finished (a retained slot in place); D continues C's conversation (prompt and output)."""
    params = SamplingParams(max_tokens=20)
    a = engine.add_request(_chat(tok, "Where should I go in spring?"), params)
    while a.num_cached < len(a.prompt_ids):
        engine.step()
    b = engine.add_request(_chat(tok, "Where should I go in autumn?"), params)
    engine.run_until_done()
    c = engine.add_request(_chat(tok, "Is the sea warm in June?"), params)
    engine.run_until_done()
    turn = tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is the sea warm in June?"},
                            {"role": "assistant", "content": tok.decode(c.output_ids)},
                            {"role": "user", "content": "And in September?"}])
    d = engine.add_request(turn, params)
    engine.run_until_done()
    seqs = (a, b, c, d)
    return [s.output_ids for s in seqs], [s.num_reused for s in seqs]
