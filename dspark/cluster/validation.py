"""Request rules shared by the router's HTTP (OpenAI) and gRPC APIs.

Both front ends parse their wire format into a protocol-neutral :class:`GenerationRequest`
and call :func:`prepare_request`, which applies every rule once: model name, input form,
tokenization, context length, the ``max_tokens`` policy and the sampling ranges.  It returns
what a backend needs (prompt ids + :class:`SamplingParams`) or raises :class:`RequestError`,
whose :class:`ErrorKind` each front end maps to its own status (HTTP code, gRPC code).

max_tokens policy (clip, as vLLM does when the room runs out):

- unset: ``RouterConfig.default_max_tokens``, clipped to the room the prompt leaves in the
  context (``max_context - prompt_tokens``);
- set: must be in ``[1, max_context]`` (else the request is rejected), then clipped to that
  room the same way; a clipped request ends with ``finish_reason="length"``.
- a prompt that leaves no room at all (``prompt_tokens >= max_context``) is rejected with
  ``code="context_length_exceeded"``.
"""

from __future__ import annotations

import enum
import functools
import hmac
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from dspark.workers.grammar import GrammarSpec
from dspark.workers.request import MAX_N, MAX_TOP_LOGPROBS, SamplingParams

if TYPE_CHECKING:
    from dspark.cluster.backend import GenerationBackend
    from dspark.models.tokenizer import Tokenizer

API_KEY_ENV = "DSPARK_API_KEY"
# Chat roles a request may use; "developer" is OpenAI's newer name for "system".
CHAT_ROLES = ("system", "user", "assistant", "developer")
# Below this a temperature is greedy decoding (as in vLLM): dividing logits by ~0 overflows.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class RouterConfig:
    """Limits and defaults of the router's client APIs (HTTP and gRPC alike)."""

    max_request_bytes: int = 1 << 20  # largest request body / gRPC message accepted
    default_max_tokens: int = 256  # max_tokens of a request that sets none (clipped to the context)
    default_temperature: float = 1.0  # temperature of a request that sets none (OpenAI's default)
    api_key: str | None = None  # bearer key clients must send; None: env DSPARK_API_KEY; "": open
    health_timeout_s: float = 5.0  # how long /health and the gRPC health view wait on the backend
    max_request_id_chars: int = 128  # longest client-chosen request id (gRPC)

    def resolved_api_key(self) -> str | None:
        """The key in force: ``api_key`` if set, else the environment; None means no auth."""
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None


class ErrorKind(enum.Enum):
    """What went wrong with a request; the value is the HTTP status the API answers with."""

    INVALID = 400
    UNAUTHENTICATED = 401
    NOT_FOUND = 404
    TOO_LARGE = 413


class RequestError(ValueError):
    """A client mistake, with the field it concerns (``param``) and a short machine ``code``."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, kind: ErrorKind = ErrorKind.INVALID
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """A generation request's fields, as parsed from any wire format (None = not given).

    Exactly one of ``prompt`` (text, a list of one text, token ids or a list of one token-id
    list) and ``messages`` must be given.
    """

    model: str | None = None
    prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | None = None
    messages: Sequence[ChatTurn] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    n: int | None = None
    speculative: bool | None = None  # False: plain decoding (A/B comparisons); None: server default
    logprobs: int | None = None  # None: no logprobs; k >= 0: each token's and its k best alternatives'
    grammar: GrammarSpec | None = None  # structured output (response_format); None: free text
    echo: bool = False  # completions: the answer starts with the prompt (with logprobs: its tokens' too)


@dataclass(frozen=True)
class PreparedRequest:
    """What a backend needs to serve a validated request."""

    prompt_ids: list[int]
    params: SamplingParams
    model: str


def check_bearer(authorization: str | None, api_key: str | None) -> None:
    """Raise UNAUTHENTICATED unless ``authorization`` is ``Bearer <api_key>`` (no key: open)."""
    if not api_key:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RequestError(
            "missing API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            kind=ErrorKind.UNAUTHENTICATED,
        )
    # Constant-time comparison, on bytes so non-ASCII input cannot raise.
    if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), api_key.encode("utf-8")):
        raise RequestError("invalid API key", code="invalid_api_key", kind=ErrorKind.UNAUTHENTICATED)


def check_model(model: str | None, served: str) -> str:
    """The served model's name; unset or empty means the served model, anything else is 404."""
    if model is None or model == "":
        return served
    if model != served:
        raise RequestError(
            f"the model {model!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
            kind=ErrorKind.NOT_FOUND,
        )
    return served


def prepare_request(
    req: GenerationRequest, tokenizer: "Tokenizer", backend: "GenerationBackend", cfg: RouterConfig
) -> PreparedRequest:
    """Validate a request and turn it into prompt ids + sampling params; raises RequestError.

    Example:
        >>> p = prepare_request(GenerationRequest(prompt="Hi", max_tokens=8, temperature=0),
        ...                     tok, backend, RouterConfig())
        >>> p.params.max_tokens, p.params.greedy
        (8, True)
    """
    model = check_model(req.model, backend.model_name)
    n = 1 if req.n is None else req.n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise RequestError(f"n must be an integer in [1, {MAX_N}]", param="n")
    if req.logprobs is not None and (not _is_int(req.logprobs) or not 0 <= req.logprobs <= MAX_TOP_LOGPROBS):
        raise RequestError(f"at most {MAX_TOP_LOGPROBS} top logprobs per token", param="logprobs")
    prompt_ids = _prompt_ids(req, tokenizer)
    max_context = int(backend.max_context)
    n_prompt = len(prompt_ids)
    if n_prompt >= max_context:
        raise RequestError(
            f"this model's maximum context length is {max_context} tokens; the prompt has {n_prompt} tokens "
            f"(at most {max_context - 1}, leaving room for one output token)",
            param="messages" if req.messages is not None else "prompt",
            code="context_length_exceeded",
        )
    room = max_context - n_prompt
    if req.max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, room)
    else:
        if not _is_int(req.max_tokens) or req.max_tokens < 1:
            raise RequestError("max_tokens must be a positive integer", param="max_tokens")
        if req.max_tokens > max_context:
            raise RequestError(
                f"max_tokens is {req.max_tokens}, more than this model's context of {max_context} tokens",
                param="max_tokens",
            )
        max_tokens = min(req.max_tokens, room)

    temperature = cfg.default_temperature if req.temperature is None else req.temperature
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and 0 <= temperature < GREEDY_EPS:
        temperature = 0.0
    top_k = 0 if req.top_k is None else req.top_k
    if _is_int(top_k):
        if top_k == -1:  # vLLM's spelling of "off"
            top_k = 0
        elif top_k >= tokenizer.vocab_size:  # keeps every token anyway; huge values overflow tensors
            top_k = 0
    stop = req.stop
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, (list, tuple)):
        stop = tuple(stop)
    else:
        raise RequestError("stop must be a string or a list of strings", param="stop")
    for text in stop:
        if isinstance(text, str):
            _check_text(text, "stop")
    if req.grammar is not None:
        check_grammar(req.grammar, tokenizer)
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            seed=req.seed,
            stop=stop,
            speculative=req.speculative is not False,
            n=n,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None,
            grammar=req.grammar,
        )
    except ValueError as exc:  # SamplingParams owns the ranges; name the field it complained about
        raise RequestError(str(exc), param=_param_of(str(exc))) from None
    return PreparedRequest(prompt_ids=prompt_ids, params=params, model=model)


def grammar_from_response_format(response_format: dict | None, param: str = "response_format") -> GrammarSpec | None:
    """The grammar of an OpenAI ``response_format`` object (None for ``text`` or none); RequestError if malformed.

    ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``;
    DSpark extensions: ``{"type": "regex", "regex": "..."}`` and ``{"type": "grammar", "grammar": "..."}``
    (the grammar language of :mod:`dspark.workers.grammar`).

    Example:
        >>> grammar_from_response_format({"type": "json_object"}).kind
        'json_object'
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError("response_format must be an object", param=param)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise RequestError("json_schema must be an object with a 'schema'", param=f"{param}.json_schema")
        schema = spec["schema"]
        if not isinstance(schema, (dict, bool)):
            raise RequestError("the schema must be a JSON object", param=f"{param}.json_schema.schema")
        return GrammarSpec("json_schema", json.dumps(schema))  # key order kept: it orders the output
    if kind in ("regex", "grammar"):
        text = response_format.get(kind)
        if not isinstance(text, str) or not text:
            raise RequestError(f"'{kind}' must be a non-empty string", param=f"{param}.{kind}")
        _check_text(text, f"{param}.{kind}")
        return GrammarSpec(kind, text)
    raise RequestError(
        f"response_format type {kind!r} is not supported; use text, json_object, json_schema, regex or grammar",
        param=f"{param}.type",
    )


def check_grammar(spec: GrammarSpec, tokenizer: "Tokenizer") -> None:
    """Compile ``spec`` for ``tokenizer`` (cached), so a grammar the engine refuses is a 400 at the
    router, naming ``response_format``, before anything is queued."""
    from dspark.workers.grammar import GrammarError

    try:
        _compiler(tokenizer).compile(spec)
    except GrammarError as exc:
        raise RequestError(str(exc), param="response_format") from None


@functools.lru_cache(maxsize=4)
def _compiler(tokenizer: "Tokenizer"):
    from dspark.workers.grammar import GrammarCompiler

    return GrammarCompiler(tokenizer, tokenizer.vocab_size, tokenizer.stop_token_ids)


def _prompt_ids(req: GenerationRequest, tokenizer: "Tokenizer") -> list[int]:
    if (req.prompt is None) == (req.messages is None):
        raise RequestError(
            "give exactly one of 'prompt' and 'messages'", param="messages" if req.prompt is None else "prompt"
        )
    if req.messages is not None:
        return _chat_ids(req.messages, tokenizer)
    prompt = req.prompt
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise RequestError("the prompt is empty", param="prompt")
        if all(_is_int(t) for t in prompt):
            return _check_token_ids(list(prompt), tokenizer)
        if len(prompt) != 1:
            raise RequestError(
                "exactly one prompt per request: a string, a list of one string, or token ids", param="prompt"
            )
        prompt = prompt[0]
        if isinstance(prompt, (list, tuple)):
            if not all(_is_int(t) for t in prompt):
                raise RequestError("token ids must be integers", param="prompt")
            return _check_token_ids(list(prompt), tokenizer)
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string or a list of token ids", param="prompt")
    _check_text(prompt, "prompt")
    if not prompt:
        raise RequestError("the prompt is empty", param="prompt")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise RequestError("the prompt is empty after tokenization", param="prompt")
    return ids


def _chat_ids(messages: Sequence[ChatTurn], tokenizer: "Tokenizer") -> list[int]:
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m.role, str) or m.role not in CHAT_ROLES:
            raise RequestError(
                f"unknown role {m.role!r}; use one of {', '.join(CHAT_ROLES)}", param=f"messages[{i}].role"
            )
        if not isinstance(m.content, str):
            raise RequestError("message content must be text", param=f"messages[{i}].content")
        _check_text(m.content, f"messages[{i}].content")
        turns.append({"role": "system" if m.role == "developer" else m.role, "content": m.content})
    try:
        ids = tokenizer.encode_chat(turns)
    except ValueError as exc:  # the model's template refused the conversation
        raise RequestError(str(exc), param="messages") from None
    except Exception as exc:  # noqa: BLE001 - a template error is about this input, not the server
        raise RequestError(f"the chat template could not render these messages: {exc}", param="messages") from None
    if not ids:
        raise RequestError("the conversation is empty after tokenization", param="messages")
    return ids


def _check_token_ids(ids: list[int], tokenizer: "Tokenizer") -> list[int]:
    if not ids:
        raise RequestError("the prompt is empty", param="prompt")
    vocab = tokenizer.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
    return ids


def _check_text(text: str, param: str) -> None:
    # JSON's \uD800-style escapes can smuggle lone surrogates into a str; they are not text.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("the text contains invalid Unicode (a lone surrogate)", param=param) from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs")


def _param_of(message: str) -> str | None:
    """The request field a SamplingParams error message is about."""
    first = message.split(" ", 1)[0]
    if first in _PARAMS:
        return first
    return "stop" if "stop" in message else None
