"""The data stage of `train-draft`: prompts the target writes itself, and the order responses are made in."""

from __future__ import annotations

from pathlib import Path

from dspark.datasets import Prompt
from dspark.train.config import DataConfig
from dspark.train.data import SELF_SOURCE, generate_self_prompts, plan_jobs, prompt_key, self_prompt_split


def test_target_writes_prompts_resumably(tmp_path: Path, model_fp32):
    cfg = DataConfig(self_prompts=3, self_prompt_max_tokens=40, gen_batch=4, dtype="fp32")
    out = tmp_path / "self_prompts.jsonl"
    written = generate_self_prompts(cfg, out)
    assert 0 < len(written) <= 3
    assert all(p.source == SELF_SOURCE and len(p.text) >= 16 for p in written)
    assert len({" ".join(p.text.lower().split()) for p in written}) == len(written)  # no repeats
    # The prompt starts where the user's turn does: no template text leaks into it.
    assert not any("<|im_start|>" in p.text or p.text.startswith("user") for p in written)
    attempts = out.read_text()
    assert generate_self_prompts(cfg, out) == written  # cached: nothing regenerated
    assert out.read_text() == attempts


def test_tokenizer_user_turn_prefix_is_the_chat_template_up_to_the_message(model_fp32):
    tok = model_fp32.tokenizer
    prefix = tok.user_turn_prefix()
    full = tok.encode_chat([{"role": "user", "content": "Hello there"}])
    assert full[: len(prefix)] == prefix and len(full) > len(prefix) + 2


def test_self_prompts_never_land_in_the_test_split_and_jobs_go_round_by_round():
    cfg = DataConfig(greedy_responses=1, sampled_responses=2, prompts="mbpp")
    extra = [Prompt(id=str(i), text=f"question {i}", category="self", source=SELF_SOURCE) for i in range(300)]
    splits = {self_prompt_split(prompt_key(p), cfg) for p in extra}
    assert splits == {"train", "valid"}
    jobs = plan_jobs(cfg, extra=extra)
    assert {j.split for j in jobs} <= {"train", "valid"}
    kinds = [j.key.split("|")[1] for j in jobs]
    n = len(jobs) // 3
    # Every prompt's greedy response first, then every first sample, then every second one.
    assert kinds == ["greedy0"] * n + ["sample0"] * n + ["sample1"] * n
    assert len({j.key for j in jobs}) == len(jobs)
