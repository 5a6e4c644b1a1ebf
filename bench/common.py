"""Shared helpers for the benchmark scripts: prompts, HF reference, isolated runs, output."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def chat_prompts(tokenizer, n: int, source: str = "all", offset: int = 0) -> list[list[int]]:
    from dspark.datasets import load_prompts

    ps = load_prompts(source)[offset : offset + n]
    return [tokenizer.encode_chat([{"role": "user", "content": p.text}]) for p in ps]


def load_hf(dtype: str, model: str | None = None):
    """transformers' model of the same GGUF file (or HF folder ``model``), in the same dtype (the
    reference engine)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dspark.models.loader import default_model_path

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    if model is not None:
        return AutoModelForCausalLM.from_pretrained(model, dtype=dt).eval()
    p = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dt).eval()


def run_isolated(module: str, func: str, kwargs: dict, threads: int, timeout: int = 1800,
                 env: dict[str, str] | None = None) -> dict:
    """Run ``module.func(**kwargs)`` in a fresh interpreter (``env``: variables to add to its
    environment); returns its JSON result.

    Each configuration gets its own process so peak memory and thread pools do not leak
    between the engines being compared.
    """
    root = Path(__file__).resolve().parents[1]
    code = (
        "import json, sys; sys.path.insert(0, %r); import torch; torch.set_num_threads(%d); "
        "from %s import %s as f; print('@@RESULT@@' + json.dumps(f(**json.loads(sys.argv[1]))))"
        % (str(root), threads, module, func)
    )
    env = dict(os.environ, **(env or {}), OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env, timeout=timeout
    )
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    raise RuntimeError(f"{module}.{func} failed:\n{proc.stderr[-3000:]}")


def write_json(path: str | Path | None, default_name: str, data: dict) -> Path:
    out = Path(path) if path else RESULTS / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    data = dict(data, generated_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    out.write_text(json.dumps(data, indent=2))
    return out


def table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    out = [line, "  ".join("-" * widths[c] for c in cols)]
    for r in rows:
        out.append("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "" if v is None else str(v)
