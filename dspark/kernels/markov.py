"""Markov-head block sampling for the DSpark drafter (paper, section 3.1, eq. 4-5).

The parallel backbone gives base logits U_1..U_G for a block in one pass; the Markov head then
samples left to right, adding a low-rank bias from the previous token:

    logits_k = U_k + W1[x_{k-1}] @ W2,    q_k = softmax(logits_k / T),    x_k ~ q_k,

with x_0 the anchor (the last token the target emitted).  DeepSpec's gated and RNN heads replace
the latent W1[x_{k-1}] by a mix with the backbone's hidden state h_k (``MarkovMix``, ``markov_latent``):

    gated   u_k = sigmoid(W_g [h_k ; W1[x_{k-1}]] + b_g) * W1[x_{k-1}]
    rnn     [g ; c ; o] = W_j [s_{k-1} ; W1[x_{k-1}] ; h_k] + b_j,   s_0 = 0
            s_k = sigmoid(g) * s_{k-1} + (1 - sigmoid(g)) * tanh(c),   u_k = tanh(o)

and logits_k = U_k + u_k @ W2.  q_k may be truncated to its top-k
entries and renormalised; either way the returned q_k is *exactly* the distribution x_k was
drawn from, which is what lossless rejection sampling needs (``rejection.py``).

Randomness: one uniform per position, [B, G], sampled by inverse CDF.  That is the least
randomness an exact draw needs and costs one cumsum over the (truncated) row, where the
exponential race of ``sampling.sample_from_probs`` would need B * G * V noise values.

An all-greedy block of the vanilla head on a CPU with AVX-512 BF16 runs its left-to-right loop
in one call of our kernel (``markov_chain.cpp``, W2 packed by :func:`pack_w2`; on the tile unit
where the CPU has AMX): a block of 7 over 8,192 columns at one thread took 0.31 against 1.3 ms
at one request and 0.72 against 3.8 ms at sixteen, where torch's loop is five small operations
a position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MarkovDraft", "MarkovMix", "markov_block_sample", "markov_latent", "inverse_cdf_sample",
           "masked_position_sample", "pack_w2"]


def pack_w2(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor | None:
    """W2 [r, N] packed for the greedy kernel, [r / 2, N, 2] bf16 (the pair of rows 2j, 2j + 1 of
    each column side by side), or None where the kernel does not serve this head: a CPU without
    AVX-512 BF16 (or without the built kernel), another device, or W1 / W2 not held in bf16 (the
    kernel's products are exact only for bf16 values) or of odd rank.

        >>> w2 = torch.arange(6.0).view(2, 3).bfloat16()
        >>> p = pack_w2(torch.zeros(4, 2, dtype=torch.bfloat16), w2)
        >>> p is None or p[0].tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
        True
    """
    from dspark.kernels.native import markov_chain_usable

    r = w2.shape[0]
    if (w2.device.type != "cpu" or w1.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16 or r % 2
            or w1.shape[1] != r or not markov_chain_usable()):  # fmt: skip
        return None
    return w2.detach().reshape(r // 2, 2, -1).permute(0, 2, 1).contiguous()


@dataclass(frozen=True)
class MarkovMix:
    """The mixing layer of a gated or RNN Markov head (absent for the vanilla head).

    kind: "gated" (weight [r, D + r], bias [r]) or "rnn" (weight [3r, 2r + D], bias [3r]).
    hidden: [B, G, D] the backbone's hidden states h_1..h_G of the block being sampled.
    """

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor
    hidden: torch.Tensor


def markov_latent(mix: MarkovMix | None, emb: torch.Tensor, k: int,
                  state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The latent u_k that W2 projects to the bias at position k, and the next recurrent state.

    emb: [B, r] = W1[x_{k-1}]; state: [B, r] s_{k-1} (rnn; None starts from zeros).  Returns
    (u_k [B, r], s_k or None).  Vanilla (mix None): u_k = emb.

    Example (gated, r = 1, D = 1, gate weights 0: the gate is sigmoid(0) = 1/2):
        >>> mix = MarkovMix("gated", torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, 1, 1))
        >>> markov_latent(mix, torch.tensor([[4.0]]), 0, None)[0]
        tensor([[2.]])
    """
    if mix is None:
        return emb, None
    h = mix.hidden[:, k].to(emb.dtype)  # [B, D]
    if mix.kind == "gated":
        gate = torch.sigmoid(torch.nn.functional.linear(torch.cat([h, emb], dim=-1), mix.weight, mix.bias))
        return gate * emb, None
    if mix.kind == "rnn":
        state = torch.zeros_like(emb) if state is None else state
        proj = torch.nn.functional.linear(torch.cat([state, emb, h], dim=-1), mix.weight, mix.bias)  # [B, 3r]
        g_raw, c_raw, o_raw = proj.chunk(3, dim=-1)
        g = torch.sigmoid(g_raw)
        state = g * state + (1.0 - g) * torch.tanh(c_raw)
        return torch.tanh(o_raw), state
    raise ValueError(f"Markov head kind {mix.kind!r}: expected gated or rnn")


@dataclass(frozen=True)
class MarkovDraft:
    """A sampled block and the exact proposal it came from.

    tokens: [B, G] int64, the drafts x_1..x_G.
    draft_probs: [B, G, V] float32 dense q, or [B, G, K] float32 values of a sparse q.
    draft_prob_ids: [B, G, K] int64 vocabulary ids of the sparse entries; None when dense.
        Entries with value 0 are padding (an id may then repeat).
    prev_embeddings: [B, G, r], W1[x_{k-1}] for k = 1..G (the confidence head's input).
    """

    tokens: torch.Tensor
    draft_probs: torch.Tensor
    draft_prob_ids: torch.Tensor | None
    prev_embeddings: torch.Tensor


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]: a draw from probs (unnormalised is fine).

    probs: [R, K] >= 0 with positive row sums; uniforms: [R] in [0, 1).  Returns [R] int64.
    The cumsum runs in float64, so the realised law matches probs to ~1e-15 given a float64
    uniform (a float32 uniform only resolves 2^-24).  Zero entries are never returned.

    Example:
        >>> inverse_cdf_sample(torch.tensor([[0.5, 0.0, 0.5]]), torch.tensor([0.6]))
        tensor([2])
    """
    cdf = torch.cumsum(probs.double(), dim=-1)  # [R, K]
    target = uniforms.double().unsqueeze(-1) * cdf[:, -1:]  # [R, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def markov_block_sample(
    base_logits: torch.Tensor,
    anchor_ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    temperature: torch.Tensor,
    top_k: int,
    uniforms: torch.Tensor,
    vocab_ids: torch.Tensor | None = None,
    mix: MarkovMix | None = None,
    w2_pairs: torch.Tensor | None = None,
) -> MarkovDraft:
    """Sample a draft block left to right through the Markov head.

    base_logits: [B, G, N] from the parallel backbone (N = V without ``vocab_ids``).
    anchor_ids: [B] int64, x_0 (a vocabulary id).
    w1: [V, r] previous-token embedding (any vocabulary id); w2: [r, N] logit projection (the
        latent is cast to its dtype: a float32 W2 makes the bias a float32 product, which the
        all-greedy path adds to float32 base logits in the same call).
    temperature: [B]; <= 0 means greedy (x_k = argmax logits_k, lowest column on ties).
    top_k: 0 = q over all N columns; > 0 = q truncated to the top_k logits.
    uniforms: [B, G] in [0, 1) (float64 recommended), one draw per position.
    vocab_ids: [N] int64 vocabulary id of each logit column (a draft vocabulary), or None when
        the columns are the vocabulary itself.  q's support is then inside ``vocab_ids``; tokens
        and sparse ids are reported as vocabulary ids, so the verifier needs nothing else.
    mix: the gated / RNN head's mixing layer and the block's hidden states (None: vanilla head).
    w2_pairs: W2 packed by :func:`pack_w2` (the same values as ``w2``): an all-greedy block of
        the vanilla head then runs in one call of the kernel.

    Proposal format: sparse ``[B, G, 1]`` when every request is greedy (whatever ``top_k``);
    otherwise sparse ``[B, G, K]`` values + ids when top_k > 0 (K = min(top_k, N)) or with
    ``vocab_ids`` (K = N when top_k = 0); dense ``[B, G, V]`` otherwise.  A greedy row's q is
    one-hot on its token (slot 0 of a sparse row, the other slots padding).

    Returns a :class:`MarkovDraft`.

    Example (V = 3, r = 1, one greedy request; the bias makes token 2 follow token 1):
        >>> w1 = torch.tensor([[0.0], [1.0], [0.0]]); w2 = torch.tensor([[0.0, 0.0, 5.0]])
        >>> d = markov_block_sample(torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]]),
        ...     torch.tensor([0]), w1, w2, torch.tensor([0.0]), 0, torch.zeros(1, 2))
        >>> d.tokens, d.draft_probs.squeeze(-1), d.draft_prob_ids.squeeze(-1)
        (tensor([[1, 2]]), tensor([[1., 1.]]), tensor([[1, 2]]))
    """
    num_reqs, block, vocab = base_logits.shape
    device = base_logits.device
    temperature = temperature.to(device=device, dtype=torch.float32)
    greedy = temperature <= 0  # [B]
    any_greedy, all_greedy = bool(greedy.any()), bool(greedy.all())
    if all_greedy:
        if w2_pairs is not None and mix is None and base_logits.device.type == "cpu" and w1.dtype == torch.bfloat16:
            return _greedy_chain(base_logits, anchor_ids, w1, w2_pairs, vocab_ids)
        return _greedy_block(base_logits, anchor_ids, w1, w2, vocab_ids, mix)
    mapped = vocab_ids is not None
    sparse = top_k > 0 or all_greedy or mapped
    width = min(top_k, vocab) if top_k > 0 else (1 if all_greedy else vocab)
    if mapped:
        vocab_ids = vocab_ids.to(device=device, dtype=torch.long)  # [N]
    temp = torch.where(greedy, 1.0, temperature).unsqueeze(1)  # greedy rows divide by 1: [B, 1]
    rows = torch.arange(num_reqs, device=device)  # [B]

    tokens = torch.empty(num_reqs, block, dtype=torch.long, device=device)
    probs = torch.empty(num_reqs, block, width, dtype=torch.float32, device=device)
    ids = torch.empty(num_reqs, block, width, dtype=torch.long, device=device) if sparse else None
    prev_emb = torch.empty(num_reqs, block, w1.shape[1], dtype=w1.dtype, device=device)
    prev = anchor_ids.to(device=device, dtype=torch.long)  # x_{k-1}: [B]
    state = None  # the RNN head's s_{k-1}
    for k in range(block):
        emb = w1[prev]  # W1[x_{k-1}]: [B, r]
        prev_emb[:, k] = emb
        latent, state = markov_latent(mix, emb, k, state)
        logits = base_logits[:, k].float() + (latent.to(w2.dtype) @ w2).float()  # [B, N]
        if sparse:
            if top_k > 0:
                vals, cand = torch.topk(logits, width, dim=-1)  # [B, K] each, descending
                q = torch.softmax(vals / temp, dim=-1)
            elif all_greedy:  # K = 1
                cand = logits.argmax(-1, keepdim=True)
                q = torch.ones(num_reqs, 1, dtype=torch.float32, device=device)
            else:  # every column of a draft vocabulary, K = N
                cand = torch.arange(vocab, device=device).expand(num_reqs, vocab)
                q = torch.softmax(logits / temp, dim=-1)
            if any_greedy:
                # Greedy: one-hot on the argmax in slot 0 (topk's tie order may differ).
                cand = cand.clone()
                cand[:, 0] = torch.where(greedy, logits.argmax(-1), cand[:, 0])
                onehot = torch.zeros_like(q)
                onehot[:, 0] = 1.0
                q = torch.where(greedy.unsqueeze(1), onehot, q)
            tok = cand[rows, inverse_cdf_sample(q, uniforms[:, k])]  # [B] column
            if mapped:  # columns -> vocabulary ids
                tok, cand = vocab_ids[tok], vocab_ids[cand]
            ids[:, k] = cand
        else:
            q = torch.softmax(logits / temp, dim=-1)  # [B, V]
            if any_greedy:
                onehot = torch.zeros_like(q).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
                q = torch.where(greedy.unsqueeze(1), onehot, q)
            tok = inverse_cdf_sample(q, uniforms[:, k])
        probs[:, k] = q
        tokens[:, k] = tok
        prev = tok
    return MarkovDraft(tokens=tokens, draft_probs=probs, draft_prob_ids=ids, prev_embeddings=prev_emb)


def _greedy_chain(base_logits: torch.Tensor, anchor_ids: torch.Tensor, w1: torch.Tensor, w2_pairs: torch.Tensor,
                  vocab_ids: torch.Tensor | None) -> MarkovDraft:
    """``_greedy_block`` of the vanilla head in one call of the kernel (``markov_chain.cpp``)."""
    num_reqs, block, _ = base_logits.shape
    ids = torch.empty(0, dtype=torch.long) if vocab_ids is None else vocab_ids.to(dtype=torch.long).contiguous()
    tokens, prev_emb = torch.ops.dspark_markov.greedy_chain(base_logits.float().contiguous(),
                                                           anchor_ids.to(torch.long).contiguous(), w1.contiguous(),
                                                           w2_pairs, ids)
    probs = torch.ones(num_reqs, block, 1, dtype=torch.float32)
    return MarkovDraft(tokens=tokens, draft_probs=probs, draft_prob_ids=tokens.unsqueeze(-1).clone(),
                       prev_embeddings=prev_emb)


def _greedy_block(base_logits: torch.Tensor, anchor_ids: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  vocab_ids: torch.Tensor | None, mix: MarkovMix | None) -> MarkovDraft:
    """``markov_block_sample`` when every request is greedy: the argmax chain, q one-hot (K = 1).

    The common case at temperature 0, with the fewest operations per position (the loop is
    sequential, so at batch 1 its cost is the number of operations, not their size).
    """
    num_reqs, block, _ = base_logits.shape
    device = base_logits.device
    if vocab_ids is not None:
        vocab_ids = vocab_ids.to(device=device, dtype=torch.long)
    fused = w2.dtype == base_logits.dtype == torch.float32  # U_k + u_k W2 in one product
    prev = anchor_ids.to(device=device, dtype=torch.long)  # x_{k-1}: [B]
    state, toks, embs = None, [], []
    for k in range(block):
        emb = w1[prev]  # W1[x_{k-1}]: [B, r]
        embs.append(emb)
        latent, state = markov_latent(mix, emb, k, state)
        if fused:
            logits = torch.addmm(base_logits[:, k], latent.float(), w2)
        else:
            logits = torch.add(base_logits[:, k], (latent.to(w2.dtype) @ w2).float())
        col = logits.argmax(-1)  # [B], lowest column on ties
        prev = col if vocab_ids is None else vocab_ids[col]
        toks.append(prev)
    tokens, prev_emb = torch.stack(toks, dim=1), torch.stack(embs, dim=1)  # [B, G], [B, G, r]
    probs = torch.ones(num_reqs, block, 1, dtype=torch.float32, device=device)
    return MarkovDraft(tokens=tokens, draft_probs=probs, draft_prob_ids=tokens.unsqueeze(-1).clone(),
                       prev_embeddings=prev_emb)


def masked_position_sample(
    logits: torch.Tensor, allowed: torch.Tensor, temperature: torch.Tensor, top_k: int, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one position of a block among the ``allowed`` columns only (structured outputs).

    logits: [B, N] float32 (the position's logits, Markov bias included); allowed: [B, N] bool,
    at least one True per row; temperature: [B] (<= 0: greedy, the argmax among the allowed);
    top_k: 0 = q over every allowed column, > 0 = over the top_k allowed logits; uniforms: [B].
    Returns (columns [B], q [B, K], candidate columns [B, K]): q is exactly the distribution the
    column was drawn from (zero outside the allowed set), K = 1 for an all-greedy batch.

    Example (column 1 is the likeliest but forbidden; greedy takes column 2):
        >>> masked_position_sample(torch.tensor([[0.0, 9.0, 1.0]]), torch.tensor([[True, False, True]]),
        ...                        torch.tensor([0.0]), 2, torch.tensor([0.3]))
        (tensor([2]), tensor([[1., 0.]]), tensor([[2, 0]]))
    """
    rows, n = logits.shape
    masked = logits.float().masked_fill(~allowed, float("-inf"))  # [B, N]
    greedy = temperature <= 0  # [B]
    width = min(top_k, n) if top_k > 0 else n
    temp = torch.where(greedy, 1.0, temperature.float()).unsqueeze(1)  # [B, 1]
    if top_k > 0:
        vals, cand = torch.topk(masked, width, dim=-1)  # [B, K], descending; forbidden ones last at -inf
    else:
        vals, cand = masked, torch.arange(n, device=logits.device).expand(rows, n)
    q = torch.softmax(vals / temp, dim=-1)  # [B, K]; -inf -> 0
    best = masked.argmax(-1)  # [B], lowest column on ties, as the unconstrained greedy path
    onehot = torch.zeros_like(q)
    onehot[:, 0] = 1.0
    q = torch.where(greedy.unsqueeze(1), onehot, q)
    cand = cand.clone()
    cand[:, 0] = torch.where(greedy, best, cand[:, 0])
    cols = cand[torch.arange(rows, device=logits.device), inverse_cdf_sample(q, uniforms)]
    return cols, q, cand
