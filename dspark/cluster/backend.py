"""What the router's client APIs need from whoever generates tokens.

The HTTP and gRPC front ends only see a :class:`GenerationBackend`: a verifier worker in this
process (:class:`LocalBackend`), or a Ray Serve deployment handle wrapped by the cluster app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Protocol, runtime_checkable

from dspark.workers.request import RequestOutput, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from dspark.workers.verifier import VerifierWorker


class BackendUnavailable(RuntimeError):
    """The backend cannot serve this request now (its replica died, none is up yet).

    Front ends answer HTTP 503 / gRPC UNAVAILABLE: the client may retry, unlike an INTERNAL
    error of the engine itself.
    """


class IncompleteOutput(RuntimeError):
    """A backend's outputs for a request ended before its final output (``finished``).

    A fault of the backend, not of the client: front ends answer it as an engine error
    (HTTP 500 / gRPC INTERNAL).
    """

    def __init__(self) -> None:
        super().__init__("the backend ended the request without a final output")


@dataclass(frozen=True)
class Completion:
    """One sequence of a whole request, read by :func:`collect`: what a non-streaming answer carries."""

    index: int  # which of the request's n sequences
    text: str  # every output's text delta, joined
    token_ids: list[int]  # every output's new token ids, in order
    logprobs: list[TokenLogprob] | None  # one per token when the request asked for logprobs
    final: RequestOutput  # the last output: finish reason, usage, speculative-decoding metrics
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked for: one per prompt token


async def collect(outputs: AsyncIterator[RequestOutput], n: int = 1) -> list[Completion]:
    """Read a request's outputs up to the final one of each of its ``n`` sequences; the caller
    closes ``outputs``.  Returns the sequences in index order.

    The backend's own errors pass through; outputs that end before every final one raise
    :class:`IncompleteOutput`.  Both client APIs' non-streaming calls answer from this.
    """
    pieces: dict[int, list[str]] = {i: [] for i in range(n)}
    token_ids: dict[int, list[int]] = {i: [] for i in range(n)}
    logprobs: dict[int, list[TokenLogprob] | None] = {i: None for i in range(n)}
    done: dict[int, Completion] = {}
    prompt: dict[int, list | None] = {}
    async for out in outputs:
        i = out.index
        if out.prompt_logprobs is not None:
            prompt[i] = out.prompt_logprobs
        pieces[i].append(out.text_delta)
        token_ids[i].extend(out.new_token_ids)
        if out.logprobs is not None:
            logprobs[i] = (logprobs[i] or []) + list(out.logprobs)
        if out.finished:
            done[i] = Completion(i, "".join(pieces[i]), token_ids[i], logprobs[i], out, prompt.get(i))
            if len(done) == n:
                return [done[j] for j in range(n)]
    raise IncompleteOutput()


@runtime_checkable
class GenerationBackend(Protocol):
    """A source of request outputs.

    ``generate`` is an async generator: invalid requests raise ValueError no later than the
    first ``__anext__`` (before any output), engine failures raise ``EngineError``, a backend
    that is gone raises :class:`BackendUnavailable`; closing the iterator early (``aclose``,
    task cancellation) must abort the request and free its slot.
    """

    model_name: str  # the name clients address the model by

    @property
    def max_context(self) -> int:
        """Longest prompt + output one request may reach, in tokens."""
        ...

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]: ...

    async def health(self) -> dict[str, object]:
        """Small status figures; raise (or never return) when the backend cannot serve."""
        ...


class LocalBackend:
    """A :class:`VerifierWorker` of this process, served as a backend."""

    def __init__(self, worker: VerifierWorker, model_name: str) -> None:
        self.worker = worker
        self.model_name = model_name

    @property
    def max_context(self) -> int:
        return self.worker.engine.max_context

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        return self.worker.generate(prompt_ids, params, request_id)

    async def health(self) -> dict[str, object]:
        s = self.worker.demand()
        return {
            "active_requests": s.active_requests,
            "queued_requests": s.queued_requests,
            "steps": self.worker.engine.num_steps,
            "mean_acceptance_length": round(s.mean_acceptance_length, 4),
        }
