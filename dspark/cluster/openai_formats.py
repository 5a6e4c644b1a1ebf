"""The OpenAI response objects of each endpoint: stream chunks and whole answers.

One :class:`Format` per endpoint builds them from :class:`~dspark.workers.request.RequestOutput`
records; :mod:`dspark.cluster.openai_streaming` sends them. Every answer carries the request's
token usage and its speculative-decoding figures (``spec_decode``).
"""

from __future__ import annotations

import abc
import time

from dspark.cluster import openai_types as T
from dspark.workers.request import RequestOutput

__all__ = ["ChatFormat", "CompletionFormat", "Format"]


class Format(abc.ABC):
    """Builds one endpoint's response objects from request outputs (one subclass per endpoint)."""

    def __init__(self, request_id: str, model: str) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())

    def first_events(self) -> list[dict]:
        """Stream events sent before any text (none unless the endpoint has some)."""
        return []

    @abc.abstractmethod
    def text_event(self, text: str) -> dict:
        """The stream event carrying a piece of text."""

    @abc.abstractmethod
    def finish_event(self, out: RequestOutput) -> dict:
        """The stream event carrying the finish reason (``out`` is the final output)."""

    @abc.abstractmethod
    def usage_event(self, out: RequestOutput) -> dict:
        """The stream event carrying token usage, sent when the client asked for it."""

    @abc.abstractmethod
    def whole(self, text: str, out: RequestOutput) -> dict:
        """The non-streaming response: all of ``text`` and the final output's figures."""


class ChatFormat(Format):
    """``/v1/chat/completions``: ``chat.completion.chunk`` events, or one ``chat.completion``."""

    def _chunk(self, delta: T.Delta, finish: str | None = None, **extra) -> dict:
        choice = T.ChatChunkChoice(delta=delta, finish_reason=finish)
        chunk = T.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice], **extra)
        return T.dump(chunk)

    def first_events(self) -> list[dict]:
        return [self._chunk(T.Delta(role="assistant", content=""))]

    def text_event(self, text: str) -> dict:
        return self._chunk(T.Delta(content=text))

    def finish_event(self, out: RequestOutput) -> dict:
        return self._chunk(T.Delta(), _finish_reason(out), spec_decode=_spec(out))

    def usage_event(self, out: RequestOutput) -> dict:
        chunk = T.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=_usage(out), spec_decode=_spec(out)
        )
        return T.dump(chunk)

    def whole(self, text: str, out: RequestOutput) -> dict:
        choice = T.ChatChoice(message=T.AssistantMessage(content=text), finish_reason=_finish_reason(out))
        whole = T.ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=_usage(out),
            spec_decode=_spec(out),
        )
        return T.dump(whole)


class CompletionFormat(Format):
    """``/v1/completions``: ``text_completion`` objects, streamed or whole."""

    def _chunk(self, choices: list[T.CompletionChoice], **extra) -> dict:
        return T.dump(T.Completion(id=self.id, created=self.created, model=self.model, choices=choices, **extra))

    def text_event(self, text: str) -> dict:
        return self._chunk([T.CompletionChoice(text=text)])

    def finish_event(self, out: RequestOutput) -> dict:
        return self._chunk([T.CompletionChoice(text="", finish_reason=_finish_reason(out))], spec_decode=_spec(out))

    def usage_event(self, out: RequestOutput) -> dict:
        return self._chunk([], usage=_usage(out), spec_decode=_spec(out))

    def whole(self, text: str, out: RequestOutput) -> dict:
        choice = T.CompletionChoice(text=text, finish_reason=_finish_reason(out))
        return self._chunk([choice], usage=_usage(out), spec_decode=_spec(out))


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason


def _usage(out: RequestOutput) -> T.Usage:
    p, c = out.num_prompt_tokens, out.num_output_tokens
    return T.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _spec(out: RequestOutput) -> T.SpecDecodeStats:
    m = out.metrics
    return T.SpecDecodeStats(
        num_drafts=m.num_drafts,
        num_draft_tokens=m.num_draft_tokens,
        num_accepted_tokens=m.num_accepted_tokens,
        mean_acceptance_length=round(m.mean_acceptance_length, 4),
    )
