"""GPU checks, prepared to run as one script on a CUDA machine (``bench/gpu_check.sh``).

1. CUDA logits vs the CPU fp32 reference (fp32 with TF32 off, and bf16).
2. Greedy speculative decoding on CUDA (n-gram and layer-skip drafters) = plain decoding.
3. Triton kernels on CUDA vs their torch references (rejection sampling, top-K admission).
4. NCCL tensor parallelism when >= 2 GPUs are visible (TP=1 vs TP=N logits).
5. The compiled step's logits vs eager on the GPU (fp32).
6. CUDA graphs (:mod:`dspark.models.graph_step`): decode and verification steps replayed from
   the captured graphs, their fp32 logits vs the CPU fp32 regular step, and greedy output with
   graphs = without, plain and n-gram speculative.
7. Decode tokens/s on the GPU at batch 1, 8, 64 (bf16): eager, eager with CUDA graphs and
   compiled, plain and n-gram speculative, and transformers' ``generate`` beside them; the
   ``decode_summary`` rows give graphs / eager and ours / transformers per batch.
8. DeepSeek-V4 (:mod:`bench.gpu_check_v4`): a ``dspark make-model`` folder, its logits vs CPU
   fp32, an NCCL group over the GPUs present vs one rank, decode tokens/s vs transformers.
Writes a JSON report (``--json``) and exits non-zero if a correctness check fails.  Without CUDA
the CUDA checks are reported as skipped and the V4 section runs its CPU parts (a dry run).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def logits_check(report: dict) -> bool:
    from dspark.models.loader import load_model
    from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = load_model(dtype="fp32", device="cpu", progress=False)
    ids = cpu.tokenizer.encode_chat([{"role": "user", "content": "Explain speculative decoding in one paragraph."}])
    step = StepInput(ids, [0], [0], [len(ids)])
    ref = LocalRunner(cpu.model, RunnerConfig(1, 512)).forward(step).logits
    ok = True
    for dtype, tol in (("fp32", 1e-3), ("bf16", 6e-2)):
        gpu = load_model(dtype=dtype, device="cuda", progress=False)
        out = LocalRunner(gpu.model, RunnerConfig(1, 512)).forward(step).logits.cpu()
        err = float((out - ref).abs().max() / ref.abs().max())
        agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        report[f"logits_{dtype}"] = {"max_rel_err": err, "top1_agreement": agree, "tolerance": tol}
        ok &= err <= tol
    return ok


def spec_check(report: dict) -> bool:
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    prompts = ["Write a Python function to sort a list.", "What is the capital of Italy?", "List three animals."]
    outs = {}
    for draft, opts in (("none", ()), ("ngram", ()), ("layerskip", (("layers", 20),))):
        b = build_engine(EngineSpec(dtype="fp32", device="cuda", draft=draft, block_len=4,
                                    runner=RunnerConfig(8, 512), draft_options=opts), progress=False)
        ids = [b.loaded.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        outs[draft] = [s.output_ids for s in b.engine.generate(ids, SamplingParams(max_tokens=48))]
    same = {k: outs[k] == outs["none"] for k in outs}
    report["greedy_spec_identical"] = same
    return all(same.values())


def triton_check(report: dict) -> bool:
    import os

    from dspark.kernels import budget, rejection

    g = torch.Generator(device="cuda").manual_seed(0)
    B, V, K = 16, 49152, 8
    n = torch.randint(0, 6, (B,), generator=g, device="cuda")
    cu = torch.cumsum(n, 0)
    N = int(cu[-1])
    args = dict(
        draft_token_ids=torch.randint(0, V, (N,), generator=g, device="cuda"),
        cu_num_draft_tokens=cu,
        draft_probs=torch.softmax(torch.randn(N, K, generator=g, device="cuda"), -1),
        draft_prob_ids=torch.randint(0, V, (N, K), generator=g, device="cuda"),
        target_probs=torch.softmax(torch.randn(N + B, V, generator=g, device="cuda") * 3, -1),
        is_greedy=torch.rand(B, generator=g, device="cuda") < 0.3,
        uniforms=torch.rand(N, generator=g, device="cuda"),
        recovery_noise=torch.empty(B, V, device="cuda").exponential_(generator=g),
    )
    from dspark.kernels.rejection_types import RejectionInputs
    from dspark.kernels.triton_rejection import rejection_sample_triton

    a = rejection.rejection_sample_torch(RejectionInputs(**args))
    b = rejection_sample_triton(RejectionInputs(**args))
    same_rej = bool(torch.equal(a.output_token_ids, b.output_token_ids))
    surv = torch.sort(torch.rand(B, 7, generator=g, device="cuda"), dim=1, descending=True).values
    os.environ["DSPARK_KERNELS"] = "torch"
    ref = budget.top_k_admission(surv, 20)
    os.environ["DSPARK_KERNELS"] = "triton"
    tri = budget.top_k_admission(surv, 20)
    os.environ.pop("DSPARK_KERNELS")
    same_topk = bool(torch.equal(ref.cpu(), tri.cpu()))
    report["triton"] = {"rejection_identical": same_rej, "top_k_identical": same_topk}
    return same_rej and same_topk


def nccl_check(report: dict) -> bool:
    n = torch.cuda.device_count()
    if n < 2:
        report["nccl"] = f"skipped: {n} GPU visible"
        return True
    from dspark.models.loader import load_model
    from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput, TPGroup, TPSpec

    tp = 3 if n >= 3 else 1
    if tp == 1:
        report["nccl"] = "skipped: SmolLM2-135M (9 heads, 3 KV heads) needs TP 3"
        return True
    lm = load_model(dtype="fp32", device="cuda:0", progress=False)
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    step = StepInput(ids, [0], [0], [len(ids)])
    ref = LocalRunner(lm.model, RunnerConfig(1, 256)).forward(step).logits.cpu()
    del lm
    group = TPGroup(TPSpec(None, "fp32", "cuda", tp, RunnerConfig(1, 256)))
    try:
        out = group.driver.forward(step).logits.cpu()
    finally:
        group.close()
    err = float((out - ref).abs().max() / ref.abs().max())
    report["nccl"] = {"tp": tp, "max_rel_err": err}
    return err < 1e-3


# A CPU dry run of the timing part: DSPARK_CHECK_DEVICE=cpu DSPARK_CHECK_BATCHES=1 DSPARK_CHECK_NEW_TOKENS=8.
DEVICE = os.environ.get("DSPARK_CHECK_DEVICE", "cuda")
BATCHES = tuple(int(b) for b in os.environ.get("DSPARK_CHECK_BATCHES", "1,8,64").split(","))
NEW_TOKENS = int(os.environ.get("DSPARK_CHECK_NEW_TOKENS", "128"))  # per request in the decode timing


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def decode_timing(report: dict) -> None:
    """Tokens/s at batch 1, 8, 64: eager, eager with CUDA graphs and compiled, plain and n-gram
    speculative, and transformers' ``generate`` on the same device."""
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import RunnerConfig

    rows, n_new = [], NEW_TOKENS
    for compiled, graphs in ((False, False), (False, True), (True, False)):
        for draft in ("none", "ngram"):
            cfg = RunnerConfig(max(BATCHES), 1024, compile=compiled, cuda_graphs=graphs)
            b = build_engine(EngineSpec(dtype="bf16", device=DEVICE, draft=draft, block_len=4, runner=cfg), progress=False)
            tok = b.loaded.tokenizer
            for batch in BATCHES:
                ids = [tok.encode_chat([{"role": "user", "content": f"Write a story about robot number {i}."}])
                       for i in range(batch)]
                b.engine.generate(ids[:1], SamplingParams(max_tokens=8, ignore_eos=True))
                _sync()
                t0 = time.perf_counter()
                seqs = b.engine.generate(ids, SamplingParams(max_tokens=n_new, ignore_eos=True))
                _sync()
                dt = time.perf_counter() - t0
                g = b.engine.runner.graphs
                rows.append({"compiled": compiled, "cuda_graphs": graphs, "draft": draft, "batch": batch,
                             "tokens_per_s": sum(len(s.output_ids) for s in seqs) / dt,
                             "acceptance_length": b.engine.metrics.mean_acceptance_length,
                             "compile_s": b.engine.runner.compile_s, "capture_s": b.engine.runner.graph_s,
                             "graph_steps": 0 if g is None else g.served})
            b.close()
    report["decode"] = rows
    try:
        report["hf_decode"] = _hf_timing(n_new)
    except Exception as exc:  # the reference is optional; our rows stand on their own
        report["hf_decode"] = f"error: {exc!r}"
    report["decode_summary"] = decode_summary(rows, report["hf_decode"])


def decode_summary(rows: list[dict], hf: list[dict] | str) -> list[dict]:
    """Per (draft, batch): eager, graphs and compiled tokens/s, graphs / eager, and each over
    transformers at that batch (None where transformers did not run).

    >>> decode_summary([{"compiled": False, "cuda_graphs": g, "draft": "none", "batch": 1, "tokens_per_s": t}
    ...                 for g, t in ((False, 100.0), (True, 300.0))], [{"batch": 1, "tokens_per_s": 50.0}])
    [{'draft': 'none', 'batch': 1, 'eager': 100.0, 'graphs': 300.0, 'compiled': None, \
'graphs_over_eager': 3.0, 'eager_over_hf': 2.0, 'graphs_over_hf': 6.0}]
    """
    hf_tps = {r["batch"]: r["tokens_per_s"] for r in hf} if isinstance(hf, list) else {}
    kind = {(False, False): "eager", (False, True): "graphs", (True, False): "compiled"}
    table: dict[tuple[str, int], dict] = {}
    for r in rows:
        t = table.setdefault((r["draft"], r["batch"]), {"draft": r["draft"], "batch": r["batch"], "eager": None,
                                                        "graphs": None, "compiled": None})
        t[kind[(r["compiled"], r["cuda_graphs"])]] = r["tokens_per_s"]
    out = []
    for (draft, batch), t in table.items():
        eager, graphs, ref = t["eager"], t["graphs"], hf_tps.get(batch)
        t["graphs_over_eager"] = graphs / eager if eager and graphs else None
        t["eager_over_hf"] = eager / ref if eager and ref else None
        t["graphs_over_hf"] = graphs / ref if graphs and ref else None
        out.append(t)
    return out


def _hf_timing(n_new: int) -> list[dict]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.common import load_hf
    from dspark.models.loader import load_model

    tok = load_model(dtype="fp32", progress=False).tokenizer
    model = load_hf("bf16").to(DEVICE)
    out = []
    for batch in BATCHES:
        prompts = [tok.encode_chat([{"role": "user", "content": f"Write a story about robot number {i}."}])
                   for i in range(batch)]
        width = max(len(p) for p in prompts)
        pad = tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=DEVICE)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
        kw = dict(do_sample=False, pad_token_id=pad, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new)
        with torch.inference_mode():
            model.generate(ids, **dict(kw, max_new_tokens=8, min_new_tokens=8))
            _sync()
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            _sync()
        out.append({"batch": batch, "tokens_per_s": n_new * batch / (time.perf_counter() - t0)})
    return out


def compiled_check(report: dict) -> bool:
    """The compiled step's fp32 logits within 1e-3 of eager on this device."""
    from dspark.models.kv_cache import make_batch
    from dspark.models.loader import load_model

    model = load_model(dtype="fp32", device=DEVICE, progress=False).model

    def steps() -> list[torch.Tensor]:
        cache = model.make_cache(2, 128)
        out = []
        for slots, q_lens, toks in (([0], [9], list(range(300, 309))), ([0], [1], [42]),
                                    ([1, 0], [6, 4], list(range(500, 506)) + [7, 8, 9, 10])):
            batch = make_batch(cache, slots, q_lens, model.args.n_rep)
            out.append(model(torch.tensor(toks, device=DEVICE), cache, batch).logits)
        return out

    with torch.inference_mode():
        eager = steps()
        model.enable_compile()
        compiled = steps()
    err = max(float((a - b).abs().max()) for a, b in zip(eager, compiled))
    report["compiled_vs_eager_max_abs"] = err
    return err < 1e-3


def graphs_check(report: dict) -> bool:
    """The graph-safe step replayed from CUDA graphs: fp32 logits of decode and verification
    steps (with a rollback, padded buckets) within 1e-3 of the CPU fp32 regular step, relative
    to the largest logit, and greedy output with graphs token for token the same as without,
    plain and n-gram speculative."""
    from dspark.models.loader import load_model
    from dspark.workers.factory import EngineSpec, build_engine
    from dspark.workers.request import SamplingParams
    from dspark.workers.runner import LocalRunner, RunnerConfig, StepInput

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = load_model(dtype="fp32", device="cpu", progress=False)
    dev = load_model(dtype="fp32", device=DEVICE, progress=False)
    ref = LocalRunner(cpu.model, RunnerConfig(3, 256))
    run = LocalRunner(dev.model, RunnerConfig(3, 256, cuda_graphs=True))
    a = cpu.tokenizer.encode_chat([{"role": "user", "content": "Explain speculative decoding in one paragraph."}])
    b = cpu.tokenizer.encode_chat([{"role": "user", "content": "Name three rivers."}])
    la, lb = len(a), len(b)
    steps = [StepInput(a, [0], [0], [la]), StepInput(b, [1], [0], [lb]),  # prefills: the regular path
             StepInput([11, 12], [0, 1], [la, lb], [1, 1]),  # decode, bucket 2
             StepInput([13, 14, 15, 16, 17, 18], [1, 0], [lb + 1, la + 1], [5, 1]),  # verify + decode, bucket 8
             StepInput([19, 20, 21], [1, 0, 2], [lb + 3, la + 2, 0], [1, 1, 1])]  # rollback to lb + 3; bucket 4
    err, agree = 0.0, True
    with torch.inference_mode():
        for step in steps:
            want = ref.forward(step).logits
            got = run.forward(step).logits.cpu()
            err = max(err, float((got - want).abs().max() / want.abs().max()))
            agree &= bool(torch.equal(got.argmax(-1), want.argmax(-1)))
    g = run.graphs
    report["graphs_logits_fp32"] = {"max_rel_err": err, "top1_identical": agree, "tolerance": 1e-3,
                                    "graph_steps": g.served, "graphs": g.num_graphs, "capture_s": run.graph_s}
    del run, dev
    prompts = ["Write a Python function to sort a list.", "What is the capital of Italy?", "List three animals."]
    outs = {}
    for draft in ("none", "ngram"):
        for graphs in (False, True):
            built = build_engine(EngineSpec(dtype="fp32", device=DEVICE, draft=draft, block_len=4,
                                            runner=RunnerConfig(4, 512, cuda_graphs=graphs)), progress=False)
            ids = [built.loaded.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
            outs[(draft, graphs)] = [s.output_ids for s in built.engine.generate(ids, SamplingParams(max_tokens=48))]
            built.close()
    same = {f"{draft}_graphs": outs[(draft, True)] == outs[("none", False)] for draft in ("none", "ngram")}
    report["graphs_greedy_identical"] = same
    return err <= 1e-3 and agree and g.served == len(steps) - 2 and all(same.values())


def v4_check(report: dict) -> bool:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.gpu_check_v4 import v4_section

    return v4_section(report, "cuda" if torch.cuda.is_available() else "cpu")


def main(out: str | None) -> int:
    if not torch.cuda.is_available():
        print("CUDA is not available: the CUDA checks are skipped, the V4 section runs on CPU", file=sys.stderr)
        report = {"device": "cpu (no CUDA)", "torch": torch.__version__, "cuda_checks": "skipped: no CUDA device",
                  "cuda_graphs": "skipped: no CUDA", "decode": "skipped: no CUDA"}
        ok = v4_check(report)
        report["v4_check_passed"] = ok
        return _write(report, out, ok)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    ok = True
    for check in (logits_check, spec_check, triton_check, nccl_check, compiled_check, graphs_check, v4_check):
        try:
            passed = check(report)
        except Exception as exc:  # report and go on with the other checks
            report[check.__name__] = f"error: {exc!r}"
            passed = False
        report[check.__name__ + "_passed"] = passed
        ok &= passed
    decode_timing(report)
    return _write(report, out, ok)


def _write(report: dict, out: str | None, ok: bool) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
