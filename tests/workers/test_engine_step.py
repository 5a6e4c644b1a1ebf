"""One engine step, stage by stage, on a stand-in target whose greedy next token is ``t + 1``.

The stand-in runner makes every outcome known in advance: a draft is accepted iff it continues
the count, and the features it returns for a token are the token id, so the test can see which
of the batch's rows reach which request.  Covered: the budget is shown blocks already trimmed to
what their requests may still emit; each request's drafter is told exactly the tokens it keeps
(with their own features and the verified count); a request whose remote block has not arrived
sits the step out, and a step with nothing else to run does no forward pass.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dspark.models.llama import ForwardOutput
from dspark.workers.drafters.base import DraftBlock, StatelessDrafter
from dspark.workers.budget_policy import fixed_budget
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams, Sequence
from dspark.workers.runner import StepInput

V = 64


class CountingRunner:
    """A target whose greedy next token after ``t`` is ``(t + 1) % V``; features: the token id."""

    def __init__(self, n_slots: int = 4, max_seq: int = 64) -> None:
        self.device = torch.device("cpu")
        self.cache = SimpleNamespace(n_slots=n_slots, max_seq=max_seq)
        self.steps: list[StepInput] = []

    def forward(self, step: StepInput) -> ForwardOutput:
        self.steps.append(step)
        toks = torch.tensor(step.tokens)  # [T]
        rows = toks[step.logits_rows]  # [R]
        logits = torch.full((len(rows), V), -10.0)
        logits[torch.arange(len(rows)), (rows + 1) % V] = 10.0
        feats = toks[:, None].float() if step.feature_layers else None  # [T, 1]
        return ForwardOutput(logits=logits, features=feats, hidden=None)


class CountingDrafter(StatelessDrafter):
    """Drafts the count on from the anchor, wrong at block position ``wrong_at[request_id]``."""

    name = "counting"
    feature_layers = (0,)

    def __init__(self, wrong_at: dict[str, int] | None = None) -> None:
        self.wrong_at = wrong_at or {}
        self.observed: list[tuple[str, list[int], list[int], int | None]] = []

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock | None]:
        out = []
        for seq in seqs:
            ids = [(seq.all_ids[-1] + 1 + k) % V for k in range(block_len)]
            k = self.wrong_at.get(seq.request_id)
            if k is not None:
                ids[k] = (ids[k] + 7) % V
            out.append(DraftBlock(token_ids=ids))
        return out

    def observe(self, seq, token_ids, features, num_verified=None) -> None:
        feats = [] if features is None else [int(x) for x in features[:, 0]]
        self.observed.append((seq.request_id, list(token_ids), feats, num_verified))


def test_budget_sees_blocks_trimmed_to_what_the_request_may_emit():
    seen: list[int] = []

    def budget(blocks, block_len):
        seen.extend(len(b) for b in blocks)
        return fixed_budget(blocks, block_len)

    eng = Engine(CountingRunner(), None, EngineConfig(block_len=4), drafter=CountingDrafter(), budget=budget)
    seq = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=4))[0]
    # Prefill emits 4; three tokens are left (two drafts and the bonus), so the budget sees two.
    assert seq.output_ids == [4, 5, 6, 7] and seq.finish_reason == "length"
    assert seen == [2]
    assert [len(s.tokens) for s in eng.runner.steps] == [3, 3]  # the prompt; the anchor + 2 drafts


def test_each_request_keeps_its_accepted_tokens_with_its_own_features():
    drafter = CountingDrafter(wrong_at={"b": 1})
    eng = Engine(CountingRunner(), None, EngineConfig(block_len=3), drafter=drafter)
    eng.add_request([10, 11], SamplingParams(max_tokens=8), request_id="a")
    eng.add_request([20, 21, 22], SamplingParams(max_tokens=8), request_id="b")
    first = eng.step()  # both prefills
    assert [o.new_token_ids for o in first] == [[12], [23]]
    second = eng.step()  # a: 3 drafts accepted + bonus; b: draft 1 rejected, recovered token
    assert [o.new_token_ids for o in second] == [[13, 14, 15, 16], [24, 25]]
    assert drafter.observed == [
        ("a", [10, 11], [10, 11], None),
        ("b", [20, 21, 22], [20, 21, 22], None),
        ("a", [12, 13, 14, 15], [12, 13, 14, 15], 3),
        ("b", [23, 24], [23, 24], 3),
    ]
    assert [s.num_cached for s in eng.running] == [6, 5]


class LateDrafter(CountingDrafter):
    """An asynchronous drafter whose block for ``late`` has not arrived yet."""

    def __init__(self) -> None:
        super().__init__()
        self.late: set[str] = set()
        self.waits: list[float] = []

    def propose(self, seqs, block_len):
        blocks = super().propose(seqs, block_len)
        return [None if s.request_id in self.late else b for s, b in zip(seqs, blocks)]

    def wait_for_blocks(self, timeout: float) -> None:
        self.waits.append(timeout)


def test_a_request_whose_block_is_late_sits_the_step_out():
    drafter = LateDrafter()
    runner = CountingRunner()
    eng = Engine(runner, None, EngineConfig(block_len=2, max_block_wait_s=0.0), drafter=drafter)
    eng.add_request([1], SamplingParams(max_tokens=16), request_id="a")
    eng.add_request([30], SamplingParams(max_tokens=16), request_id="b")
    eng.step()  # prefills
    drafter.late = {"b"}
    out = eng.step()
    assert [(o.request_id, o.new_token_ids) for o in out] == [("a", [3, 4, 5])]
    drafter.late = {"a", "b"}  # nothing to run: no forward pass, a short wait for a block
    steps, forwards = eng.num_steps, len(runner.steps)
    assert eng.step() == [] and drafter.waits
    assert (eng.num_steps, len(runner.steps)) == (steps, forwards)
    drafter.late = set()
    out = eng.step()
    assert [(o.request_id, o.new_token_ids) for o in out] == [("a", [6, 7, 8]), ("b", [32, 33, 34])]


class ArrivingDrafter(LateDrafter):
    """Its late blocks land while the engine waits for them."""

    def wait_for_blocks(self, timeout: float) -> None:
        super().wait_for_blocks(timeout)
        self.late = set()


def test_a_step_with_a_prompt_chunk_waits_for_blocks_none_of_which_is_here():
    """A new request's prompt chunk runs whatever the blocks do.  When no decoding request's
    block has arrived yet (a worker drafts a batch's blocks together, so they land together),
    the step waits briefly for them as it does when some are here, instead of running the chunk
    alone while every decoding request sits the step out."""
    drafter = ArrivingDrafter()
    eng = Engine(CountingRunner(), None, EngineConfig(block_len=2, max_block_wait_s=0.5), drafter=drafter)
    eng.add_request([1], SamplingParams(max_tokens=16), request_id="a")
    eng.add_request([30], SamplingParams(max_tokens=16), request_id="b")
    eng.step()  # prefills
    eng.add_request([50, 51], SamplingParams(max_tokens=16), request_id="c")
    drafter.late = {"a", "b"}
    eng.last_step_seconds = 1.0  # the wait is bounded by the late requests' share of the last step
    out = eng.step()
    assert drafter.waits
    assert {o.request_id: o.new_token_ids for o in out} == {"a": [3, 4, 5], "b": [32, 33, 34], "c": [52]}


def test_a_request_that_drafts_nothing_does_not_run_alone_while_every_block_is_in_flight():
    """A request at its last token drafts nothing, so its step runs whatever the blocks do.
    When every other request's block is still in flight, the step waits briefly for them, as it
    does when some are here, instead of running one token while the others sit the step out
    (through the cluster at four requests: 6% of the steps, each a full step for one token)."""
    drafter = ArrivingDrafter()
    eng = Engine(CountingRunner(), None, EngineConfig(block_len=2, max_block_wait_s=0.5), drafter=drafter)
    eng.add_request([1], SamplingParams(max_tokens=16), request_id="a")
    eng.add_request([30], SamplingParams(max_tokens=2), request_id="b")  # one token left after its prefill
    eng.step()  # prefills
    drafter.late = {"a"}
    eng.last_step_seconds = 1.0  # the wait is bounded by the late requests' share of the last step
    out = eng.step()
    assert drafter.waits
    assert {o.request_id: o.new_token_ids for o in out} == {"a": [3, 4, 5], "b": [32]}


def test_the_wait_for_blocks_grows_with_the_share_of_requests_it_waits_for():
    """A late request that sits a step out loses a step; the others lose what the step waits.
    So the wait is bounded by the late requests' share of the last step (and
    ``max_block_wait_s``): one of three late, a third of a step; two of three, two thirds."""
    for late, share in (({"a"}, 1 / 3), ({"a", "b"}, 2 / 3)):
        drafter = LateDrafter()  # its blocks never land: the engine waits until its deadline
        eng = Engine(CountingRunner(), None, EngineConfig(block_len=2, max_block_wait_s=10.0), drafter=drafter)
        for rid, prompt in (("a", [1]), ("b", [20]), ("c", [40])):
            eng.add_request(prompt, SamplingParams(max_tokens=16), request_id=rid)
        eng.step()  # prefills
        drafter.late = late
        eng.last_step_seconds = 0.3
        out = eng.step()
        assert sorted(o.request_id for o in out) == sorted({"a", "b", "c"} - late)
        assert drafter.waits[0] == pytest.approx(share * 0.3, abs=0.02), (late, drafter.waits[:3])
