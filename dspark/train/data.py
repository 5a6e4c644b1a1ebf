"""Self-distillation data: the target's own responses to the prompt sets, generated with our engine.

Prompts are split by a hash of their identity into train / valid / test, so a split never changes
when prompts are added and the held-out prompts are known to benchmarks and tests without a run
directory.  Responses are cached as JSONL (one object per response, appended as requests finish),
so an interrupted generation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dspark.datasets import Prompt, load_prompts
from dspark.train.config import DataConfig

SPLITS = ("train", "valid", "test")


def prompt_key(p: Prompt) -> str:
    return f"{p.source}:{p.id}"


def assign_split(key: str, cfg: DataConfig) -> str:
    """train / valid / test from a hash of the prompt key (stable, independent of prompt order)."""
    h = hashlib.sha1(f"{cfg.split_seed}:{key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.valid_fraction:
        return "valid"
    return "train"


def split_prompts(cfg: DataConfig) -> dict[str, list[Prompt]]:
    """All prompts of ``cfg.prompts`` grouped by split."""
    out: dict[str, list[Prompt]] = {s: [] for s in SPLITS}
    for p in load_prompts(cfg.prompts):
        out[assign_split(prompt_key(p), cfg)].append(p)
    return out


def held_out_prompts(cfg: DataConfig, split: str = "test", limit: int | None = None) -> list[Prompt]:
    return split_prompts(cfg)[split][:limit]


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": text}])


@dataclass(frozen=True)
class Job:
    key: str  # unique per response: "<prompt key>|<mode><index>"
    prompt: Prompt
    split: str
    temperature: float
    seed: int


def plan_jobs(cfg: DataConfig, splits: tuple[str, ...] = ("train", "valid")) -> list[Job]:
    jobs = []
    by_split = split_prompts(cfg)
    for split in splits:
        for p in by_split[split]:
            k = prompt_key(p)
            for i in range(cfg.greedy_responses):
                jobs.append(Job(f"{k}|greedy{i}", p, split, 0.0, i))
            for i in range(cfg.sampled_responses):
                seed = int.from_bytes(hashlib.sha1(f"{k}|{i}".encode()).digest()[:7], "big")
                jobs.append(Job(f"{k}|sample{i}", p, split, cfg.sample_temperature, seed))
    return jobs


def read_responses(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
    return rows


def generate_responses(cfg: DataConfig, out_path: Path, model: str | None = None,
                       splits: tuple[str, ...] = ("train", "valid"), limit: int | None = None) -> list[dict]:
    """Generate (or finish generating) the responses of ``splits`` into ``out_path`` (JSONL).

    Plain decoding with our engine, ``cfg.gen_batch`` requests at a time (continuous batching).
    ``limit`` caps the planned jobs (the first ``limit``, done or not), so a resumed run finishes
    the same set.  Returns every cached row.
    """
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    done = {r["key"] for r in read_responses(out_path)}
    jobs = [j for j in plan_jobs(cfg, splits)[:limit] if j.key not in done]
    if jobs:
        max_seq = cfg.max_prompt_tokens + cfg.max_new_tokens + 16
        spec = EngineSpec(model=model, dtype=cfg.dtype, runner=RunnerConfig(n_slots=cfg.gen_batch, max_seq=max_seq))
        built = build_engine(spec, progress=False)
        engine, tok = built.engine, built.loaded.tokenizer
        out_path.parent.mkdir(parents=True, exist_ok=True)
        pending: dict[str, tuple[Job, list[int], object]] = {}
        queue = list(jobs)
        bar = tqdm(total=len(jobs), desc="generating responses", unit="resp")
        t0, n_tok = time.perf_counter(), 0
        with out_path.open("a") as fh:
            while queue or engine.has_work:
                while queue and len(engine.waiting) + len(engine.running) < cfg.gen_batch:
                    job = queue.pop(0)
                    ids = chat_ids(tok, job.prompt.text)
                    if len(ids) > cfg.max_prompt_tokens:
                        bar.update(1)
                        continue
                    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=job.temperature, seed=job.seed)
                    seq = engine.add_request(ids, params, request_id=job.key)
                    pending[seq.request_id] = (job, ids, seq)
                for out in engine.step():
                    n_tok += len(out.new_token_ids)
                    if not out.finished:
                        continue
                    job, ids, seq = pending.pop(out.request_id)
                    row = {
                        "key": job.key, "prompt_id": prompt_key(job.prompt), "split": job.split,
                        "category": job.prompt.category, "temperature": job.temperature, "seed": job.seed,
                        "prompt_ids": ids, "output_ids": list(seq.output_ids),
                        "finish_reason": out.finish_reason,
                    }
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
        bar.close()
        built.close()
    return read_responses(out_path)


__all__ = ["SPLITS", "assign_split", "split_prompts", "held_out_prompts", "plan_jobs", "generate_responses",
           "read_responses", "chat_ids", "prompt_key"]
