"""Acceptance length of a released DSpark drafter beside the paper's Table 1 (a GPU check section).

``bench/gpu_check.sh`` runs this when ``DSPARK_QWEN3_8B`` (a Qwen3-8B Hugging Face folder) and
``DSPARK_QWEN3_8B_DSPARK`` (DeepSeek's ``dspark_qwen3_8b_block7`` folder) name local folders, and
writes the figures into its JSON report under ``table1``.  Prompt sets are JSON-lines files named
by variables, read in place and never copied into the project:

    DSPARK_GSM8K_PROMPTS      GSM8K test split (field "question")            -> Table 1 "GSM8K"
    DSPARK_MT_BENCH_PROMPTS   MT-Bench question.jsonl (first of "turns")     -> "MT-Bench"
    DSPARK_MBPP_PROMPTS       default: mbppplus_prompts.jsonl of the shared
                              data folder ($DSPARK_DATA_DIR), MBPP+ prompts  -> "MBPP"

A set whose variable is unset or whose file is absent is reported as skipped.  The protocol is
the paper's (section 4.1): sampling at temperature 1.0, whole blocks verified (no confidence
scheduling: ``verify_policy`` fixed), the block size of the checkpoint, the chat template in
non-thinking mode, and tau = accepted tokens per verification round including the bonus token,
summed over every round of the set (``SpecMetrics.mean_acceptance_length``).

    python bench/table1.py --model /models/Qwen3-8B --head /models/dspark_qwen3_8b_block7 \
        --report bench/results/gpu_check.json [--limit 80] [--max-tokens 512] [--set NAME=PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Table 1 of the paper: accepted length tau per round (incl. bonus), Qwen3-8B target.
PAPER_TABLE1 = {
    "Qwen3-8B": {
        "GSM8K": {"Eagle3": 5.30, "DFlash": 5.33, "DSpark": 6.17},
        "MBPP": {"Eagle3": 3.96, "DFlash": 4.36, "DSpark": 5.16},
        "MT-Bench": {"Eagle3": 2.66, "DFlash": 3.11, "DSpark": 3.72},
    },
}
# set name -> (variable naming its file, the file under the shared data folder when unset, Table 1 column)
SETS = {
    "gsm8k": ("DSPARK_GSM8K_PROMPTS", None, "GSM8K"),
    "mt_bench": ("DSPARK_MT_BENCH_PROMPTS", None, "MT-Bench"),
    "mbpp_plus": ("DSPARK_MBPP_PROMPTS", "mbppplus_prompts.jsonl", "MBPP"),
}
TEXT_FIELDS = ("question", "prompt", "instruction", "Instruction")  # first present is the user turn


def default_sets() -> dict[str, str | None]:
    """Each set's file from its variable, else from the shared data folder, else None (skipped)."""
    from dspark.datasets import data_dir

    out = {}
    for name, (var, shared, _) in SETS.items():
        path = os.environ.get(var) or (str(data_dir() / shared) if shared else None)
        out[name] = path if path and Path(path).is_file() else None
    return out


def read_prompts(path: str | Path, limit: int) -> list[str]:
    """The first ``limit`` user turns of a JSON-lines file (a field of TEXT_FIELDS, or turns[0])."""
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = next((row[k] for k in TEXT_FIELDS if isinstance(row.get(k), str)), None)
            if text is None and row.get("turns"):
                text = row["turns"][0]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: no prompt field ({', '.join(TEXT_FIELDS)} or turns)")
            prompts.append(text)
            if len(prompts) == limit:
                break
    return prompts


def chat_ids(tok, text: str) -> list[int]:
    """The chat-templated prompt in non-thinking mode (the paper's): a template that reads
    ``enable_thinking`` gets the empty think block it would write for ``enable_thinking=False``."""
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    if "enable_thinking" in (tok.chat_template or ""):
        rendered += "<think>\n\n</think>\n\n"
    return tok.encode_rendered(rendered)


def measure(engine, tok, prompts: list[str], max_tokens: int, seed: int = 0) -> dict:
    """Generate every prompt at temperature 1.0 (seeded), and tau over all verification rounds."""
    from dspark.workers.request import SamplingParams

    ids = [chat_ids(tok, p) for p in prompts]
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i) for i in range(len(ids))]
    t0 = time.perf_counter()
    seqs = engine.generate(ids, params)
    rounds = sum(s.metrics.num_drafts for s in seqs)
    accepted = sum(s.metrics.num_accepted_tokens for s in seqs)
    return {"prompts": len(seqs), "output_tokens": sum(len(s.output_ids) for s in seqs), "rounds": rounds,
            "acceptance_length": 1.0 + accepted / rounds if rounds else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def run(model: str, head: str, sets: dict[str, str | None], *, limit: int, max_tokens: int, device: str,
        dtype: str, slots: int, paper_target: str) -> dict:
    """The report section: per set tau beside the paper's figures for ``paper_target``."""
    from dspark.workers.drafters.dspark import read_drafter_head_config
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.runner import RunnerConfig

    block = read_drafter_head_config(head).block_len
    loaded = {name: read_prompts(path, limit) for name, path in sets.items() if path}
    longest = max((len(p) for ps in loaded.values() for p in ps), default=0)
    # Characters bound tokens from above, so every prompt fits with its output and one block.
    spec = EngineSpec(model=model, dtype=dtype, device=device, draft="dspark", block_len=block,
                      draft_options=(("head", head),), verify_policy="fixed",
                      runner=RunnerConfig(n_slots=slots, max_seq=longest + max_tokens + block + 64))
    built = build_engine(spec, progress=False)
    paper = PAPER_TABLE1.get(paper_target, {})
    rows = {}
    try:
        for name, path in sets.items():
            column = SETS[name][2] if name in SETS else name
            row = {"file": path, "paper_column": column, "paper": paper.get(column)}
            if path is None:
                rows[name] = {**row, "skipped": f"no file: set ${SETS[name][0]}" if name in SETS else "no file"}
                continue
            rows[name] = {**row, **measure(built.engine, built.tokenizer, loaded[name], max_tokens)}
    finally:
        built.close()
    return {"model": model, "head": head, "paper_target": paper_target, "block_len": block, "temperature": 1.0,
            "verify_policy": "fixed", "max_tokens": max_tokens, "device": device, "dtype": dtype, "sets": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="target HF folder (Qwen3-8B for the paper's row)")
    ap.add_argument("--head", required=True, help="drafter folder (dspark_qwen3_8b_block7)")
    ap.add_argument("--report", required=True, help="JSON report to add the 'table1' section to (created if absent)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=PATH",
                    help="a prompt set (JSON lines); default: the sets of the module docstring")
    ap.add_argument("--limit", type=int, default=int(os.environ.get("DSPARK_TABLE1_PROMPTS", 80)), help="prompts per set")
    ap.add_argument("--max-tokens", type=int, default=int(os.environ.get("DSPARK_TABLE1_MAX_TOKENS", 512)))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--slots", type=int, default=16, help="requests decoded together")
    ap.add_argument("--paper-target", default="Qwen3-8B", choices=sorted(PAPER_TABLE1))
    a = ap.parse_args(argv)
    sets = default_sets()
    for item in a.set:
        name, sep, path = item.partition("=")
        if not sep or not name:
            ap.error(f"--set {item!r} is not NAME=PATH")
        if not Path(path).is_file():
            ap.error(f"--set {name}: no file {path}")
        sets[name] = path
    try:
        section = run(a.model, a.head, sets, limit=a.limit, max_tokens=a.max_tokens, device=a.device, dtype=a.dtype,
                      slots=a.slots, paper_target=a.paper_target)
    except (ValueError, FileNotFoundError) as e:
        print(f"table1: {e}", file=sys.stderr)
        return 2
    report_path = Path(a.report)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["table1"] = section
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(section, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
