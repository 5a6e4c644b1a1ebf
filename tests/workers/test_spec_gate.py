"""The speculation gate: speculate only when measured throughput says it pays.

Unit cases on hand-made measurements, then the real engine on the real default model (fp32,
greedy) with two scripted drafters: one that is slow and always wrong (the gate must settle on
plain decoding) and one that proposes the target's own continuation for free (the gate must
keep speculating).  Output stays identical to plain decoding either way.
"""

from __future__ import annotations

import time

import pytest

from dspark.workers.drafters.base import DraftBlock, StatelessDrafter
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams, Sequence
from dspark.workers.runner import LocalRunner, RunnerConfig
from dspark.workers.spec_gate import SpeculationGate


def test_gate_measures_both_arms_then_follows_the_faster():
    g = SpeculationGate(explore_every=8, warmup_steps=2)
    assert [g.speculate(1) for _ in range(2)] == [True, True]  # no measurement yet: try speculation
    for _ in range(2):
        g.record(1, True, 1.2, 0.050)  # 24 tokens/s
    assert [g.speculate(1) for _ in range(2)] == [False, False]  # then plain
    for _ in range(2):
        g.record(1, False, 1.0, 0.025)  # 40 tokens/s
    choices = [g.speculate(1) for _ in range(16)]
    assert choices.count(True) == 2 and choices[7] and choices[15]  # exploration only
    assert g.rates()[1] == pytest.approx((24.0, 40.0))


def test_gate_keeps_batch_sizes_apart_and_recovers():
    g = SpeculationGate(explore_every=4, warmup_steps=1, decay=0.5)
    g.speculate(1), g.record(1, True, 3.0, 0.030)  # 100 tok/s alone
    g.speculate(1), g.record(1, False, 1.0, 0.025)  # 40 tok/s alone
    g.speculate(16), g.record(16, True, 20.0, 0.5)  # 40 tok/s at 16
    g.speculate(16), g.record(16, False, 16.0, 0.2)  # 80 tok/s at 16
    assert g.speculate(1) and not g.speculate(16)
    # Speculation at 16 becomes cheap (say, a copy-heavy stretch): exploration notices.
    for _ in range(12):
        if g.speculate(16):
            g.record(16, True, 60.0, 0.3)
    assert g.speculate(16)


def test_gate_refuses_bad_settings():
    with pytest.raises(ValueError):
        SpeculationGate(explore_every=1)


class _Script(StatelessDrafter):
    """Proposes the next tokens of ``script`` (correct drafts), or wrong ones after a delay."""

    name = "scripted"

    def __init__(self, script: list[int], wrong: bool, delay_s: float) -> None:
        self.script, self.wrong, self.delay_s = script, wrong, delay_s

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        time.sleep(self.delay_s)
        out = []
        for seq in seqs:
            ids = list(self.script[len(seq.output_ids) : len(seq.output_ids) + block_len])
            out.append(DraftBlock(token_ids=[(t + 1) % 1000 for t in ids] if self.wrong else ids))
        return out


@pytest.fixture(scope="module")
def setup(model_fp32):
    tok = model_fp32.tokenizer
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=1, max_seq=256))
    prompt = tok.encode_chat([{"role": "user", "content": "Describe a sunrise over the sea."}])
    plain = Engine(runner, tok, EngineConfig(max_batch=1)).generate([prompt], SamplingParams(max_tokens=48))[0]
    return runner, tok, prompt, plain.output_ids


@pytest.mark.parametrize("wrong", [True, False])
def test_engine_gate_settles_on_the_faster_arm(setup, wrong):
    runner, tok, prompt, plain = setup
    gate = SpeculationGate(explore_every=8, warmup_steps=3)
    drafter = _Script(plain, wrong=wrong, delay_s=0.2 if wrong else 0.0)
    eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=8), drafter=drafter, gate=gate)
    seq = eng.generate([prompt], SamplingParams(max_tokens=48, ignore_eos=True))[0]
    assert seq.output_ids == plain[: len(seq.output_ids)] and len(seq.output_ids) == 48
    if wrong:  # 0.2 s of drafting for nothing: plain decoding after the warm-up, a few probes
        assert gate.plain_steps > 3 * gate.speculative_steps, (gate.plain_steps, gate.speculative_steps)
    else:  # free, always-accepted drafts: 9 tokens per step instead of 1
        assert gate.speculative_steps > gate.plain_steps
        assert seq.metrics.num_accepted_tokens > 0


def test_remote_drafter_drafts_nothing_for_plain_steps(setup):
    """The gate chooses the next step's arm before the step's tokens go to the draft worker, so a
    worker is asked for a block only ahead of speculative steps (it used to draft after every
    step, busy for nothing while the verifier decoded plainly).  Output stays plain decoding's."""
    from dspark.workers.draft_worker import DraftWorkerServer
    from dspark.workers.drafters.ngram import NgramDrafter
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig

    runner, tok, prompt, plain = setup
    server = DraftWorkerServer(NgramDrafter).start()
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="ngram"), block_len=4)
    try:
        gate = SpeculationGate(explore_every=4, warmup_steps=1)
        gate.record(1, True, 1.0, 60.0)  # speculation measured hopeless, plain fast:
        gate.record(1, False, 1.0, 0.001)  # plain steps, with a speculative probe every 4th
        eng = Engine(runner, tok, EngineConfig(max_batch=1, block_len=4), drafter=drafter, gate=gate)
        seq = eng.generate([prompt], SamplingParams(max_tokens=48, ignore_eos=True))[0]
        assert seq.output_ids == plain[: len(seq.output_ids)] and len(seq.output_ids) == 48
        assert gate.plain_steps >= 2 * gate.speculative_steps > 0, (gate.plain_steps, gate.speculative_steps)
        # One block per speculative step, at most: none for the plain ones.
        assert 0 < server.servicer.blocks_served <= gate.speculative_steps, (
            server.servicer.blocks_served, gate.speculative_steps, gate.plain_steps)
    finally:
        drafter.close()
        server.stop()
