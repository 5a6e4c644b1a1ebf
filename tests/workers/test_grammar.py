"""dspark.workers.grammar on the default model's tokenizer: masks, accept, rollback, random walks."""

from __future__ import annotations

import json
import pickle
import re

import jsonschema
import pytest
import torch

from dspark.kernels.sampling import unpack_bitmask
from dspark.workers.grammar import GrammarCompiler, GrammarError, GrammarSpec

# A nested schema: a string, an integer, an enum, an array of objects, a nested object.  Strings
# and numbers are bounded so that uniform random walks finish within 200 tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"enum": ["active", "inactive", "banned"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]-[0-9]{1,3}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 12},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "status", "items", "address"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "status": "active",
            "items": [{"sku": "A-100", "qty": 2}, {"sku": "B-22", "qty": 12}, {"sku": "C-7", "qty": 1}],
            "address": {"city": "London", "zip": "10001"}}
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
PAD = 64  # logits wider than the tokenizer, as padded embedding tables are


@pytest.fixture(scope="module")
def tok():
    from dspark.models.loader import load_tokenizer

    return load_tokenizer()[0]


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, vocab_size=tok.vocab_size + PAD, stop_token_ids=tok.stop_token_ids)


@pytest.fixture(scope="module")
def stops(tok):
    return sorted(tok.stop_token_ids)


def mask_of(m, compiler) -> torch.Tensor:
    out = torch.empty(compiler.vocab_size, dtype=torch.bool)
    m.fill_mask(out)
    return out


def random_walk(m, compiler, gen: torch.Generator, limit: int = 200) -> tuple[list[int], bool]:
    """Pick uniformly among the allowed ids until a stop token is accepted or ``limit`` tokens."""
    ids: list[int] = []
    while len(ids) < limit:
        allowed = mask_of(m, compiler).nonzero().flatten()
        t = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
        assert m.accept(t), "a token the mask allows must be accepted"
        ids.append(t)
        if t in compiler.stop_token_ids:
            assert m.done
            return ids[:-1], True
    return ids, False


# ------------------------------------------------------------------ walking a valid document


def test_valid_document_is_allowed_token_by_token_then_stop(tok, compiler, stops):
    m = compiler.matcher(GrammarSpec.from_schema(SCHEMA))
    ids = tok.encode(json.dumps(DOCUMENT))
    assert len(ids) > 60
    for t in ids:
        mask = mask_of(m, compiler)
        assert mask[t], f"token {tok.id_to_token(t)!r} of the valid document is not allowed"
        assert not mask[stops].any(), "stop ids are allowed only once the document is complete"
        assert not mask[tok.vocab_size:].any(), "ids past the tokenizer are never allowed"
        assert not m.done
        assert m.accept(t)
    mask = mask_of(m, compiler)
    assert mask[stops].all() and int(mask.sum()) == len(stops)  # nothing may follow "}" but a stop
    assert not m.done
    assert m.accept(stops[-1]) and m.done
    assert not m.accept(tok.encode("x")[0]) and not m.accept(stops[0])  # nothing after a stop
    assert mask_of(m, compiler).nonzero().flatten().tolist() == stops  # never an empty row


def test_refused_token_leaves_the_state_unchanged(tok, compiler, stops):
    m = compiler.matcher(GrammarSpec.from_schema(SCHEMA))
    letter = tok.encode("a")[0]
    before = mask_of(m, compiler)
    assert not before[letter]  # "{" is required first
    assert not m.accept(letter) and not m.accept(stops[0]) and not m.accept(1)  # 1: <|im_start|>
    assert not m.accept(-1) and not m.accept(compiler.vocab_size) and not m.accept(tok.vocab_size + 1)
    assert torch.equal(mask_of(m, compiler), before)
    ids = tok.encode(json.dumps(DOCUMENT))
    k = next(k for k in range(len(ids)) if tok.decode(ids[:k]).endswith('"age":'))  # an integer comes next
    assert all(m.accept(t) for t in ids[:k])
    before = mask_of(m, compiler)
    for bad in (tok.encode("]")[0], letter, tok.encode('"')[0]):
        assert not before[bad] and not m.accept(bad)
        assert torch.equal(mask_of(m, compiler), before)
    assert all(m.accept(t) for t in ids[k:]) and m.accept(stops[0]) and m.done


def test_bitmask_layout_matches_the_bool_mask(tok, compiler):
    m = compiler.matcher(GrammarSpec.from_schema(SCHEMA))
    bits = torch.empty(compiler.words, dtype=torch.int32)
    for t in tok.encode(json.dumps(DOCUMENT))[:20]:
        m.fill_bitmask(bits)
        assert torch.equal(unpack_bitmask(bits[None], compiler.vocab_size)[0], mask_of(m, compiler))
        assert m.accept(torch.tensor(t))  # a tensor element works as a token id too
    strided = torch.zeros(compiler.vocab_size, 2, dtype=torch.bool)[:, 1]  # not contiguous: copied, not viewed
    m.fill_mask(strided)
    assert torch.equal(strided, mask_of(m, compiler))
    with pytest.raises(ValueError, match="bitmask must be"):
        m.fill_bitmask(torch.empty(compiler.words, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask must be"):
        m.fill_mask(torch.empty(tok.vocab_size, dtype=torch.bool))  # the tokenizer's width, not the logits'


def test_json_object_and_lark_grammar(tok, compiler, stops):
    m = compiler.matcher(GrammarSpec("json_object"))
    assert all(m.accept(t) for t in tok.encode('{"x": [1, {"y": null}], "z": "s"}'))
    assert m.accept(stops[0]) and m.done
    m = compiler.matcher(GrammarSpec("json_object"))
    assert not m.accept(tok.encode("[")[0])  # an object, not any JSON value
    m = compiler.matcher(GrammarSpec("grammar", 'start: "yes" | "no"'))
    assert all(m.accept(t) for t in tok.encode("no"))
    assert not m.done  # complete and nothing else may follow, but no stop token yet
    assert mask_of(m, compiler).nonzero().flatten().tolist() == stops
    assert m.accept(stops[0]) and m.done


# ------------------------------------------------------------------ rollback


@pytest.mark.parametrize("k", [1, 7, 40])
def test_rollback_restores_the_initial_mask(tok, compiler, k):
    m = compiler.matcher(GrammarSpec.from_schema(SCHEMA))
    initial = mask_of(m, compiler)
    ids = tok.encode(json.dumps(DOCUMENT))[:k]
    assert all(m.accept(t) for t in ids)
    m.rollback(k)
    assert torch.equal(mask_of(m, compiler), initial)
    with pytest.raises(ValueError, match="cannot roll back 1 tokens: 0 accepted"):
        m.rollback(1)


def test_rollback_is_exact_at_every_position_and_across_the_stop(tok, compiler, stops):
    """Speculative decoding's pattern: accept a block of drafts tentatively, roll back the rejected tail."""
    ids = tok.encode(json.dumps(DOCUMENT))
    reference = compiler.matcher(GrammarSpec.from_schema(SCHEMA))
    masks = []  # masks[p]: the mask after p tokens
    for t in ids:
        masks.append(mask_of(reference, compiler))
        reference.accept(t)
    masks.append(mask_of(reference, compiler))
    m = compiler.matcher(GrammarSpec.from_schema(SCHEMA))
    for p in range(len(ids) - 8):  # p tokens accepted
        assert all(m.accept(t) for t in ids[p : p + 8])  # 8 drafts
        m.rollback(5)  # 3 of them survive verification
        assert torch.equal(mask_of(m, compiler), masks[p + 3])
        m.rollback(3)
        assert m.accept(ids[p])
    assert all(m.accept(t) for t in ids[len(ids) - 8 :])
    assert m.accept(stops[0]) and m.done
    m.rollback(1)  # the stop token alone
    assert not m.done
    assert torch.equal(mask_of(m, compiler), masks[-1])
    assert m.accept(stops[1])
    m.rollback(9)  # the stop and 8 tokens
    assert torch.equal(mask_of(m, compiler), masks[len(ids) - 8])


# ------------------------------------------------------------------ random walks


def test_random_walks_through_the_schema_validate(tok, compiler):
    gen = torch.Generator().manual_seed(0)
    spec = GrammarSpec.from_schema(SCHEMA)
    finished = 0
    for _ in range(20):
        ids, done = random_walk(compiler.matcher(spec), compiler, gen)
        if done:
            finished += 1
            jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)
    assert finished >= 5, f"only {finished} of 20 walks finished within 200 tokens"


def test_random_walks_through_a_date_regex_match(tok, compiler):
    gen = torch.Generator().manual_seed(1)
    spec = GrammarSpec("regex", DATE)
    for _ in range(20):
        ids, done = random_walk(compiler.matcher(spec), compiler, gen)
        assert done
        assert re.fullmatch(DATE, tok.decode(ids)), tok.decode(ids)


# ------------------------------------------------------------------ specs, errors, cache


def test_invalid_and_unsupported_grammars_raise_one_line_errors(compiler):
    cases = [
        (GrammarSpec("json_schema", "{not json"), "response_format.json_schema: the schema is not valid JSON"),
        (GrammarSpec("json_schema", "[1]"), "response_format.json_schema: the schema must be a JSON object"),
        (GrammarSpec("json_schema", '{"type": "strin"}'), "response_format.json_schema: Invalid type: strin"),
        (GrammarSpec.from_schema({"type": "array", "uniqueItems": True}),
         r'response_format.json_schema: Unimplemented keys: \["uniqueItems"\]'),
        (GrammarSpec.from_schema({"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}),
         "Unimplemented keys"),  # a schema cannot switch the refusal off
        (GrammarSpec("regex", "(ab"), "regex: .*unclosed group"),
        (GrammarSpec("regex", "a(?=b)"), "regex: .*look-around"),
        (GrammarSpec("grammar", "start: foo"), 'grammar: .*unknown name: "foo"'),
    ]
    for spec, message in cases:
        with pytest.raises(GrammarError, match=message) as err:
            compiler.compile(spec)
        assert "\n" not in str(err.value)
        assert isinstance(err.value, ValueError)


def test_spec_validation_and_pickling():
    with pytest.raises(ValueError, match="grammar kind 'xml' is not supported"):
        GrammarSpec("xml", "<a/>")
    with pytest.raises(ValueError, match="response_format.json_object"):
        GrammarSpec("json_object", "{}")
    with pytest.raises(ValueError, match="regex: expected a regular expression"):
        GrammarSpec("regex", "")
    spec = GrammarSpec.from_schema(SCHEMA)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert list(json.loads(spec.source)["properties"]) == list(SCHEMA["properties"])  # order kept


def test_compile_is_cached_per_spec_lru(tok, stops):
    compiler = GrammarCompiler(tok, vocab_size=tok.vocab_size, stop_token_ids=stops, cache_size=2)
    a, b, c = GrammarSpec("regex", "a+"), GrammarSpec("regex", "b+"), GrammarSpec("regex", "c+")
    first = compiler.compile(a)
    assert compiler.compile(GrammarSpec("regex", "a+")) is first  # equal specs share one
    assert compiler.matcher(a).compiled is first
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recent
    compiler.compile(c)  # evicts b
    assert compiler.compile(a) is first
    assert compiler.masks == 0
    mask_of(compiler.matcher(a), compiler)
    assert compiler.masks == 1 and compiler.mask_seconds > 0


def test_compiler_refuses_bad_construction(tok):
    with pytest.raises(ValueError, match="below the tokenizer"):
        GrammarCompiler(tok, vocab_size=tok.vocab_size - 1, stop_token_ids=[2])
    with pytest.raises(ValueError, match="stop_token_ids"):
        GrammarCompiler(tok, vocab_size=tok.vocab_size, stop_token_ids=[])
