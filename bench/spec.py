"""`dspark bench spec`: speculative vs plain decoding per drafter and prompt category, vs HF.

    dspark bench spec [--prompts FILE|wizardlm|mbpp|all] [--max-prompts N] [--max-tokens N]
                      [--concurrency 1,8] [--drafters ngram,draft_model,layerskip,dspark,hybrid]
                      [--block 4|NAME=N,...] [--deterministic off|on|both] [--json FILE] [--plot FILE]

What it measures (bf16, greedy, requests stop at end-of-turn or after ``--max-tokens``):

* our engine, plain decoding and each drafter, at every concurrency level.  Per-user tokens/s of a
  request = output tokens / its latency (submission to last token, prefill included); a category's
  figure is the mean over its requests.  At concurrency c > 1 the engine keeps c requests running
  at once for the whole measurement: when a measured request finishes, the next one starts, and
  once the measured prompts run out, filler requests (the same prompts again, not counted) keep
  the batch full until the last measured request ends.
* Hugging Face transformers on the same GGUF file and dtype: plain ``generate`` and prompt-lookup
  assisted generation (``prompt_lookup_num_tokens``), concurrency 1 only: transformers' assisted
  generation serves one sequence per call.
* mean acceptance length (vLLM's meaning: 1 + accepted / verification rounds with drafts) and
  tokens per target forward pass after prefill (comparable with HF, where the passes are counted
  with a forward hook).
* ``same_text``: the share of prompts whose greedy speculative output ids equal plain decoding's
  in the same mode.  ``--deterministic both`` runs every configuration also in the deterministic
  mode (row-invariant kernels, ``RunnerConfig.deterministic``), named ``NAME+det`` and compared
  with ``plain+det``; the summary then adds each one's tokens/s against its default-mode twin
  (the speed cost of the mode).

Block length is a per-drafter default (ngram, layerskip, draft_model, hybrid: 4; dspark: 7, what
its head was trained for; hybrid measured faster at 4 than at 7 on every category on this CPU,
where verifying 8 tokens costs ~16% more than 5); ``--block 6`` sets all, ``--block ngram=6,dspark=5`` some.  ``draft_model``
is an independent 10-layer truncation of the target with its own KV cache (no smaller model with
the same tokenizer ships); ``layerskip`` drafts with the first half of the target.  HF prompt
lookup proposes as many tokens as our ngram block (4 by default) with transformers' default
matching n-gram size.  ``hybrid`` proposes, per request and step, the prompt-lookup block or the
head's, whichever is expected to be accepted further.  The dspark and hybrid drafters run only
when a head ships in dspark/models/heads/; otherwise they are skipped with a note.

Prompt categories (WizardLM skills grouped in four buckets, ``BUCKET_OF``):

* code: MBPP+ tasks, Code Generation, Code Debug;
* format: Complex Format and Academic Writing, whose prompts carry text or data the answer
  reformats, edits or extracts from (the case prompt lookup is built for);
* math: Math and Reasoning;
* chat: every other skill, Writting included (its prompts ask for new text: cards, reviews,
  statements; little to copy from the prompt).

Defaults: 3 prompts per bucket (12), 96 new tokens, concurrency 1 and 8, one torch thread per
process; about 15-25 minutes on a shared 2-core CPU host.  Prompts come from the held-out test
split of the DSpark head's training config first (then valid, then train), so the dspark drafter
is not timed on prompts it was trained on.

Noise control (the host's speed drifts by 2x within minutes): every engine configuration runs in
its own process.  At concurrency 1 these processes stay alive side by side (only one computes at a
time) and take turns prompt by prompt, in alternating order, so a slow phase hits all of them
alike; the two HF modes share one process and model (generate keeps no state between calls).  At
concurrency > 1 each run is a fresh process (``run_isolated``); plain and ngram run first and
again last (their two runs averaged), bracketing the slower drafters.  The 1-minute load average
at start and end is recorded.  Writes bench/results/spec.json and spec.png.
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

import click

from bench.common import RESULTS, run_isolated, table, write_json

BUCKETS = ("code", "format", "math", "chat")
BUCKET_OF = {
    "code": "code", "Code Generation": "code", "Code Debug": "code",
    "Complex Format": "format", "Academic Writing": "format",
    "Math": "math", "Reasoning": "math",
}  # any other skill: chat
DEFAULT_BLOCK = {"ngram": 4, "draft_model": 4, "layerskip": 4, "dspark": 7, "hybrid": 4}
DRAFT_OPTIONS = {"draft_model": (("draft_layers", 10),)}
DTYPE = "bf16"


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


# -------------------------------------------------------------------------------------------
# Measurements (in engine processes: persistent workers at concurrency 1, run_isolated above)
# -------------------------------------------------------------------------------------------
class OursRunner:
    """Our engine (plain when ``drafter`` is "none") with a fixed number of cache slots."""

    def __init__(self, drafter: str, block: int, options: list, max_seq: int, concurrency: int,
                 warm_prompt: list[int], max_prefill: int = 512, deterministic: bool = False) -> None:
        from dspark.workers.factory import EngineSpec, build_engine
        from dspark.workers.request import SamplingParams, SpecMetrics

        spec = EngineSpec(dtype=DTYPE, draft=drafter, block_len=block or EngineSpec.block_len,
                          runner=_runner_config(concurrency, max_seq, deterministic), max_prefill_tokens=max_prefill,
                          draft_options=tuple(tuple(kv) for kv in options))
        self.built = build_engine(spec, progress=False)
        self.eng = self.built.engine
        self.concurrency = concurrency
        self.max_prefill = max_prefill
        # Warm-up at the measured batch size (first-call allocations, oneDNN kernel selection).
        self.eng.generate([warm_prompt] * concurrency, SamplingParams(max_tokens=8, temperature=0.0))
        self.eng.metrics = SpecMetrics()

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[dict]:
        """One record per prompt: tokens, latency, drafts and accepted drafts, output ids."""
        from dspark.workers.request import SamplingParams

        eng, params = self.eng, SamplingParams(max_tokens=max_tokens, temperature=0.0)
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
                s0 = eng.num_steps
                t0 = time.perf_counter()
                seq = eng.add_request(p, params)
                eng.run_until_done()
                record(i, seq, time.perf_counter() - t0, eng.num_steps - s0)
            return records
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


def _runner_config(n_slots: int, max_seq: int, deterministic: bool = False):
    from dspark.workers.runner import RunnerConfig

    return RunnerConfig(n_slots=n_slots, max_seq=max_seq, deterministic=deterministic)


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
                "from bench.spec import serve_worker; serve_worker(%r, json.loads(sys.argv[1]))" % (str(root), threads, kind))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", OMP_WAIT_POLICY="PASSIVE")
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


# -------------------------------------------------------------------------------------------
# Aggregation, report, plot
# -------------------------------------------------------------------------------------------
def summarize(recs: list[dict], meta: list[dict], plain: list[dict] | None) -> dict:
    """Per bucket (and "all"): per-user tokens/s, acceptance length, tokens per pass, same text."""
    out = {}
    for b in (*BUCKETS, "all"):
        rows = [(r, m, plain[j] if plain else None) for j, (r, m) in enumerate(zip(recs, meta)) if b in ("all", m["bucket"])]
        if not rows:
            continue
        drafts = sum(r.get("drafts", 0) for r, _, _ in rows)
        acc = sum(r.get("accepted", 0) for r, _, _ in rows)
        passes = [r["decode_passes"] for r, _, _ in rows if r.get("decode_passes")]
        row = {
            "requests": len(rows),
            "tokens_per_s": sum(r["tokens"] / r["seconds"] for r, _, _ in rows) / len(rows),
            "acceptance_length": 1.0 + acc / drafts if drafts else None,
            "tokens_per_pass": (sum(r["tokens"] - 1 for r, _, _ in rows if r.get("decode_passes")) / sum(passes)) if passes else None,
            "output_tokens": sum(r["tokens"] for r, _, _ in rows),
        }
        if plain:
            row["same_text_as_plain"] = sum(r["output_ids"] == p["output_ids"] for r, _, p in rows) / len(rows)
        out[b] = row
    return out


def _interleaved(configs, options, ids, meta, max_tokens, threads, blocks, tok, skip_hf, errors) -> dict:
    """Concurrency 1: every configuration in its own live process; prompt by prompt, each runs in
    turn (order reversed every other prompt), so drifts in machine speed hit all alike."""
    max_seq = max(map(len, ids)) + max_tokens + max(c[2] for c in configs) + 8
    workers = {name: Worker(name, "ours", {"drafter": kind, "block": block, "options": options[kind], "max_seq": max_seq,
                                           "concurrency": 1, "warm_prompt": ids[0], "deterministic": det}, threads)
               for name, kind, block, det in configs}
    if not skip_hf:
        workers["hf"] = Worker("hf", "hf", {"lookup_tokens": blocks.get("ngram", DEFAULT_BLOCK["ngram"]),
                                            "stop_ids": sorted(tok.stop_token_ids), "warm_prompt": ids[0]}, threads)
    raw: dict[str, list[dict]] = {}
    try:
        for name, w in list(workers.items()):
            try:
                w.ready()
            except RuntimeError as exc:  # one broken drafter must not sink the whole comparison
                errors[f"c1:{name}"] = str(exc)[-1500:]
                click.echo(f"  {name}: FAILED to start ({str(exc).strip().splitlines()[-1][:200]})", err=True)
                w.close()
                del workers[name]
        for i, p in enumerate(ids):
            order = list(workers) if i % 2 == 0 else list(reversed(workers))
            line = []
            for name in order:
                w = workers[name]
                try:
                    if name == "hf":
                        for mode, recs in w.call(prompts=[p], max_tokens=max_tokens, flip=i % 2 == 1).items():
                            raw.setdefault(mode, []).extend(recs)
                            line.append(f"{mode} {recs[0]['tokens'] / recs[0]['seconds']:.1f}")
                    else:
                        (rec,) = w.call(prompts=[p], max_tokens=max_tokens)
                        raw.setdefault(name, []).append(rec)
                        line.append(f"{name} {rec['tokens'] / rec['seconds']:.1f}")
                except RuntimeError as exc:
                    errors[f"c1:{name}"] = str(exc)[-1500:]
                    click.echo(f"  {name}: FAILED ({str(exc).strip().splitlines()[-1][:200]})", err=True)
                    workers.pop(name).close()
                    raw.pop(name, None)
            click.echo(f"  prompt {i + 1}/{len(ids)} [{meta[i]['bucket']}] tok/s: {', '.join(line)}", err=True)
    finally:
        for w in workers.values():
            w.close()
    return {n: r for n, r in raw.items() if len(r) == len(ids)}


def _bracketed(configs, options, ids, max_tokens, level, threads, errors) -> dict:
    """Concurrency > 1: one fresh process per run; the cheap runs (plain and ngram) go first and
    again last, and their two runs are averaged, bracketing the slow drafters in time."""
    names = [c[0] for c in configs]
    cheap = [n for n in ("plain", "ngram") if n in names]
    order = cheap + [n for n in names if n not in cheap] + list(reversed(cheap))
    spec = {name: (kind, block, det) for name, kind, block, det in configs}
    runs: dict[str, list[list[dict]]] = {}
    for name in order:
        kind, block, det = spec[name]
        kw = {"drafter": kind, "block": block, "options": options[kind], "prompts": ids, "max_tokens": max_tokens,
              "concurrency": level, "deterministic": det}
        t0 = time.perf_counter()
        try:
            res = run_isolated("bench.spec", "ours", kw, threads)["requests"]
        except Exception as exc:
            errors[f"c{level}:{name}"] = str(exc)[-1500:]
            click.echo(f"  {name}: FAILED ({str(exc).strip().splitlines()[-1][:200]})", err=True)
            continue
        runs.setdefault(name, []).append(res)
        per_user = sum(r["tokens"] / r["seconds"] for r in res) / len(res)
        click.echo(f"  {name:12s} {per_user:6.2f} tok/s per user  ({time.perf_counter() - t0:.0f} s)", err=True)
    out = {}
    for name, rs in runs.items():
        merged = []
        for recs in zip(*rs):  # same request in each run: mean tokens/s, first run's tokens and counters
            rates = [r["tokens"] / r["seconds"] for r in recs]
            merged.append(dict(recs[0], seconds=recs[0]["tokens"] / (sum(rates) / len(rates)), runs_tokens_per_s=rates))
        out[name] = merged
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(results)
    cats = [*BUCKETS, "all"]
    fig, axes = plt.subplots(1, len(levels), figsize=(6.5 * len(levels), 4.8), squeeze=False)
    for ax, level in zip(axes[0], levels):
        methods = [m for m, r in results[level].items() if r.get("speedup")]
        width = 0.8 / max(1, len(methods))
        for k, m in enumerate(methods):
            ys = [results[level][m]["speedup"].get(c, 0.0) for c in cats]
            xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(cats))]
            ax.bar(xs, ys, width, label=results[level][m]["label"])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(cats)), cats)
        ax.set_ylabel("per-user tokens/s vs plain")
        ax.set_title(f"concurrency {level[1:]}: speedup per category")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_blocks(text: str | None, names: list[str]) -> dict[str, int]:
    blocks = {n: DEFAULT_BLOCK[n] for n in names}
    if not text:
        return blocks
    if "=" not in text:
        return {n: int(text) for n in names}
    for item in text.split(","):
        k, v = item.split("=", 1)
        if k.strip() not in DEFAULT_BLOCK:
            raise click.BadParameter(f"unknown drafter {k!r} in --block")
        blocks[k.strip()] = int(v)
    return blocks


@click.command()
@click.option("--prompts", "source", default="all", show_default=True, help="wizardlm | mbpp | all | a JSONL file")
@click.option("--max-prompts", type=int, default=3, show_default=True, help="prompts per category bucket")
@click.option("--max-tokens", type=int, default=96, show_default=True)
@click.option("--concurrency", default="1,8", show_default=True)
@click.option("--drafters", default="ngram,draft_model,layerskip,dspark,hybrid", show_default=True)
@click.option("--block", "block_text", default=None, help="block length: N for all, or NAME=N,... (default per drafter)")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per process (1 is fastest on a shared host)")
@click.option("--skip-hf", is_flag=True, help="leave out the transformers runs")
@click.option("--deterministic", "det_mode", type=click.Choice(["off", "on", "both"]), default="off", show_default=True,
              help="engine mode: default kernels, row-invariant kernels, or both side by side")
@click.option("--json", "json_path", default=None, help="output (default bench/results/spec.json)")
@click.option("--plot", "plot_path", default=None, help="PNG (default bench/results/spec.png)")
def main(source, max_prompts, max_tokens, concurrency, drafters, block_text, threads, skip_hf, det_mode, json_path, plot_path):
    """Per-user tokens/s and acceptance per drafter and category, vs plain and vs HF prompt lookup."""
    from dspark.models.dspark_head import default_head_path
    from dspark.models.loader import DEFAULT_MODEL_NAME, load_tokenizer

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    names = [d.strip() for d in drafters.split(",") if d.strip()]
    unknown = set(names) - set(DEFAULT_BLOCK)
    if unknown:
        raise click.BadParameter(f"unknown drafters {sorted(unknown)}; choose from {', '.join(DEFAULT_BLOCK)}")
    notes = []
    for headed in ("dspark", "hybrid"):  # both draft with the shipped head
        if headed in names and not default_head_path(DEFAULT_MODEL_NAME).exists():
            names.remove(headed)
            notes.append(f"{headed} skipped: no head shipped ({default_head_path(DEFAULT_MODEL_NAME).name} not in dspark/models/heads/)")
    blocks = _parse_blocks(block_text, names)
    levels = [int(c) for c in concurrency.split(",")]
    meta = select_prompts(source, max_prompts)
    tok = load_tokenizer(None)[0]
    ids = [tok.encode_chat([{"role": "user", "content": m["text"]}]) for m in meta]
    for n in notes:
        click.echo(f"note: {n}", err=True)
    counts = ", ".join(f"{b}: {sum(m['bucket'] == b for m in meta)}" for b in BUCKETS)
    block_list = ", ".join(f"{n}={b}" for n, b in blocks.items())
    click.echo(f"{len(meta)} prompts ({counts}), {max_tokens} new tokens, {DTYPE}, greedy; blocks: {block_list}", err=True)

    base = [("plain", "none", 0)] + [(n, n, blocks[n]) for n in names]
    configs = [(n, k, b, False) for n, k, b in base] if det_mode != "on" else []
    if det_mode != "off":
        configs += [(n + "+det", k, b, True) for n, k, b in base]
    raw: dict[str, dict[str, list[dict]]] = {}
    errors: dict[str, str] = {}

    options = {kind: [list(kv) for kv in DRAFT_OPTIONS.get(kind, ())] for _, kind, _, _ in configs}
    for level in levels:
        key = f"c{level}"
        click.echo(f"concurrency {level}", err=True)
        if level == 1:
            raw[key] = _interleaved(configs, options, ids, meta, max_tokens, threads, blocks, tok, skip_hf, errors)
        else:
            raw[key] = _bracketed(configs, options, ids, max_tokens, level, threads, errors)

    results, rows, summary = report(raw, meta, blocks)
    click.echo(table(rows, ["conc", "method", "block", "category", "tok_s", "speedup", "accept_len", "tok_per_pass", "same_text"]))
    if summary:
        click.echo("\nSpeedup summary (per-user tokens/s ratio)")
        click.echo(table(summary, ["conc", "ratio", *BUCKETS, "all"]))
    for n in notes:
        click.echo(f"note: {n}")

    minutes = (time.perf_counter() - t_start) / 60
    buckets = {b: sorted(k for k, v in BUCKET_OF.items() if v == b) or ["(every other skill)"] for b in BUCKETS}
    requests = {k: {n: [{kk: vv for kk, vv in r.items() if kk != "output_ids"} for r in recs] for n, recs in v.items()}
                for k, v in raw.items()}
    out = write_json(json_path, "spec.json", {
        "dtype": DTYPE, "temperature": 0.0, "max_tokens": max_tokens, "threads": threads, "source": source,
        "deterministic": det_mode,
        "prompts_per_bucket": max_prompts, "blocks": blocks, "draft_options": {k: dict(v) for k, v in DRAFT_OPTIONS.items()},
        "hf_lookup_tokens": blocks.get("ngram", DEFAULT_BLOCK["ngram"]), "buckets": buckets,
        "prompts": [{k: m[k] for k in ("id", "bucket", "category", "split")} for m in meta],
        "results": results, "summary": summary, "notes": notes, "errors": errors, "requests": requests,
        "minutes": round(minutes, 1), "cpus": os.cpu_count(),
        "load_average_1m": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
    })
    png = Path(plot_path) if plot_path else RESULTS / "spec.png"
    plot(results, png)
    click.echo(f"wrote {out} and {png} ({minutes:.1f} min)")


def report(raw: dict, meta: list[dict], blocks: dict[str, int]) -> tuple[dict, list[dict], list[dict]]:
    """Every method against the plain decoding of the same engine (ours vs ours, HF vs HF)."""
    lookup = blocks.get("ngram", DEFAULT_BLOCK["ngram"])
    results: dict[str, dict] = {}
    rows = []
    for key, by_method in raw.items():
        results[key] = {}
        for name, recs in by_method.items():
            base_name = "hf_plain" if name.startswith("hf_") else ("plain+det" if name.endswith("+det") else "plain")
            base = by_method.get(base_name) if name != base_name else None
            s = summarize(recs, meta, base)
            entry = {"label": _label(name, blocks), "block": lookup if name == "hf_lookup" else blocks.get(twin_name(name) if name.endswith("+det") else name),
                     "per_category": s}
            if base is not None:
                sb = summarize(base, meta, None)
                entry["speedup"] = {c: s[c]["tokens_per_s"] / sb[c]["tokens_per_s"] for c in s}
            results[key][name] = entry
            for c, v in s.items():
                rows.append({"conc": key[1:], "method": name, "block": entry["block"], "category": c,
                             "tok_s": v["tokens_per_s"], "speedup": entry.get("speedup", {}).get(c),
                             "accept_len": v["acceptance_length"], "tok_per_pass": v["tokens_per_pass"],
                             "same_text": v.get("same_text_as_plain")})
    summary = []
    for key in results:
        for name, label in (("ngram", "ngram vs our plain"), ("hf_lookup", "HF prompt lookup vs HF plain")):
            sp = results[key].get(name, {}).get("speedup")
            if sp:
                summary.append({"conc": key[1:], "ratio": label, **{c: sp.get(c) for c in (*BUCKETS, "all")}})
        for name, entry in results[key].items():  # speed of the deterministic mode vs the default
            twin = results[key].get(name[: -len("+det")]) if name.endswith("+det") else None
            if twin:
                a, b = entry["per_category"], twin["per_category"]
                summary.append({"conc": key[1:], "ratio": f"{name} vs {twin_name(name)}",
                                **{c: a[c]["tokens_per_s"] / b[c]["tokens_per_s"] if c in a and c in b else None
                                   for c in (*BUCKETS, "all")}})
    return results, rows, summary


def twin_name(name: str) -> str:
    return name[: -len("+det")]


def _label(name: str, blocks: dict[str, int]) -> str:
    if name == "hf_lookup":
        return f"HF prompt lookup ({blocks.get('ngram', DEFAULT_BLOCK['ngram'])}) vs HF plain"
    if name == "hf_plain":
        return "HF plain"
    if name in ("plain", "plain+det"):
        return "ours, " + name
    kind = twin_name(name) if name.endswith("+det") else name
    return f"{name} (block {blocks[kind]})"


if __name__ == "__main__":
    main()
