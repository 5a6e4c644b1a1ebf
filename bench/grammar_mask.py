"""`dspark bench grammar`: the cost of grammar-constrained decoding per token, xgrammar vs llguidance.

Both engines run on the default model's tokenizer (SmolLM2-135M-Instruct, 49,152 ids) over three
grammars: a nested JSON schema, ``json_object`` (any JSON object) and a regex (ISO dates).  For
each, the same valid output of 100+ tokens (the tokenizer's own encoding) is walked token by
token, a fresh matcher per repeat, the engines interleaved so host drift hits both alike:

  * compile: a fresh compile of the grammar (no cache), median over repeats, and the first mask
    of a fresh compile (llguidance builds its lexer lazily, so its compile alone flatters it);
  * mask: time to fill the next-token bitmask at every position of the walk, mean and p99 over
    all repeats (the first repeat, which builds lazily built tables, included); back to back
    (hot caches), and "cold": with a 64 MB write before each mask, as a model step between two
    masks evicts the core's caches;
  * accept: one token, as the engine integration calls it;
  * rollback: undo the last 1 or 8 tokens at every position of a walk (then re-accept them);
  * leaks: positions where a special token that is not a stop token (``<|im_start|>``...) was
    allowed: it decodes to nothing, so the client would get text the grammar never saw.

Then the cost of turning one bitmask row into bools (numpy, what ``GrammarMatcher.fill_mask``
does, vs torch shifts), the shipped ``dspark.workers.grammar`` matcher end to end, and which JSON
schema keywords each engine enforces, ignores, or refuses.

    .venv/bin/python bench/grammar_mask.py          # or: dspark bench grammar
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click

from bench.common import table, write_json

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "status": {"enum": ["active", "inactive", "banned"]},
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}},
        "address": {"type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "status", "items", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace", "age": 36, "status": "active",
    "items": [{"sku": "A-100", "qty": 2, "price": 9.99}, {"sku": "B-220", "qty": 1, "price": 120.5},
              {"sku": "C-7", "qty": 12, "price": 0.25}, {"sku": "D-42", "qty": 3, "price": 14.0}],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
}
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
DATES_REGEX = DATE + r"(, " + DATE + r")*"
DATES_TEXT = ", ".join(f"20{y:02d}-{m:02d}-{d:02d}" for y, m, d in
                       [(24, 1, 15), (23, 12, 31), (19, 7, 4), (21, 2, 28), (20, 10, 9), (22, 6, 30),
                        (18, 3, 1), (25, 11, 11), (17, 5, 19), (16, 8, 22)])
# (kind, source, valid output)
GRAMMARS = {
    "json_schema": ("json_schema", json.dumps(SCHEMA), json.dumps(DOCUMENT)),
    "json_object": ("json_object", "", json.dumps(DOCUMENT)),
    "regex": ("regex", DATES_REGEX, DATES_TEXT),
}

# keyword -> (schema, a valid instance, an invalid one): what each engine does with it.
FEATURES = {
    "pattern": ({"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}, '"abc-12"', '"abc-1x"'),
    "minLength/maxLength": ({"type": "string", "minLength": 3, "maxLength": 5}, '"abcd"', '"ab"'),
    "enum": ({"enum": ["red", "green", 3]}, '"green"', '"blue"'),
    "const": ({"const": "x"}, '"x"', '"y"'),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, '"a"', "true"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"a"'),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
              '{"a": 1, "b": 2}', '{"a": 1}'),
    "$ref/$defs": ({"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/p"}},
                    "required": ["x"]}, '{"x": 3}', '{"x": "3"}'),
    "recursive $ref": ({"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                                        "required": ["c"]}}, "$ref": "#/$defs/n"}, '{"c": [{"c": []}]}', '{"c": [{}]}'),
    "additionalProperties: false": ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
                                    '{"a": 1}', '{"a": 1, "b": 2}'),
    "additionalProperties: schema": ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"q": 1}', '{"q": "s"}'),
    "additionalProperties unset (= true)": ({"type": "object", "properties": {"a": {"type": "integer"}}},
                                            '{"a": 1, "b": 2}', '{"a": "x"}'),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"]},
                 '{"a": 1}', '{"b": 1}'),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, "[1, 2]", "[1]"),
    "minimum/maximum": ({"type": "integer", "minimum": 10, "maximum": 20}, "15", "25"),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, "0.5", "0"),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "15", "7"),
    "type: [a, b]": ({"type": ["integer", "null"]}, "null", '"a"'),
    "format: date-time": ({"type": "string", "format": "date-time"}, '"2024-01-02T03:04:05Z"', '"yesterday"'),
    "format: email": ({"type": "string", "format": "email"}, '"a@b.com"', '"nope"'),
    "format: uuid": ({"type": "string", "format": "uuid"}, '"123e4567-e89b-12d3-a456-426614174000"', '"x"'),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    '[1, "a"]', '["a", 1]'),
    "patternProperties": ({"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False},
                          '{"x_a": 1}', '{"y": 1}'),
    "minProperties": ({"type": "object", "minProperties": 1}, '{"a": 1}', "{}"),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 2]", "[1, 1]"),
    "contains": ({"type": "array", "contains": {"type": "integer"}}, '[1, "a"]', '["a"]'),
    "not": ({"not": {"type": "string"}}, "1", '"a"'),
    "if/then": ({"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
                '{"a": 2}', '{"a": 1}'),
    "dependentRequired": ({"type": "object", "dependentRequired": {"a": ["b"]}}, '{"b": 1}', '{"a": 1}'),
    "external $ref": ({"$ref": "https://example.com/s.json"}, "1", '"a"'),
}


class Xgrammar:
    """xgrammar 0.2 as an integration would use it: TokenizerInfo from the byte-level vocabulary."""

    name = "xgrammar"

    def __init__(self, tok, vocab_size: int, stops: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=stops)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)  # 2 = this host's cores

    def compile(self, kind: str, source: str):
        if kind == "json_schema":
            return self.compiler.compile_json_schema(source)  # defaults: any whitespace, strict mode
        if kind == "json_object":
            return self.compiler.compile_json_schema('{"type":"object"}', strict_mode=False)
        return self.compiler.compile_regex(source)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bits) -> None:  # bits: [1, W] int32
        m.fill_next_token_bitmask(bits)

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def rollback(self, m, n: int) -> None:
        m.rollback(n)

    def can_end(self, m) -> bool:
        return m.is_completed()


class Llguidance:
    """llguidance 1.x as dspark.workers.grammar uses it (same JSON options, copy of a start parser)."""

    name = "llguidance"

    def __init__(self, tok, vocab_size: int, stops: list[int]) -> None:
        import llguidance as llg

        from dspark.workers.grammar import JSON_OPTIONS

        self.llg, self.options = llg, dict(JSON_OPTIONS)
        self.tokenizer = llg.LLTokenizer(tok.to_json(), n_vocab=vocab_size, eos_token=stops)

    def compile(self, kind: str, source: str):
        M = self.llg.LLMatcher
        text = {"json_schema": lambda: M.grammar_from_json_schema(source, overrides=self.options),
                "json_object": lambda: M.grammar_from_json_schema('{"type":"object"}', overrides=self.options),
                "regex": lambda: M.grammar_from_regex(source)}[kind]()
        start = M(self.tokenizer, text, log_level=0)
        if start.is_error():
            raise ValueError(start.get_error())
        return start

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, bits) -> None:
        m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)

    def accept(self, m, t: int) -> bool:
        return m.try_consume_tokens([t]) == 1

    def rollback(self, m, n: int) -> None:
        m.rollback(n)

    def can_end(self, m) -> bool:
        return m.is_accepting()


def _us(xs: list[float]) -> tuple[float, float]:
    """(mean, p99) in microseconds."""
    xs = sorted(xs)
    return 1e6 * statistics.fmean(xs), 1e6 * xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


def _bit(bits, i: int) -> bool:
    return bool((int(bits[0, i // 32]) >> (i % 32)) & 1)


class Evict:
    """Write 64 MB before a mask, untimed: the engine fills masks between model steps that stream
    hundreds of MB of weights, so the grammar's tables are no longer in the core's 2 MB L2."""

    def __init__(self) -> None:
        import torch

        self.buf = torch.zeros(16 << 20)  # 64 MB of float32

    def __call__(self) -> None:
        self.buf.add_(1.0)


def walk(engine, compiled, ids: list[int], stops: list[int], specials: list[int], bits, evict=None) -> dict:
    """Walk ``ids`` with a fresh matcher: per-position mask and accept times, leaks, end check.
    ``evict``: called before each mask (caches cold, as after a model step)."""
    m = engine.matcher(compiled)
    masks, accepts, leaks = [], [], 0
    for t in ids:
        if evict is not None:
            evict()
        t0 = time.perf_counter()
        engine.fill(m, bits)
        masks.append(time.perf_counter() - t0)
        if not _bit(bits, t):
            raise RuntimeError(f"{engine.name}: a token of the valid output is not allowed")
        leaks += any(_bit(bits, s) for s in specials)
        t0 = time.perf_counter()
        ok = engine.accept(m, t)
        accepts.append(time.perf_counter() - t0)
        assert ok
    if evict is not None:
        evict()
    t0 = time.perf_counter()
    engine.fill(m, bits)
    masks.append(time.perf_counter() - t0)
    if not all(_bit(bits, s) for s in stops):
        raise RuntimeError(f"{engine.name}: the stop tokens are not allowed at the end of a valid output")
    return {"masks": masks, "accepts": accepts, "leaks": leaks, "matcher": m}


def rollbacks(engine, m, ids: list[int], k: int) -> list[float]:
    """At every position p >= k of a finished walk, from the end back: undo k tokens, time it, redo them."""
    out = []
    for p in range(len(ids), k - 1, -1):  # p tokens accepted
        t0 = time.perf_counter()
        engine.rollback(m, k)
        out.append(time.perf_counter() - t0)
        for t in ids[p - k : p]:
            assert engine.accept(m, t)
        engine.rollback(m, 1)  # one position back for the next round
    for t in ids[k - 1 :]:  # leave the walk finished, as it came
        assert engine.accept(m, t)
    return out


def unpack_costs(vocab_size: int, n: int = 2000) -> dict:
    """Microseconds to expand bitmask rows into bools: numpy per row vs torch shifts (1 and 8 rows)."""
    import numpy as np
    import torch

    from dspark.kernels.sampling import unpack_bitmask

    words = (vocab_size + 31) // 32
    bits = torch.randint(-2**31, 2**31 - 1, (8, words), dtype=torch.int32)
    out = torch.empty(vocab_size, dtype=torch.bool)
    row_u8 = bits[0].numpy().view(np.uint8)

    def numpy_row():
        out.copy_(torch.from_numpy(np.unpackbits(row_u8, bitorder="little", count=vocab_size).view(np.bool_)))

    cases = {"numpy_row_us": numpy_row, "torch_row_us": lambda: unpack_bitmask(bits[:1], vocab_size),
             "torch_8rows_us": lambda: unpack_bitmask(bits, vocab_size)}
    res = {}
    for name, f in cases.items():
        for _ in range(50):
            f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        res[name] = 1e6 * (time.perf_counter() - t0) / n
    return res


def ours(tok, vocab_size: int, stops: list[int], repeats: int) -> list[dict]:
    """dspark.workers.grammar end to end: fill_mask (bitmask + stop rule + bools), accept, rollback."""
    import torch

    from dspark.workers.grammar import GrammarCompiler, GrammarSpec

    compiler = GrammarCompiler(tok, vocab_size, stops)
    out = torch.empty(vocab_size, dtype=torch.bool)
    evict = Evict()
    rows = []
    for gname, (kind, source, text) in GRAMMARS.items():
        ids = tok.encode(text)
        masks, accepts, rb8, cold = [], [], [], []
        for _ in range(repeats):
            m = compiler.matcher(GrammarSpec(kind, source))
            for t in ids:
                evict()
                t0 = time.perf_counter()
                m.fill_mask(out)
                cold.append(time.perf_counter() - t0)
                assert m.accept(t)
            m = compiler.matcher(GrammarSpec(kind, source))
            for t in ids:
                t0 = time.perf_counter()
                m.fill_mask(out)
                masks.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert m.accept(t)
                accepts.append(time.perf_counter() - t0)
            for p in range(len(ids), 7, -1):
                t0 = time.perf_counter()
                m.rollback(8)
                rb8.append(time.perf_counter() - t0)
                assert all(m.accept(t) for t in ids[p - 8 : p])
                m.rollback(1)
        (mm, mp), (am, _), (rm, _) = _us(masks), _us(accepts), _us(rb8)
        rows.append({"engine": "dspark fill_mask", "grammar": gname, "tokens": len(ids), "mask_mean_us": mm,
                     "mask_p99_us": mp, "cold_mean_us": _us(cold)[0], "cold_p99_us": _us(cold)[1],
                     "accept_us": am, "rollback8_us": rm})
    return rows


def features(engines, tok) -> list[dict]:
    """What each engine does with each JSON schema keyword: enforced, ignored, rejects valid, error."""
    rows = []
    for key, (schema, good, bad) in FEATURES.items():
        row = {"keyword": key}
        for e in engines:
            try:
                compiled = e.compile("json_schema", json.dumps(schema))
            except Exception as exc:
                row[e.name] = "error: " + " ".join(str(exc).split())[:60]
                continue

            def fits(text: str) -> bool:
                m = e.matcher(compiled)
                return all(e.accept(m, t) for t in tok.encode(text)) and e.can_end(m)

            g, b = fits(good), fits(bad)
            row[e.name] = "enforced" if g and not b else "ignored" if g else "rejects valid"
        rows.append(row)
    return rows


@click.command()
@click.option("--repeats", type=int, default=5, show_default=True, help="walks per engine and grammar")
@click.option("--engines", default="xgrammar,llguidance", show_default=True,
              help="comma-separated; xgrammar is not a dependency of dspark (pip install xgrammar)")
@click.option("--json", "json_path", default=None, help="where to write the results")
def main(repeats, engines, json_path):
    """Grammar engines on the default tokenizer: compile, per-token mask, accept, rollback costs."""
    import torch

    from dspark.models.loader import load_tokenizer

    torch.set_num_threads(1)  # the engine thread computes masks on one core
    tok, _, _ = load_tokenizer()
    vocab_size, stops = tok.vocab_size, sorted(tok.stop_token_ids)
    specials = [i for i in range(vocab_size) if i not in stops and tok.token_text(i) and not tok.decode([i])]
    kinds = {e.name: e for e in (Xgrammar, Llguidance)}
    names = [n.strip() for n in engines.split(",") if n.strip()]
    if not names or set(names) - set(kinds):
        raise click.UsageError(f"--engines: choose among {', '.join(kinds)}, got {engines!r}")
    engines, setup = [], {}
    for n in names:
        t0 = time.perf_counter()
        try:
            engines.append(kinds[n](tok, vocab_size, stops))
        except ImportError as e:
            raise click.UsageError(f"{n} is not installed ({e}); pip install {n}, or leave it out of --engines")
        setup[n] = time.perf_counter() - t0  # the tokenizer's index, once per model
    bits = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    evict = Evict()
    rows = []
    for gname, (kind, source, text) in GRAMMARS.items():
        ids = tok.encode(text)
        acc = {e.name: {"compile": [], "first": [], "masks": [], "cold": [], "accepts": [], "rb1": [], "rb8": [],
                        "leaks": 0}
               for e in engines}
        for r in range(repeats):
            for e in engines:  # interleaved: drift of the shared host hits both
                a = acc[e.name]
                t0 = time.perf_counter()
                compiled = e.compile(kind, source)
                a["compile"].append(time.perf_counter() - t0)
                e.fill(e.matcher(compiled), bits)
                a["first"].append(time.perf_counter() - t0)
                w = walk(e, compiled, ids, stops, specials, bits)
                a["masks"] += w["masks"]
                a["accepts"] += w["accepts"]
                a["leaks"] += w["leaks"]
                a["rb1"] += rollbacks(e, w["matcher"], ids, 1)
                a["rb8"] += rollbacks(e, w["matcher"], ids, 8)
                a["cold"] += walk(e, compiled, ids, stops, specials, bits, evict)["masks"]
        for e in engines:
            a = acc[e.name]
            (mm, mp), (am, _) = _us(a["masks"]), _us(a["accepts"])
            rows.append({"engine": e.name, "grammar": gname, "tokens": len(ids),
                         "compile_ms": 1e3 * statistics.median(a["compile"]),
                         "first_mask_ms": 1e3 * statistics.median(a["first"]),
                         "mask_mean_us": mm, "mask_p99_us": mp, "cold_mean_us": _us(a["cold"])[0],
                         "cold_p99_us": _us(a["cold"])[1], "accept_us": am,
                         "rollback1_us": _us(a["rb1"])[0], "rollback8_us": _us(a["rb8"])[0],
                         "special_leaks": a["leaks"] / repeats})
        click.echo(table(rows[-len(engines):], list(rows[-1])), err=True)
    click.echo(table(rows, list(rows[0])))
    wrapped = ours(tok, vocab_size, stops, repeats)
    click.echo("\n" + table(wrapped, list(wrapped[0])))
    unpack = unpack_costs(vocab_size)
    click.echo("\nbitmask -> bool, one 49,152-id row: " + ", ".join(f"{k} {v:.1f}" for k, v in unpack.items()))
    feats = features(engines, tok)
    click.echo("\n" + table(feats, list(feats[0])))
    click.echo("\ntokenizer setup s: " + ", ".join(f"{k} {v:.2f}" for k, v in setup.items()))
    out = write_json(json_path, "grammar_mask.json", {"repeats": repeats, "rows": rows, "dspark": wrapped,
                                                     "unpack": unpack, "features": feats, "setup_s": setup})
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
