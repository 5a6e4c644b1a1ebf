"""The verifier worker: an engine driven by its own thread, served to asyncio callers.

The engine step is CPU/GPU bound and synchronous; it runs on a dedicated thread so the event
loop that talks to clients, routers and drafters never blocks.  Requests join and leave at every
step (continuous batching): ``generate`` validates the request at once (so bad input fails
before anything is queued), hands it to the engine thread, and yields its outputs as they come.
A caller that goes away (client disconnect) aborts its request, freeing its cache slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator

from dspark.workers.engine import Engine
from dspark.workers.request import RequestOutput, SamplingParams, SpecMetrics
from dspark.workers.scheduling import Demand

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while serving a request (the request is aborted, others go on)."""


class VerifierWorker:
    """Serves an ``Engine`` to asyncio callers; the engine steps on a thread of its own.

    ``generate`` (an async stream of ``RequestOutput``) and ``abort`` may be called from any event
    loop: they queue commands that the engine thread applies between steps, and outputs go back
    to each caller's loop.  ``demand`` gives the load figures the cluster reports (``Demand``),
    ``finished_requests`` and ``engine.num_steps`` count, ``alive`` tells whether the engine
    thread runs, ``close`` stops it (after draining, when asked).
    """

    def __init__(self, engine: Engine, name: str = "verifier") -> None:
        self.engine = engine
        self.name = name
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._finished = 0
        self._ema_tokens = 0.0
        self._ema_latency = 0.0
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._thread.start()

    # -- caller side (any thread / event loop) ----------------------------------------------
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (of all its ``params.n`` sequences, each output tagged with its
        ``index``) until every sequence has finished; raises ValueError at once for invalid requests."""
        if self._stop.is_set():
            raise EngineError(f"{self.name} is shut down")
        self.engine.validate(prompt_ids, params)
        rid = request_id or f"{self.name}-{next(self._ids)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", rid, list(prompt_ids), params))
        self._wake.set()
        done = False
        unfinished = params.n
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    unfinished -= 1
                    if unfinished == 0:
                        done = True
                        return
        finally:
            self._streams.pop(rid, None)
            if not done:  # consumer left early (disconnect, cancellation): free the slot
                self._commands.put(("abort", rid, None, None))
                self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None, None))
        self._wake.set()

    def demand(self) -> Demand:
        """This worker's load now (unstamped: the writer sets ``timestamp``)."""
        m: SpecMetrics = self.engine.metrics
        return Demand(
            active_requests=self.engine.num_active,
            queued_requests=len(self.engine.waiting) + self._commands.qsize(),
            tokens_per_step=self._ema_tokens,
            step_latency_s=self._ema_latency,
            mean_acceptance_length=m.mean_acceptance_length,
        )

    @property
    def finished_requests(self) -> int:
        """Requests whose final output the engine produced since start (a health figure)."""
        return self._finished

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def alive(self) -> bool:
        """The engine thread is running (a health check reads this)."""
        return self._thread.is_alive()

    def close(self, drain_s: float = 0.0) -> None:
        """Stop the engine thread; with ``drain_s`` > 0, let running requests finish first."""
        deadline = time.monotonic() + drain_s
        while drain_s > 0 and self._streams and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        for rid in list(self._streams):
            self._deliver(rid, EngineError(f"{self.name} shut down"))

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            self._apply_commands()
            if not eng.has_work:
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                outputs = eng.step()
            except Exception as exc:  # never leave a client hanging: fail what was running
                log.exception("%s: engine step failed", self.name)
                for seq in list(eng.running) + list(eng.waiting):
                    eng.abort(seq.group_id, "error")
                    self._deliver(seq.group_id, EngineError(f"engine failure: {exc}"))
                continue
            if eng.last_step_tokens:
                a = 0.2
                self._ema_tokens = (1 - a) * self._ema_tokens + a * eng.last_step_tokens
                self._ema_latency = (1 - a) * self._ema_latency + a * eng.last_step_seconds
            for out in outputs:
                if out.finished and out.index == 0:
                    self._finished += 1
                self._deliver(out.request_id, out)

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, rid, prompt, params = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if rid not in self._streams:
                    continue  # the caller already left
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                except Exception as exc:
                    self._deliver(rid, exc if isinstance(exc, ValueError) else EngineError(str(exc)))
            elif kind == "abort":
                self.engine.abort(rid, "abort")

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            self._streams.pop(rid, None)
