"""Verifier-side drafter that drafts on remote draft workers over gRPC streams.

Implements the engine's drafter protocol without ever blocking the engine on one worker:

* ``observe`` (after each verification) queues the request's newly cached tokens, their target
  features and the new anchor as a ``Step``, and ``flush_steps`` (once the engine has observed
  the whole step) sends each worker its Steps in one message, which it drafts as one batch; the
  blocks come back asynchronously.  When the
  engine's next step will not speculate (``seq.wants_block`` is False) it keeps them instead, so
  plain steps cost the draft worker nothing;
* ``propose`` hands back the blocks that have arrived and ``None`` ("not ready, sit this step
  out") for those still in flight, so the verifier batches whoever is ready; a request whose
  tokens were kept gets its ``Step`` sent now (and sits this step out);
* a request whose worker died, answered with an error or timed out continues with plain decoding
  (``seq.draft_enabled = False``): output is unchanged, only speed is lost.

One bidirectional stream per (verifier, worker) pair carries all of that pair's requests.
Requests go to the live worker with the fewest open requests.

A verifier that holds few requests drafts them itself.  At one request the verifier and its
worker take turns: the next block needs this step's tokens, so the verifier waits for the whole
round trip (the features' transfer and intake, the drafting, two hops; measured 10 ms a step
through the local cluster) where drafting in process costs the drafting alone.  With a ``local``
drafter (the same kind, built beside the target), a request that arrives while fewer than
``local_below`` requests are being drafted for (here or on workers; requests with speculation
off are not counted) is drafted in process for its whole life; the others go to the workers,
whose drafting overlaps the verification of the rest of the batch.  Each request has one drafter
from its first token to its release, so no drafter state crosses over.  If the local drafter
raises, its requests continue with plain decoding, like those of a failed worker.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import torch

from dspark.proto.dspark.v1 import draft_pb2, draft_pb2_grpc
from dspark.proto.tensors import tensor_to_proto
from dspark.workers.draft_codec import block_from_proto
from dspark.workers.drafters.base import DraftBlock, Drafter
from dspark.workers.request import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteDrafterConfig:
    """How the verifier talks to draft workers."""

    kind: str = "dspark"  # drafter the workers run
    feature_layers: tuple[int, ...] = ()  # target layers whose features the drafter needs
    proposal_top_k: int = 8  # sparse proposal width
    block_timeout_s: float = 10.0  # a block later than this: the request falls back to plain decoding
    token: str | None = None  # internal auth token (metadata authorization: Bearer ...)
    tls_ca_file: str | None = None  # PEM CA bundle: connect with TLS, trusting these roots
    tls_server_name: str | None = None  # name to verify in the worker's certificate (default: its host)
    feature_dtype: torch.dtype = torch.bfloat16  # features travel in this dtype
    max_message_bytes: int = 128 * 2**20
    steps_batch_bytes: int = 64 * 2**20  # a Steps message is split before it passes this (see _Link.flush)


class _Link:
    """One bidirectional stream to one draft worker."""

    def __init__(self, address: str, cfg: RemoteDrafterConfig, on_response, on_broken) -> None:
        self.address = address
        self.alive = True
        self.requests: set[str] = set()
        self._out: queue.Queue = queue.Queue()
        self._steps: list[draft_pb2.Step] = []  # queued by queue_step, sent together by flush
        self._batch_bytes = min(cfg.steps_batch_bytes, cfg.max_message_bytes // 2)
        opts = [("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_receive_message_length", cfg.max_message_bytes)]
        if cfg.tls_ca_file:
            with open(cfg.tls_ca_file, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            if cfg.tls_server_name:  # workers register IP addresses; certificates carry names
                opts.append(("grpc.ssl_target_name_override", cfg.tls_server_name))
            self._channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(address, options=opts)
        stub = draft_pb2_grpc.DraftServiceStub(self._channel)
        md = (("authorization", f"Bearer {cfg.token}"),) if cfg.token else None
        self._call = stub.Draft(iter(self._out.get, None), metadata=md)
        self._on_response, self._on_broken = on_response, on_broken
        self._reader = threading.Thread(target=self._read, name=f"draft-link-{address}", daemon=True)
        self._reader.start()

    def send(self, msg: draft_pb2.DraftRequest) -> None:
        if self.alive:
            self._out.put(msg)

    def queue_step(self, step: draft_pb2.Step) -> None:
        self._steps.append(step)

    def unqueue(self, request_id: str) -> None:
        """Drop a queued Step of a request that ends before it is sent."""
        self._steps = [st for st in self._steps if st.request_id != request_id]

    def flush(self) -> None:
        """Send the queued Steps: one Steps message for several, so the worker drafts them in
        one batch, split where a message would pass ``steps_batch_bytes`` (at most half the gRPC
        limit: a step of many long prompts' features would pass it; each Step alone stays within
        it, as before)."""
        steps, self._steps = self._steps, []
        group: list[draft_pb2.Step] = []
        size = 0
        for st in steps:
            n = st.ByteSize()
            if group and size + n > self._batch_bytes:
                self._send_steps(group)
                group, size = [], 0
            group.append(st)
            size += n
        self._send_steps(group)

    def _send_steps(self, steps: list[draft_pb2.Step]) -> None:
        if len(steps) == 1:
            self.send(draft_pb2.DraftRequest(step=steps[0]))
        elif steps:
            self.send(draft_pb2.DraftRequest(steps=draft_pb2.Steps(steps=steps)))

    def _read(self) -> None:
        try:
            for resp in self._call:
                self._on_response(self, resp)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.warning("draft worker %s stream broke: %s", self.address, exc.code())
        except Exception:
            log.exception("draft worker %s stream failed", self.address)
        finally:
            self.alive = False
            self._on_broken(self)

    def close(self) -> None:
        self.alive = False
        self._out.put(None)
        self._call.cancel()
        self._channel.close()


@dataclass
class _Req:
    link: _Link
    opened: bool = False
    step_id: int = 0
    awaiting: int = 0  # step id whose block we wait for (0: none)
    sent_at: float = 0.0
    block: DraftBlock | None = None
    pending_tokens: list[int] = field(default_factory=list)
    pending_feats: list[torch.Tensor] = field(default_factory=list)
    num_verified: int | None = None  # of the last verified step, sent with the next Step
    failed: bool = False


class RemoteDrafter:
    """An ``AsyncDrafter`` over the draft workers' streams (see the module docstring).

    Its owner closes it (``close``): the links are threads and channels the engine knows nothing of.
    """

    name = "remote"

    def __init__(self, addresses: Callable[[], list[str]] | list[str], cfg: RemoteDrafterConfig, block_len: int,
                 local: Drafter | None = None, local_below: int = 1) -> None:
        self.cfg = cfg
        self.name = f"remote-{cfg.kind}"
        self.feature_layers = tuple(cfg.feature_layers)
        self.block_len = block_len
        if local is not None and tuple(local.feature_layers) != self.feature_layers:
            raise ValueError(f"the local drafter reads layers {tuple(local.feature_layers)}, the workers' "
                             f"{self.feature_layers}: one step's features must serve both")
        self.local = local if local_below > 0 else None
        self.local_below = local_below
        self._local: set[str] = set()  # requests drafted in this process (see the module docstring)
        self.requests_drafted = {"local": 0, "remote": 0}  # since start, by where they were drafted
        self._addresses = addresses if callable(addresses) else (lambda a=list(addresses): a)
        self._links: dict[str, _Link] = {}
        self._reqs: dict[str, _Req] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._ids = itertools.count(1)

    # -- links ------------------------------------------------------------------------------
    def _pick_link(self) -> _Link | None:
        for addr in self._addresses():
            link = self._links.get(addr)
            if link is None or not link.alive:
                try:
                    self._links[addr] = _Link(addr, self.cfg, self._on_response, self._on_broken)
                except Exception:
                    log.warning("cannot reach draft worker %s", addr)
        live = [link for link in self._links.values() if link.alive]
        return min(live, key=lambda link: len(link.requests)) if live else None

    def _on_response(self, link: _Link, resp: draft_pb2.DraftResponse) -> None:
        kind = resp.WhichOneof("kind")
        msg = getattr(resp, kind)
        with self._arrived:
            r = self._reqs.get(msg.request_id)
            if r is None or r.link is not link:
                return
            if kind == "error":
                log.warning("draft worker %s: request %s: %s", link.address, msg.request_id, msg.message)
                r.failed = True
            elif msg.step_id == r.awaiting:
                try:
                    r.block = block_from_proto(msg)
                except ValueError:
                    r.failed = True
                r.awaiting = 0
            self._arrived.notify_all()

    def _on_broken(self, link: _Link) -> None:
        with self._arrived:
            for rid in list(link.requests):
                r = self._reqs.get(rid)
                if r is not None:
                    r.failed = True
            self._arrived.notify_all()

    # -- drafter protocol ---------------------------------------------------------------------
    def observe(
        self, seq: Sequence, token_ids: list[int], features: torch.Tensor | None, num_verified: int | None = None
    ) -> None:
        rid = seq.request_id
        if self._drafts_locally(rid):
            try:
                self.local.observe(seq, token_ids, features, num_verified)
            except Exception:
                self._local_failed([seq])
            return
        with self._lock:
            r = self._reqs.get(rid)
            if r is None:
                link = self._pick_link()
                if link is None:
                    seq.draft_enabled = False
                    return
                r = self._reqs[rid] = _Req(link=link)
                link.requests.add(rid)
                self.requests_drafted["remote"] += 1
            if r.failed:
                return
            if token_ids:
                # The request moved on: a block drafted (or still in flight) for its old context
                # would be served at its next speculative step and verified at the wrong position.
                # That is a block a plain step left unused: the gate chose plain decoding after
                # the step it was asked for (it came late, and its request sat that step out).
                r.block, r.awaiting = None, 0
            r.pending_tokens.extend(token_ids)
            if features is not None:
                # A copy (``to`` returns the view itself when device and dtype match): pending
                # features wait for the next speculative step, and a view would keep the whole
                # step's features alive through a stretch of plain steps.
                r.pending_feats.append(features.to("cpu", self.cfg.feature_dtype, copy=True))
            if num_verified is not None:
                r.num_verified = num_verified
            if seq.output_ids and seq.wants_block:  # else: still prefilling, or a plain step comes next
                self._send_step(r, seq, seq.draft_len or self.block_len)

    def _send_step(self, r: _Req, seq: Sequence, block_len: int) -> None:
        """Queue what ``r`` holds (tokens, features, the anchor) and a request for a block of
        ``block_len`` drafts (lock held); the Open goes out at once, ahead of it."""
        rid = seq.request_id
        if not r.opened:
            opts = draft_pb2.DrafterOptions(kind=self.cfg.kind, block_len=self.block_len,
                                            temperature=seq.params.temperature,
                                            proposal_top_k=self.cfg.proposal_top_k)
            if seq.seed is not None:
                opts.seed = seq.seed
            if seq.params.grammar is not None:  # the worker drafts only what the grammar allows
                opts.grammar_kind, opts.grammar_source = seq.params.grammar.kind, seq.params.grammar.source
            r.link.send(draft_pb2.DraftRequest(open=draft_pb2.Open(
                request_id=rid, prompt_len=len(seq.prompt_ids), options=opts)))
            r.opened = True
        r.step_id = next(self._ids)
        step = draft_pb2.Step(request_id=rid, step_id=r.step_id, new_token_ids=r.pending_tokens,
                              context_len=seq.num_cached, anchor_token_id=seq.last_token,
                              block_len=min(block_len, self.block_len))
        if r.num_verified is not None:
            step.num_verified = r.num_verified
        if r.pending_feats:
            step.features.CopyFrom(tensor_to_proto(torch.cat(r.pending_feats)))
        r.pending_tokens, r.pending_feats, r.num_verified = [], [], None
        r.awaiting, r.sent_at, r.block = r.step_id, time.monotonic(), None
        r.link.queue_step(step)  # sent with the step's others by flush_steps (or at the next propose)

    def _drafts_locally(self, rid: str) -> bool:
        """Whether this request is drafted in process; decided at its first ``observe``."""
        if self.local is None:
            return False
        with self._lock:
            if rid not in self._local and rid not in self._reqs and len(self._reqs) + len(self._local) < self.local_below:
                self._local.add(rid)
                self.requests_drafted["local"] += 1
            return rid in self._local

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock | None]:
        here = [s for s in seqs if s.request_id in self._local]
        if not here:
            return self._propose_remote(seqs, block_len)
        try:
            blocks = self.local.propose(here, block_len)
        except Exception:
            self._local_failed(here)
            blocks = [DraftBlock.empty() for _ in here]
        local = dict(zip((s.request_id for s in here), blocks))
        away = [s for s in seqs if s.request_id not in local]
        remote = dict(zip((s.request_id for s in away), self._propose_remote(away, block_len) if away else []))
        return [local[s.request_id] if s.request_id in local else remote[s.request_id] for s in seqs]

    def _local_failed(self, seqs: list[Sequence]) -> None:
        """The local drafter raised for these requests: they continue with plain decoding, as a
        request whose worker failed does; the other requests are not touched."""
        log.exception("drafting in process failed for %s; plain decoding for them from now on",
                      ", ".join(s.request_id for s in seqs))
        for seq in seqs:
            seq.draft_enabled = False
            self._release_local(seq.request_id)

    def _release_local(self, request_id: str) -> None:
        self._local.discard(request_id)
        try:
            self.local.release(request_id)
        except Exception:
            log.exception("releasing request %s in the local drafter failed", request_id)

    def _propose_remote(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock | None]:
        out: list[DraftBlock | None] = []
        now = time.monotonic()
        with self._lock:
            for seq in seqs:
                r = self._reqs.get(seq.request_id)
                if r is not None and not r.failed and r.awaiting and now - r.sent_at > self.cfg.block_timeout_s:
                    log.warning("request %s: no block within %.1fs", seq.request_id, self.cfg.block_timeout_s)
                    r.failed = True
                if r is None or r.failed or not r.link.alive:
                    seq.draft_enabled = False  # plain decoding from now on
                    out.append(DraftBlock.empty())
                elif r.block is not None:
                    blk, r.block = r.block, None
                    out.append(blk.prefix(block_len))
                else:
                    if not r.awaiting and r.pending_tokens:  # kept during plain steps: draft now
                        self._send_step(r, seq, block_len)
                    out.append(None)
            self._flush()
        return out

    def flush_steps(self) -> None:
        """The engine's step has been observed for every request: send the Steps it queued, one
        message per worker.  Sent one by one, they reached the worker apart and it drafted the
        first alone, then the rest (through the cluster at four requests the step waited for the
        two batches in turn)."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        for link in self._links.values():
            link.flush()

    def wait_for_blocks(self, timeout: float) -> None:
        with self._arrived:
            self._arrived.wait(timeout)

    def release(self, request_id: str) -> None:
        if request_id in self._local:
            self._release_local(request_id)
            return
        with self._lock:
            r = self._reqs.pop(request_id, None)
            if r is None:
                return
            r.link.requests.discard(request_id)
            r.link.unqueue(request_id)
            if r.opened and r.link.alive:
                r.link.send(draft_pb2.DraftRequest(close=draft_pb2.Close(
                    request_id=request_id, reason=draft_pb2.CLOSE_REASON_FINISHED)))

    def close(self) -> None:
        close_local = getattr(self.local, "close", None)
        if close_local is not None:
            close_local()
        with self._lock:
            for link in self._links.values():
                link.close()
            self._links.clear()
