"""The OpenAI response objects of each endpoint: stream chunks and whole answers.

One :class:`Format` per endpoint builds them from :class:`~dspark.workers.request.RequestOutput`
records (one per step and sequence; ``out.index`` is the choice it belongs to);
:mod:`dspark.cluster.openai_streaming` sends them. Every answer carries the request's token usage
(the prompt counted once, the completion tokens of all n choices) and its speculative-decoding
figures (``spec_decode``, over all choices).

Log-probabilities are the target's, of the distribution each token was drawn from (after
temperature, top-k, top-p and a structured-output grammar; temperature 1 for greedy requests):
vLLM's "processed" logprobs.  A token that distribution excludes has -inf, sent as -9999.0.
"""

from __future__ import annotations

import abc
import math
import time

from dspark.cluster import openai_types as T
from dspark.cluster.backend import Completion
from dspark.kernels.sampling import LOGPROB_FLOOR
from dspark.models.tokenizer import Tokenizer
from dspark.workers.request import RequestOutput, SpecMetrics, TokenLogprob

__all__ = ["ChatFormat", "CompletionFormat", "Format"]


class Format(abc.ABC):
    """Builds one endpoint's response objects from request outputs (one subclass per endpoint)."""

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer, n: int = 1) -> None:
        self.id = request_id
        self.model = model
        self.tok = tokenizer
        self.n = n
        self.created = int(time.time())

    def first_events(self) -> list[dict]:
        """Stream events sent before any text (none unless the endpoint has some)."""
        return []

    def output_events(self, out: RequestOutput) -> list[dict]:
        """The stream events of one output: its text and logprobs, then its finish reason if final."""
        events = []
        if out.text_delta or out.logprobs:
            events.append(self.text_event(out))
        if out.finished:
            events.append(self.finish_event(out))
        return events

    @abc.abstractmethod
    def text_event(self, out: RequestOutput) -> dict:
        """The stream event carrying an output's piece of text (and its tokens' logprobs)."""

    @abc.abstractmethod
    def finish_event(self, out: RequestOutput) -> dict:
        """The stream event carrying a choice's finish reason (``out`` is its final output)."""

    @abc.abstractmethod
    def usage_event(self, finals: list[RequestOutput]) -> dict:
        """The stream event carrying token usage (every choice's final output), sent when asked for."""

    @abc.abstractmethod
    def whole(self, choices: list[Completion]) -> dict:
        """The non-streaming response: every choice, in index order."""

    # -- token strings ------------------------------------------------------------------------
    def token_str(self, token_id: int) -> str:
        """A token as text; a piece of a UTF-8 character as OpenAI writes it (``bytes:\\xe2\\x80``)."""
        raw = self.tok.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class ChatFormat(Format):
    """``/v1/chat/completions``: ``chat.completion.chunk`` events, or one ``chat.completion``."""

    def _chunk(self, index: int, delta: T.Delta, finish: str | None = None, logprobs=None, **extra) -> dict:
        choice = T.ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
        chunk = T.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice], **extra)
        return T.dump(chunk)

    def first_events(self) -> list[dict]:
        return [self._chunk(i, T.Delta(role="assistant", content="")) for i in range(self.n)]

    def text_event(self, out: RequestOutput) -> dict:
        return self._chunk(out.index, T.Delta(content=out.text_delta), logprobs=self._logprobs(out.logprobs))

    def finish_event(self, out: RequestOutput) -> dict:
        return self._chunk(out.index, T.Delta(), _finish_reason(out), spec_decode=_spec([out]))

    def usage_event(self, finals: list[RequestOutput]) -> dict:
        chunk = T.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=_usage(finals), spec_decode=_spec(finals)
        )
        return T.dump(chunk)

    def whole(self, choices: list[Completion]) -> dict:
        finals = [c.final for c in choices]
        whole = T.ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                T.ChatChoice(
                    index=c.index,
                    message=T.AssistantMessage(content=c.text),
                    finish_reason=_finish_reason(c.final),
                    logprobs=self._logprobs(c.logprobs),
                )
                for c in choices
            ],
            usage=_usage(finals),
            spec_decode=_spec(finals),
        )
        return T.dump(whole)

    def _logprobs(self, lps: list[TokenLogprob] | None) -> T.ChatLogprobs | None:
        if lps is None:
            return None
        return T.ChatLogprobs(content=[
            T.ChatTokenLogprob(
                token=self.token_str(lp.token_id),
                logprob=_finite(lp.logprob),
                bytes=list(self.tok.token_bytes(lp.token_id)),
                top_logprobs=[T.TopLogprob(token=self.token_str(t), logprob=_finite(v), bytes=list(self.tok.token_bytes(t)))
                              for t, v in lp.top],
            )
            for lp in lps
        ])


class CompletionFormat(Format):
    """``/v1/completions``: ``text_completion`` objects, streamed or whole.

    With ``echo_ids`` (the prompt's token ids, for ``echo``), each choice's text starts with the
    prompt, and with logprobs its tokens come first (the first with a null logprob).
    """

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer, n: int = 1,
                 echo_ids: list[int] | None = None) -> None:
        super().__init__(request_id, model, tokenizer, n)
        self._offset = [0] * n  # characters of each choice's text before its next token (text_offset)
        self.echo_ids = echo_ids
        self._echo_text = tokenizer.decode(echo_ids, skip_special_tokens=False) if echo_ids else ""
        self._echoed: set[int] = set()  # choices whose prompt went out already

    def output_events(self, out: RequestOutput) -> list[dict]:
        if self.echo_ids is not None and out.index not in self._echoed:  # the prompt goes first, even with no text yet
            return [self.text_event(out)] + ([self.finish_event(out)] if out.finished else [])
        return super().output_events(out)

    def _chunk(self, choices: list[T.CompletionChoice], **extra) -> dict:
        return T.dump(T.Completion(id=self.id, created=self.created, model=self.model, choices=choices, **extra))

    def text_event(self, out: RequestOutput) -> dict:
        prefix, prompt_lps = self._echo(out.index, out.prompt_logprobs)
        return self._chunk([T.CompletionChoice(index=out.index, text=prefix + out.text_delta,
                                               logprobs=self._logprobs(out.index, out.logprobs, prompt_lps))])

    def _echo(self, index: int, prompt_lps) -> tuple[str, list | None]:
        """The echoed prompt's text and logprobs, the first time a choice is sent; else nothing."""
        if self.echo_ids is None or index in self._echoed:
            return "", None
        self._echoed.add(index)
        return self._echo_text, prompt_lps

    def finish_event(self, out: RequestOutput) -> dict:
        choice = T.CompletionChoice(index=out.index, text="", finish_reason=_finish_reason(out))
        return self._chunk([choice], spec_decode=_spec([out]))

    def usage_event(self, finals: list[RequestOutput]) -> dict:
        return self._chunk([], usage=_usage(finals), spec_decode=_spec(finals))

    def whole(self, choices: list[Completion]) -> dict:
        finals = [c.final for c in choices]
        items = []
        for c in choices:
            prefix, prompt_lps = self._echo(c.index, c.prompt_logprobs)
            items.append(T.CompletionChoice(index=c.index, text=prefix + c.text, finish_reason=_finish_reason(c.final),
                                            logprobs=self._logprobs(c.index, c.logprobs, prompt_lps)))
        return self._chunk(items, usage=_usage(finals), spec_decode=_spec(finals))

    def _logprobs(self, index: int, lps: list[TokenLogprob] | None,
                  prompt_lps: list[TokenLogprob | None] | None = None) -> T.CompletionLogprobs | None:
        if lps is None:
            return None
        if prompt_lps is not None:  # echo: the prompt's tokens first; the first has no logprob
            ids = [*self.echo_ids, *(lp.token_id for lp in lps)]
            entries = [*prompt_lps, *lps]
        else:
            ids, entries = [lp.token_id for lp in lps], list(lps)
        tokens = [self.token_str(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(self._offset[index])
            self._offset[index] += len(t)
        return T.CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[None if lp is None else _finite(lp.logprob) for lp in entries],
            top_logprobs=[None if lp is None else {self.token_str(t): _finite(v) for t, v in lp.top} for lp in entries],
            text_offset=offsets,
        )


def _finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason


def _usage(finals: list[RequestOutput]) -> T.Usage:
    p, c = finals[0].num_prompt_tokens, sum(o.num_output_tokens for o in finals)
    return T.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _spec(finals: list[RequestOutput]) -> T.SpecDecodeStats:
    m = SpecMetrics(
        num_drafts=sum(o.metrics.num_drafts for o in finals),
        num_draft_tokens=sum(o.metrics.num_draft_tokens for o in finals),
        num_accepted_tokens=sum(o.metrics.num_accepted_tokens for o in finals),
    )
    return T.SpecDecodeStats(
        num_drafts=m.num_drafts,
        num_draft_tokens=m.num_draft_tokens,
        num_accepted_tokens=m.num_accepted_tokens,
        mean_acceptance_length=round(m.mean_acceptance_length, 4),
    )
