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


def test_train_draft_runs_every_stage_end_to_end(tmp_path: Path):
    """`dspark train-draft` on a tiny config: data (with self-written prompts) -> vocab -> features
    -> train (with validation and the learning curve) -> calibrate -> export; then resumes."""
    import json

    from click.testing import CliRunner

    from dspark.models.dspark_head import load_head
    from dspark.models.loader import load_model
    from dspark.train.commands import train_draft

    prompts = tmp_path / "prompts.jsonl"
    texts = ["Name three colours.", "Write a haiku about rain.", "What is 2 + 2?", "Say hello in French.",
             "List two fruits.", "Describe a cat.", "Count to five.", "What is the capital of Italy?"]
    prompts.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    cfg = json.loads((Path(__file__).resolve().parents[2] / "dspark/train/configs/smollm2-135m.json").read_text())
    cfg["head"]["trained_vocab"] = 512
    cfg["data"].update(prompts=str(prompts), valid_fraction=0.4, test_fraction=0.1, sampled_responses=1,
                       self_prompts=2, self_prompt_max_tokens=24, max_new_tokens=12, gen_batch=8)
    cfg["optim"].update(steps=4, warmup_steps=1, seqs_per_step=2, anchors_per_seq=4)
    cfg["run"].update(eval_every=2, checkpoint_every=2, eval_blocks=8, calib_max_tokens=8, calib_prompts=2)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    res = CliRunner().invoke(train_draft, ["--config", str(path), "--out", str(run), "--threads", "2"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "data" / "responses.jsonl").read_text().splitlines()]
    assert any(r["prompt_id"].startswith("self:") for r in rows) and {r["split"] for r in rows} == {"train", "valid"}
    curve = json.loads((run / "learning_curve.json").read_text())
    assert [c["step"] for c in curve] == [2, 4] and (run / "learning_curve.png").stat().st_size > 0
    head = load_head(run / "head", load_model(None, dtype="fp32", progress=False).model)
    assert head.cfg.trained_vocab == 512 and head.cfg.sts  # trained over the map's first 512 ids, calibrated
    # Same command again: every stage is cached or refuses to clobber the checkpoint.
    again = CliRunner().invoke(train_draft, ["--config", str(path), "--out", str(run), "--stages", "data,vocab"])
    assert again.exit_code == 0 and "responses: %d" % len(rows) in again.output
    refused = CliRunner().invoke(train_draft, ["--config", str(path), "--out", str(run), "--stages", "train"])
    assert refused.exit_code != 0 and "--resume" in refused.output
    # A smaller plan (no sampled responses) uses only its own rows of the cache.
    cfg["data"]["sampled_responses"] = 0
    path.write_text(json.dumps(cfg))
    fewer = CliRunner().invoke(train_draft, ["--config", str(path), "--out", str(run), "--stages", "data,vocab"])
    greedy = sum(1 for r in rows if r["temperature"] == 0)
    assert fewer.exit_code == 0 and "responses: %d" % greedy in fewer.output and greedy < len(rows)


def test_train_draft_device_cuda_is_refused_clearly_without_cuda(tmp_path: Path):
    import pytest
    import torch
    from click.testing import CliRunner

    from dspark.train.commands import train_draft

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal path does not apply")
    cfg = Path(__file__).resolve().parents[2] / "dspark/train/configs/smollm2-135m.json"
    res = CliRunner().invoke(train_draft, ["--config", str(cfg), "--out", str(tmp_path / "r"), "--device", "cuda"])
    assert res.exit_code == 2 and "CUDA is not available" in res.output and "Traceback" not in res.output
