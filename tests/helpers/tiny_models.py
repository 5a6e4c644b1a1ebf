"""A tiny randomly initialised Llama target and DSpark head, for pure tests of the head,
its drafter and training (V = 64 tokens, dim 32)."""

from __future__ import annotations

import torch

from dspark.models.config import ModelArgs
from dspark.models.dspark_head import DSparkHead, DSparkHeadConfig
from dspark.models.llama import Transformer
from dspark.train.features import FeatureStore
from dspark.workers.request import SamplingParams, Sequence

V, D = 64, 32
TINY_HEAD = DSparkHeadConfig(
    target_name="tiny", dim=D, vocab_size=V, feature_layers=(1, 3), n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, intermediate_size=48, block_len=4, markov_rank=8,
)


def tiny_target(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=V, dim=D, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48,
                     max_position_embeddings=256, name="tiny")
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval().requires_grad_(False)


def tiny_head(target: Transformer, cfg: DSparkHeadConfig = TINY_HEAD, seed: int = 0) -> DSparkHead:
    head = DSparkHead(cfg)
    head.reset_parameters(target, seed=seed)
    with torch.no_grad():  # make every part matter (the training init zeroes some of them)
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.2)
    return head.bind_target(target).eval()


def make_seq(rid: str, prompt: list[int], anchor: int, temperature: float = 0.0, seed: int = 0) -> Sequence:
    s = Sequence(request_id=rid, prompt_ids=list(prompt), params=SamplingParams(max_tokens=64, temperature=temperature, seed=seed),
                 generator=torch.Generator())
    s.output_ids = [anchor]
    s.num_cached = len(prompt)
    return s


def synthetic_store(n_seqs: int = 6, length: int = 24, prompt: int = 6, seed: int = 0) -> FeatureStore:
    g = torch.Generator().manual_seed(seed)
    N = n_seqs * length
    return FeatureStore(
        tokens=torch.randint(0, V, (N,), generator=g), features=torch.randn(N, 2 * D, generator=g).bfloat16(),
        final=torch.randn(N, D, generator=g).bfloat16(), starts=torch.arange(n_seqs) * length,
        lengths=torch.full((n_seqs,), length), prompt_lens=torch.full((n_seqs,), prompt),
        greedy=torch.tensor([i % 2 == 0 for i in range(n_seqs)]),
    )
