"""Self-distillation data: the target's own responses to the prompt sets, generated with our engine.

Prompts are split by a hash of their identity into train / valid / test, so a split never changes
when prompts are added and the held-out prompts are known to benchmarks and tests without a run
directory.  Besides the prompt sets, the target can write prompts itself (``data.self_prompts``):
it gets the chat template up to the user's turn and samples the user's message.  Those prompts go
to train or valid only, so the test split stays the prompt sets' held-out part.  Responses and
self-written prompts are cached as JSONL (one object per row, appended as requests finish), so an
interrupted generation resumes where it stopped.
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


SELF_SOURCE = "self"


def self_prompt_split(key: str, cfg: DataConfig) -> str:
    """A self-written prompt's split: its hash decides as for any prompt, but test becomes train."""
    split = assign_split(key, cfg)
    return "train" if split == "test" else split


def plan_jobs(cfg: DataConfig, splits: tuple[str, ...] = ("train", "valid"),
              extra: list[Prompt] | None = None) -> list[Job]:
    """Every response to generate, round by round: each prompt's first response, then each one's second...

    So a run cut short (or capped by ``limit``) still covers every prompt.  ``extra`` are
    self-written prompts (split by ``self_prompt_split``).
    """
    by_split = split_prompts(cfg)
    prompts = [(p, split) for split in splits for p in by_split[split]]
    prompts += [(p, s) for p in extra or [] if (s := self_prompt_split(prompt_key(p), cfg)) in splits]
    rounds: list[list[Job]] = []
    for p, split in prompts:
        k = prompt_key(p)
        mine = [Job(f"{k}|greedy{i}", p, split, 0.0, i) for i in range(cfg.greedy_responses)]
        for i in range(cfg.sampled_responses):
            seed = int.from_bytes(hashlib.sha1(f"{k}|{i}".encode()).digest()[:7], "big")
            mine.append(Job(f"{k}|sample{i}", p, split, cfg.sample_temperature, seed))
        for r, job in enumerate(mine):
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(job)
    return [job for r in rounds for job in r]


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


def _drive(engine, requests, gen_batch: int, on_finish, desc: str) -> None:
    """Continuous batching of ``(request_id, prompt_ids, params)``; ``on_finish(request_id, seq, out)``."""
    pending: dict[str, object] = {}
    queue = list(requests)
    bar = tqdm(total=len(queue), desc=desc, unit="req")
    t0, n_tok = time.perf_counter(), 0
    while queue or engine.has_work:
        while queue and len(engine.waiting) + len(engine.running) < gen_batch:
            rid, ids, params = queue.pop(0)
            pending[rid] = engine.add_request(ids, params, request_id=rid)
        for out in engine.step():
            n_tok += len(out.new_token_ids)
            if out.finished:
                on_finish(out.request_id, pending.pop(out.request_id), out)
                bar.update(1)
                bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
    bar.close()


def _build(cfg: DataConfig, model: str | None, max_seq: int, device: str):
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig

    spec = EngineSpec(model=model, dtype=cfg.dtype, device=device,
                      runner=RunnerConfig(n_slots=cfg.gen_batch, max_seq=max_seq, compile=cfg.compile))
    return build_engine(spec, progress=False)


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def kept_self_prompts(rows: list[dict], want: int) -> list[Prompt]:
    """The first ``want`` usable attempts (see ``generate_self_prompts``), in attempt order."""
    seen, out = set(), []
    for r in sorted(rows, key=lambda r: r["attempt"]):
        norm = _normalised(r["text"])
        if r["finish_reason"] == "stop" and len(r["text"].strip()) >= 16 and norm not in seen:
            seen.add(norm)
            out.append(Prompt(id=str(r["attempt"]), text=r["text"].strip(), category="self", source=SELF_SOURCE))
    return out[:want]


def planned_rows(cfg: DataConfig, responses: Path, self_prompts: Path) -> list[dict]:
    """The cached responses the config plans (rows of an earlier, larger config are left out)."""
    extra = kept_self_prompts(read_responses(self_prompts), cfg.self_prompts) if cfg.self_prompts > 0 else []
    keys = {j.key for j in plan_jobs(cfg, extra=extra)}
    return [r for r in read_responses(responses) if r["key"] in keys]


def generate_self_prompts(cfg: DataConfig, out_path: Path, model: str | None = None,
                          device: str = "cpu") -> list[Prompt]:
    """The target writes ``cfg.self_prompts`` user messages (cached in ``out_path``, resumable).

    Each attempt samples from the chat template cut where the user's message starts, with its own
    seed.  Kept: attempts that ended their turn (a stop token), at least 16 characters long, and
    not a repeat of an earlier kept prompt (case and whitespace ignored).  At most four attempts
    per wanted prompt, so a model that cannot end its turn does not loop forever.
    """
    from dspark.workers.request import SamplingParams

    want = cfg.self_prompts
    rows = read_responses(out_path)
    if want <= 0:
        return []

    def kept(rows):
        return kept_self_prompts(rows, want)

    built = None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        while len(kept(rows)) < want:
            start = max((r["attempt"] for r in rows), default=-1) + 1
            if start >= 4 * want:
                break
            n = min(4 * want - start, max(cfg.gen_batch, 2 * (want - len(kept(rows)))))
            if built is None:
                built = _build(cfg, model, max_seq=cfg.self_prompt_max_tokens + 64, device=device)
            tok = built.loaded.tokenizer
            prefix = tok.user_turn_prefix()
            reqs = [(f"self{a}", prefix, SamplingParams(
                max_tokens=cfg.self_prompt_max_tokens, temperature=cfg.self_prompt_temperature,
                top_p=cfg.self_prompt_top_p, seed=a)) for a in range(start, start + n)]
            with out_path.open("a") as fh:
                def done(rid, seq, out):
                    row = {"attempt": int(rid[4:]), "text": tok.decode(seq.output_ids),
                           "finish_reason": out.finish_reason}
                    rows.append(row)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()

                _drive(built.engine, reqs, cfg.gen_batch, done, "writing prompts")
    finally:
        if built is not None:
            built.close()
    return kept(rows)


def generate_responses(cfg: DataConfig, out_path: Path, model: str | None = None,
                       splits: tuple[str, ...] = ("train", "valid"), limit: int | None = None,
                       extra: list[Prompt] | None = None, device: str = "cpu") -> list[dict]:
    """Generate (or finish generating) the responses of ``splits`` into ``out_path`` (JSONL).

    Plain decoding with our engine, ``cfg.gen_batch`` requests at a time (continuous batching).
    ``extra`` adds self-written prompts.  ``limit`` caps the planned jobs (the first ``limit``,
    done or not), so a resumed run finishes the same set.  Returns the cached rows of the planned
    jobs (rows an earlier, larger plan left in the file stay there, unused).
    """
    from dspark.workers.request import SamplingParams

    done = {r["key"] for r in read_responses(out_path)}
    planned = plan_jobs(cfg, splits, extra)[:limit]
    jobs = [j for j in planned if j.key not in done]
    if jobs:
        built = _build(cfg, model, max_seq=cfg.max_prompt_tokens + cfg.max_new_tokens + 16, device=device)
        tok = built.loaded.tokenizer
        by_key, reqs = {}, []
        for job in jobs:
            ids = chat_ids(tok, job.prompt.text)
            if len(ids) <= cfg.max_prompt_tokens:
                by_key[job.key] = (job, ids)
                reqs.append((job.key, ids, SamplingParams(max_tokens=cfg.max_new_tokens, temperature=job.temperature,
                                                          seed=job.seed)))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with out_path.open("a") as fh:
                def finished(rid, seq, out):
                    job, ids = by_key[rid]
                    row = {
                        "key": job.key, "prompt_id": prompt_key(job.prompt), "split": job.split,
                        "category": job.prompt.category, "temperature": job.temperature, "seed": job.seed,
                        "prompt_ids": ids, "output_ids": list(seq.output_ids),
                        "finish_reason": out.finish_reason,
                    }
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()

                _drive(built.engine, reqs, cfg.gen_batch, finished, "generating responses")
        finally:
            built.close()
    keys = {j.key for j in planned}
    return [r for r in read_responses(out_path) if r["key"] in keys]


__all__ = ["SPLITS", "SELF_SOURCE", "assign_split", "self_prompt_split", "split_prompts", "held_out_prompts",
           "plan_jobs", "planned_rows", "kept_self_prompts", "generate_self_prompts", "generate_responses", "read_responses", "chat_ids", "prompt_key"]
