"""Training loop of the draft head: random anchors, AdamW, bf16 autocast, resumable checkpoints.

A batch takes ``seqs_per_step`` cached sequences and ``anchors_per_seq`` random anchors in each
(positions P..L-2 of the response, P = prompt length).  All blocks of a sequence share one pass of
context keys/values; the attention mask keeps each block to the context before its anchor.

Checkpoint (``<run>/checkpoints/last/``): ``head.safetensors`` (fp32 weights), ``optim.safetensors``
(AdamW moments + the anchor sampler's RNG state) and ``state.json`` (step, config, metrics).
Resuming restores all three, so a resumed run takes exactly the steps an uninterrupted one would.

Any target whose forward returns feature layers and the collapsed final hidden state trains the
same way (``check_head_fits``): the Llama family (features D wide) and DeepSeek-V4 (a block's
hc_mult hyper-connection streams, hc_mult * D wide; docs/DEEPSEEK_V4.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dspark.models.dspark_head import DSparkHead, DSparkHeadConfig, block_attention_mask, save_head
from dspark.models.llama import Transformer
from dspark.train.config import TrainConfig
from dspark.train.features import FeatureStore
from dspark.train.loss import LossParts, dspark_loss


@dataclass
class Batch:
    """Blocks of B sequences, A anchors each, G positions per block.

    ctx_features [B, S, m D]; ctx_lens [B]; anchors [B, A]; anchor_ids [B, A]; prev_ids, target_ids,
    final_index [B, A, G] (flat store index of the target's final hidden for that position);
    valid [B, A, G] bool; greedy [B] bool (sequence generated at temperature 0).
    """

    ctx_features: torch.Tensor
    ctx_lens: torch.Tensor
    anchors: torch.Tensor
    anchor_ids: torch.Tensor
    prev_ids: torch.Tensor
    target_ids: torch.Tensor
    final_index: torch.Tensor
    valid: torch.Tensor
    greedy: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{f: getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__})


def autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast on the device the head trains on (CPU: AMX / AVX512-BF16 matmuls)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def check_head_fits(head: DSparkHeadConfig, target) -> None:
    """Refuse a head config that does not fit ``target``: one-line ValueError naming the field.

    ``init_from_layers`` copies Llama-family blocks (fused q/k/v, SwiGLU) into the draft layers,
    so it needs such a target; a DeepSeek-V4 head starts from the random init.
    """
    args = target.args
    width = head.feature_width or head.dim
    if head.dim != args.dim:
        raise ValueError(f"head.dim {head.dim} != the target's hidden size {args.dim}")
    if head.vocab_size != args.vocab_size:
        raise ValueError(f"head.vocab_size {head.vocab_size} != the target's vocabulary {args.vocab_size}")
    bad = [i for i in head.feature_layers if not 0 <= i < args.n_layers]
    if bad:
        raise ValueError(f"head.feature_layers {bad} outside the target's {args.n_layers} blocks")
    if width != args.feature_width:
        raise ValueError(f"head.feature_width {head.feature_width} ({width} wide) != the target's feature width "
                         f"{args.feature_width} ({args.hc_mult} streams of {args.dim}): set feature_width "
                         f"{args.feature_width}")
    if head.init_from_layers and not isinstance(target, Transformer):
        raise ValueError(f"head.init_from_layers copies Llama-family blocks into the draft layers; the target "
                         f"({type(target).__name__}) has none: leave it empty (random init)")


def head_device(head: DSparkHead) -> torch.device:
    return next(head.parameters()).device


def sample_batch(store: FeatureStore, gen: torch.Generator, n_seqs: int, n_anchors: int, block_len: int,
                 full_blocks: bool = False) -> Batch:
    """Random sequences (weighted by their number of anchors) and random anchors within each.

    full_blocks: only anchors whose G positions all have a target token (for evaluation).
    """
    counts = store.num_anchors()
    if full_blocks:
        counts = (counts - (block_len - 1)).clamp(min=0)
    n_seqs = min(n_seqs, int((counts > 0).sum()))
    seq = torch.multinomial(counts.float(), n_seqs, replacement=False, generator=gen)  # [B]
    starts, lens, plens = store.starts[seq], store.lengths[seq], store.prompt_lens[seq]
    offs = (torch.rand(n_seqs, n_anchors, generator=gen) * counts[seq].unsqueeze(1)).long()  # [B, A]
    anchors = torch.sort(plens.unsqueeze(1) + offs, dim=1).values  # [B, A] anchor positions
    ctx_lens = anchors.max(1).values  # context needed: positions < the last anchor
    S = int(ctx_lens.max())
    F = store.features.shape[1]
    ctx = torch.zeros(n_seqs, S, F, dtype=store.features.dtype)
    for b in range(n_seqs):
        n = int(ctx_lens[b])
        ctx[b, :n] = store.features[int(starts[b]) : int(starts[b]) + n]
    k = torch.arange(block_len)
    pos = anchors.unsqueeze(-1) + k  # [B, A, G] position of x_k (k=0: the anchor)
    last = (lens - 1).view(-1, 1, 1)
    valid = pos + 1 <= last  # position k predicts the token at pos + 1
    flat = starts.view(-1, 1, 1) + pos
    prev_ids = store.tokens[torch.minimum(flat, (starts.view(-1, 1, 1) + last))]
    target_ids = store.tokens[torch.minimum(flat + 1, starts.view(-1, 1, 1) + last)]
    return Batch(
        ctx_features=ctx, ctx_lens=ctx_lens, anchors=anchors, anchor_ids=prev_ids[..., 0], prev_ids=prev_ids,
        target_ids=target_ids, final_index=torch.minimum(flat, starts.view(-1, 1, 1) + last), valid=valid,
        greedy=store.greedy[seq],
    )


@dataclass
class StepResult:
    loss: LossParts
    positions: torch.Tensor  # [R] block position of each valid row
    draft_top1: torch.Tensor | None  # [R] argmax of the final draft distribution (evaluation only)
    target_top1: torch.Tensor | None  # [R] argmax of the target distribution (evaluation only)
    row_index: torch.Tensor  # [R] flat index into [B * A * G] of each valid row


def forward_batch(head: DSparkHead, target, store: FeatureStore, batch: Batch, cfg: TrainConfig, markov: bool = True,
                  with_top1: bool = False) -> StepResult:
    """Draft forward (teacher-forced Markov head) and the loss, for one batch."""
    B, A, G = batch.prev_ids.shape
    dev = batch.prev_ids.device
    positions = torch.arange(batch.ctx_features.shape[1], device=dev).expand(B, -1)  # [B, S]
    ctx = head.context(batch.ctx_features)  # [B, S, D]
    ctx_kv = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in head.context_kv(ctx, positions)]
    x = head.block_inputs(batch.anchor_ids, G).reshape(B, A * G, -1)  # [B, A G, D]
    qpos = (batch.anchors.unsqueeze(-1) + torch.arange(G, device=dev)).reshape(B, A * G)  # [B, A G]
    mask = block_attention_mask(batch.ctx_lens, batch.anchors, G, batch.ctx_features.shape[1])
    h = head.backbone(x, qpos, ctx_kv, mask)  # [B, A G, D]
    valid = batch.valid.reshape(-1)
    rows = valid.nonzero().squeeze(-1)  # [R]
    h = h.reshape(B * A * G, -1)[rows]  # [R, D]
    prev = batch.prev_ids.reshape(-1)[rows]
    k_pos = torch.arange(G, device=dev).repeat(B * A)[rows]
    logits = head.base_logits(h)  # [R, N] (N = V without a draft vocabulary)
    prev_emb = head.markov_embedding(prev)
    if markov and head.cfg.markov_rank > 0:
        logits = logits + head.markov_bias(prev_emb)
    conf = head.confidence_logit(h, prev_emb)
    target_ids = batch.target_ids.reshape(-1)[rows]  # [R] vocabulary ids
    ids = head.draft_ids  # [N] or None
    t_top1 = None
    with torch.no_grad():
        # Target distribution from the cached final hidden state, once per distinct position.
        idx = batch.final_index.reshape(-1)[rows]
        uniq, inv = torch.unique(idx, return_inverse=True)
        final = store.final[uniq.cpu()].to(dev, target.dtype)  # [U, D]
        if ids is not None and store.lse is not None:
            # Over the draft vocabulary S only: p_t|S = softmax of the target's S logits, and
            # p_t(S) = exp(lse_S - lse_V) with lse_V stored per token (features.py).
            s_logits = F.linear(target.norm(final), head.draft_rows.to(final.dtype)).float()  # [U, N]
            lse_v = store.lse[uniq.cpu()].to(dev)  # [U]
            mass = torch.exp(torch.logsumexp(s_logits, -1) - lse_v).clamp(max=1.0)[inv]  # [R]
            target_probs = torch.softmax(s_logits, dim=-1)[inv]  # [R, N]
            t_top1 = store.top1[uniq.cpu()].to(dev)[inv]
            column = torch.full((head.cfg.vocab_size,), -1, dtype=torch.long, device=dev)
            column[ids] = torch.arange(ids.numel(), device=dev)
            target_ids = column[target_ids]  # draft index, -1 outside S
        else:
            t_logits = target.lm_head(final)  # [U, V] float32
            target_probs = torch.softmax(t_logits, dim=-1)[inv]  # [R, V]
            t_top1 = t_logits.argmax(-1)[inv]
            mass = None
        if ids is not None and store.lse is None:
            # Draft vocabulary S: the L1 target is p_t restricted to S and renormalised (loss.py).
            inside = target_probs[:, ids]  # [R, N]
            mass = inside.sum(-1)  # [R] p_t(S)
            target_probs = inside / mass.clamp_min(1e-30).unsqueeze(-1)
            column = torch.full((head.cfg.vocab_size,), -1, dtype=torch.long, device=dev)
            column[ids] = torch.arange(ids.numel(), device=dev)
            target_ids = column[target_ids]  # draft index, -1 outside S
    loss = dspark_loss(logits, conf, target_probs, target_ids, k_pos, cfg.loss, target_mass=mass)
    draft_top1 = logits.detach().argmax(-1)
    if ids is not None:
        draft_top1 = ids[draft_top1]
    top1 = (draft_top1, t_top1) if with_top1 else (None, None)
    return StepResult(loss=loss, positions=k_pos, draft_top1=top1[0], target_top1=top1[1], row_index=rows)


def lr_at(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    frac = min(1.0, (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(head: DSparkHead, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in head.named_parameters():
        (decay if p.dim() >= 2 and name != "markov_w1" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # one fused kernel per step instead of a dozen passes over 20M parameters
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)


@torch.no_grad()
def evaluate(head: DSparkHead, target, store: FeatureStore, cfg: TrainConfig, markov: bool = True,
             n_blocks: int | None = None, seed: int = 1234) -> dict:
    """Teacher-forced validation on full blocks.

    Reports the loss terms, the mean 1 - TV per position (expected conditional acceptance at
    temperature 1), and on greedy sequences the greedy acceptance length: with teacher forcing the
    drafts follow the target's own greedy path, so leading argmax matches are exactly what greedy
    verification would accept (up to numerics).  ``tau_t1`` is 1 + sum_k prod_{i<=k} (1 - TV_i).
    """
    G = cfg.head.block_len
    n_blocks = n_blocks or cfg.run.eval_blocks
    gen = torch.Generator().manual_seed(seed)
    per = cfg.optim.anchors_per_seq
    tot = {"loss": 0.0, "ce": 0.0, "l1": 0.0, "conf": 0.0}
    acc_sum, acc_n = torch.zeros(G), torch.zeros(G)
    tau_g, n_g, tau_1, n_1, n_batches, done = 0.0, 0, 0.0, 0, 0, 0
    was_training = head.training
    dev = head_device(head)
    head.eval()
    while done < n_blocks:
        batch = sample_batch(store, gen, cfg.optim.seqs_per_step, per, G, full_blocks=True)
        with autocast(dev, cfg.optim.autocast_bf16):
            res = forward_batch(head, target, store, batch.to(dev), cfg, markov=markov, with_top1=True)
        n_batches += 1
        for key, val in (("loss", res.loss.total), ("ce", res.loss.ce), ("l1", res.loss.l1), ("conf", res.loss.conf)):
            tot[key] += float(val)
        positions, accept = res.positions.cpu(), res.loss.accept.float().cpu()
        acc_sum.index_add_(0, positions, accept)
        acc_n.index_add_(0, positions, torch.ones_like(accept))
        B, A = batch.anchors.shape
        # full_blocks: every row valid, so rows reshape to [B, A, G].
        match = (res.draft_top1 == res.target_top1).cpu().view(B, A, G)
        accept = accept.view(B, A, G)
        lead = match.int().cumprod(-1).sum(-1)  # [B, A] leading matches
        g = batch.greedy.view(-1, 1).expand(B, A)
        tau_g += float((1 + lead[g]).sum())
        n_g += int(g.sum())
        tau_1 += float((1 + accept.cumprod(-1).sum(-1)).sum())
        n_1 += B * A
        done += B * A
    head.train(was_training)
    out = {k: v / n_batches for k, v in tot.items()}
    out["accept_per_pos"] = (acc_sum / acc_n.clamp_min(1)).tolist()
    out["tau_greedy_tf"] = tau_g / max(1, n_g)
    out["tau_t1_tf"] = tau_1 / max(1, n_1)
    return out


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def save_checkpoint(ckpt_dir: Path, head: DSparkHead, opt: torch.optim.Optimizer, gen: torch.Generator,
                    step: int, cfg: TrainConfig, history: list) -> None:
    from safetensors.torch import save_file

    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors"))
    sd = opt.state_dict()
    tensors = {"rng": gen.get_state()}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"state.{idx}.{key}"] = val.detach().cpu().reshape(val.shape).contiguous() if torch.is_tensor(val) else torch.tensor(val)
    save_file(tensors, str(tmp / "optim.safetensors"))
    meta = {"step": step, "config": cfg.to_json(), "param_groups": sd["param_groups"], "history": history}
    (tmp / "state.json").write_text(json.dumps(meta))
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_dir: Path, head: DSparkHead, opt: torch.optim.Optimizer, gen: torch.Generator) -> tuple[int, list]:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(ckpt_dir / "head.safetensors")))
    meta = json.loads((ckpt_dir / "state.json").read_text())
    tensors = load_file(str(ckpt_dir / "optim.safetensors"))
    gen.set_state(tensors.pop("rng"))
    state: dict = {}
    for name, val in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), list(meta.get("history", []))


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, run_dir: Path, target, train_store: FeatureStore, valid_store: FeatureStore | None,
          resume: bool = False, max_steps: int | None = None, progress: bool = True,
          vocab_ids: torch.Tensor | None = None) -> DSparkHead:
    """Train (or continue training) a head; returns it with the target bound.

    ``max_steps`` stops early (the schedule still follows ``cfg.optim.steps``), e.g. to run in
    slices; ``resume`` continues from ``<run>/checkpoints/last``.  ``vocab_ids``: the frequency-
    ranked id map [M]; required when ``cfg.head.trained_vocab`` > 0 (the head then drafts and is
    trained over its first N ids), and saved with the head either way.
    """
    torch.manual_seed(cfg.run.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.head.trained_vocab and vocab_ids is None:
        raise ValueError(f"head.trained_vocab={cfg.head.trained_vocab} needs an id map (run the vocab stage)")
    check_head_fits(cfg.head, target)
    head = DSparkHead(cfg.head)
    head.reset_parameters(target, seed=cfg.run.seed)
    head = head.to(target.device)
    head.bind_target(target)
    if vocab_ids is not None:
        head.vocab_ids = vocab_ids.long()
        head.use_draft_vocab(cfg.head.trained_vocab)
    head.train()
    dev = head_device(head)
    opt = make_optimizer(head, cfg)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    ckpt = run_dir / "checkpoints" / "last"
    step, history = 0, []
    if resume and ckpt.exists():
        step, history = load_checkpoint(ckpt, head, opt, gen)
    end = cfg.optim.steps if max_steps is None else min(cfg.optim.steps, step + max_steps)
    log = (run_dir / "metrics.jsonl").open("a")
    bar = tqdm(total=end, initial=step, desc="train draft head", unit="step", disable=not progress)
    G = cfg.head.block_len
    t_last = time.perf_counter()
    while step < end:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sample_batch(train_store, gen, cfg.optim.seqs_per_step, cfg.optim.anchors_per_seq, G).to(dev)
        with autocast(dev, cfg.optim.autocast_bf16):
            res = forward_batch(head, target, train_store, batch, cfg)
        opt.zero_grad(set_to_none=True)
        res.loss.total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.optim.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == end:
            now = time.perf_counter()
            row = {"step": step, "lr": lr, "loss": float(res.loss.total.detach()), "ce": float(res.loss.ce),
                   "l1": float(res.loss.l1), "conf": float(res.loss.conf), "accept": float(res.loss.accept.mean()),
                   "grad_norm": float(gnorm), "sec_per_step": (now - t_last) / cfg.run.log_every}
            t_last = now
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accept']:.3f}")
            log.write(json.dumps(row) + "\n")
            log.flush()
        if valid_store is not None and (step % cfg.run.eval_every == 0 or step == end):
            ev = evaluate(head, target, valid_store, cfg)
            ev["step"] = step
            history.append(ev)
            log.write(json.dumps({"eval": ev}) + "\n")
            log.flush()
            bar.write(f"step {step}: valid loss {ev['loss']:.3f} tau_greedy(tf) {ev['tau_greedy_tf']:.2f} "
                      f"tau_t1(tf) {ev['tau_t1_tf']:.2f} accept/pos " + " ".join(f"{a:.2f}" for a in ev["accept_per_pos"]))
            export_head(head, run_dir / "head", cfg, {"steps": step, "last_eval": ev})  # usable mid-run
        if step % cfg.run.checkpoint_every == 0 or step == end:
            save_checkpoint(ckpt, head, opt, gen, step, cfg, history)
    bar.close()
    log.close()
    return head


def export_head(head: DSparkHead, path: Path, cfg: TrainConfig, extra: dict | None = None) -> Path:
    """The shipped form: bf16 weights + JSON config (training summary in the JSON)."""
    return save_head(head, path, dtype=torch.bfloat16, extra={"training": {"config": cfg.to_json(), **(extra or {})}})


__all__ = ["Batch", "check_head_fits", "sample_batch", "forward_batch", "evaluate", "train", "lr_at",
           "make_optimizer", "save_checkpoint", "load_checkpoint", "export_head"]
