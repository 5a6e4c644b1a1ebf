"""Tokenizer and chat template from the same source as the weights (GGUF or a HF folder).

Byte-level BPE vocabularies from GGUF files are rebuilt with the ``tokenizers`` library; Hugging
Face folders load their ``tokenizer.json``.  :class:`IncrementalDetokenizer` turns a growing list
of token ids into text pieces that never split a UTF-8 character.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# Pre-tokenizer regexes of the BPE families we rebuild from GGUF ("tokenizer.ggml.pre").
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# End-of-turn markers of common chat formats; any present in the vocabulary stops generation.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>")


class Tokenizer:
    def __init__(
        self,
        tok: HFTokenizer,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_id: int,
        add_bos: bool = False,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self._tok = tok
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.stop_token_ids = frozenset({eos_token_id, *extra_stop_ids})
        self._template = None
        self._specials: frozenset[int] | None = None

    # -- basic ----------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, t: str) -> int | None:
        return self._tok.token_to_id(t)

    def token_text(self, i: int) -> str:
        return self._tok.decode([i], skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` stands for; a byte-level piece may be part of a UTF-8 character.

        Example:
            >>> tok.token_bytes(tok.encode(" the")[0])
            b' the'
        """
        piece = self.id_to_token(i)
        if piece is None:
            return b""
        table = _byte_of_char()
        if i in self.special_ids or not all(c in table for c in piece):
            return piece.encode("utf-8")
        return bytes(table[c] for c in piece)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added (special) tokens: chat markers, end of text, ..."""
        if self._specials is None:
            self._specials = frozenset(self._tok.get_added_tokens_decoder())  # {id: AddedToken}
        return self._specials

    def to_json(self) -> str:
        """The whole tokenizer as Hugging Face ``tokenizers`` JSON (grammar engines index the
        vocabulary's bytes from it)."""
        return self._tok.to_str()

    # -- chat -----------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own template (sandboxed Jinja)."""
        if not self.chat_template:
            # No template: plain concatenation of the user turns.
            return "\n".join(m["content"] for m in messages)
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos or "",
            eos_token=self.id_to_token(self.eos_token_id) or "",
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode_rendered(self.apply_chat_template(messages, add_generation_prompt=True))

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of text rendered by the chat template (one BOS, whether or not the template wrote it)."""
        bos_text = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None
        add_bos = self.add_bos and not (bos_text and text.startswith(bos_text))
        return self.encode(text, add_bos=add_bos)

    def user_turn_prefix(self) -> list[int]:
        """Ids of the chat template up to where the user's message starts (the model then writes it)."""
        marker = "\x00user message\x00"
        text = self.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=False)
        if marker not in text:
            raise ValueError("the chat template does not place the user's message verbatim")
        return self.encode_rendered(text[: text.index(marker)])

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> "Tokenizer":
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only)")
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = fields.get("tokenizer.ggml.pre", "gpt2")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "llama3", "qwen2"):
            split = _LLAMA3_SPLIT if pre != "qwen2" else _QWEN2_SPLIT
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        # Control (3) and user-defined (4) tokens are matched whole in text, never split by BPE.
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
        tok.add_special_tokens(special)
        eos = int(fields.get("tokenizer.ggml.eos_token_id", 0))
        bos = fields.get("tokenizer.ggml.bos_token_id")
        stops = [vocab[t] for t in _END_OF_TURN if t in vocab]
        return cls(
            tok,
            chat_template=fields.get("tokenizer.chat_template"),
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_id=eos,
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
            extra_stop_ids=stops,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")

        def tid(name: str) -> int | None:
            v = cfg.get(name)
            if isinstance(v, dict):
                v = v.get("content")
            return tok.token_to_id(v) if isinstance(v, str) else None

        eos = next((e for e in (gen.get("eos_token_id"), model_cfg.get("eos_token_id"), tid("eos_token")) if e is not None), None)
        eos_ids = eos if isinstance(eos, list) else [eos]
        eos_ids = [int(e) for e in eos_ids if e is not None]
        if not eos_ids:
            raise ValueError(f"{path}: no eos token id in its configs")
        bos = tid("bos_token")
        if bos is None:
            bos = model_cfg.get("bos_token_id")
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        stops = [i for t in _END_OF_TURN if (i := tok.token_to_id(t)) is not None]
        # A post-processor in tokenizer.json decides BOS for HF; mirror its template's intent.
        add_bos = bool(cfg.get("add_bos_token", False))
        return cls(tok, template, bos, eos_ids[0], add_bos=add_bos, extra_stop_ids=[*eos_ids[1:], *stops])


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet: the printable character each byte is written as, inverted.

    Bytes that are printable Latin-1 stand for themselves; the others (controls, space, ...) are
    written as the characters from U+0100 on, in byte order (GPT-2's convention).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.exists() else {}


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces without splitting UTF-8 characters.

    Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a
    prefix yields U+FFFD.  We hold text back until the decoded tail no longer ends with it.
    Decoding always restarts a few tokens back (``prefix``) so merges across token boundaries
    (e.g. a leading space) render exactly as a full decode would.

    Example:
        >>> d = IncrementalDetokenizer(tok)
        >>> "".join(d.push(t) for t in ids) + d.flush() == tok.decode(ids)
        True
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window we re-decode
        self.read = 0  # tokens before this index are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prev = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        full = self.tok.decode(self.ids[self.prefix :], self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prev):
            return ""  # incomplete character (or nothing visible yet): wait for more tokens
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(prev) :]

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character at the very end)."""
        prev = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        full = self.tok.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return full[len(prev) :]
