"""One request in process: the adaptive budget with and without the slope it learns from one
request's steps (``AdaptiveBudget.one_request_slope`` and the probe step's whole block), and
plain decoding, prompt by prompt in alternating order on one engine.

    .venv/bin/python bench/budget_slope_ab.py --rounds 3 --threads 2

Prints, after each round, tokens/s of the three and their ratios, the drafts each budget
verified a step and the slope the new one fitted.  Hybrid drafter, block 7, bf16, compiled.
"""

from __future__ import annotations

import argparse
import time

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a hash map works.",
    "List five tips for staying productive when working from home.",
    "What causes the seasons on Earth?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Describe the water cycle.",
    "Translate into French: The weather is nice today and we are going to the park.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    import torch

    from dspark.workers.budget_policy import AdaptiveBudget
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    torch.set_num_threads(args.threads)
    built = build_engine(EngineSpec(draft="hybrid", block_len=7, verify_policy="adaptive",
                                    runner=RunnerConfig(n_slots=8, max_seq=1024, deterministic=True, compile=True)),
                         progress=False)
    eng, new = built.engine, built.adaptive
    old = AdaptiveBudget(built.costs, new.policy)  # the start-up shape over 1-8 tokens, the budget's own choice every step
    old.SLOPE_MIN_WEIGHT, old.VERIFY_WHOLE_ON_PROBE = float("inf"), False
    drafter = eng.drafter
    print("profile (tokens: ms):", built.costs.describe(), flush=True)
    done: dict[str, list[tuple[int, float]]] = {"new": [], "old": [], "plain": []}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    for rnd in range(args.rounds):
        for i, text in enumerate(PROMPTS):
            ids = built.tokenizer.encode_chat([{"role": "user", "content": text}])
            for name in ("new", "old", "plain") if (rnd + i) % 2 == 0 else ("plain", "old", "new"):
                eng.drafter = None if name == "plain" else drafter
                eng.budget = old if name == "old" else new
                t0 = time.perf_counter()
                seq = eng.generate([ids], params)[0]
                done[name].append((len(seq.output_ids), time.perf_counter() - t0))
        rate = {k: sum(n for n, _ in v) / sum(s for _, s in v) for k, v in done.items()}
        slope = new.one_request_slope()
        print(f"round {rnd + 1}: tok/s " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items())
              + f"; new/old {rate['new'] / rate['old']:.3f}, new/plain {rate['new'] / rate['plain']:.3f}, "
              f"old/plain {rate['old'] / rate['plain']:.3f}; drafts verified a step new "
              f"{new.verified_tokens / max(1, new.steps):.2f}, old {old.verified_tokens / max(1, old.steps):.2f}; "
              f"slope a token {'-' if slope is None else f'{slope:.4f}'}", flush=True)
    eng.drafter = drafter


if __name__ == "__main__":
    main()
