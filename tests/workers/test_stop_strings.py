"""Stop conditions under speculative decoding end a block exactly where plain decoding ends.

The real default model (fp32, greedy) drafts through a scripted drafter that proposes the
target's own greedy continuation, so every block is accepted whole (or rejected at a chosen
position) and the test decides which block position completes a stop string.  Speculative
and plain decoding must agree on text, output ids, finish reason and the output token count.
"""

from __future__ import annotations

import dataclasses

import pytest

from dspark.models.tokenizer import IncrementalDetokenizer
from dspark.workers.drafters.base import DraftBlock, StatelessDrafter
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.request import RequestOutput, SamplingParams, Sequence
from dspark.workers.runner import LocalRunner, RunnerConfig

PROMPT = "Describe a sunrise over the sea in two sentences."
BLOCK = 4
MAX_TOKENS = 32


class ScriptedDrafter(StatelessDrafter):
    """Proposes the next ``block_len`` tokens of a fixed script.

    With the target's greedy output as the script every draft is accepted and each step emits
    block_len + 1 tokens (the last is the bonus); ``wrong_at`` corrupts that block position, so
    verification stops there and the target's token comes out as the recovered token.
    """

    name = "scripted"

    def __init__(self, script: list[int], vocab_size: int, wrong_at: int | None = None) -> None:
        self.script = script
        self.vocab_size = vocab_size
        self.wrong_at = wrong_at

    def propose(self, seqs: list[Sequence], block_len: int) -> list[DraftBlock]:
        blocks = []
        for seq in seqs:
            n = len(seq.output_ids)  # script[n - 1] is the anchor
            ids = list(self.script[n : n + block_len])
            if self.wrong_at is not None and self.wrong_at < len(ids):
                ids[self.wrong_at] = (ids[self.wrong_at] + 1) % self.vocab_size
            blocks.append(DraftBlock(token_ids=ids))
        return blocks


@pytest.fixture(scope="module")
def prompt_ids(model_fp32):
    return model_fp32.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])


@pytest.fixture(scope="module")
def runner(model_fp32):
    return LocalRunner(model_fp32.model, RunnerConfig(n_slots=2, max_seq=256))


@pytest.fixture(scope="module")
def script(model_fp32, runner, prompt_ids):
    """The target's greedy output (no stop strings) and each token's text piece."""
    tok = model_fp32.tokenizer
    seq = Engine(runner, tok, EngineConfig(max_batch=1)).generate([prompt_ids], SamplingParams(max_tokens=MAX_TOKENS))[0]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in seq.output_ids]
    assert seq.finish_reason == "length" and all(pieces), pieces
    return seq.output_ids, pieces


def run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[Sequence, list[RequestOutput]]:
    seq = engine.add_request(prompt, params)
    outs: list[RequestOutput] = []
    engine.run_until_done(outs.append)
    return seq, outs


def assert_same_as_plain(engine: Engine, prompt: list[int], params: SamplingParams) -> Sequence:
    """Run ``params`` plain and speculative on ``engine``; every observable must agree."""
    plain, plain_outs = run(engine, prompt, dataclasses.replace(params, speculative=False))
    spec, spec_outs = run(engine, prompt, params)
    assert spec.metrics.num_accepted_tokens > 0 and plain.metrics.num_drafts == 0
    for seq, outs in ((plain, plain_outs), (spec, spec_outs)):
        # What a client streams adds up to the final state (nothing of a stop string went out).
        assert "".join(o.text_delta for o in outs) == seq.text
        assert [t for o in outs for t in o.new_token_ids] == seq.output_ids
        assert outs[-1].finished and outs[-1].num_output_tokens == len(seq.output_ids)
    assert spec.text == plain.text
    assert spec.output_ids == plain.output_ids
    assert spec.finish_reason == plain.finish_reason
    assert spec_outs[-1].num_output_tokens == plain_outs[-1].num_output_tokens
    return plain


# Block layout with BLOCK = 4.  The prefill step emits output token 0.  All drafts accepted:
# steps emit tokens 1-5, 6-10, 11-15 (the bonus tokens are 5, 10, 15).  wrong_at=3: steps emit
# 1-4, 5-8, ... (4 and 8 are recovered tokens).  Each case: (wrong_at, stops from the token
# pieces p, index of the output token that completes the earliest stop string).
CASES = {
    # Stop "bc" in a block that reads "abcd": completed inside an accepted block.
    "spans_two_tokens_inside_block": (None, lambda p: (p[1][-2:] + p[2][:2],), 2),
    # Its first part was held back at the end of the previous block.
    "held_across_blocks": (None, lambda p: (p[5] + p[6],), 6),
    # The earliest *completion* wins, not the earliest start: the long one starts first.
    "several_earliest_completion_wins": (None, lambda p: ("".join(p[6:10]), p[7][-3:] + p[8]), 8),
    "several_under_rejection": (3, lambda p: ("".join(p[5:9]), p[5][-2:] + p[6]), 6),
    # A stop completed by a block's last token was always handled; these two guard the
    # token-by-token loop against losing the bonus or recovered token.
    "completed_by_bonus_token": (None, lambda p: (p[9][-3:] + p[10][:3],), 10),
    "completed_by_recovered_token": (3, lambda p: (p[7] + p[8],), 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stop_strings_end_the_block_where_plain_decoding_ends(case, model_fp32, runner, prompt_ids, script):
    wrong_at, make_stops, stop_index = CASES[case]
    ids, pieces = script
    stops = make_stops(pieces)
    tok = model_fp32.tokenizer
    drafter = ScriptedDrafter(ids, tok.vocab_size, wrong_at)
    engine = Engine(runner, tok, EngineConfig(max_batch=1, block_len=BLOCK), drafter=drafter)
    plain = assert_same_as_plain(engine, prompt_ids, SamplingParams(max_tokens=MAX_TOKENS, stop=stops))
    # The case sits where intended: plain decoding stopped on that token, and the text is cut
    # at the start of the stop string it completed.
    assert plain.finish_reason == "stop" and plain.output_ids == ids[: stop_index + 1], (stops, pieces)
    text = "".join(pieces)
    end = len("".join(pieces[: stop_index + 1]))
    completed = [text.find(s) for s in stops if 0 <= text.find(s) <= end - len(s)]
    assert plain.text == text[: min(completed)]


def test_cache_limit_ends_the_block_where_plain_decoding_ends(model_fp32, prompt_ids, script):
    """A request that runs into the cache limit keeps as many tokens as plain decoding does."""
    tok = model_fp32.tokenizer
    # 16 positions past the prompt: plain decoding keeps a block of headroom and stops at 12.
    runner = LocalRunner(model_fp32.model, RunnerConfig(n_slots=1, max_seq=len(prompt_ids) + 16))
    engine = Engine(runner, tok, EngineConfig(max_batch=1, block_len=BLOCK), drafter=ScriptedDrafter(script[0], tok.vocab_size))
    plain = assert_same_as_plain(engine, prompt_ids, SamplingParams(max_tokens=MAX_TOKENS))
    assert plain.finish_reason == "length" and len(plain.output_ids) == 16 - BLOCK
