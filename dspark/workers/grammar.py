"""Structured outputs: which tokens a request's grammar allows next.

A request that constrains its output (OpenAI ``response_format``, or a regex or grammar) carries a
:class:`GrammarSpec`.  The engine turns it into a :class:`GrammarMatcher` through one
:class:`GrammarCompiler` per model, then, at every position it verifies or samples, asks the
matcher for the next-token mask, masks the logits (``kernels.sampling.mask_logits``) and feeds the
chosen token back with :meth:`GrammarMatcher.accept`.  Speculative decoding accepts a block of
drafts tentatively and calls :meth:`GrammarMatcher.rollback` for the rejected tail.

The grammar engine is llguidance (imported on first use, so the package imports without it);
docs/STRUCTURED_OUTPUTS.md has the measurements behind that choice.  Vocabulary:

  * *spec*: what the request asks for (:class:`GrammarSpec`, plain data, picklable);
  * *compiled grammar*: the engine's parser for one spec and one tokenizer, shared by every
    request with that spec (LRU cache in the compiler);
  * *matcher*: one request's position in its grammar.

Stop tokens (the model's end-of-turn ids) are handled here rather than by the engine's parser: a
mask allows them exactly when the output so far is a complete match, and accepting one ends the
matcher (:attr:`GrammarMatcher.done`) without touching the parser, so rolling it back is exact.

Example (the default tokenizer, whose stop ids are 0 and 2):
    >>> compiler = GrammarCompiler(tok, vocab_size=49152, stop_token_ids=tok.stop_token_ids)
    >>> m = compiler.matcher(GrammarSpec("regex", r"[0-9]{2}"))
    >>> allowed = torch.empty(49152, dtype=torch.bool)
    >>> all(m.accept(t) for t in tok.encode("42"))
    True
    >>> m.fill_mask(allowed); allowed.nonzero().flatten().tolist()  # complete: only stop ids
    [0, 2]
    >>> m.accept(2), m.done
    (True, True)
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import torch

if TYPE_CHECKING:
    from dspark.models.tokenizer import Tokenizer

__all__ = ["KINDS", "JSON_OPTIONS", "GrammarSpec", "GrammarError", "GrammarCompiler", "CompiledGrammar",
           "GrammarMatcher"]

# kind -> what the source is, for error messages and docs.
KINDS = {
    "json_object": "nothing (any JSON object)",
    "json_schema": "a JSON schema, as JSON text",
    "regex": "a regular expression the whole output must match (Rust regex syntax: no look-around or backreferences)",
    "grammar": "a context-free grammar in llguidance's Lark syntax (rule `start` is the output)",
}
# JSON output options, as overrides (a schema's "x-guidance" cannot change them).  Whitespace: an
# optional newline then up to 40 spaces or tabs between tokens, so compact, json.dumps and
# pretty-printed output (20 levels of two-space indent) all fit, while a model cannot spend its
# whole budget in whitespace (with the engine's unbounded default, 20 of 20 uniform random walks
# over the test schema were still in whitespace after 200 tokens).  Not lenient: a keyword the
# engine does not implement is an error, never silently ignored.
JSON_OPTIONS = MappingProxyType({"whitespace_pattern": r"\n?[ \t]{0,40}", "lenient": False})
# kind -> the request field it comes from, so an error names what the client sent.
_FIELD = {"json_object": "response_format.json_object", "json_schema": "response_format.json_schema",
          "regex": "regex", "grammar": "grammar"}


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to.

    kind: one of :data:`KINDS`.  source: "" for ``json_object``; the JSON schema as JSON text (use
    :meth:`from_schema`); the regex; the Lark grammar text.  Equal specs share one compiled grammar.

    Property order in a schema is significant: the output lists an object's properties in the order
    the schema declares them (as OpenAI's structured outputs do), so a schema must not be
    re-serialised with sorted keys.

    Example:
        >>> GrammarSpec.from_schema({"type": "object", "properties": {"b": {}, "a": {}}}).source
        '{"type":"object","properties":{"b":{},"a":{}}}'
    """

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind {self.kind!r} is not supported (one of {', '.join(KINDS)})")
        if not isinstance(self.source, str):
            raise ValueError(f"{_FIELD[self.kind]}: the source must be a string, not {type(self.source).__name__}")
        if (self.kind == "json_object") != (self.source == ""):
            raise ValueError(f"{_FIELD[self.kind]}: expected {KINDS[self.kind]}")

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any]) -> "GrammarSpec":
        """A ``json_schema`` spec from a parsed schema; keys keep their order (see above)."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))


class GrammarError(ValueError):
    """A grammar the engine cannot compile or does not support; the message names the request field.

    e.g. ``response_format.json_schema: Unimplemented keys: ["uniqueItems"]``.
    """


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency of the package; only a broken install lands here
        raise ImportError("structured outputs need the llguidance package (pip install llguidance)") from e
    return llguidance


_CARETS = re.compile(r"^[\s^]*$")  # a line that only points at a column
_GRAMMAR_POSITION = re.compile(r"^at \d+\(\d+\): ")  # "at 1(8): ": line and column in the grammar text
_ECHO = re.compile(r"^\s*\d+\s*\|")  # "   1 | start: /(ab/": the engine's own grammar text, not the client's


def _one_line(message: str) -> str:
    """The engine's multi-line, caret-annotated error message as one line.

    Example:
        >>> _one_line('invalid regex "(ab":\\n    (ab\\n    ^\\nerror: unclosed group\\n   1 | start: /(ab/\\n')
        'invalid regex "(ab": (ab error: unclosed group'
    """
    kept = [ln.strip() for ln in message.splitlines() if not _CARETS.match(ln) and not _ECHO.match(ln)]
    return " ".join(kept) or "invalid grammar"


class CompiledGrammar:
    """One spec compiled for one tokenizer; immutable once built and shared by matchers.

    It holds a parser at the start of the grammar that no request advances: each matcher starts
    from a copy, which shares the lexer's lazily built automaton with it.
    """

    def __init__(self, spec: GrammarSpec, start: Any) -> None:
        self.spec = spec
        self._start = start  # llguidance.LLMatcher, never advanced

    def new_parser(self) -> Any:
        """A parser at the start of the grammar, for one request."""
        return self._start.deep_copy()


class GrammarCompiler:
    """Compiles specs for one model (tokenizer + logits width) and makes matchers.

    tokenizer: the model's tokenizer.  vocab_size: the model's logits width V (>= the tokenizer's
    size; ids past the tokenizer are never allowed).  stop_token_ids: the model's end-of-turn ids,
    allowed exactly when the output so far completes the grammar.  cache_size: compiled grammars
    kept (LRU).  ``mask_seconds`` / ``masks``: time spent in, and number of, mask computations
    (for /metrics; one engine thread calls them, plain attribute updates suffice).
    """

    def __init__(
        self, tokenizer: "Tokenizer", vocab_size: int, stop_token_ids: Iterable[int], cache_size: int = 64
    ) -> None:
        if sys.byteorder != "little":  # masks are unpacked as little-endian bytes of int32 words
            raise RuntimeError(f"grammar masks need a little-endian host, not {sys.byteorder}")
        stops = tuple(sorted({int(i) for i in stop_token_ids}))
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {tokenizer.vocab_size} ids")
        if not stops or not all(0 <= i < tokenizer.vocab_size for i in stops):
            raise ValueError(f"stop_token_ids {list(stops)} must be non-empty ids of the tokenizer")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.stop_token_ids = stops
        self.words = (vocab_size + 31) // 32  # int32 words of one bitmask row
        # The engine's index of every token's bytes (about 0.25 s for 49k ids, once per model).
        self._tokenizer = llg.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=list(stops))
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self.cache_size = cache_size
        self.mask_seconds = 0.0
        self.masks = 0

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec`` (cached); raises :class:`GrammarError` if it is invalid
        or uses something the engine does not support."""
        hit = self._cache.get(spec)
        if hit is not None:
            self._cache.move_to_end(spec)
            return hit
        llg = _llguidance()
        try:
            text = self._grammar_text(spec)
        except GrammarError:
            raise
        except ValueError as e:  # the front ends refuse some sources outright
            raise GrammarError(f"{_FIELD[spec.kind]}: {_one_line(str(e))}") from None
        start = llg.LLMatcher(self._tokenizer, text, log_level=0)
        if start.is_error():  # the constructor reports grammar errors as an error state, never raises
            message = _one_line(start.get_error())
            if spec.kind == "regex":  # the position is in the one-rule grammar wrapped around the regex
                message = _GRAMMAR_POSITION.sub("", message)
            raise GrammarError(f"{_FIELD[spec.kind]}: {message}")
        compiled = CompiledGrammar(spec, start)
        self._cache[spec] = compiled
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec) -> "GrammarMatcher":
        """A new matcher at the start of ``spec``'s grammar (compiled once, then cached)."""
        return GrammarMatcher(self, self.compile(spec))

    @staticmethod
    def _grammar_text(spec: GrammarSpec) -> str:
        """llguidance's grammar text for a spec (its JSON / regex / Lark front ends)."""
        llg = _llguidance()
        field = _FIELD[spec.kind]
        if spec.kind == "json_object":
            # OpenAI's JSON mode: any object (llguidance allows properties not in a schema by default).
            return llg.LLMatcher.grammar_from_json_schema('{"type":"object"}', overrides=dict(JSON_OPTIONS))
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "grammar":
            return llg.LLMatcher.grammar_from_lark(spec.source)
        try:
            schema = json.loads(spec.source)
        except json.JSONDecodeError as e:
            raise GrammarError(f"{field}: the schema is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"{field}: the schema must be a JSON object, not {type(schema).__name__}")
        return llg.LLMatcher.grammar_from_json_schema(spec.source, overrides=dict(JSON_OPTIONS))


class GrammarMatcher:
    """One request's grammar state: the next-token mask, and tokens accepted or rolled back.

    Masks come in two layouts: :meth:`fill_mask`, one bool per token, and :meth:`fill_bitmask`,
    32 tokens per int32 word (``kernels.sampling.unpack_bitmask`` expands it, e.g. on the device
    after copying the words).  Both count towards the compiler's ``mask_seconds`` / ``masks``.
    """

    def __init__(self, compiler: GrammarCompiler, compiled: CompiledGrammar) -> None:
        self.compiler = compiler
        self.compiled = compiled
        self._parser = compiled.new_parser()
        self._stopped = False  # a stop token was accepted: nothing more may follow
        self._accepted = 0  # tokens accepted and not rolled back, the stop token included
        self._bits = torch.empty(compiler.words, dtype=torch.int32)  # [W] scratch row for fill_mask
        self._words = self._bits.numpy().view(np.uint32)  # [W], the same memory
        self._bits_u8 = self._words.view(np.uint8)  # [4W], the same memory
        # Stop ids as (word, bits) pairs, one per word: ids 0 and 2 share word 0, and a fancy-indexed
        # "|=" with a repeated index would keep only one of them.
        by_word: dict[int, int] = {}
        for i in compiler.stop_token_ids:
            by_word[i // 32] = by_word.get(i // 32, 0) | (1 << (i % 32))
        self._stop_words = np.array(list(by_word), dtype=np.int64)  # [S'] word indices
        self._stop_bits = np.array(list(by_word.values()), dtype=np.uint32)  # [S'] bits set in each

    @property
    def done(self) -> bool:
        """A stop token was accepted: the output is finished and nothing more may be accepted.

        A grammar that is complete with nothing more allowed (a closed JSON object, a fixed-length
        regex) is not done yet: its mask allows only the stop ids, so the request ends by
        sampling one, through the engine's usual stop handling.
        """
        return self._stopped

    def fill_mask(self, out: torch.Tensor) -> None:
        """Write the next-token mask into ``out``: [V] bool, True = allowed.

        Stop ids are allowed exactly when the output so far completes the grammar; after a stop
        token only the stop ids are (a row is never empty).  ``out`` may live on any device.
        """
        if out.dtype != torch.bool or tuple(out.shape) != (self.compiler.vocab_size,):
            raise ValueError(f"mask must be [{self.compiler.vocab_size}] bool, got {list(out.shape)} {out.dtype}")
        t0 = time.perf_counter()
        self._fill(self._bits, self._words)
        # numpy unpacks a row in about 5 us on one core, 4x faster than torch shifts on the CPU;
        # assigning through numpy skips torch's copy dispatch (which doubled the cold-cache cost).
        unpacked = np.unpackbits(self._bits_u8, bitorder="little", count=self.compiler.vocab_size).view(np.bool_)
        if out.device.type == "cpu" and out.is_contiguous():
            out.numpy()[:] = unpacked
        else:
            out.copy_(torch.from_numpy(unpacked))
        self._count(t0)

    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the next-token mask as bits: ``out`` is a contiguous CPU [W] int32 row
        (W = ``compiler.words``), token t at bit t % 32 of word t // 32; same rules as fill_mask."""
        if out.dtype != torch.int32 or tuple(out.shape) != (self.compiler.words,) or out.device.type != "cpu" \
                or not out.is_contiguous():
            raise ValueError(f"bitmask must be a contiguous CPU [{self.compiler.words}] int32 row")
        t0 = time.perf_counter()
        self._fill(out, out.numpy().view(np.uint32))
        self._count(t0)

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False, with the state unchanged, if the mask would not allow it."""
        token_id = int(token_id)  # numpy / torch integers too: the parser takes Python ints
        if self._stopped or not 0 <= token_id < self.compiler.vocab_size:
            return False
        if token_id in self.compiler.stop_token_ids:
            if not self._parser.is_accepting():
                return False
            self._stopped = True  # kept out of the parser: its handling of end tokens is not a history step
        elif self._parser.try_consume_tokens([token_id]) != 1:  # unlike consume_token, a refusal leaves no error state
            return False
        self._accepted += 1
        return True

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens (a stop token counts as one)."""
        if not 0 <= n <= self._accepted:
            raise ValueError(f"cannot roll back {n} tokens: {self._accepted} accepted")
        self._accepted -= n
        if n and self._stopped:
            self._stopped = False
            n -= 1
        if n and not self._parser.rollback(n):
            raise GrammarError(f"{_FIELD[self.compiled.spec.kind]}: rollback failed: {self._parser.get_error()}")

    # -- internals ------------------------------------------------------------------------------
    def _fill(self, bits: torch.Tensor, words: np.ndarray) -> None:
        """The engine's bitmask into the [W] int32 CPU row ``bits`` (``words``: the same memory as
        uint32), with the stop-id rule applied."""
        if self._stopped:
            bits.zero_()
            can_end = True
        else:
            self._parser.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
            if self._parser.is_error():  # e.g. a parser resource limit hit while computing the mask
                raise GrammarError(f"{_FIELD[self.compiled.spec.kind]}: {_one_line(self._parser.get_error())}")
            can_end = self._parser.is_accepting()
        if can_end:
            words[self._stop_words] |= self._stop_bits
        else:
            words[self._stop_words] &= ~self._stop_bits

    def _count(self, t0: float) -> None:
        self.compiler.mask_seconds += time.perf_counter() - t0
        self.compiler.masks += 1
