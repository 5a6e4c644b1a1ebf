"""A DSpark head trained and served on a DeepSeek-V4 target (tiny random V4 folder, fp32).

`dspark train-draft` runs every stage against the V4 folder: data (the V4 target writes the
responses), vocab, features (each feature layer is a block's three hyper-connection streams,
flattened: 3 * 32 = 96 wide), training, calibration.  The stored features and final hidden states
are checked against transformers' own model of the folder, the trained head serves as
``--draft dspark`` with greedy output identical to plain decoding (blocks partly accepted), the
drafter's context is the one training sees, sampled output follows the target, and heads or
configs that do not fit the target are refused naming the field.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_v4")

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dspark.models.dspark_head import block_attention_mask, load_head  # noqa: E402
from dspark.models.loader import load_model  # noqa: E402
from dspark.train.commands import train_draft  # noqa: E402
from dspark.train.features import target_features  # noqa: E402
from dspark.workers.drafters.dspark import DSparkDrafter  # noqa: E402
from dspark.workers.factory import EngineSpec, build_engine  # noqa: E402
from dspark.workers.request import SamplingParams  # noqa: E402
from dspark.workers.runner import RunnerConfig  # noqa: E402
from helpers.spec_stats import chisquare_pvalue, second_token_law  # noqa: E402
from helpers.tiny_deepseek_v4 import write_tiny_folder  # noqa: E402

VOCAB, HIDDEN, STREAMS = 260, 32, 3
LAYERS = (0, 2)  # feature layers: the sliding-window block and the HCA block
TEXTS = ["Name three colours.", "Write a haiku about rain.", "What is 2 + 2?", "Say hello in French.",
         "List two fruits.", "Describe a cat.", "Count to five.", "What is the capital of Italy?"]


def tiny_config(folder: Path, prompts: Path, **head) -> dict:
    return {
        "name": "tiny-v4", "model": str(folder),
        "head": {"target_name": "tiny-v4", "dim": HIDDEN, "vocab_size": VOCAB, "feature_layers": list(LAYERS),
                 "feature_width": STREAMS * HIDDEN, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
                 "intermediate_size": 48, "block_len": 4, "markov_rank": 8, "trained_vocab": 128,
                 "init_from_layers": [], **head},
        # fp32 and no torch.compile (V4 runs its eager reference path)
        "data": {"prompts": str(prompts), "valid_fraction": 0.4, "test_fraction": 0.1, "sampled_responses": 1,
                 "max_new_tokens": 16, "gen_batch": 8, "dtype": "fp32", "compile": False},
        "optim": {"steps": 4, "warmup_steps": 1, "seqs_per_step": 2, "anchors_per_seq": 4},
        "run": {"eval_every": 2, "checkpoint_every": 2, "eval_blocks": 8, "calib_max_tokens": 8, "calib_prompts": 2},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(V4 folder, run directory, transformers' model of the folder, our loaded target, CLI output)."""
    tmp = tmp_path_factory.mktemp("v4_dspark")
    folder = tmp / "v4"
    folder.mkdir()
    ref = write_tiny_folder(folder, vocab_size=VOCAB, seed=3)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    path = tmp / "tiny-v4.json"
    path.write_text(json.dumps(tiny_config(folder, prompts)))
    run = tmp / "run"
    res = CliRunner().invoke(train_draft, ["--config", str(path), "--out", str(run), "--threads", "1"])
    assert res.exit_code == 0, res.output
    return folder, run, ref, load_model(folder, dtype="fp32", progress=False), res.output


def streams_of(ref, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' features (LAYERS' output streams, flattened) [S, 2 * 96] and logits [S, V]."""
    got = {}
    hooks = [ref.model.layers[i].register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out[0]))
             for i in LAYERS]
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    return torch.cat([got[i].flatten(1) for i in LAYERS], dim=-1), logits


def test_train_draft_on_v4_stores_its_streams_and_exports_a_calibrated_head(trained):
    folder, run, ref, ours, output = trained
    assert "STS greedy" in output and (run / "learning_curve.png").stat().st_size > 0
    rows = [json.loads(line) for line in (run / "data" / "responses.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "valid"} and any(r["output_ids"] for r in rows)
    shard = load_file(str(run / "features" / "train" / "shard_0000.safetensors"))
    assert shard["features"].shape[1] == len(LAYERS) * STREAMS * HIDDEN and shard["final"].shape[1] == HIDDEN
    # The first sequences of the shard against transformers: the streams of blocks 0 and 2, and
    # the final hidden state that, through the final norm and LM head, gives the target's logits.
    off = shard["offsets"]
    for s in range(3):
        a, b = int(off[s]), int(off[s + 1])
        want, logits = streams_of(ref, shard["tokens"][a:b].tolist())
        torch.testing.assert_close(shard["features"][a:b].float(), want, rtol=2e-2, atol=2e-2)  # stored in bf16
        torch.testing.assert_close(shard["lse"][a:b], torch.logsumexp(logits, -1), rtol=2e-2, atol=2e-2)
        assert (shard["top1"][a:b] == logits.argmax(-1)).float().mean() > 0.9  # bf16 final: rare near-ties
    head = load_head(run / "head", ours.model)
    assert head.cfg.feature_width == STREAMS * HIDDEN and head.fc.weight.shape == (HIDDEN, 2 * STREAMS * HIDDEN)
    assert head.cfg.sts and head.cfg.trained_vocab == 128


class SteeredDSpark(DSparkDrafter):
    """The dspark drafter; with ``scripts`` (prompt -> plain greedy output) a pseudo-random prefix
    of each block is replaced by the true continuation, so blocks are partly accepted (a head
    trained for four steps on a random target is almost never right).  Keeps, for the first
    proposals, the request's tokens and the context keys of its slot."""

    scripts: dict
    gen: torch.Generator
    seen: list

    def propose(self, seqs, block_len):
        self.flush_context(seqs)  # the context keys of what was observed, as drafting would
        for s in seqs:
            slot = self._slot.get(s.request_id)
            if slot is not None and len(self.seen) < 6 and self.cache.lengths[slot] == s.num_cached:
                self.seen.append((list(s.all_ids[: s.num_cached]), self.cache.k[0, slot, :, : s.num_cached].clone()))
        blocks = super().propose(seqs, block_len)
        for seq, b in zip(seqs, blocks):
            script = self.scripts.get(tuple(seq.prompt_ids))
            if script and b.token_ids:
                n = len(seq.output_ids)
                right = int(torch.randint(0, len(b.token_ids) + 1, (1,), generator=self.gen))
                b.token_ids[:right] = script[n : n + right]
                b.probs = b.prob_ids = None  # greedy: a one-hot proposal
        return blocks


def engine(folder: Path, head: Path | None, n_slots: int = 2, block_len: int = 4):
    # Float products: the context keys are compared with the training path's (int8 drafting
    # weights, the CPU default, move them by int8 rounding; tests/models/test_int8_weights.py).
    opts = (("head", str(head)), ("weights", "float")) if head else ()
    spec = EngineSpec(model=str(folder), dtype="fp32", draft="dspark" if head else "none", block_len=block_len,
                      runner=RunnerConfig(n_slots=n_slots, max_seq=256), draft_options=opts)
    return build_engine(spec, progress=False)


def test_dspark_on_v4_greedy_equals_plain_and_serves_the_training_context(trained):
    folder, run, _, ours, _ = trained
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 21)]
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    plain = engine(folder, None)
    want = [s.output_ids for s in plain.engine.generate(prompts, params)]
    plain.close()
    built = engine(folder, run / "head")
    drafter = built.engine.drafter
    drafter.__class__ = SteeredDSpark
    drafter.scripts = {tuple(p): w for p, w in zip(prompts, want)}
    drafter.gen, drafter.seen = torch.Generator().manual_seed(5), []
    got = [s.output_ids for s in built.engine.generate(prompts, params)]
    m = built.engine.metrics
    built.close()
    assert got == want
    assert 0 < m.num_accepted_tokens < m.num_draft_tokens  # blocks partly accepted: the context rolled forward
    # The drafter's context keys (from the streams the verifier returned, prefill chunks then
    # anchor + accepted drafts) equal those of the training path (one pass, features.py).
    head = drafter.head
    assert len(drafter.seen) >= 4
    for ids, keys in drafter.seen:
        feats, _ = target_features(ours.model, [ids], head.cfg.feature_layers)[0]
        k, _ = head.context_kv(head.context(feats), torch.arange(len(ids)))[0]  # [S, nkv, hd]
        torch.testing.assert_close(keys, k.transpose(0, 1), rtol=1e-4, atol=1e-4)


def test_dspark_on_v4_sampled_second_token_follows_the_target(trained):
    folder, run, _, _, _ = trained
    built = engine(folder, run / "head", n_slots=32, block_len=2)
    # A prompt whose first token has probability 0.85 at T = 0.5 (the second token comes out of
    # the first speculative step).
    prompt, temp, n = torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(6)).tolist(), 0.5, 256
    x1, p = second_token_law(built.engine.runner, prompt, temp)
    # A head trained for four steps is almost never right: its Markov head is set to favour, after
    # x1, the target's likelier second tokens (q peaked, p not: drafts accepted about p(x2) of the
    # time, and rejections must resample from the residual for the law to hold).
    head = built.engine.drafter.head
    with torch.no_grad():
        head.markov_w1.zero_()
        head.markov_w1[x1, 0] = 1.0
        head.markov_w2.zero_()
        head.markov_w2[0] = 8.0 * p[head.draft_ids].clamp_min(1e-9).log()
    params = [SamplingParams(max_tokens=3, temperature=temp, seed=s, ignore_eos=True) for s in range(n)]
    counts: collections.Counter = collections.Counter()
    for seq in built.engine.generate([prompt] * n, params):
        if seq.output_ids[0] == x1:
            counts[seq.output_ids[1]] += 1
    m = built.engine.metrics
    built.close()
    assert sum(counts.values()) > 0.3 * n
    assert 0.1 * n < m.num_accepted_tokens < m.num_draft_tokens, "drafts both accepted and rejected"
    assert chisquare_pvalue(counts, p) > 1e-3, counts.most_common(5)


def test_heads_and_configs_that_do_not_fit_a_v4_target_are_refused_by_field(trained, tmp_path):
    folder, run, _, ours, _ = trained
    meta = json.loads((run / "head.json").read_text())
    for change, field in (({"feature_width": 64}, "feature_width 64 != the target's feature width 96"),
                          ({"feature_width": 0}, "feature_width 32 != the target's feature width 96"),
                          ({"feature_layers": [0, 5]}, "feature layers [5] outside the target's 3 blocks")):
        bad = tmp_path / "bad"
        for suffix in (".safetensors", ".vocab.safetensors"):
            (tmp_path / f"bad{suffix}").write_bytes((run / f"head{suffix}").read_bytes())
        (tmp_path / "bad.json").write_text(json.dumps({**meta, "config": {**meta["config"], **change}}))
        with pytest.raises(ValueError, match=re.escape(field)) as err:
            engine(folder, bad)
        assert "\n" not in str(err.value)
    # train-draft refuses, before any feature is computed, a config that does not fit.
    for change, field in (({"feature_width": 0}, "head.feature_width 0 (32 wide)"),
                          ({"init_from_layers": [1]}, "head.init_from_layers copies Llama-family blocks")):
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(tiny_config(folder, folder.parent / "prompts.jsonl", **change)))
        res = CliRunner().invoke(train_draft, ["--config", str(path), "--out", str(tmp_path / "r"),
                                               "--stages", "features"])
        assert res.exit_code == 2 and field in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "r" / "features").exists()
