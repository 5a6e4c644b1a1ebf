"""The learning curve of a run: held-out acceptance length against training data seen.

Each validation pass of ``train`` appends to the checkpoint's history (teacher-forced, on the
valid split: greedy acceptance length on greedy responses, and ``1 + sum_k prod_{i<=k} (1 - TV_i)``
at temperature 1).  Plotting them against the blocks trained on so far (each response token
can anchor one block per pass over the data) shows whether
the next improvement needs more steps (still rising) or more data (flat while the train loss
keeps falling).
"""

from __future__ import annotations

from pathlib import Path

from dspark.train.config import TrainConfig


def blocks_seen(step: int, cfg: TrainConfig) -> int:
    """Blocks (anchors) trained on after ``step`` optimiser steps; each has ``block_len`` positions."""
    return step * cfg.optim.seqs_per_step * cfg.optim.anchors_per_seq


def curve_rows(history: list[dict], cfg: TrainConfig) -> list[dict]:
    return [{"step": ev["step"], "blocks_seen": blocks_seen(ev["step"], cfg),
             "tau_greedy_tf": ev["tau_greedy_tf"], "tau_t1_tf": ev["tau_t1_tf"], "valid_loss": ev["loss"]}
            for ev in history]


def plot_learning_curve(history: list[dict], cfg: TrainConfig, path: Path, train_tokens: int | None = None) -> Path:
    """Write the curve as a PNG (matplotlib, headless); ``train_tokens``: anchors in one pass over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = curve_rows(history, cfg)
    x = [r["blocks_seen"] / 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r["tau_greedy_tf"] for r in rows], "o-", label="greedy (T=0)")
    ax.plot(x, [r["tau_t1_tf"] for r in rows], "s-", label="sampled (T=1)")
    ax.set_xlabel("blocks trained on (thousands)")
    ax.set_ylabel("acceptance length, valid split (teacher-forced)")
    title = f"{cfg.name}: block {cfg.head.block_len}, {cfg.head.n_layers} draft layer(s)"
    if train_tokens:
        title += f", {train_tokens / 1e3:.0f}k training anchors (response tokens)"
        epoch = train_tokens / 1e3
        if x and x[-1] > epoch:
            ax.axvline(epoch, color="grey", lw=0.8, ls="--")
            ax.text(epoch, ax.get_ylim()[0], " one pass over the data", color="grey", fontsize=8, va="bottom")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["blocks_seen", "curve_rows", "plot_learning_curve"]
