"""The Table 1 section of the GPU check (bench/table1.py) on this CPU, so it cannot rot unnoticed:
the script as gpu_check.sh runs it, with a tiny Qwen3 folder and a DeepSpec DSpark head in place
of Qwen3-8B and dspark_qwen3_8b_block7, GSM8K- and MT-Bench-shaped prompt files, and an existing
report it must add to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers.drafter_checkpoints import write_deepspec_checkpoint
from helpers.tiny_hf import VOCAB, tiny_qwen3

ROOT = Path(__file__).resolve().parents[2]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
          "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_table1_section_on_cpu(tmp_path):
    model = tmp_path / "Qwen3-tiny"
    hf = tiny_qwen3(model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    head = tmp_path / "dspark_qwen3_tiny_block4"
    write_deepspec_checkpoint(head, hf.model.embed_tokens.weight.detach(), hf.lm_head.weight.detach(), 3,
                              layer_ids=(0, 1), block_size=4, mask_token_id=VOCAB - 1)
    gsm8k, mt_bench = tmp_path / "gsm8k.jsonl", tmp_path / "question.jsonl"
    gsm8k.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": "#### 2"}) + "\n"
                             for i in range(5)))
    mt_bench.write_text("".join(json.dumps({"question_id": i, "category": "writing", "turns": [f"Write about {w}.", "More."]})
                                + "\n" for i, w in enumerate(["rain", "cats", "maps"])))
    report = tmp_path / "out" / "gpu_check.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"device": "earlier checks"}))

    env = {**os.environ, "DSPARK_GSM8K_PROMPTS": str(gsm8k), "DSPARK_MT_BENCH_PROMPTS": str(mt_bench),
           "DSPARK_MBPP_PROMPTS": str(tmp_path / "absent.jsonl"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench/table1.py", "--model", str(model), "--head", str(head), "--report", str(report),
           "--device", "cpu", "--dtype", "fp32", "--limit", "4", "--max-tokens", "12", "--slots", "4"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    out = json.loads(report.read_text())
    assert out["device"] == "earlier checks"  # the checks before it are kept
    t = out["table1"]
    assert t["block_len"] == 4 and t["temperature"] == 1.0 and t["verify_policy"] == "fixed"
    for name, n, column, dspark in (("gsm8k", 4, "GSM8K", 6.17), ("mt_bench", 3, "MT-Bench", 3.72)):
        row = t["sets"][name]
        assert row["prompts"] == n and row["paper_column"] == column and row["paper"]["DSpark"] == dspark
        assert row["rounds"] > 0 and 1.0 <= row["acceptance_length"] <= 1.0 + t["block_len"]
        assert 0 < row["output_tokens"] <= 12 * n
    assert "skipped" in t["sets"]["mbpp_plus"] and t["sets"]["mbpp_plus"]["paper"]["DSpark"] == 5.16

    # A prompt file without a prompt field: one line naming the file and line, no traceback.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    res = subprocess.run(cmd + ["--set", f"gsm8k={bad}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and f"{bad}:1: no prompt field" in res.stderr and "Traceback" not in res.stderr


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
