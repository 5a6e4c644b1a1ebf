"""Pydantic models of the OpenAI-compatible HTTP API (requests, responses, stream chunks).

Requests are parsed strictly (JSON types only: no "3" for 3, no true for 1); value ranges are
not checked here but in :mod:`dspark.cluster.validation`, which the gRPC API shares.  Unknown
request fields are ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dspark.cluster.validation import ChatTurn, GenerationRequest, RequestError, grammar_from_response_format
from dspark.workers.request import MAX_TOP_LOGPROBS

_STRICT = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------------------- requests
class ContentPart(BaseModel):
    model_config = _STRICT

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted, not used

    def to_turn(self, index: int) -> ChatTurn:
        if self.content is None:
            return ChatTurn(self.role, "")
        if isinstance(self.content, str):
            return ChatTurn(self.role, self.content)
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise RequestError(
                    f"content part of type {part.type!r} is not supported (text only)",
                    param=f"messages[{index}].content",
                )
            texts.append(part.text)
        return ChatTurn(self.role, "".join(texts))


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool | None = None


class _SamplingFields(BaseModel):
    """Fields both endpoints share."""

    model_config = _STRICT

    model: str | None = Field(None, description="The served model's id (see /v1/models); unset means that model.")
    max_tokens: int | None = Field(None, description="New tokens at most; unset: the server default.")
    max_completion_tokens: int | None = Field(None, description="Alias of max_tokens; wins when both are set.")
    temperature: float | None = Field(None, description="0 = greedy; unset: 1.0.")
    top_p: float | None = None
    top_k: int | None = Field(None, description="DSpark extension: keep the k most likely tokens (0 or -1: off).")
    seed: int | None = None
    speculative: bool | None = Field(None, description="DSpark extension: false = plain decoding for this request.")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings (not included in the output).")
    n: int | None = Field(None, description="Sequences sampled for the prompt (1-16); the prompt is prefilled once.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    response_format: dict | None = Field(
        None,
        description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}; '
        'DSpark extensions: {"type": "regex", "regex": "..."} and {"type": "grammar", "grammar": "..."}.',
    )

    # OpenAI parameters this server does not implement: refused when set to anything but their
    # neutral value, so a client never silently gets an answer that ignored them.
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    suffix: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None

    def sampling_fields(self) -> dict:
        """The GenerationRequest fields both endpoints fill the same way."""
        for name, neutral in _UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value not in neutral:
                raise RequestError(f"{name} is not supported by this server", param=name)
        return dict(
            model=self.model,
            max_tokens=self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            n=self.n,
            speculative=self.speculative,
            logprobs=self.logprobs_k(),
            grammar=grammar_from_response_format(self.response_format),
        )

    def logprobs_k(self) -> int | None:
        """How many alternatives per token the request asks for; None: no logprobs."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# Unsupported parameter -> the values that mean "off" (accepted, since they change nothing).
_UNSUPPORTED: dict[str, tuple] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
    "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"), "best_of": (1,),
    "suffix": ("",), "audio": (), "modalities": (["text"],), "prediction": (),
}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool | None = Field(None, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(None, description="With logprobs: the 0-20 most likely tokens at each position.")

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        if not self.logprobs:
            if self.top_logprobs:
                raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
            return None
        return self.top_logprobs or 0

    def to_generation_request(self) -> GenerationRequest:
        turns = [m.to_turn(i) for i, m in enumerate(self.messages)]
        return GenerationRequest(messages=turns, **self.sampling_fields())


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of one string, token ids, or a list of one token-id list."
    )
    logprobs: int | None = Field(None, description="Each output token's log-probability and its 0-20 most likely alternatives.")
    echo: bool | None = Field(None, description="Prepend the prompt to the text (and, with logprobs, its tokens' logprobs).")

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def to_generation_request(self) -> GenerationRequest:
        return GenerationRequest(prompt=self.prompt, echo=bool(self.echo), **self.sampling_fields())



# ---------------------------------------------------------------------------- responses
# Serialized with :func:`dump`: optional extras (usage in stream chunks, spec_decode) and unset
# delta fields are left out rather than sent as null; the rest follows OpenAI, nulls included.


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpecDecodeStats(BaseModel):
    """DSpark extension: the request's speculative-decoding counters (vLLM's meaning)."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    mean_acceptance_length: float


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the echoed prompt's first token (nothing precedes it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    spec_decode: SpecDecodeStats | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    spec_decode: SpecDecodeStats | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A completion, or (object "text_completion" too, as OpenAI does) one stream chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    spec_decode: SpecDecodeStats | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dspark"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_OPTIONAL_EXTRAS = ("usage", "spec_decode")


def dump(model: BaseModel) -> dict:
    """JSON-ready dict of a response model without its null extras and null delta fields."""
    d = model.model_dump(mode="json")
    for key in _OPTIONAL_EXTRAS:
        if key in d and d[key] is None:
            del d[key]
    for choice in d.get("choices", ()):
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return d
