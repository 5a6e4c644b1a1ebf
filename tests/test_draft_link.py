"""The verifier <-> draft worker link under hostile or careless peers, over real gRPC on loopback:
stream ownership of request ids.

Every test starts its own DraftWorkerServer (ngram drafter: no model to load) on 127.0.0.1 and
talks to it with raw Draft streams, as a second verifier or a probe would.
"""

from __future__ import annotations

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

    def open(self, rid: str, prompt: list[int] = PROMPT) -> None:
        self._out.put(draft_pb2.DraftRequest(open=draft_pb2.Open(
            request_id=rid, prompt_token_ids=prompt, options=draft_pb2.DrafterOptions(kind="ngram", block_len=3))))

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
