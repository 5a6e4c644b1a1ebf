"""`dspark bench spec`: speculative vs plain decoding per drafter and prompt category, vs HF.

    dspark bench spec [--prompts FILE|wizardlm|mbpp|all] [--max-prompts N] [--max-tokens N]
                      [--concurrency 1,8] [--drafters ngram,draft_model,layerskip,dspark,hybrid]
                      [--block 4|NAME=N,...] [--deterministic off|on|both] [--json FILE] [--plot FILE]
    dspark bench spec --structured [--drafters ngram,dspark,hybrid] [--max-tokens 128] [--json FILE]

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

``--structured``: plain decoding and each drafter (default ngram, dspark, hybrid) under one JSON
schema of the kind an application asks for (``RECORD_SCHEMA``: bounded strings, a bounded integer,
an enum, an array of up to 3 short strings, a nested object), on the ``STRUCTURED_PROMPTS`` that
ask for such records; concurrency 1, greedy, interleaved prompt by prompt as above, no HF (its
``generate`` has no grammar).  Under a grammar the verifier masks the target's logits at every
verified row and cuts a block after its first draft the grammar forbids (verified, so rejected); the
DSpark drafter draws its drafts among what the grammar allows (the ``dspark-unmasked`` row turns
that off: ``grammar_mask=0``).  Per configuration: tokens/s, the ratio against plain decoding under
the same schema, the acceptance length, and the share of request latency spent computing grammar
masks (``engine.grammar_stats()``).  Every output must parse and validate against the schema
(jsonschema); one that does not is an error of the bench (the command exits non-zero).  Writes
bench/results/spec_structured.json; no plot.

This module is the command and the order of runs; the prompts are chosen in ``spec_prompts``,
the engine and HF processes are ``spec_runners``, the figures and the plot ``spec_report``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from bench.common import RESULTS, run_isolated, table, write_json
from bench.spec_prompts import BUCKET_OF, BUCKETS, select_prompts
from bench.spec_report import plot, report, structured_report
from bench.spec_runners import DEFAULT_BLOCK, DRAFT_OPTIONS, DTYPE, Worker


# --structured: one schema of the kind an application sends (property order is the output's order).
RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["engineer", "designer", "manager", "scientist", "teacher", "other"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "skills", "address"],
    "additionalProperties": False,
}
_FIELDS = "name, age, role, skills (at most 3) and address (city, country)"
STRUCTURED_PROMPTS = (
    f"Extract a JSON record with {_FIELDS} from this note: Maria Lopez, 34, is a data scientist living in "
    "Valencia, Spain. She works with Python, SQL and statistics.",
    f"Return a JSON record ({_FIELDS}) for this employee: Tom Becker is a 52 year old manager from Hamburg, "
    "Germany, known for budgeting, hiring and negotiation.",
    f"Create a JSON profile with {_FIELDS} for a fictional graphic designer who lives in Osaka.",
    f"Write the following person as JSON with {_FIELDS}: Aisha Khan, age 28, software engineer, Toronto, "
    "Canada; skills: Rust, Kubernetes, testing.",
    f"Invent a JSON record with {_FIELDS} for a retired history teacher from a small town in Ireland.",
    f"Parse this signature into JSON with {_FIELDS}: \"Dr. Lena Svensson (41), research scientist, "
    "Uppsala, Sweden - microscopy, genetics\".",
)
STRUCTURED_DRAFTERS = "ngram,dspark,hybrid"


def _interleaved(configs, options, ids, meta, max_tokens, threads, blocks, tok, skip_hf, errors, schema=None) -> dict:
    """Concurrency 1: every configuration in its own live process; prompt by prompt, each runs in
    turn (order reversed every other prompt), so drifts in machine speed hit all alike.  With
    ``schema`` (JSON text) every request of our engine is constrained to it."""
    max_seq = max(map(len, ids)) + max_tokens + max(c[2] for c in configs) + 8
    extra = {"schema": schema} if schema is not None else {}
    # options: per drafter kind, or per configuration name where a configuration overrides its kind's
    workers = {name: Worker(name, "ours", {"drafter": kind, "block": block, "options": options.get(name, options[kind]),
                                           "max_seq": max_seq,
                                           "concurrency": 1, "warm_prompt": ids[0], "deterministic": det, **extra}, threads)
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
                        (rec,) = w.call(prompts=[p], max_tokens=max_tokens, **extra)
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
            res = run_isolated("bench.spec_runners", "ours", kw, threads)["requests"]
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
@click.option("--compile/--no-compile", "compile_step", default=False, show_default=True,
              help="our engines with the compiled step (the `dspark serve` default)")
@click.option("--structured", is_flag=True,
              help=f"plain vs drafters under a JSON schema, concurrency 1, {len(STRUCTURED_PROMPTS)} record prompts "
                   f"(drafters default {STRUCTURED_DRAFTERS}; the category options do not apply)")
@click.option("--json", "json_path", default=None, help="output (default bench/results/spec.json)")
@click.option("--plot", "plot_path", default=None, help="PNG (default bench/results/spec.png)")
@click.option("--weights", type=click.Choice(["dense", "q4"]), default="dense", show_default=True,
              help="our target's layer matrices: dequantized, or the GGUF file's 4-bit blocks as stored "
                   "(transformers runs dequantized)")
def main(source, max_prompts, max_tokens, concurrency, drafters, block_text, threads, skip_hf, det_mode, compile_step,
         structured, json_path, plot_path, weights):
    """Per-user tokens/s and acceptance per drafter and category, vs plain and vs HF prompt lookup."""
    from bench.spec_runners import COMPILE_ENV, WEIGHTS_ENV
    from dspark.models.dspark_head import default_head_path
    from dspark.models.loader import DEFAULT_MODEL_NAME, load_tokenizer

    os.environ[COMPILE_ENV] = "1" if compile_step else "0"  # read by the worker processes
    os.environ[WEIGHTS_ENV] = weights

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    if structured and click.get_current_context().get_parameter_source("drafters").name == "DEFAULT":
        drafters = STRUCTURED_DRAFTERS
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
    if structured:
        _structured(names, blocks, max_tokens, threads, compile_step, notes, json_path, t_start, load_start)
        return
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
        "compile": compile_step, "weights": weights,
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


def _structured(names, blocks, max_tokens, threads, compile_step, notes, json_path, t_start, load_start) -> None:
    """``--structured``: plain and each drafter under RECORD_SCHEMA, concurrency 1, interleaved;
    every output must parse and validate, or the command fails after writing its results."""
    import jsonschema

    from dspark.models.loader import load_tokenizer

    tok = load_tokenizer(None)[0]
    schema = json.dumps(RECORD_SCHEMA)
    ids = [tok.encode_chat([{"role": "user", "content": text}]) for text in STRUCTURED_PROMPTS]
    meta = [{"bucket": "json"} for _ in ids]
    for n in notes:
        click.echo(f"note: {n}", err=True)
    block_list = ", ".join(f"{n}={b}" for n, b in blocks.items())
    click.echo(f"structured: {len(ids)} prompts under a JSON schema, {max_tokens} new tokens, {DTYPE}, greedy, "
               f"concurrency 1; blocks: {block_list}", err=True)
    configs = [("plain", "none", 0, False)] + [(n, n, blocks[n], False) for n in names]
    options = {kind: [list(kv) for kv in DRAFT_OPTIONS.get(kind, ())] for _, kind, _, _ in configs}
    if "dspark" in names:  # the same head drafting unconstrained: the verifier rejects what the grammar forbids
        configs.append(("dspark-unmasked", "dspark", blocks["dspark"], False))
        blocks = {**blocks, "dspark-unmasked": blocks["dspark"]}
        options["dspark-unmasked"] = options["dspark"] + [["grammar_mask", "0"]]
    errors: dict[str, str] = {}
    raw = _interleaved(configs, options, ids, meta, max_tokens, threads, blocks, tok, True, errors, schema=schema)
    invalid = []
    for name, recs in raw.items():
        for i, r in enumerate(recs):
            r["text"] = tok.decode(r["output_ids"])
            try:
                jsonschema.validate(json.loads(r["text"]), RECORD_SCHEMA)
                r["valid"] = True
            except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                r["valid"] = False
                why = "cut at max_tokens; " if r.get("finish_reason") == "length" else ""
                invalid.append(f"{name}, prompt {i + 1}: {why}{str(exc).splitlines()[0][:200]}: {r['text'][:200]!r}")
    results, rows = structured_report(raw, meta, blocks)
    click.echo(table(rows, ["method", "block", "tok_s", "vs_plain", "accept_len", "tok_per_pass", "mask_share",
                            "mask_us", "valid", "same_text"]))
    for n in notes:
        click.echo(f"note: {n}")
    minutes = (time.perf_counter() - t_start) / 60
    requests = {n: [{k: v for k, v in r.items() if k != "output_ids"} for r in recs] for n, recs in raw.items()}
    out = write_json(json_path, "spec_structured.json", {
        "dtype": DTYPE, "temperature": 0.0, "max_tokens": max_tokens, "threads": threads, "concurrency": 1,
        "compile": compile_step, "schema": RECORD_SCHEMA, "prompts": list(STRUCTURED_PROMPTS), "blocks": blocks,
        "draft_options": {k: dict(v) for k, v in DRAFT_OPTIONS.items()},
        "results": results, "notes": notes, "errors": errors, "invalid": invalid, "requests": requests,
        "minutes": round(minutes, 1), "cpus": os.cpu_count(),
        "load_average_1m": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
    })
    click.echo(f"wrote {out} ({minutes:.1f} min)")
    if invalid or errors:
        raise click.ClickException("; ".join([f"{len(invalid)} outputs do not validate against the schema"] * bool(invalid)
                                             + [f"failed: {', '.join(errors)}"] * bool(errors))
                                   + "".join(f"\n  {line}" for line in invalid))


if __name__ == "__main__":
    main()
