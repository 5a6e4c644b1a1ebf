"""Prometheus metrics of a Router replica, served at ``GET /metrics``.

Names follow vLLM's (``vllm:spec_decode_num_drafts`` ...) under a ``dspark:`` prefix, so
dashboards written for vLLM's speculative-decoding panels work after a prefix swap:

====================================================  ========  ===============================
name                                                  type      meaning
====================================================  ========  ===============================
dspark:spec_decode_num_drafts                         counter   verification rounds with >= 1 draft
dspark:spec_decode_num_draft_tokens                   counter   draft tokens verified
dspark:spec_decode_num_accepted_tokens                counter   draft tokens accepted
dspark:spec_decode_num_accepted_tokens_per_pos        counter   accepted at block position ``position``
dspark:time_to_first_token_seconds                    histogram request start -> first token, at the router
dspark:inter_token_latency_seconds                    histogram gap between outputs carrying tokens
dspark:request_success                                counter   finished requests by ``finished_reason``
dspark:request_failure                                counter   requests that ended in an error
dspark:prompt_tokens / dspark:generation_tokens       counter   tokens in / out (out: as they stream)
dspark:verification_budget                            gauge     mean drafts verified per request per step
dspark:policy_version                                 gauge     scheduler policy version in force (0: local)
dspark:queue_depth / dspark:num_requests_running      gauge     verifier's waiting / running requests
dspark:num_requests_in_flight                         gauge     requests this router is streaming
dspark:redis_connected                                gauge     1 when the router's last Redis call worked
dspark:prefix_cache_hit_rate                          gauge     verifier's reused / reusable prompt tokens
dspark:kv_cache_usage                                 gauge     verifier's cache positions held by running requests
dspark:kv_cache_block_usage                           gauge     paged cache: blocks in use / blocks in the pool
dspark:structured_output_requests                     counter   requests with a response_format grammar
dspark:grammar_mask_seconds / dspark:grammar_masks    gauge     verifier's total time computing grammar masks / masks
dspark:speculative_steps / dspark:plain_steps         gauge     verifier's steps the speculation gate sent each way
dspark:draft_depth                                    gauge     drafts per block asked for at the last speculative step
dspark:draft_requests_local / _remote                 gauge     verifier's requests drafted in its process / on workers
dspark:spec_gate_tokens_per_second                    gauge     the gate's average by ``batch`` range and ``arm``
dspark:verify_step_seconds                            gauge     adaptive budget's step time by ``tokens`` (1-8)
====================================================  ========  ===============================

Why counters are accumulated here, at the router, from each request's final ``SpecMetrics``
rather than read from the verifier: every Router replica is scraped on its own, and a request
is counted exactly once, by the replica that served it, so sums over replicas are right and
survive verifier restarts.  The gauges describe the verifier group and are refreshed from its
``stats()`` when scraped (with one Verifier replica they are exact; with several, each scrape
sees the replica Serve picked).  Every instance owns a private :class:`CollectorRegistry`, so
several apps (and tests) in one process never share series.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dspark.workers.request import RequestOutput, SamplingParams

# vLLM's bucket edges, so latency panels line up with a vLLM deployment's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
MAX_POSITIONS = 64  # block positions exported (a block is never longer in practice)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class RouterMetrics:
    """The metric families of one router, in a registry of their own."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        lab = ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"dspark:{name}", doc, lab + list(extra), registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"dspark:{name}", doc, lab, registry=r)

        self.num_drafts = counter("spec_decode_num_drafts", "Verification rounds that carried at least one draft token.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at each block position.", ("position",)
        )
        self.request_success = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        self.request_failure = counter("request_failure", "Requests that ended in an error (not client mistakes).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens, counted as they stream.")
        self.ttft = Histogram("dspark:time_to_first_token_seconds", "Time to first token, measured at the router.",
                              lab, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("dspark:inter_token_latency_seconds",
                             "Time between two outputs of a request that carry tokens, measured at the router.",
                             lab, buckets=ITL_BUCKETS, registry=r)
        self.budget = gauge("verification_budget", "Mean draft tokens verified per request per step (verifier).")
        self.policy_version = gauge("policy_version", "Verification policy version in force (0: local default).")
        self.queue_depth = gauge("queue_depth", "Requests waiting for a verifier slot.")
        self.running = gauge("num_requests_running", "Requests decoding on the verifier.")
        self.in_flight = gauge("num_requests_in_flight", "Requests this router replica is streaming.")
        self.redis_connected = gauge("redis_connected", "1 when this router's last Redis call succeeded, else 0.")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate",
                                     "Prompt tokens reused from cached prefixes over those that could be (verifier).")
        self.kv_usage = gauge("kv_cache_usage", "Fraction of the verifier's KV cache positions held by running requests.")
        self.kv_block_usage = gauge("kv_cache_block_usage",
                                    "Paged KV cache: blocks held by requests over the blocks in the pool (verifier).")
        self.structured = counter("structured_output_requests", "Requests constrained by a grammar (response_format).")
        self.mask_seconds = gauge("grammar_mask_seconds",
                                  "Seconds the verifier spent computing grammar masks since it started.")
        self.masks = gauge("grammar_masks", "Grammar masks the verifier computed since it started.")
        self.spec_steps = gauge("speculative_steps", "Verifier steps the speculation gate let speculate, since start.")
        self.plain_steps = gauge("plain_steps", "Verifier steps the speculation gate kept plain, since start.")
        self.draft_depth = gauge("draft_depth", "Drafts per block the verifier asked for at its last speculative step.")
        self.drafted_local = gauge("draft_requests_local", "Requests the verifier drafted in its own process, since it started.")
        self.drafted_remote = gauge("draft_requests_remote", "Requests the verifier had drafted on draft workers, since it started.")
        self.gate_rate = Gauge("dspark:spec_gate_tokens_per_second",
                               "Speculation gate's moving average of tokens per second, by batch-size range "
                               "(decoding requests) and arm (speculative or plain); 0: not measured yet.",
                               lab + ["batch", "arm"], registry=r)
        self.step_cost = Gauge("dspark:verify_step_seconds",
                               "Adaptive budget's seconds per verification step by token count (1 to 8: the "
                               "counts one request's verification takes), as it weighs them now.",
                               lab + ["tokens"], registry=r)
        # Series exist (at 0) from the start, so rates and absent() behave before traffic.
        for m in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, self.request_failure,
                  self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.budget,
                  self.policy_version, self.queue_depth, self.running, self.in_flight, self.redis_connected,
                  self.structured, self.mask_seconds, self.masks, self.spec_steps, self.plain_steps,
                  self.draft_depth, self.drafted_local, self.drafted_remote):
            self.labels(m)
        # The same figure as a plain int (graceful drain reads it).  HTTP and gRPC requests run on
        # different threads' event loops, hence the lock.
        self.requests_in_flight = 0
        self._lock = threading.Lock()
        self._refresh: Callable[[], Awaitable[None]] | None = None

    def labels(self, metric, **extra):
        return metric.labels(model_name=self.model_name, **extra)

    # -- per request ----------------------------------------------------------------------------
    def record_final(self, out: RequestOutput) -> None:
        """Account a finished sequence's speculative-decoding figures (the request itself, and its
        prompt tokens, once: with its first sequence, index 0).  Its generated tokens were counted
        as they streamed (``observe``)."""
        m = out.metrics
        self.labels(self.num_drafts).inc(m.num_drafts)
        self.labels(self.num_draft_tokens).inc(m.num_draft_tokens)
        self.labels(self.num_accepted_tokens).inc(m.num_accepted_tokens)
        for pos, n in enumerate(m.accepted_per_pos[:MAX_POSITIONS]):
            if n:
                self.labels(self.accepted_per_pos, position=str(pos)).inc(n)
        if out.index == 0:
            self.labels(self.request_success, finished_reason=out.finish_reason or "abort").inc()
            self.labels(self.prompt_tokens).inc(out.num_prompt_tokens)

    async def observe(self, outputs: AsyncIterator[RequestOutput], started: float) -> AsyncIterator[RequestOutput]:
        """Pass ``outputs`` through, timing tokens; ``started`` is the request's arrival
        (``time.perf_counter()``).  Closing this iterator closes ``outputs``."""
        last = None
        with self._lock:
            self.requests_in_flight += 1
        self.labels(self.in_flight).inc()
        try:
            async for out in outputs:
                if out.new_token_ids:
                    # Counted as they stream, not when a request ends: the rate over a window
                    # (``rate()`` in a dashboard, ``bench load``'s steady figure) is then the
                    # tokens made in it, not those of the requests that happened to end in it.
                    self.labels(self.generation_tokens).inc(len(out.new_token_ids))
                    now = time.perf_counter()
                    if last is None:
                        self.labels(self.ttft).observe(now - started)
                    else:
                        self.labels(self.itl).observe(now - last)
                    last = now
                if out.finished:
                    self.record_final(out)
                yield out
        except ValueError:
            raise  # the client's mistake, not a failure of the service
        except (GeneratorExit, asyncio.CancelledError):
            raise  # the client left
        except BaseException:
            self.labels(self.request_failure).inc()
            raise
        finally:
            with self._lock:
                self.requests_in_flight -= 1
            self.labels(self.in_flight).dec()
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- gauges -----------------------------------------------------------------------------------
    def set_verifier_stats(self, stats: dict) -> None:
        """Gauges from a Verifier's ``stats()`` (missing keys leave a gauge as it was)."""
        for key, gauge in (("verification_budget", self.budget), ("policy_version", self.policy_version),
                           ("queued_requests", self.queue_depth), ("active_requests", self.running),
                           ("prefix_cache_hit_rate", self.prefix_hit_rate), ("kv_cache_usage", self.kv_usage),
                           ("kv_cache_block_usage", self.kv_block_usage), ("grammar_mask_seconds", self.mask_seconds),
                           ("grammar_masks", self.masks), ("speculative_steps", self.spec_steps),
                           ("plain_steps", self.plain_steps), ("draft_depth", self.draft_depth),
                           ("draft_requests_local", self.drafted_local), ("draft_requests_remote", self.drafted_remote)):
            if key in stats:
                self.labels(gauge).set(float(stats[key]))
        for batch, arms in stats.get("gate_rates", {}).items():
            for arm, rate in arms.items():
                self.labels(self.gate_rate, batch=batch, arm=arm).set(float(rate))
        for tokens, seconds in stats.get("step_costs", {}).items():
            self.labels(self.step_cost, tokens=tokens).set(float(seconds))

    def set_redis_connected(self, connected: bool) -> None:
        self.labels(self.redis_connected).set(1.0 if connected else 0.0)

    def on_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Run ``refresh`` (e.g. fetch verifier stats) before each exposition."""
        self._refresh = refresh

    async def exposition(self) -> bytes:
        if self._refresh is not None:
            try:
                await self._refresh()
            except Exception:  # noqa: BLE001 - stale gauges beat a failed scrape
                pass
        return generate_latest(self.registry)


class MeteredBackend:
    """A :class:`GenerationBackend` that records :class:`RouterMetrics` for every request."""

    def __init__(self, inner, metrics: RouterMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.model_name = inner.model_name

    @property
    def max_context(self) -> int:
        return self.inner.max_context

    @property
    def in_flight(self) -> int:
        return self.metrics.requests_in_flight

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None):
        started = time.perf_counter()
        if params.grammar is not None:
            self.metrics.labels(self.metrics.structured).inc()
        return self.metrics.observe(self.inner.generate(prompt_ids, params, request_id), started)

    async def health(self) -> dict[str, object]:
        return await self.inner.health()


__all__ = ["RouterMetrics", "MeteredBackend", "CONTENT_TYPE", "TTFT_BUCKETS", "ITL_BUCKETS"]
