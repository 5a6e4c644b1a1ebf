"""Draft worker: a gRPC DraftService hosting a local drafter for many requests.

One bidirectional stream per verifier; many requests multiplexed on it by id:

  verifier -> worker   Open(request, prompt length, options) | Step(new cached tokens + their target
                       features, anchor, block length) | Steps(the Steps of one verifier step) |
                       Close(request)
  worker -> verifier   DraftBlock(tokens, sparse proposal q, confidences) | DraftError

The worker mirrors each request's accepted tokens in a small ``Sequence`` so the very same
drafter classes serve in-process and remote drafting.  Steps that arrive together, and those of
one Steps message, are drafted together (one batched ``propose``), on one executor thread:
drafters are not thread-safe and the event loop must stay free to read the streams.  When a
stream breaks, every request it carried is released; nothing outlives its verifier.

A request id belongs to the stream that opened it: Open, Step or Close for it from any other
stream is answered with a DraftError and changes nothing.  Admission is bounded per stream
(``max_requests_per_stream``) and per worker (``max_requests``, the drafter's cache slots), so
one stream cannot take every slot; requests idle past ``idle_release_s`` give theirs back.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import grpc
import torch

from dspark.proto.dspark.v1 import draft_pb2, draft_pb2_grpc
from dspark.proto.tensors import tensor_from_proto
from dspark.workers.draft_codec import block_to_proto
from dspark.workers.drafters.base import DraftBlock, Drafter
from dspark.workers.request import SamplingParams, Sequence

if TYPE_CHECKING:
    from dspark.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_FEATURE_BYTES = 64 * 2**20  # one Step's features; larger messages are refused
IDLE_S = 5.0  # a request with no Step for this long is not in flight (graceful drain)
STALE_S = 60.0  # default idle_release_s: after this long without a Step its state is dropped


@dataclass(frozen=True)
class DraftWorkerConfig:
    """How a draft worker serves."""

    host: str = "127.0.0.1"  # bind address: the cluster's internal_host (pod IP on real clusters), never the public one
    port: int = 0  # 0: pick a free port
    token: str | None = None  # shared secret verifiers must present (metadata authorization)
    max_message_bytes: int = 128 * 2**20  # gRPC receive limit
    tls_cert_file: str | None = None  # PEM certificate chain: serve TLS instead of plaintext
    tls_key_file: str | None = None  # PEM private key of that certificate
    max_requests: int = 128  # requests open at once over all streams (the drafter's cache slots)
    max_requests_per_stream: int = 0  # open requests one stream may hold (0: half of max_requests, >= 1)
    idle_release_s: float = STALE_S  # a request with no Open or Step for this long is released

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_requests_per_stream < 0 or self.idle_release_s <= 0:
            raise ValueError("max_requests >= 1, max_requests_per_stream >= 0 and idle_release_s > 0 are required")

    @property
    def stream_quota(self) -> int:
        """Open requests one stream may hold: the configured cap, or half of the slots."""
        quota = self.max_requests_per_stream or self.max_requests // 2
        return max(1, min(quota, self.max_requests))

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the certificate and key files (None: plaintext)."""
        if not self.tls_cert_file and not self.tls_key_file:
            return None
        if not (self.tls_cert_file and self.tls_key_file):
            raise ValueError("TLS needs both a certificate file and a key file")
        with open(self.tls_key_file, "rb") as f:
            key = f.read()
        with open(self.tls_cert_file, "rb") as f:
            chain = f.read()
        return grpc.ssl_server_credentials([(key, chain)])


class _Remote:
    """Worker-side mirror of one request, owned by the stream that opened it."""

    def __init__(self, request_id: str, prompt_len: int, params: SamplingParams, owner: set[str],
                 prompt: list[int] | None = None, grammar=None) -> None:
        self.seq = Sequence(request_id=request_id, prompt_ids=[], params=params, generator=torch.Generator(),
                            grammar=grammar)  # its GrammarMatcher: fed the request's output as Steps carry it
        self.prompt_len = prompt_len
        self.prompt = prompt  # from an older verifier's Open, checked against the first Step
        self.owner = owner  # the opening stream's set of request ids (compared by identity)
        self.cached: list[int] = []  # tokens in the verifier's target cache, in order
        self.last_seen = time.monotonic()  # the last Open or Step for it

    def apply(self, new_tokens: list[int], anchor: int) -> None:
        """Mirror a Step: the prompt is the first ``prompt_len`` tokens the Steps carried."""
        full = self.cached + list(new_tokens) + [anchor]  # the anchor may be the prompt's last token
        if len(full) < self.prompt_len:
            raise ValueError(f"the first Step carries {len(new_tokens)} tokens; the prompt has {self.prompt_len}")
        if not self.seq.prompt_ids:
            if self.prompt is not None and full[: self.prompt_len] != self.prompt:
                raise ValueError("step tokens do not continue the prompt")
            self.seq.prompt_ids = full[: self.prompt_len]
        self.cached.extend(new_tokens)
        done = len(self.seq.output_ids)
        self.seq.output_ids = full[self.prompt_len:]
        m = self.seq.grammar
        if m is not None:  # the output only grows: feed the grammar what is new
            for t in self.seq.output_ids[done:]:
                if not m.done and not m.accept(t):  # out of step with the verifier: draft freely from here
                    self.seq.grammar = None
                    break
        self.seq.num_cached = len(self.cached)


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, drafter: Drafter, cfg: DraftWorkerConfig = DraftWorkerConfig(),
                 tokenizer: Tokenizer | None = None) -> None:
        self.drafter = drafter
        self.cfg = cfg
        self.tokenizer = tokenizer  # for requests with a grammar; None: they are drafted freely
        self._grammars = None  # GrammarCompiler, made on the first request with a grammar
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")
        self.active: dict[str, _Remote] = {}  # all streams' requests (ids are globally unique)
        self.blocks_served = 0  # blocks sent back (tests check that plain steps get none)
        self.step_messages = 0  # messages that carried Steps (a Steps message counts once)
        self._next_reap = 0.0  # monotonic time of the next stale-request scan

    # -- auth -------------------------------------------------------------------------------
    def _authorized(self, context) -> bool:
        if not self.cfg.token:
            return True
        md = dict(context.invocation_metadata() or ())
        got = md.get("authorization")
        if not isinstance(got, str):
            return False
        # Constant time, on bytes (non-ASCII input must not raise).
        return hmac.compare_digest(got.encode("utf-8", "surrogateescape"), f"Bearer {self.cfg.token}".encode())

    # -- the stream ---------------------------------------------------------------------------
    async def Draft(self, request_iterator, context):
        if not self._authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")
        mine: set[str] = set()
        inbox: asyncio.Queue = asyncio.Queue()
        outbox: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    await inbox.put(msg)
            finally:
                await inbox.put(None)

        reader = asyncio.create_task(read())
        worker = asyncio.create_task(self._work(inbox, outbox, mine, loop))
        try:
            while True:
                item = await outbox.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            worker.cancel()
            # The stream is gone: release everything it carried.  ``mine`` is read on the drafter
            # thread, after any batch still running there (a cancelled _work does not stop it).
            await loop.run_in_executor(self.pool, self._release_all, mine)

    async def _work(self, inbox: asyncio.Queue, outbox: asyncio.Queue, mine: set[str], loop) -> None:
        try:
            while True:
                msg = await inbox.get()
                batch = [msg]
                while not inbox.empty():  # everything that arrived together drafts together
                    batch.append(inbox.get_nowait())
                done = any(m is None for m in batch)
                batch = [m for m in batch if m is not None]
                if batch:
                    replies = await loop.run_in_executor(self.pool, self._handle, batch, mine)
                    for r in replies:
                        await outbox.put(r)
                if done:
                    return
        finally:
            await outbox.put(None)

    # -- drafter thread -----------------------------------------------------------------------
    def busy(self, idle_s: float = IDLE_S) -> int:
        """Requests that had an Open or Step within ``idle_s``: those a shutdown waits for.  A
        request whose verifier went quiet (it finished without a Close reaching us, or is stuck)
        does not hold a drain up."""
        now = time.monotonic()
        return sum(1 for r in list(self.active.values()) if now - r.last_seen < idle_s)

    def _reap(self, force: bool = False) -> None:
        """Drop requests with no Open or Step for ``idle_release_s``: a lost Close or an idle
        stream must not hold state or slots.  Scans at most once per ``idle_release_s / 10``, so
        the drafting path does not pay for it; an Open that would exceed a quota forces a scan."""
        now = time.monotonic()
        if now < self._next_reap and not force:
            return
        idle = self.cfg.idle_release_s
        self._next_reap = now + idle / 10
        stale = [r for r in list(self.active.values()) if now - r.last_seen > idle]
        if stale:
            log.warning("released %d requests with no step for %gs: %s", len(stale), idle,
                        sorted(r.seq.request_id for r in stale)[:8])
            for r in stale:
                self._release(r.seq.request_id, r.owner)

    def _handle(self, batch: list, mine: set[str]) -> list:
        self._reap()
        replies = []
        steps: list[tuple[_Remote, int, int]] = []  # (request, step id, block length)
        self.step_messages += sum(m.WhichOneof("kind") in ("step", "steps") for m in batch)
        for kind, m in _items(batch):
            try:
                if kind == "open":
                    self._open(m, mine)
                elif kind == "close":
                    self._close(m.request_id, mine)
                elif kind == "step":
                    st = m
                    r = self._owned(st.request_id, mine)
                    feats = tensor_from_proto(st.features, ndim=2, max_bytes=MAX_FEATURE_BYTES) if st.features.data else None
                    new = list(st.new_token_ids)
                    if feats is not None and feats.shape[0] != len(new):
                        raise ValueError("features rows do not match new tokens")
                    r.last_seen = time.monotonic()
                    r.apply(new, st.anchor_token_id)
                    if st.context_len and st.context_len != len(r.cached):
                        raise ValueError(f"context length {st.context_len} != mirrored {len(r.cached)}")
                    self.drafter.observe(r.seq, new, feats, st.num_verified if st.HasField("num_verified") else None)
                    steps.append((r, st.step_id, st.block_len))
            except Exception as exc:  # a bad message fails its request, never the stream
                rid = getattr(m, "request_id", "")
                step_id = m.step_id if kind == "step" else 0
                replies.append(draft_pb2.DraftResponse(error=draft_pb2.DraftError(request_id=rid, step_id=step_id, message=str(exc))))
                if rid:
                    self._release(rid, mine)  # only if this stream owns it
        by_len: dict[int, list[tuple[_Remote, int]]] = {}
        for r, step_id, blen in steps:
            if self.active.get(r.seq.request_id) is r:  # not closed by a later message of the batch
                by_len.setdefault(blen, []).append((r, step_id))
        for blen, group in by_len.items():
            t0 = time.perf_counter()
            try:
                blocks = self.drafter.propose([r.seq for r, _ in group], blen)
            except Exception as exc:
                log.exception("drafting failed")
                for r, step_id in group:
                    replies.append(draft_pb2.DraftResponse(error=draft_pb2.DraftError(
                        request_id=r.seq.request_id, step_id=step_id, message=f"drafting failed: {exc}")))
                continue
            us = int(1e6 * (time.perf_counter() - t0) / max(1, len(group)))
            for (r, step_id), blk in zip(group, blocks):
                replies.append(draft_pb2.DraftResponse(block=block_to_proto(r.seq.request_id, step_id, blk, us)))
                self.blocks_served += 1
        return replies

    def _owned(self, rid: str, mine: set[str]) -> _Remote:
        """The request ``rid`` if this stream opened it; another stream's id is as unknown."""
        r = self.active.get(rid)
        if r is None or r.owner is not mine:
            raise LookupError(f"request {rid!r} is not open on this stream")
        return r

    def _open(self, o, mine: set[str]) -> None:
        rid = o.request_id
        if not rid:
            raise ValueError("Open needs a request_id")
        r = self.active.get(rid)
        if r is not None:
            if r.owner is not mine:  # another stream's request: refuse, and leave it alone
                raise ValueError(f"request id {rid!r} is in use")
            raise ValueError(f"request {rid!r} is already open")
        quota, slots = self.cfg.stream_quota, self.cfg.max_requests
        if len(mine) >= quota or len(self.active) >= slots:
            self._reap(force=True)  # idle requests give their slots back first
        if len(mine) >= quota:
            raise ValueError(f"stream quota exceeded: {len(mine)} requests open on this stream "
                             f"(max_requests_per_stream={quota})")
        if len(self.active) >= slots:
            raise ValueError(f"draft worker full: {len(self.active)} requests open (max_requests={slots})")
        opts = o.options
        params = SamplingParams(
            max_tokens=2**31 - 1,  # the verifier enforces limits; the drafter just drafts
            temperature=float(opts.temperature),
            seed=int(opts.seed) if opts.HasField("seed") else None,
        )
        legacy = list(o.prompt_token_ids) or None
        prompt_len = o.prompt_len or len(legacy or ())
        if prompt_len < 1:
            raise ValueError("Open needs prompt_len >= 1")
        if legacy is not None and len(legacy) != prompt_len:
            raise ValueError(f"Open: prompt_len {o.prompt_len} != {len(legacy)} prompt_token_ids")
        self.active[rid] = _Remote(rid, prompt_len, params, owner=mine, prompt=legacy,
                                   grammar=self._matcher(opts.grammar_kind, opts.grammar_source))
        mine.add(rid)

    def _matcher(self, kind: str, source: str):
        """A grammar state for a request's drafts, or None (no grammar, no tokenizer, or one this
        worker cannot compile: its drafts are then free and the verifier rejects what it forbids)."""
        if not kind or self.tokenizer is None:
            return None
        from dspark.workers.grammar import GrammarCompiler, GrammarSpec

        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.tokenizer.vocab_size, self.tokenizer.stop_token_ids)
        try:
            return self._grammars.matcher(GrammarSpec(kind, source))
        except ValueError as exc:
            log.warning("drafting without the request's grammar: %s", exc)
            return None

    def _close(self, rid: str, mine: set[str]) -> None:
        """Close from the owning stream; an id already gone is a no-op (Close is idempotent)."""
        if rid in self.active:
            self._owned(rid, mine)
            self._release(rid, mine)

    def _release(self, rid: str, owner: set[str]) -> None:
        """Forget ``rid`` and free its drafter state, if ``owner`` is the stream that opened it."""
        r = self.active.get(rid)
        if r is not None and r.owner is owner:
            del self.active[rid]
            self.drafter.release(rid)
        owner.discard(rid)

    def _release_all(self, mine: set[str]) -> None:
        """The stream that opened ``mine`` is gone: release every request it still holds."""
        for rid in list(mine):
            self._release(rid, mine)


def _items(batch: list[draft_pb2.DraftRequest]):
    """(kind, message) of each Open, Step and Close in ``batch``, in order; a Steps message gives
    each of its Steps (an empty DraftRequest gives (None, None))."""
    for msg in batch:
        kind = msg.WhichOneof("kind")
        if kind == "steps":
            yield from (("step", st) for st in msg.steps.steps)
        else:
            yield kind, getattr(msg, kind) if kind else None


class DraftWorkerServer:
    """A grpc.aio DraftService (+ health, reflection) on its own thread and event loop."""

    def __init__(self, drafter_factory: Callable[[], Drafter], cfg: DraftWorkerConfig = DraftWorkerConfig(),
                 tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg
        self._factory = drafter_factory
        self._tokenizer = tokenizer  # lets drafters follow requests' grammars (structured outputs)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0
        self.servicer: DraftServicer | None = None
        self._server = None
        self._thread = threading.Thread(target=self._main, name="draft-worker", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def start(self, timeout: float = 300.0) -> "DraftWorkerServer":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("draft worker did not start")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        from dspark.proto.health import DRAFT_SERVICE, add_health_and_reflection

        drafter = self._factory()
        self.servicer = DraftServicer(drafter, self.cfg, self._tokenizer)
        opts = [
            ("grpc.max_receive_message_length", self.cfg.max_message_bytes),
            ("grpc.max_send_message_length", self.cfg.max_message_bytes),
        ]
        self._server = grpc.aio.server(options=opts)
        draft_pb2_grpc.add_DraftServiceServicer_to_server(self.servicer, self._server)
        await add_health_and_reflection(self._server, [DRAFT_SERVICE])
        address = f"{self.cfg.host}:{self.cfg.port}"
        creds = self.cfg.server_credentials()
        if creds is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, creds)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        await self._server.start()

    def stop(self, grace: float = 1.0) -> None:
        if self._server is None or not self._loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
        try:
            fut.result(timeout=grace + 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
