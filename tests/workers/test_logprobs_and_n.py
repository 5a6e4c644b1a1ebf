"""Engine-level logprobs and n > 1 on the real default model (fp32), with every kind of drafter.

Logprobs are the target's log-probabilities of the emitted tokens under the distribution each
was drawn from, whatever emitted it (plain decoding, an accepted draft, a recovered or bonus
token): checked against transformers' logits of the same text.  n sequences share one prefill
and sample exactly as n seeded single requests would.
"""

from __future__ import annotations

import pytest
import torch

from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.request import SamplingParams
from dspark.workers.runner import RunnerConfig

DRAFTERS = {"none": (), "ngram": (), "dspark": (), "hybrid": ()}


def _build(draft: str, n_slots: int = 8):
    return build_engine(
        EngineSpec(dtype="fp32", draft=draft, block_len=4,
                   runner=RunnerConfig(n_slots=n_slots, max_seq=512), draft_options=DRAFTERS[draft]),
        progress=False,
    )


def _run(engine, prompt, params, rid="r"):
    """Every output of one request, in order."""
    engine.add_request(prompt, params, rid)
    outs = []
    while engine.has_work:
        outs += engine.step()
    return outs


@pytest.fixture(scope="module")
def prompt(model_fp32):
    return model_fp32.tokenizer.encode_chat([{"role": "user", "content": "Write a Python function that adds two numbers, then explain it."}])


def _reference_logprobs(hf_model, prompt, output, scale=1.0, top_k=0):
    """transformers' log-probabilities of ``output`` after ``prompt``: [len(output)] and the full rows."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].float() / scale
    if top_k:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    lp = torch.log_softmax(logits, -1)
    return lp.gather(-1, torch.tensor(output).view(-1, 1)).view(-1), lp


@pytest.mark.parametrize("draft", list(DRAFTERS))
def test_greedy_logprobs_equal_transformers_with_every_drafter(draft, prompt, hf_model):
    built = _build(draft)
    try:
        outs = _run(built.engine, prompt, SamplingParams(max_tokens=40, logprobs=3, ignore_eos=True))
        ids = [t for o in outs for t in o.new_token_ids]
        lps = [lp for o in outs for lp in o.logprobs]
        assert len(ids) == len(lps) == 40 and [lp.token_id for lp in lps] == ids
        ref, rows = _reference_logprobs(hf_model, prompt, ids)
        assert torch.allclose(torch.tensor([lp.logprob for lp in lps]), ref, atol=2e-4)
        for j, lp in enumerate(lps):
            assert len(lp.top) == 3
            ref_v, ref_i = rows[j].topk(3)
            assert [t for t, _ in lp.top][0] == ids[j] == ref_i[0].item()  # greedy: the token is the top one
            assert torch.allclose(torch.tensor([v for _, v in lp.top]), ref_v, atol=2e-4)
        if draft != "none":
            assert built.engine.metrics.num_accepted_tokens > 0, "no draft was accepted: the test checks nothing"
    finally:
        built.close()


def test_sampled_logprobs_are_of_the_processed_distribution(prompt, hf_model):
    """temperature 0.7 and top-k 20: log-probabilities of logits / 0.7 restricted to the top 20."""
    built = _build("ngram")
    try:
        params = SamplingParams(max_tokens=32, temperature=0.7, top_k=20, seed=3, logprobs=2, ignore_eos=True)
        outs = _run(built.engine, prompt, params)
        ids = [t for o in outs for t in o.new_token_ids]
        lps = [lp for o in outs for lp in o.logprobs]
        ref, _ = _reference_logprobs(hf_model, prompt, ids, scale=0.7, top_k=20)
        assert torch.allclose(torch.tensor([lp.logprob for lp in lps]), ref, atol=2e-4)
        assert all(lp.logprob > float("-inf") for lp in lps)  # every token came from the top 20
    finally:
        built.close()


def test_no_logprobs_unless_asked(prompt):
    built = _build("none")
    try:
        outs = _run(built.engine, prompt, SamplingParams(max_tokens=4))
        assert all(o.logprobs is None for o in outs)
    finally:
        built.close()


@pytest.mark.parametrize("draft", ["none", "dspark"])
def test_n_sequences_sample_as_seeded_single_requests(draft, prompt):
    """Sequence i of a seeded n-request is the single request with seed + i, token for token."""
    built = _build(draft)
    try:
        eng = built.engine
        outs = _run(eng, prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=11, n=3))
        got = {i: [t for o in outs if o.index == i for t in o.new_token_ids] for i in range(3)}
        assert sorted(o.index for o in outs if o.finished) == [0, 1, 2]
        assert {o.request_id for o in outs} == {"r"}
        for i in range(3):
            alone = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=1.0, seed=11 + i))[0]
            assert got[i] == alone.output_ids, f"sequence {i}"
        assert len({tuple(v) for v in got.values()}) == 3
    finally:
        built.close()


def test_n_greedy_with_dspark_equals_plain(prompt):
    built = _build("dspark")
    plain = _build("none")
    try:
        outs = _run(built.engine, prompt, SamplingParams(max_tokens=32, n=4))
        ref = plain.engine.generate([prompt], SamplingParams(max_tokens=32))[0].output_ids
        for i in range(4):
            assert [t for o in outs if o.index == i for t in o.new_token_ids] == ref
        assert built.engine.metrics.num_accepted_tokens > 0
    finally:
        built.close()
        plain.close()


def test_n_prefills_the_prompt_once(prompt):
    """n = 4 with one new token each: the step feeds the prompt's tokens once, not four times."""
    built = _build("none")
    try:
        eng = built.engine
        eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=1.0, n=4), "r")
        fed, outs = 0, []
        while eng.has_work:
            outs += eng.step()
            fed += eng.last_step_tokens
        assert fed == len(prompt)
        assert sorted(o.index for o in outs) == [0, 1, 2, 3]
        assert all(o.finished and o.num_output_tokens == 1 for o in outs)
        assert eng.prefix.num_free == eng.n_slots  # every slot back
    finally:
        built.close()


def test_abort_ends_every_sequence(prompt):
    built = _build("ngram")
    try:
        eng = built.engine
        eng.add_request(prompt, SamplingParams(max_tokens=64, temperature=1.0, n=3), "r")
        eng.step()
        eng.step()
        assert eng.abort("r")
        assert not eng.has_work and eng.prefix.num_free == eng.n_slots
    finally:
        built.close()


def test_n_larger_than_the_batch_is_refused(prompt):
    built = _build("none", n_slots=2)
    try:
        with pytest.raises(ValueError, match="n is 3"):
            built.engine.add_request(prompt, SamplingParams(n=3))
    finally:
        built.close()


def test_prompt_logprobs_equal_transformers_across_chunks(prompt, hf_model, model_fp32):
    """Prompt logprobs (echo) computed over several prefill chunks, after a request that could
    have lent its prefix: every prompt token from the second on, against transformers."""
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.runner import LocalRunner

    eng = Engine(LocalRunner(model_fp32.model, RunnerConfig(n_slots=4, max_seq=512)), model_fp32.tokenizer,
                 EngineConfig(max_batch=4, max_prefill_tokens=16))  # several chunks
    eng.generate([prompt], SamplingParams(max_tokens=2))  # its prompt is now indexed for reuse
    outs = _run(eng, prompt, SamplingParams(max_tokens=3, prompt_logprobs=2, n=2))
    firsts = [o for o in outs if o.prompt_logprobs is not None]
    assert sorted(o.index for o in firsts) == [0, 1]  # each choice gets them, once
    plp = firsts[0].prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    assert [lp.token_id for lp in plp[1:]] == prompt[1:]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0, :-1].float(), -1)  # [P-1, V]
    want = ref.gather(-1, torch.tensor(prompt[1:]).view(-1, 1)).view(-1)
    assert torch.allclose(torch.tensor([lp.logprob for lp in plp[1:]]), want, atol=2e-4)
    assert all(len(lp.top) == 2 for lp in plp[1:])
