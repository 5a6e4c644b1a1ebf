"""`bench spec`'s prompts: held-out prompts of each category bucket, taken round by round.

Buckets group WizardLM skills (``BUCKET_OF``) with MBPP+ tasks in "code"; the module doc of
:mod:`bench.spec` says why each bucket holds what it holds.
"""

from __future__ import annotations

import itertools

BUCKETS = ("code", "format", "math", "chat")
BUCKET_OF = {
    "code": "code", "Code Generation": "code", "Code Debug": "code",
    "Complex Format": "format", "Academic Writing": "format",
    "Math": "math", "Reasoning": "math",
}  # any other skill: chat


def bucket(category: str) -> str:
    return BUCKET_OF.get(category, "chat")


# -------------------------------------------------------------------------------------------
# Prompts
# -------------------------------------------------------------------------------------------
def _split_of():
    """prompt -> train/valid/test of the DSpark head's training config (None if unavailable)."""
    try:
        import json

        from dspark.models.dspark_head import default_head_path
        from dspark.models.loader import DEFAULT_MODEL_NAME
        from dspark.train.config import CONFIG_DIR, TrainConfig
        from dspark.train.data import assign_split, prompt_key

        meta = default_head_path(DEFAULT_MODEL_NAME).with_suffix(".json")
        if meta.exists():
            cfg = TrainConfig.from_json(json.loads(meta.read_text())["training"]["config"])
        else:
            cfg = TrainConfig.load(CONFIG_DIR / "smollm2-135m.json")
        return lambda p: assign_split(prompt_key(p), cfg.data)
    except Exception:
        return None


def select_prompts(source: str, per_bucket: int) -> list[dict]:
    """``per_bucket`` prompts of each bucket, held-out ones first, ordered round by round."""
    from dspark.datasets import load_prompts

    prompts = load_prompts(source)
    split = _split_of()
    rank = {"test": 0, "valid": 1, "train": 2}
    chosen: dict[str, list[dict]] = {b: [] for b in BUCKETS}
    order = sorted(range(len(prompts)), key=lambda i: (rank.get(split(prompts[i]), 3) if split else 0, i))
    for i in order:
        p = prompts[i]
        b = bucket(p.category)
        if len(chosen[b]) < per_bucket:
            chosen[b].append({"id": f"{p.source}:{p.id}", "bucket": b, "category": p.category,
                              "split": split(p) if split else None, "text": p.text})
    rounds = itertools.zip_longest(*(chosen[b] for b in BUCKETS))
    return [p for rnd in rounds for p in rnd if p is not None]
