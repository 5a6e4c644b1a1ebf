"""A verifier that holds few requests drafts them in its own process (``RemoteDrafter``'s
``local`` drafter): the real engine on the real default model (fp32, greedy) with prompt lookup
both in process and on a draft worker served over gRPC on loopback.  A request that arrives while
the verifier holds fewer than ``local_below`` requests is drafted in process for its whole life;
the rest go to the worker; the output is plain decoding's either way."""

from __future__ import annotations

import itertools
import time

import pytest

from dspark.workers.draft_worker import DraftWorkerServer
from dspark.workers.drafters.ngram import NgramDrafter
from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import SamplingParams
from dspark.workers.runner import LocalRunner, RunnerConfig
from helpers.tiny_models import make_seq

PROMPTS = ["List the days of the week, then list them again.", "Count from one to twelve in words."]
PARAMS = SamplingParams(max_tokens=40, ignore_eos=True)


class Recording(NgramDrafter):
    """Prompt lookup that remembers which requests it drafted for."""

    def __init__(self) -> None:
        super().__init__()
        self.drafted: set[str] = set()

    def propose(self, seqs, block_len):
        self.drafted.update(s.request_id for s in seqs)
        return super().propose(seqs, block_len)


@pytest.fixture(scope="module")
def setup(model_fp32):
    tok = model_fp32.tokenizer
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=3, max_seq=256))
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    plain = [s.output_ids for s in Engine(runner, tok, EngineConfig(max_batch=2)).generate(prompts, PARAMS)]
    workers: list[Recording] = []

    def factory() -> Recording:
        workers.append(Recording())
        return workers[-1]

    server = DraftWorkerServer(factory).start()
    yield runner, tok, prompts, plain, server, workers
    server.stop()


_ENGINES = itertools.count(1)


def _own_ids(eng: Engine) -> Engine:
    """Request ids of this engine's own (req-1000, ... for the first; an engine counts from
    req-0): the worker outlives each test and releases a closed stream's requests on its own
    time, and it refuses an id another stream still holds as in use, so a test reusing the last
    one's req-0 found that request decoding plainly, now and then."""
    eng._ids = itertools.count(1000 * next(_ENGINES))
    return eng


def _engine(setup, local_below: int, local: NgramDrafter | None = None) -> tuple[Engine, Recording, RemoteDrafter]:
    runner, tok, _, _, server, workers = setup
    for w in workers:  # the worker's drafter outlives each test
        w.drafted.clear()
    local = local or Recording()
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="ngram"), block_len=4,
                            local=local, local_below=local_below)
    return _own_ids(Engine(runner, tok, EngineConfig(max_batch=2, block_len=4), drafter=drafter)), local, drafter


def test_the_first_request_drafts_here_the_second_on_the_worker(setup):
    _, _, prompts, plain, _, workers = setup
    eng, local, drafter = _engine(setup, local_below=1)
    try:
        a, b = eng.generate(prompts, PARAMS)  # both held from the first step on
        assert [a.output_ids, b.output_ids] == plain
        assert local.drafted == {a.request_id}  # b arrived while a was held
        assert any(b.request_id in w.drafted for w in workers) and not any(a.request_id in w.drafted for w in workers)
        assert a.metrics.num_accepted_tokens > 0 and b.metrics.num_accepted_tokens > 0  # both were drafted for
        # Both released: the next request finds the verifier empty and drafts here again.
        c = eng.generate([prompts[1]], PARAMS)[0]
        assert c.output_ids == plain[1] and c.request_id in local.drafted
        assert not drafter._local and not drafter._reqs  # nothing held after release
    finally:
        drafter.close()


def test_local_below_zero_drafts_everything_on_the_worker(setup):
    _, _, prompts, plain, _, workers = setup
    eng, local, drafter = _engine(setup, local_below=0)
    try:
        seqs = eng.generate(prompts, PARAMS)
        assert [s.output_ids for s in seqs] == plain and not local.drafted
        assert all(any(s.request_id in w.drafted for w in workers) for s in seqs)
    finally:
        drafter.close()


def test_the_requests_of_a_step_reach_the_worker_in_one_message(setup):
    """Every request of an engine step is observed before any Step leaves: the worker gets one
    message per step and drafts its requests in one batch.  (Sent one by one, they could reach
    it apart, and it drafted the first alone, then the rest: through the cluster at four
    requests the verifier waited for the two batches in turn.)"""
    _, _, prompts, plain, server, workers = setup
    eng, _, drafter = _engine(setup, local_below=0)
    before = server.servicer.step_messages
    try:
        seqs = eng.generate(prompts, PARAMS)
        assert [s.output_ids for s in seqs] == plain
        sent = server.servicer.step_messages - before
        assert 0 < sent <= eng.num_steps, (sent, eng.num_steps)
        assert all(any(s.request_id in w.drafted for w in workers) for s in seqs)
    finally:
        drafter.close()


def test_a_steps_message_is_split_where_it_would_pass_its_byte_budget(setup):
    """Many long prompts' features in one step could pass the gRPC message limit in one Steps
    message: the Steps are split where a message would pass ``steps_batch_bytes`` (here so small
    that every Step goes alone), and drafting goes on as before."""
    runner, tok, prompts, plain, server, workers = setup
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="ngram", steps_batch_bytes=1), block_len=4)
    eng = _own_ids(Engine(runner, tok, EngineConfig(max_batch=2, block_len=4), drafter=drafter))
    before = server.servicer.step_messages
    try:
        seqs = eng.generate(prompts, PARAMS)
        assert [s.output_ids for s in seqs] == plain
        assert server.servicer.step_messages - before > eng.num_steps  # two requests, one message each
        assert all(s.metrics.num_accepted_tokens > 0 for s in seqs)
    finally:
        drafter.close()


def test_an_n_request_drafts_its_first_sequence_here(setup):
    """The sequences of one request arrive together; the first (the leader) takes the local place
    and the second goes to the worker, each for its whole life, and both decode as plain does."""
    _, _, prompts, plain, _, workers = setup
    eng, local, drafter = _engine(setup, local_below=1)
    try:
        lead = eng.add_request(prompts[0], SamplingParams(max_tokens=40, ignore_eos=True, n=2))
        follower = lead.followers[0]
        eng.run_until_done()
        assert lead.output_ids == follower.output_ids == plain[0]
        assert local.drafted == {lead.request_id}
        assert any(follower.request_id in w.drafted for w in workers)
        assert lead.metrics.num_accepted_tokens > 0 and follower.metrics.num_accepted_tokens > 0
    finally:
        drafter.close()


class Failing(Recording):
    """Drafts one block, then raises (a drafter bug, or out of memory)."""

    def propose(self, seqs, block_len):
        if self.drafted:
            raise RuntimeError("drafter failed")
        return super().propose(seqs, block_len)


def test_a_failing_local_drafter_leaves_its_request_to_plain_decoding(setup, caplog):
    """Only the request drafted here loses its drafts; the one on the worker, and the output of
    both, are untouched, as when a worker fails."""
    _, _, prompts, plain, _, workers = setup
    eng, local, drafter = _engine(setup, local_below=1, local=Failing())
    try:
        a, b = eng.generate(prompts, PARAMS)
        assert [a.output_ids, b.output_ids] == plain
        assert local.drafted == {a.request_id} and not a.draft_enabled and b.draft_enabled
        assert a.metrics.num_drafts <= 1 < b.metrics.num_drafts
        assert any(b.request_id in w.drafted for w in workers)
        assert "drafting in process failed" in caplog.text and not drafter._local
    finally:
        drafter.close()


def test_a_local_drafter_reading_other_features_is_refused():
    class Featured(NgramDrafter):
        feature_layers = (3,)

    with pytest.raises(ValueError, match="one step's features must serve both"):
        RemoteDrafter([], RemoteDrafterConfig(kind="ngram"), block_len=4, local=Featured())


def test_a_block_for_an_old_context_is_never_served(setup):
    """A request that moved on without using its block (its block came late, it sat the
    speculative step out, and the next step was plain) drops the block drafted for its old
    context, arrived or still in flight: served at its next speculative step, it would be checked
    at the wrong position, and nothing would be drafted for the new one."""
    _, _, prompts, _, server, _ = setup
    drafter = RemoteDrafter([server.address], RemoteDrafterConfig(kind="ngram"), block_len=4, local_below=0)
    try:
        seq = make_seq("old-block", prompts[0], prompts[0][1])
        drafter.observe(seq, prompts[0], None)  # its prompt is cached; it wants a block (the default)
        drafter.flush_steps()
        r = drafter._reqs["old-block"]
        deadline = time.monotonic() + 10
        while r.block is None and time.monotonic() < deadline:
            drafter.wait_for_blocks(0.1)
        assert r.block is not None
        seq.output_ids.append(prompts[0][2])  # a plain step went by: its anchor is cached, no block asked
        seq.num_cached += 1
        seq.wants_block = False
        drafter.observe(seq, [seq.output_ids[-2]], None)
        assert drafter.propose([seq], 4) == [None]  # the old block is gone; a new one is asked for
        deadline = time.monotonic() + 10
        while (blk := drafter.propose([seq], 4)[0]) is None and time.monotonic() < deadline:
            drafter.wait_for_blocks(0.1)
        assert blk is not None

        # Still in flight when the request moves on: its answer, when it comes, is not kept.
        seq = make_seq("in-flight", prompts[1], prompts[1][1])
        drafter.observe(seq, prompts[1], None)  # the Step is queued, not sent yet
        seq.output_ids.append(prompts[1][2])
        seq.num_cached += 1
        seq.wants_block = False
        drafter.observe(seq, [seq.output_ids[-2]], None)
        drafter.flush_steps()  # the first Step goes out now and is answered
        r = drafter._reqs["in-flight"]
        deadline = time.monotonic() + 1.0
        while r.block is None and time.monotonic() < deadline:
            drafter.wait_for_blocks(0.1)
        assert r.block is None and drafter.propose([seq], 4) == [None]
    finally:
        drafter.close()
