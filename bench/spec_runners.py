"""`bench spec`'s measurements, run in engine processes: our engine (plain or with a drafter)
and Hugging Face transformers (plain and prompt lookup), and the process that keeps one alive.

At concurrency 1 each configuration is a :class:`Worker` (a live process answering ``run`` calls
prompt by prompt); at higher concurrency each run is a fresh process (``run_isolated`` of
:func:`ours`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_BLOCK = {"ngram": 4, "draft_model": 4, "layerskip": 4, "dspark": 7, "hybrid": 4}
DRAFT_OPTIONS = {"draft_model": (("draft_layers", 10),)}
DTYPE = "bf16"


class OursRunner:
    """Our engine (plain when ``drafter`` is "none") with a fixed number of cache slots."""

    def __init__(self, drafter: str, block: int, options: list, max_seq: int, concurrency: int,
                 warm_prompt: list[int], max_prefill: int = 512, deterministic: bool = False,
                 schema: str | None = None) -> None:
        from dspark.workers.factory import EngineSpec, build_engine
        from dspark.workers.request import SamplingParams, SpecMetrics

        spec = EngineSpec(dtype=DTYPE, draft=drafter, block_len=block or EngineSpec.block_len,
                          runner=_runner_config(concurrency, max_seq, deterministic), max_prefill_tokens=max_prefill,
                          draft_options=tuple(tuple(kv) for kv in options),
                          weights=os.environ.get(WEIGHTS_ENV) or "dense")
        self.built = build_engine(spec, progress=False)
        self.eng = self.built.engine
        self.concurrency = concurrency
        self.max_prefill = max_prefill
        # Warm-up at the measured batch size (first-call allocations, oneDNN kernel selection); under
        # a schema also with it, so its compilation (cached per spec) is not timed in the first prompt.
        self.eng.generate([warm_prompt] * concurrency, SamplingParams(max_tokens=8, temperature=0.0))
        if schema is not None:
            self.eng.generate([warm_prompt], _params(8, schema))
        self.eng.metrics = SpecMetrics()

    def run(self, prompts: list[list[int]], max_tokens: int, schema: str | None = None) -> list[dict]:
        """One record per prompt: tokens, latency, drafts and accepted drafts, output ids; under a
        JSON schema (concurrency 1) also the grammar mask seconds and masks of the request."""
        eng, params = self.eng, _params(max_tokens, schema)
        records: list[dict | None] = [None] * len(prompts)

        def record(i: int, seq, seconds: float, steps: int | None) -> None:
            m = seq.metrics
            rec = {"tokens": len(seq.output_ids), "seconds": seconds, "drafts": m.num_drafts,
                   "draft_tokens": m.num_draft_tokens, "accepted": m.num_accepted_tokens, "output_ids": seq.output_ids}
            if steps is not None:  # concurrency 1: every decode step is one of this request's passes
                rec["decode_passes"] = steps - math.ceil(len(seq.prompt_ids) / self.max_prefill)
            records[i] = rec

        if self.concurrency == 1:
            for i, p in enumerate(prompts):
                s0, g0 = eng.num_steps, eng.grammar_stats()
                t0 = time.perf_counter()
                seq = eng.add_request(p, params)
                eng.run_until_done()
                record(i, seq, time.perf_counter() - t0, eng.num_steps - s0)
                if schema is not None:
                    g1 = eng.grammar_stats()
                    records[i].update(finish_reason=seq.finish_reason,
                                      grammar_mask_seconds=g1["grammar_mask_seconds"] - g0["grammar_mask_seconds"],
                                      grammar_masks=g1["grammar_masks"] - g0["grammar_masks"])
            return records
        if schema is not None:
            raise ValueError("a schema is measured at concurrency 1 only")
        todo = list(range(len(prompts)))
        fillers = itertools.cycle(range(len(prompts)))
        active: dict[str, tuple[int | None, object, float]] = {}
        while todo or any(i is not None for i, _, _ in active.values()):
            while len(active) < self.concurrency:
                i = todo.pop(0) if todo else None
                seq = eng.add_request(prompts[next(fillers) if i is None else i], params)
                active[seq.request_id] = (i, seq, time.perf_counter())
            eng.step()
            now = time.perf_counter()
            for rid, (i, seq, t0) in list(active.items()):
                if seq.finished:
                    del active[rid]
                    if i is not None:
                        record(i, seq, now - t0, None)
        for rid in list(active):  # fillers still running
            eng.abort(rid)
        return records

    def close(self) -> None:
        self.built.close()


def _params(max_tokens: int, schema: str | None):
    """Greedy sampling parameters, constrained to ``schema`` (JSON text) when one is given."""
    from dspark.workers.grammar import GrammarSpec
    from dspark.workers.request import SamplingParams

    grammar = GrammarSpec("json_schema", schema) if schema is not None else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=grammar)


COMPILE_ENV = "DSPARK_BENCH_COMPILE"  # `bench spec --compile` sets it for every worker process
WEIGHTS_ENV = "DSPARK_BENCH_WEIGHTS"  # `bench spec --weights`: dense | q4, likewise


def _runner_config(n_slots: int, max_seq: int, deterministic: bool = False):
    from dspark.workers.runner import RunnerConfig

    return RunnerConfig(n_slots=n_slots, max_seq=max_seq, deterministic=deterministic,
                        compile=os.environ.get(COMPILE_ENV) == "1")


def ours(drafter: str, block: int, options: list, prompts: list[list[int]], max_tokens: int, concurrency: int,
         deterministic: bool = False) -> dict:
    """One configuration over all prompts in a fresh process (``run_isolated``)."""
    max_seq = max(map(len, prompts)) + max_tokens + block + 8
    r = OursRunner(drafter, block, options, max_seq, concurrency, prompts[0], deterministic=deterministic)
    try:
        return {"requests": r.run(prompts, max_tokens)}
    finally:
        r.close()


class HFRunner:
    """transformers plain ``generate`` and prompt lookup on one model (generate keeps no state)."""

    def __init__(self, lookup_tokens: int, stop_ids: list[int], warm_prompt: list[int]) -> None:
        import torch

        from bench.common import load_hf

        self.model = load_hf(DTYPE)
        self.stop_ids = stop_ids
        self.passes = 0
        self.model.register_forward_pre_hook(self._count)
        self.modes = {"hf_plain": {}, "hf_lookup": {"prompt_lookup_num_tokens": lookup_tokens}}
        with torch.inference_mode():
            for extra in self.modes.values():
                self._one(warm_prompt, 8, extra)

    def _count(self, *_) -> None:
        self.passes += 1

    def _one(self, p: list[int], n: int, extra: dict) -> dict:
        import torch

        ids = torch.tensor([p])
        self.passes = 0
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[0], **extra)
        dt = time.perf_counter() - t0
        toks = out[0, len(p):].tolist()
        return {"tokens": len(toks), "seconds": dt, "decode_passes": self.passes - 1, "output_ids": toks}

    def run(self, prompts: list[list[int]], max_tokens: int, flip: bool = False) -> dict:
        import torch

        out: dict[str, list[dict]] = {m: [] for m in self.modes}
        with torch.inference_mode():
            for i, p in enumerate(prompts):
                order = list(self.modes) if (i % 2 == 0) != flip else list(reversed(self.modes))
                for mode in order:
                    out[mode].append(self._one(p, max_tokens, self.modes[mode]))
        return out

    def close(self) -> None:
        pass


def serve_worker(kind: str, kwargs: dict) -> None:
    """Worker process main: build one configuration, then answer ``run`` calls from stdin."""
    runner = OursRunner(**kwargs) if kind == "ours" else HFRunner(**kwargs)
    print("@@READY@@", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        res = runner.run(**json.loads(line))
        print("@@RESULT@@" + json.dumps(res), flush=True)
    runner.close()


class Worker:
    """One engine configuration in its own process, kept alive so configurations can alternate
    prompt by prompt (the only way to compare them fairly on a machine whose speed drifts).

    Same isolation as ``run_isolated``: fresh interpreter, its own thread pool and memory."""

    def __init__(self, name: str, kind: str, kwargs: dict, threads: int) -> None:
        root = Path(__file__).resolve().parents[1]
        code = ("import json, sys; sys.path.insert(0, %r); import dspark, torch; torch.set_num_threads(%d); "
                "from bench.spec_runners import serve_worker; serve_worker(%r, json.loads(sys.argv[1]))" % (str(root), threads, kind))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")  # wait policy: the command's (spin)
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(kwargs)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def _read(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):]
        self.log.seek(0)
        raise RuntimeError(f"{self.name} worker died:\n{self.log.read()[-3000:]}")

    def ready(self) -> None:
        self._read("@@READY@@")

    def call(self, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps(kwargs) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("@@RESULT@@"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
        self.log.close()
