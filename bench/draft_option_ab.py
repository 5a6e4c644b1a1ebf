"""One request in process: the cluster's engine with two settings of one drafter option, and
plain decoding, prompt by prompt on three engines, the order of the two settings alternating
from prompt to prompt.

    .venv/bin/python -m bench.draft_option_ab --option short_block --values 1,0 --first 0 --prompts 8

The engines are built as ``bench cluster`` builds its in-process one (``ClusterConfig``'s
defaults: bf16, ``--draft`` (hybrid), adaptive verification with the gate, compiled), with
row-invariant kernels (``--deterministic``, as the cluster serves by default), so every
engine's greedy output must equal plain decoding's: the bench stops if one does not.  Prints
after each prompt the running tokens/s of each; at the end the ratio of the two settings, the
steps, drafts verified and accepted of each, and the milliseconds of each engine's forward pass
and drafting per step.  The OpenMP wait policy is the in-process benchmarks' spin
(``GOMP_SPINCOUNT=10000``) unless set otherwise.

The engine built first ran its forward pass 1-5% slower than the second in all five runs on this
host (the same code either way), so run the bench twice with ``--values`` swapped and read
both ratios.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.step_split import _timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--option", required=True, help="the drafter option compared, e.g. short_block")
    ap.add_argument("--values", required=True, help="its two values, comma-separated, e.g. 1,0")
    ap.add_argument("--draft", default="hybrid", help="drafter kind (the cluster's default with the shipped head)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--first", type=int, default=0, help="index of the first prompt of the benchmark set")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    values = [v.strip() for v in args.values.split(",")]
    if len(values) != 2:
        ap.error("--values takes two values")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

    import torch

    from bench.cluster import _config, _texts, in_process_engine
    from dspark.workers.request import SamplingParams

    torch.set_num_threads(args.threads)
    cfg = dict(_config(args.draft, None, True, "adaptive"), deterministic=True)
    labels = [f"{args.option}={v}" for v in values]
    built = {label: in_process_engine(dict(cfg, draft_options=dict(cfg["draft_options"], **{args.option: v})), True)
             for label, v in zip(labels, values)}
    built["plain"] = in_process_engine(cfg, False)
    totals: dict = {}
    for label, b in built.items():
        _timed(b.engine.runner, "forward", totals, (label, "forward"))
        if b.engine.drafter is not None:
            _timed(b.engine.drafter, "propose", totals, (label, "drafting"))
    tok = built["plain"].loaded.tokenizer
    texts = _texts(args.first + args.prompts)[args.first :]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    for b in built.values():  # warm-up
        b.engine.generate(prompts[:1], SamplingParams(max_tokens=16, temperature=0.0))
    tokens = {label: 0 for label in built}
    seconds = {label: 0.0 for label in built}
    try:
        for i, prompt in enumerate(prompts):
            order = (labels if i % 2 == 0 else labels[::-1]) + ["plain"]
            outs = {}
            for label in order:
                t0 = time.perf_counter()
                outs[label] = built[label].engine.generate([prompt], params)[0].output_ids
                seconds[label] += time.perf_counter() - t0
                tokens[label] += len(outs[label])
            for label in labels:
                if outs[label] != outs["plain"]:
                    raise SystemExit(f"prompt {args.first + i}: {label}'s output differs from plain decoding's")
            print(f"prompt {args.first + i}: " + "  ".join(f"{k} {tokens[k] / seconds[k]:.2f}" for k in built) + " tok/s",
                  flush=True)
        rate = {k: tokens[k] / seconds[k] for k in built}
        print(f"{labels[0]} / {labels[1]}: {rate[labels[0]] / rate[labels[1]]:.3f}x; "
              + "; ".join(f"{k} / plain {rate[k] / rate['plain']:.2f}x" for k in labels))
        for label in labels:
            m, eng = built[label].engine.metrics, built[label].engine
            print(f"{label}: {eng.num_steps} steps, {m.num_draft_tokens} drafts verified, {m.num_accepted_tokens} accepted")
        for (label, part), secs in sorted(totals.items()):
            print(f"{label} {part}: {1e3 * secs / built[label].engine.num_steps:.2f} ms a step")
    finally:
        for b in built.values():
            b.close()


if __name__ == "__main__":
    main()
