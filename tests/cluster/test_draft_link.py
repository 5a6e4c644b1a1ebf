"""The verifier <-> draft worker link under hostile or careless peers, over real gRPC on loopback:
stream ownership of request ids, per-stream quotas and idle release, and the internal token and
bind address the cluster configuration gives a draft worker by default.

Every test starts its own DraftWorkerServer (ngram drafter: no model to load) on 127.0.0.1 and
talks to it with raw Draft streams, as a second verifier or a probe would.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time

import grpc
import pytest

from dspark.proto.dspark.v1 import draft_pb2, draft_pb2_grpc
from dspark.workers.draft_worker import DraftWorkerConfig, DraftWorkerServer
from dspark.workers.drafters.ngram import NgramDrafter

PROMPT = [5, 6, 7, 5, 6]  # the ngram drafter continues it with 7, 5, 6, ...
WAIT_S = 20.0


class Stream:
    """One raw Draft stream: send messages one by one, read replies with a timeout."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self._out: queue.Queue = queue.Queue()
        self._in: queue.Queue = queue.Queue()
        md = (("authorization", f"Bearer {token}"),) if token else None
        self.call = draft_pb2_grpc.DraftServiceStub(self.channel).Draft(iter(self._out.get, None), metadata=md)
        self.status: grpc.RpcError | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self._in.put(resp)
        except grpc.RpcError as exc:
            self.status = exc
        finally:
            self._in.put(None)

    def open(self, rid: str, prompt: list[int] = PROMPT, legacy: bool = False) -> None:
        """Open ``rid``: the prompt's length only (its tokens follow in the first Step), or, as
        older verifiers did, the whole prompt (``legacy``)."""
        form = {"prompt_token_ids": prompt} if legacy else {"prompt_len": len(prompt)}
        self._out.put(draft_pb2.DraftRequest(open=draft_pb2.Open(
            request_id=rid, options=draft_pb2.DrafterOptions(kind="ngram", block_len=3), **form)))

    def step(self, rid: str, step_id: int, new_tokens: list[int], anchor: int, context_len: int) -> None:
        self._out.put(draft_pb2.DraftRequest(step=draft_pb2.Step(
            request_id=rid, step_id=step_id, new_token_ids=new_tokens, anchor_token_id=anchor,
            context_len=context_len, block_len=3)))

    def close_request(self, rid: str) -> None:
        self._out.put(draft_pb2.DraftRequest(close=draft_pb2.Close(request_id=rid, reason=draft_pb2.CLOSE_REASON_FINISHED)))

    def recv(self, timeout: float = WAIT_S) -> draft_pb2.DraftResponse:
        try:
            resp = self._in.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply within {timeout:.0f}s") from None
        if resp is None:
            raise AssertionError(f"stream ended: {self.status}")
        return resp

    def block(self, rid: str, step_id: int) -> draft_pb2.DraftBlock:
        resp = self.recv()
        assert resp.WhichOneof("kind") == "block", resp
        assert (resp.block.request_id, resp.block.step_id) == (rid, step_id), resp
        return resp.block

    def error(self, rid: str) -> draft_pb2.DraftError:
        resp = self.recv()
        assert resp.WhichOneof("kind") == "error", f"expected a DraftError for {rid}, got {resp}"
        assert resp.error.request_id == rid, resp
        return resp.error

    def quiet(self, seconds: float = 0.5) -> None:
        """No reply arrives for a while."""
        try:
            resp = self._in.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected reply {resp}")

    def end(self) -> None:
        self._out.put(None)
        self.call.cancel()
        self.channel.close()


def first_step(s: Stream, rid: str, step_id: int = 1) -> draft_pb2.DraftBlock:
    """Open ``rid`` with PROMPT and send its first Step (prompt cached, anchor 7)."""
    s.open(rid)
    s.step(rid, step_id, PROMPT, anchor=7, context_len=len(PROMPT))
    blk = s.block(rid, step_id)
    assert list(blk.draft_token_ids) == [5, 6, 7]
    return blk


def wait_for(cond, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture
def worker(request):
    cfg = getattr(request, "param", DraftWorkerConfig())
    server = DraftWorkerServer(NgramDrafter, cfg).start()
    streams: list[Stream] = []

    def connect(token: str | None = None) -> Stream:
        streams.append(Stream(server.address, token))
        return streams[-1]

    server.connect = connect
    yield server
    for s in streams:
        s.end()
    server.stop()


# ---------------------------------------------------------------------------- the prompt crosses once
def test_prompt_crosses_once_and_older_verifiers_still_work(worker):
    s = worker.connect()
    first_step(s, "new")  # Open carries prompt_len; the first Step the prompt's tokens
    s.open("old", legacy=True)  # an older verifier: the prompt in Open and again in the Step
    s.step("old", 1, PROMPT, anchor=7, context_len=len(PROMPT))
    assert list(s.block("old", 1).draft_token_ids) == [5, 6, 7]
    s.open("short")  # a first Step without the whole prompt is refused, for that request only
    s.step("short", 1, PROMPT[:2], anchor=7, context_len=2)
    assert "prompt has 5" in s.error("short").message
    s.open("wrong", legacy=True)  # an old-style Open that the Step contradicts
    s.step("wrong", 1, [9, 9, 9, 9, 9], anchor=7, context_len=5)
    assert "continue the prompt" in s.error("wrong").message
    s._out.put(draft_pb2.DraftRequest(open=draft_pb2.Open(request_id="none")))
    assert "prompt_len" in s.error("none").message
    s.step("new", 2, [7], anchor=5, context_len=len(PROMPT) + 1)  # "new" went on unharmed
    assert len(s.block("new", 2).draft_token_ids) == 3


def test_remote_drafter_sends_the_prompt_once(worker):
    """The verifier's client opens with the prompt's length only; the worker's mirror gets the
    prompt from the first Step."""
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig
    from dspark.workers.request import SamplingParams, Sequence

    drafter = RemoteDrafter([worker.address], RemoteDrafterConfig(kind="ngram"), block_len=3)
    seq = Sequence(request_id="verifier-1", prompt_ids=list(PROMPT), params=SamplingParams(), generator=None)
    try:
        seq.output_ids, seq.num_cached = [7], len(PROMPT)  # prefilled: prompt cached, anchor 7
        drafter.observe(seq, list(PROMPT), None)
        block = None
        deadline = time.monotonic() + WAIT_S
        while block is None and time.monotonic() < deadline:
            block = drafter.propose([seq], 3)[0]
            if block is None:
                drafter.wait_for_blocks(0.1)
        assert block is not None and block.token_ids == [5, 6, 7]
        mirror = worker.servicer.active["verifier-1"]
        assert mirror.prompt is None  # Open carried no prompt tokens
        assert mirror.seq.prompt_ids == PROMPT and mirror.seq.output_ids == [7]
    finally:
        drafter.release(seq.request_id)
        drafter.close()


# ---------------------------------------------------------------------------- ownership
def test_request_id_belongs_to_the_stream_that_opened_it(worker):
    a, b = worker.connect(), worker.connect()
    first_step(a, "r1")

    # Stream B tries every message on A's live request: each is refused, none changes it.
    b.open("r1", prompt=[9, 9, 9])
    assert "in use" in b.error("r1").message
    b.close_request("r1")
    assert "not open on this stream" in b.error("r1").message
    b.step("r1", 7, [7], anchor=5, context_len=len(PROMPT) + 1)
    err = b.error("r1")
    assert err.step_id == 7 and "not open on this stream" in err.message
    b.quiet()

    # A keeps drafting from where it was: the mirror saw none of B's messages.
    a.step("r1", 2, [7], anchor=5, context_len=len(PROMPT) + 1)
    assert list(a.block("r1", 2).draft_token_ids) == [6, 7, 5]
    a.quiet()

    # B's own requests work beside A's, and A's Close still ends A's request.
    first_step(b, "r2")
    a.close_request("r1")
    a.step("r1", 3, [5], anchor=6, context_len=len(PROMPT) + 2)
    assert "not open" in a.error("r1").message


@pytest.mark.parametrize("worker", [DraftWorkerConfig(idle_release_s=2.0)], indirect=True)
def test_a_stream_ending_releases_only_what_it_still_owns(worker):
    """A's idle request is released; B then opens the same id.  When A's stream ends, its
    clean-up must not take B's request with it."""
    a, b = worker.connect(), worker.connect()
    first_step(a, "r1")
    time.sleep(2.4)
    first_step(b, "r1")  # A's r1 went idle and was released: the id is free again
    a.end()
    time.sleep(0.3)  # the worker notices the stream ended and cleans up after it
    b.step("r1", 2, [7], anchor=5, context_len=len(PROMPT) + 1)
    assert list(b.block("r1", 2).draft_token_ids) == [6, 7, 5]


# ---------------------------------------------------------------------------- quotas
@pytest.mark.parametrize("worker", [DraftWorkerConfig(max_requests=4)], indirect=True)
def test_one_stream_cannot_take_every_slot(worker):
    assert DraftWorkerConfig(max_requests=4).stream_quota == 2  # default: half of the slots
    greedy, fair = worker.connect(), worker.connect()
    for i in range(4):
        greedy.open(f"g{i}")
    for i in (2, 3):
        err = greedy.error(f"g{i}")
        assert "max_requests_per_stream=2" in err.message, err.message
    greedy.quiet()
    # The admitted ones draft; the refused ones were never opened.
    greedy.step("g0", 1, PROMPT, anchor=7, context_len=len(PROMPT))
    assert list(greedy.block("g0", 1).draft_token_ids) == [5, 6, 7]
    greedy.step("g3", 1, PROMPT, anchor=7, context_len=len(PROMPT))
    assert "not open" in greedy.error("g3").message

    # Another stream still gets slots and drafts.
    first_step(fair, "f0")
    first_step(fair, "f1")
    # Every slot is now taken: a third stream is told so, by name.
    third = worker.connect()
    third.open("t0")
    assert "max_requests=4" in third.error("t0").message

    # Closing frees the slot for anyone.
    greedy.close_request("g1")
    greedy.step("g1", 1, PROMPT, anchor=7, context_len=len(PROMPT))
    assert "not open" in greedy.error("g1").message  # the Close was handled
    first_step(third, "t1")


@pytest.mark.parametrize("worker", [DraftWorkerConfig(max_requests=4, max_requests_per_stream=3, idle_release_s=2.0)],
                         indirect=True)
def test_idle_requests_give_their_slots_back(worker):
    idle, busy = worker.connect(), worker.connect()
    for i in range(3):
        idle.open(f"i{i}")
    wait_for(lambda: len(worker.servicer.active) == 3)  # Opens are not answered when they succeed
    first_step(busy, "b0")  # four of four slots taken
    busy.open("b1")
    assert "max_requests=4" in busy.error("b1").message

    time.sleep(2.4)  # the idle stream's requests pass the deadline; nothing else has to happen
    first_step(busy, "b2")
    # busy's own request went idle too and was released with them: its Step is refused.
    busy.step("b0", 2, [7], anchor=5, context_len=len(PROMPT) + 1)
    assert "not open" in busy.error("b0").message
    idle.step("i0", 1, PROMPT, anchor=7, context_len=len(PROMPT))
    assert "not open" in idle.error("i0").message
    assert set(worker.servicer.active) == {"b2"}


def test_quota_options_are_checked():
    with pytest.raises(ValueError, match="max_requests"):
        DraftWorkerConfig(max_requests=0)
    with pytest.raises(ValueError, match="idle_release_s"):
        DraftWorkerConfig(idle_release_s=0)
    assert DraftWorkerConfig(max_requests=1).stream_quota == 1
    assert DraftWorkerConfig(max_requests=8, max_requests_per_stream=20).stream_quota == 8


def test_cluster_config_passes_quotas_to_draft_workers():
    from dspark.cluster.config import ClusterConfig

    for bad in ({"draft_stream_quota": -1}, {"draft_idle_release_s": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ClusterConfig.from_args(bad)
    assert ClusterConfig(n_slots=16).draft_slots == 64


# ---------------------------------------------------------------------------- internal auth, bind address
def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _remote_block(address: str, token: str | None) -> list[int] | None:
    """Draft one block through the verifier's own client (RemoteDrafter), as a verifier does."""
    from dspark.workers.drafters.remote import RemoteDrafter, RemoteDrafterConfig
    from dspark.workers.request import SamplingParams, Sequence

    drafter = RemoteDrafter([address], RemoteDrafterConfig(kind="ngram", token=token), block_len=3)
    seq = Sequence(request_id="verifier-1", prompt_ids=list(PROMPT), params=SamplingParams(), generator=None)
    try:
        seq.output_ids, seq.num_cached = [7], len(PROMPT)  # prefilled: prompt cached, anchor 7
        drafter.observe(seq, list(PROMPT), None)
        deadline = time.monotonic() + WAIT_S
        block = None
        while block is None and time.monotonic() < deadline:
            block = drafter.propose([seq], 3)[0]
            if block is None:
                drafter.wait_for_blocks(0.1)
        return block.token_ids if block is not None and seq.draft_enabled else None
    finally:
        drafter.release(seq.request_id)
        drafter.close()


def test_cluster_draft_worker_is_authenticated_and_internal_by_default(monkeypatch, caplog):
    """`dspark serve --host 0.0.0.0` without DSPARK_INTERNAL_TOKEN: the draft worker the cluster
    configuration starts binds loopback (not 0.0.0.0), refuses a stream without the cluster's
    token, and serves the verifier's client, which has it.  The token is never logged."""
    from dspark.cluster.config import draft_worker_config
    from dspark.cluster.commands import serve, serve_config

    monkeypatch.delenv("DSPARK_INTERNAL_TOKEN", raising=False)
    params = serve.make_context("serve", ["--host", "0.0.0.0", "--draft", "ngram"]).params
    with caplog.at_level(logging.DEBUG):
        cfg = serve_config(**params).with_internal_token()  # what build_app does at start-up
        token = cfg.internal_secret()
        assert cfg.bind_host == "0.0.0.0" and token
        server = DraftWorkerServer(NgramDrafter, draft_worker_config(cfg)).start()
        try:
            assert server.address.startswith("127.0.0.1:")
            assert _connects("127.0.0.1", server.port)
            # 127.0.0.2 is loopback too: a socket bound to 0.0.0.0 would accept it.
            assert not _connects("127.0.0.2", server.port), "draft port bound beyond 127.0.0.1"

            probe = Stream(server.address)  # no token
            probe.open("p1")
            with pytest.raises(AssertionError, match="stream ended"):
                probe.recv()
            assert probe.status is not None and probe.status.code() == grpc.StatusCode.UNAUTHENTICATED
            probe.end()
            wrong = Stream(server.address, token="not-the-cluster-token")
            wrong.open("p2")
            with pytest.raises(AssertionError, match="stream ended"):
                wrong.recv()
            assert wrong.status.code() == grpc.StatusCode.UNAUTHENTICATED
            wrong.end()

            assert _remote_block(server.address, cfg.internal_secret()) == [5, 6, 7]
        finally:
            server.stop()
    assert token not in repr(cfg)
    assert not [r for r in caplog.records if token in r.getMessage()]


def test_internal_token_is_generated_once_per_cluster_unless_configured(monkeypatch):
    from dspark.cluster.config import ClusterConfig, draft_worker_config

    monkeypatch.delenv("DSPARK_INTERNAL_TOKEN", raising=False)
    a, b = ClusterConfig().with_internal_token(), ClusterConfig().with_internal_token()
    assert a.internal_secret() and b.internal_secret() and a.internal_secret() != b.internal_secret()
    assert a.with_internal_token() == a  # start-up keeps the cluster's token
    with pytest.raises(ValueError, match="DSPARK_INTERNAL_TOKEN"):
        draft_worker_config(ClusterConfig())  # a draft worker never opens its port without one
    monkeypatch.setenv("DSPARK_INTERNAL_TOKEN", "operator-token")
    configured = ClusterConfig().with_internal_token()
    assert configured.internal_token is None and configured.internal_secret() == "operator-token"
    assert draft_worker_config(configured).token == "operator-token"
    assert ClusterConfig(internal_host="10.0.0.5").internal_bind() == "10.0.0.5"
