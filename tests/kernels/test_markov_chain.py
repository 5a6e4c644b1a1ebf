"""markov_chain.cpp: a greedy block's Markov loop in one call drafts what torch's loop drafts."""

from __future__ import annotations

import pytest
import torch

from dspark.kernels.markov import _greedy_block, markov_block_sample, pack_w2
from dspark.kernels.native import cpu_has_avx512_bf16, markov_chain_usable

needs_kernel = pytest.mark.skipif(not markov_chain_usable(), reason="no AVX-512 BF16 (the kernel is not built here)")


def _head(seed: int, b: int, g: int, n: int, v: int, r: int = 128, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(b, g, n, generator=gen) * scale
    w1 = (torch.randn(v, r, generator=gen) * 0.3).bfloat16()
    w2 = (torch.randn(r, n, generator=gen) * 0.3).bfloat16()
    anchor = torch.randint(0, v, (b,), generator=gen)
    return base, anchor, w1, w2


def _kernel(base, anchor, w1, w2, ids):
    return torch.ops.dspark_markov.greedy_chain(base, anchor, w1, pack_w2(w1, w2),
                                                torch.empty(0, dtype=torch.long) if ids is None else ids)


@needs_kernel
@pytest.mark.parametrize("b,g,n,mapped,r", [(1, 7, 8192, True, 128), (3, 5, 200, False, 128), (16, 7, 1000, True, 128),
                                            (2, 1, 8197, True, 128), (5, 4, 13, False, 128), (20, 7, 8192, True, 64),
                                            (4, 7, 8192, True, 48), (3, 3, 333, False, 6)])
def test_the_kernel_drafts_what_the_torch_loop_drafts(b, g, n, mapped, r):
    # r = 48 and 6 are not multiples of 32: the vector path for every column; the others take
    # the tile unit where the CPU has one, and the vector path for the columns past the last 64.
    v = 4 * n if mapped else n
    base, anchor, w1, w2 = _head(b * 100 + g, b, g, n, v, r)
    ids = torch.randperm(v, generator=torch.Generator().manual_seed(7))[:n] if mapped else None
    ref = _greedy_block(base, anchor, w1, w2.float(), ids, None)
    tokens, embs = _kernel(base, anchor, w1, w2, ids)
    assert torch.equal(tokens, ref.tokens)
    assert torch.equal(embs, ref.prev_embeddings)  # the W1 rows each position read, as they are
    # and through markov_block_sample, which the drafter calls
    d = markov_block_sample(base, anchor, w1, w2.float(), torch.zeros(b), 8, torch.zeros(b, g, dtype=torch.float64),
                            vocab_ids=ids, w2_pairs=pack_w2(w1, w2))
    assert torch.equal(d.tokens, ref.tokens) and torch.equal(d.draft_prob_ids[..., 0], ref.tokens)
    assert torch.equal(d.draft_probs, torch.ones(b, g, 1))


@needs_kernel
def test_a_request_drafts_the_same_alone_batched_and_at_any_thread_count():
    base, anchor, w1, w2 = _head(3, 6, 7, 8192, 8192)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(base, anchor, w1, w2, None)[0]
        alone = torch.cat([_kernel(base[i : i + 1].contiguous(), anchor[i : i + 1], w1, w2, None)[0] for i in range(6)])
        torch.set_num_threads(2)
        two = _kernel(base, anchor, w1, w2, None)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, alone) and torch.equal(one, two)


@needs_kernel
def test_ties_go_to_the_lowest_column_across_the_chunks():
    n, v = 3000, 3000
    base = torch.zeros(1, 2, n)
    base[0, 0, [2999, 1500, 40]] = 5.0  # equal maxima in three of the kernel's 1024-column chunks
    base[0, 1, [7, 2048]] = 1.0
    w1 = torch.zeros(v, 2, dtype=torch.bfloat16)
    w2 = torch.zeros(2, n, dtype=torch.bfloat16)
    tokens, _ = _kernel(base, torch.tensor([0]), w1, w2, None)
    assert tokens.tolist() == [[40, 7]] == _greedy_block(base, torch.tensor([0]), w1, w2.float(), None, None).tokens.tolist()


@needs_kernel
def test_bad_inputs_are_refused():
    base, anchor, w1, w2 = _head(0, 1, 2, 64, 64)
    packed = pack_w2(w1, w2)
    none = torch.empty(0, dtype=torch.long)
    op = torch.ops.dspark_markov.greedy_chain
    with pytest.raises(RuntimeError, match="W1: contiguous bf16"):
        op(base, anchor, w1.float(), packed, none)
    with pytest.raises(RuntimeError, match="packed by markov.pack_w2"):
        op(base, anchor, w1, w2, none)
    with pytest.raises(RuntimeError, match="anchor id out of W1"):
        op(base, torch.tensor([64]), w1, packed, none)
    with pytest.raises(RuntimeError, match="a drafted id out of W1"):
        op(base, anchor, w1, packed, torch.full((64,), 99))
    with pytest.raises(RuntimeError, match="base logits"):
        op(base.double(), anchor, w1, packed, none)


def test_pack_w2_serves_bf16_heads_only():
    w1 = torch.zeros(10, 4, dtype=torch.bfloat16)
    w2 = torch.arange(24.0).view(4, 6).bfloat16()
    assert pack_w2(w1.float(), w2) is None and pack_w2(w1, w2.float()) is None
    assert pack_w2(torch.zeros(10, 3, dtype=torch.bfloat16), torch.zeros(3, 6, dtype=torch.bfloat16)) is None  # odd rank
    packed = pack_w2(w1, w2)
    assert (packed is None) == (not markov_chain_usable())
    if packed is not None:
        assert packed.shape == (2, 6, 2) and torch.equal(packed[1, :, 1], w2[3]) and torch.equal(packed[0, :, 0], w2[0])


def test_the_kernel_is_usable_wherever_the_cpu_has_avx512_bf16():
    # This host's answer is the CPU's: a CPU with AVX-512 BF16 that fails to build or run the
    # kernel would otherwise lose it silently.
    assert markov_chain_usable() == cpu_has_avx512_bf16()


@needs_kernel
def test_the_shipped_heads_greedy_blocks_are_the_torch_loops():
    """The default drafter (bf16 head, int8 draft layers) packs W2 for the kernel, and its greedy
    blocks on real contexts are the blocks torch's loop drafts from the same base logits."""
    from dspark.train.features import target_features
    from dspark.workers.drafters.dspark import DSparkDrafter
    from helpers.engines import shipped_serving_head
    from helpers.tiny_models import make_seq

    loaded, head = shipped_serving_head()
    drafter = DSparkDrafter(head, n_slots=2, max_seq=128)
    assert drafter._w2_pairs is not None
    texts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "The capital of France is Paris. The capital of Germany is"]
    seqs = []
    with torch.inference_mode():
        for i, text in enumerate(texts):
            ids = loaded.tokenizer.encode(text)
            feats, _ = next(iter(target_features(loaded.model, [ids], head.cfg.feature_layers)))
            seq = make_seq(f"r{i}", ids[:-1], anchor=ids[-1], temperature=0.0, seed=3)
            drafter.observe(seq, seq.prompt_ids, feats[:-1])
            seqs.append(seq)
        blocks = drafter.propose(seqs, 7)
        anchors = torch.tensor([s.last_token for s in seqs])
        _, base = drafter.block_logits(seqs, anchors, 7)
        ref = _greedy_block(base, anchors, head.markov_w1, drafter._w2, drafter.draft_ids, None)
    assert [b.token_ids for b in blocks] == ref.tokens.tolist()
