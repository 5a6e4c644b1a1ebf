"""`dspark train-draft`: self-distillation data -> vocab -> features -> training -> STS calibration -> export.

The vocab stage ranks the ids of the run's training-split responses by frequency (the head's id
map, ``dspark.train.vocab``); a head with ``head.trained_vocab = N`` is trained over the first N.

Every stage caches its output in the run directory and picks up where it stopped, so the same
command line resumes an interrupted run (``--resume`` continues the optimiser from its last
checkpoint).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click

STAGES = ("data", "vocab", "features", "train", "calibrate")


def _split_record(cfg) -> dict:
    from dspark.train.data import prompt_key, split_prompts

    parts = split_prompts(cfg.data)
    return {"rule": "sha1(split_seed:source:id) -> test < test_fraction <= valid < +valid_fraction <= train",
            "split_seed": cfg.data.split_seed, **{k: [prompt_key(p) for p in v] for k, v in parts.items()}}


@click.command("train-draft")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="training config, e.g. dspark/train/configs/smollm2-135m.json")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="run directory (default: runs/<config name>)")
@click.option("--resume", is_flag=True, help="continue training from the run's last checkpoint")
@click.option("--max-steps", type=int, default=None, help="stop after this many more steps (schedule unchanged)")
@click.option("--stages", default=",".join(STAGES), show_default=True, help="comma-separated subset of the stages")
@click.option("--threads", type=int, default=None, help="torch threads (default: the config's run.threads)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="where every stage runs (default: the config's run.device)")
@click.option("--ship", is_flag=True, help="copy the calibrated head into dspark/models/heads/")
def train_draft(config_path, out_dir, resume, max_steps, stages, threads, device, ship):
    """Train a DSpark draft head for a target model by self-distillation."""
    import dataclasses

    import torch

    from dspark.models.dspark_head import HEADS_DIR
    from dspark.models.loader import load_model
    from dspark.train.config import TrainConfig
    from dspark.train.data import chat_ids, generate_responses, split_prompts

    cfg = TrainConfig.load(config_path)
    if device:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device=device))
    device = cfg.run.device
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: CUDA is not available on this machine")
    run = Path(out_dir or Path("runs") / Path(config_path).stem)
    run.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads or cfg.run.threads)
    todo = [s.strip() for s in stages.split(",") if s.strip()]
    bad = set(todo) - set(STAGES)
    if bad:
        raise click.BadParameter(f"unknown stages {sorted(bad)}; choose from {', '.join(STAGES)}")
    ckpt = run / "checkpoints" / "last"
    if "train" in todo and ckpt.exists() and not resume:
        raise click.UsageError(f"{run} already has a checkpoint: pass --resume, or choose another --out")
    (run / "config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    (run / "split.json").write_text(json.dumps(_split_record(cfg), indent=1) + "\n")
    responses = run / "data" / "responses.jsonl"
    t_start = time.perf_counter()

    if "data" in todo:
        from dspark.train.data import generate_self_prompts

        written = generate_self_prompts(cfg.data, run / "data" / "self_prompts.jsonl", model=cfg.model, device=device)
        if cfg.data.self_prompts:
            click.echo(f"self-written prompts: {len(written)} of {cfg.data.self_prompts} wanted")
        rows = generate_responses(cfg.data, responses, model=cfg.model, extra=written, device=device)
        click.echo(f"responses: {len(rows)} cached in {responses}")

    vocab_file = Path(cfg.vocab_map) if cfg.vocab_map else run / "vocab.safetensors"
    if "vocab" in todo and not cfg.vocab_map:
        from dspark.train.data import planned_rows
        from dspark.train.vocab import rank_responses

        rows = planned_rows(cfg.data, responses, run / "data" / "self_prompts.jsonl")
        if not rows:
            raise click.UsageError(f"no responses in {responses}: run the data stage first")
        record = rank_responses(rows, cfg.data, cfg.head.vocab_size, vocab_file)
        click.echo(f"vocab: {record['seen_ids']} distinct ids in {record['tokens']} response tokens -> {vocab_file}")

    if "features" in todo or "train" in todo:
        from dspark.train.data import planned_rows
        from dspark.train.features import build_feature_cache, load_feature_store

        from dspark.train.trainer import check_head_fits

        target = load_model(cfg.model, dtype=cfg.data.dtype, device=device, progress=False)
        try:
            check_head_fits(cfg.head, target.model)  # before any feature is computed
        except ValueError as err:
            raise click.UsageError(str(err)) from None
        rows = planned_rows(cfg.data, responses, run / "data" / "self_prompts.jsonl")
        if not rows:
            raise click.UsageError(f"no responses in {responses}: run the data stage first")
        if "features" in todo:
            for split in ("train", "valid"):
                build_feature_cache(target.model, [r for r in rows if r["split"] == split], cfg.head.feature_layers,
                                    run / "features" / split)
        if "train" in todo:
            from dspark.train.trainer import export_head, train

            train_store = load_feature_store(run / "features" / "train")
            valid_store = load_feature_store(run / "features" / "valid")
            click.echo(f"training on {train_store.num_seqs} sequences / {int(train_store.num_anchors().sum())} anchors")
            t0 = time.perf_counter()
            from dspark.models.dspark_head import read_vocab_map

            vocab_ids = read_vocab_map(vocab_file) if vocab_file.exists() else None
            head = train(cfg, run, target.model, train_store, valid_store, resume=resume, max_steps=max_steps,
                         vocab_ids=vocab_ids)
            state = json.loads((ckpt / "state.json").read_text())
            summary = {
                "steps": state["step"], "train_seconds_this_call": round(time.perf_counter() - t0),
                "train_sequences": train_store.num_seqs, "train_tokens": int(train_store.tokens.numel()),
                "train_anchors": int(train_store.num_anchors().sum()),
                "last_eval": state["history"][-1] if state["history"] else None,
            }
            export_head(head, run / "head", cfg, summary)
            click.echo(f"exported {run / 'head.safetensors'} at step {state['step']}")
            if state["history"]:
                from dspark.train.curve import curve_rows, plot_learning_curve

                (run / "learning_curve.json").write_text(json.dumps(curve_rows(state["history"], cfg), indent=1) + "\n")
                png = plot_learning_curve(state["history"], cfg, run / "learning_curve.png",
                                          train_tokens=summary["train_anchors"])
                click.echo(f"learning curve: {png}")

    if "calibrate" in todo:
        from dspark.train.calibrate import calibrate_head
        from dspark.models.loader import load_model as _load

        tok = _load(cfg.model, dtype="fp32", progress=False).tokenizer
        prompts = split_prompts(cfg.data)["valid"]
        if cfg.run.calib_prompts:
            prompts = prompts[: cfg.run.calib_prompts]
        ids = [chat_ids(tok, p.text) for p in prompts]
        report = calibrate_head(run / "head", ids, cfg.head.block_len, cfg.run.calib_max_tokens, cfg.model, cfg.data.dtype,
                                device=device)
        for mode, r in report.items():
            click.echo(f"STS {mode}: ECE {r['ece_raw']:.4f} -> {r['ece_sts']:.4f} over {r['blocks']} blocks, "
                       f"T = {[round(t, 2) for t in r['temperatures']]}")

    if ship:
        dest = HEADS_DIR / f"{cfg.name}.safetensors"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "head.safetensors", dest)
        shutil.copyfile(run / "head.json", dest.with_suffix(".json"))
        from dspark.models.dspark_head import vocab_map_path

        if vocab_map_path(run / "head").exists():
            shutil.copyfile(vocab_map_path(run / "head"), vocab_map_path(dest))
        click.echo(f"shipped {dest}")
    click.echo(f"done in {time.perf_counter() - t_start:.0f}s")


__all__ = ["train_draft"]
