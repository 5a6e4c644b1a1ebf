"""DeepSeek-V4 attention math as pure tensor functions (no modules, no cache objects).

A V4 attention layer, in the order these functions compose:

1. queries through a low-rank bottleneck (:func:`low_rank_query`), one shared key/value head
   (:func:`shared_kv`), both RMS-normalised;
2. interleaved RoPE on the *trailing* ``rope_dim`` channels of each head
   (:func:`rope_inv_freq`, :func:`rope_cos_sin`, :func:`apply_partial_rope`); sliding-window
   layers use the main base, CSA / HCA layers the compress base with YaRN;
3. CSA / HCA layers append compressed entries to the sliding-window keys: softmax-gated
   pooling of windows of m tokens, overlapping by m for CSA (:func:`compress_kv`); a query sees
   an entry only once its whole window is in the past (:func:`compressed_causal_bias`); CSA
   further keeps the top-k entries its Lightning Indexer scores highest
   (:func:`indexer_scores`, :func:`indexer_topk`, :func:`selected_entries_bias`);
4. softmax attention over the one KV head with a learned per-head sink logit
   (:func:`sink_attention`), keys masked by :func:`sliding_window_bias` + the entry bias;
5. because the value is the (rotated) key, the output's rope slice carries the key's absolute
   position; rotating it back by the *query* position (``inverse=True``) leaves only relative
   position in it; then the grouped low-rank output projection
   (:func:`grouped_output_projection`).

Shapes: B batch, S queries, T keys, H heads, D head_dim, R rope_dim, m compression ratio,
N closed windows, c indexer head width.  Masks are additive float biases (0 or -inf).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "apply_partial_rope",
    "compress_kv",
    "compressed_causal_bias",
    "grouped_output_projection",
    "indexer_scores",
    "indexer_topk",
    "low_rank_query",
    "rms_norm",
    "rope_cos_sin",
    "rope_inv_freq",
    "selected_entries_bias",
    "shared_kv",
    "sink_attention",
    "sliding_window_bias",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, in fp32; ``weight=None`` is V4's unweighted per-head norm.

    x: [..., C]; weight: [C] or None.  Returns x's shape and dtype.

    Example:
        >>> rms_norm(torch.tensor([[3.0, 4.0]]), None, 0.0)
        tensor([[0.8485, 1.1314]])
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y  # V4 keeps norm weights in fp32: scale before the cast back
    return y.to(x.dtype)


def rope_inv_freq(
    rope_dim: int,
    theta: float,
    yarn_factor: float | None = None,
    original_max_position_embeddings: int = 65536,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """Inverse frequencies of one RoPE pair each, [R/2] fp32, optionally YaRN-interpolated.

    YaRN keeps the fast frequencies (more than ``beta_fast`` turns over the original context),
    divides the slow ones (under ``beta_slow`` turns) by ``yarn_factor``, and ramps linearly
    in pair index between the two; the ramp ends are rounded outwards to whole pairs.

    Example:
        >>> rope_inv_freq(4, 10000.0)
        tensor([1.0000, 0.0100])
    """
    pair = torch.arange(0, rope_dim, 2, dtype=torch.float32)  # [R/2]: 2i
    inv = 1.0 / theta ** (pair / rope_dim)  # [R/2]
    if yarn_factor is None:
        return inv

    def pair_at(turns: float) -> float:  # the (fractional) pair index that turns this often
        return rope_dim * math.log(original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_at(beta_fast)), 0)
    high = min(math.ceil(pair_at(beta_slow)), rope_dim - 1)
    span = (high - low) or 0.001  # a zero span would divide by zero; any tiny span gives a step
    interp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / span).clamp(0, 1)  # [R/2]
    return inv / yarn_factor * interp + inv * (1 - interp)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each [..., R/2] fp32 for positions [...] (ints).

    ``scale`` multiplies both (YaRN's attention factor; V4 uses 1).

    Example:
        >>> cos, sin = rope_cos_sin(torch.tensor([0, 1]), torch.tensor([1.0]))
        >>> cos.squeeze(-1), sin.squeeze(-1)
        (tensor([1.0000, 0.5403]), tensor([0.0000, 0.8415]))
    """
    angles = positions.unsqueeze(-1).float() * inv_freq.float()  # [..., R/2]
    return angles.cos() * scale, angles.sin() * scale


def apply_partial_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Rotate the trailing 2 * cos.shape[-1] channels of x as interleaved pairs (x0,x1),(x2,x3)...

    x: [..., D]; cos, sin: broadcastable to [..., R/2] (e.g. [B, 1, S, R/2] for x [B, H, S, D]).
    The leading D - R ("nope") channels pass unchanged.  ``inverse=True`` rotates by minus the
    angle, which undoes a forward rotation at the same position.

    Example:
        >>> x = torch.tensor([5.0, 1.0, 0.0])  # one nope channel, one pair
        >>> apply_partial_rope(x, torch.tensor([0.0]), torch.tensor([1.0]))  # quarter turn
        tensor([5., 0., 1.])
    """
    half = cos.shape[-1]
    nope, rope = x[..., : -2 * half], x[..., -2 * half :]
    even, odd = rope.float()[..., 0::2], rope.float()[..., 1::2]  # [..., R/2] each
    s = -sin if inverse else sin
    rotated = torch.stack((even * cos - odd * s, odd * cos + even * s), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)


def low_rank_query(
    x: torch.Tensor,
    wq_a: torch.Tensor,
    q_norm_weight: torch.Tensor,
    wq_b: torch.Tensor,
    n_heads: int,
    eps: float,
    head_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries before RoPE, [B, S, H, D], and the normalised latent, [B, S, q_lora].

    x: [B, S, hidden]; wq_a: [q_lora, hidden]; q_norm_weight: [q_lora]; wq_b: [H * D, q_lora].
    The latent is also the indexer's query input, hence returned.  Each head is RMS-normalised
    without weight, so every query has the same norm before the softmax scale (``head_norm=False``
    skips that norm: one reading of the V4 DSpark draft's attention, docs/DEEPSEEK_V4.md).

    Example:
        >>> q, lat = low_rank_query(torch.ones(1, 1, 2), torch.eye(2), torch.ones(2), torch.eye(2), 1, 0.0)
        >>> q.shape, lat.shape
        (torch.Size([1, 1, 1, 2]), torch.Size([1, 1, 2]))
    """
    latent = rms_norm(x @ wq_a.T, q_norm_weight, eps)  # [B, S, q_lora]
    q = (latent @ wq_b.T).unflatten(-1, (n_heads, -1))  # [B, S, H, D]
    return (rms_norm(q, None, eps) if head_norm else q), latent


def shared_kv(x: torch.Tensor, wkv: torch.Tensor, kv_norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The one key/value head before RoPE, [B, S, D]: RMSNorm(x @ wkv.T).

    x: [B, S, hidden]; wkv: [D, hidden]; kv_norm_weight: [D].

    Example:
        >>> shared_kv(torch.tensor([[[3.0, 4.0]]]), torch.eye(2), torch.ones(2), 0.0).shape
        torch.Size([1, 1, 2])
    """
    return rms_norm(x @ wkv.T, kv_norm_weight, eps)


def sliding_window_bias(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """0 where key k is visible to query q (q - window < k <= q), else -inf: [..., S, T].

    query_pos: [..., S]; key_pos: [..., T] (absolute positions; the window includes the query).

    Example:
        >>> sliding_window_bias(torch.tensor([2]), torch.arange(4), 2)
        tensor([[-inf, 0., 0., -inf]])
    """
    q, k = query_pos.unsqueeze(-1), key_pos.unsqueeze(-2)  # [..., S, 1], [..., 1, T]
    visible = (k <= q) & (k > q - window)
    return torch.zeros(visible.shape).masked_fill(~visible, float("-inf")).to(query_pos.device)


def sink_attention(
    q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Softmax attention of H query heads over one shared key/value head, with per-head sinks.

    q: [B, H, S, D]; kv: [B, T, D] read as both key and value; sinks: [H] logits of a virtual
    key with a zero value (it absorbs probability mass, so a head may attend to nothing);
    bias: [B, S, T] additive (0 / -inf) or None.  Returns [B, H, S, D] in q's dtype.  The logits
    and the softmax are fp32 whatever the inputs (as a fused attention kernel keeps its scores
    in fp32 registers); the probabilities are rounded to the value's dtype for the second product.

    Example:
        >>> q, kv = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 2)
        >>> sink_attention(q, kv, torch.zeros(1), None, 1.0)  # equal logits: half goes to the sink
        tensor([[[[0.5000, 0.5000]]]])
    """
    logits = torch.einsum("bhsd,btd->bhst", q.float(), kv.float()) * scale  # [B, H, S, T] fp32
    if bias is not None:
        logits = logits + bias.unsqueeze(1)
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)  # [B, H, S, 1]
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]  # [B, H, S, T]
    return torch.einsum("bhst,btd->bhsd", probs.to(kv.dtype), kv).to(q.dtype)


def grouped_output_projection(
    o: torch.Tensor, wo_a: torch.Tensor, wo_b: torch.Tensor, n_groups: int
) -> torch.Tensor:
    """Project attention output [B, S, H, D] to [B, S, hidden] through per-group bottlenecks.

    The heads are cut into ``n_groups`` contiguous groups; group g's H*D/G channels go through
    its own [r, H*D/G] block of wo_a ([G * r, H*D/G], blocks stacked), the G * r results are
    concatenated and mixed by wo_b ([hidden, G * r]).  Cheaper than one H*D -> hidden matrix.

    Example:
        >>> o = torch.ones(1, 1, 2, 1)  # two heads of width one, two groups
        >>> grouped_output_projection(o, torch.tensor([[2.0], [3.0]]), torch.eye(2), 2)
        tensor([[[2., 3.]]])
    """
    groups = o.flatten(-2).unflatten(-1, (n_groups, -1))  # [B, S, G, H*D/G]
    blocks = wo_a.unflatten(0, (n_groups, -1))  # [G, r, H*D/G]
    mid = torch.einsum("bsgi,gri->bsgr", groups, blocks).flatten(-2)  # [B, S, G * r]
    return mid @ wo_b.T


def compress_kv(
    kv: torch.Tensor,
    gate: torch.Tensor,
    position_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    eps: float,
    overlap: bool,
    first_position: int = 0,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_scale: float = 1.0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Pool each closed window of m tokens into one compressed entry: (entries, overlap tail).

    kv, gate: [B, N*m, W] projections of the window tokens (W = D for HCA, 2D for CSA);
    position_bias: [m, W] added to the gate by position in the window; norm_weight: [D];
    inv_freq: [R/2] (the compress RoPE).  Per channel, entry = sum_j softmax_j(gate_j + bias_j)
    * kv_j over the window's slots, then RMSNorm and RoPE at the window's first position
    ``first_position + i * m``.

    ``overlap`` (CSA): the first D channels (series a) of window i-1 and the last D (series b)
    of window i are pooled together over 2m slots, so entries overlap by m tokens.  Window 0's
    series-a slots come from ``prior`` = (kv, biased gate), each [B, m, D], the tail the
    previous call returned; without it they get weight 0.  The returned tail is window N-1's
    series a, for the next call; None for HCA.  Returns entries [B, N, D].

    Example (HCA, one window of two tokens, equal gates: the mean, then normalised):
        >>> kv = torch.tensor([[[1.0, 3.0], [3.0, 1.0]]])
        >>> e, tail = compress_kv(kv, torch.zeros(1, 2, 2), torch.zeros(2, 2), torch.ones(2),
        ...                       torch.zeros(0), 0.0, overlap=False)
        >>> e, tail
        (tensor([[[1., 1.]]]), None)
    """
    b, length, width = kv.shape
    m = position_bias.shape[0]
    n = length // m
    kv = kv[:, : n * m].unflatten(1, (n, m))  # [B, N, m, W]
    gate = gate[:, : n * m].unflatten(1, (n, m)) + position_bias  # [B, N, m, W]
    tail = None
    if overlap:
        d = width // 2
        # Series a of the window before: from this call's previous window, or the prior tail.
        if prior is not None:
            prev_kv = torch.cat([prior[0].unsqueeze(1).to(kv.dtype), kv[:, :-1, :, :d]], dim=1)
            prev_gate = torch.cat([prior[1].unsqueeze(1).to(gate.dtype), gate[:, :-1, :, :d]], dim=1)
        else:  # nothing before window 0: zero value, -inf gate = no weight
            prev_kv = torch.cat([kv.new_zeros(b, 1, m, d), kv[:, :-1, :, :d]], dim=1)
            prev_gate = torch.cat([gate.new_full((b, 1, m, d), float("-inf")), gate[:, :-1, :, :d]], dim=1)
        if n > 0:
            tail = (kv[:, -1, :, :d].clone(), gate[:, -1, :, :d].clone())
        else:
            tail = prior
        kv = torch.cat([prev_kv[:, :n], kv[..., d:]], dim=2)  # [B, N, 2m, D]
        gate = torch.cat([prev_gate[:, :n], gate[..., d:]], dim=2)  # [B, N, 2m, D]
    # fp32 softmax and pooled sum (close gates stay distinct; 2m bf16 terms would each round),
    # rounded to kv's dtype once, after the norm and the rotation.
    weights = gate.float().softmax(dim=2)  # [B, N, 2m or m, D]
    pooled = rms_norm((weights * kv.float()).sum(dim=2), norm_weight, eps)  # [B, N, D] fp32
    if inv_freq.numel() == 0:
        return pooled.to(kv.dtype), tail
    positions = first_position + m * torch.arange(n, device=kv.device)  # [N]
    cos, sin = rope_cos_sin(positions, inv_freq.to(kv.device), rope_scale)  # [N, R/2]
    return apply_partial_rope(pooled, cos, sin).to(kv.dtype), tail


def compressed_causal_bias(query_pos: torch.Tensor, n_entries: int, ratio: int) -> torch.Tensor:
    """0 where compressed entry w is visible to the query, else -inf: [..., S, n_entries].

    Entry w pools positions [w*m, (w+1)*m); a query at p sees it once all of them are <= p.
    query_pos: [..., S] ints.

    Example:
        >>> compressed_causal_bias(torch.tensor([2, 3]), 2, 2)
        tensor([[0., -inf],
                [0., 0.]])
    """
    closed = (query_pos + 1) // ratio  # [..., S]: entries whose window has closed
    hidden = torch.arange(n_entries, device=query_pos.device) >= closed.unsqueeze(-1)  # [..., S, T]
    return torch.zeros(hidden.shape, device=query_pos.device).masked_fill(hidden, float("-inf"))


def indexer_scores(q: torch.Tensor, keys: torch.Tensor, head_weights: torch.Tensor) -> torch.Tensor:
    """Lightning Indexer relevance of each compressed entry to each query: [B, S, T] fp32.

    score(s, t) = sum_h w[s, h] / sqrt(Hi) * ReLU(q[s, h] . k[t]) / sqrt(c).
    q: [B, S, Hi, c] (rope applied); keys: [B, T, c] (the indexer's own compressed entries);
    head_weights: [B, S, Hi] (the per-token head-weight projection, before the 1/sqrt(Hi)).

    Example:
        >>> q = torch.tensor([[[[1.0], [-1.0]]]])  # two heads of width one
        >>> indexer_scores(q, torch.tensor([[[2.0]]]), torch.tensor([[[1.0, 1.0]]]))
        tensor([[[1.4142]]])
    """
    c, heads = q.shape[-1], q.shape[-2]
    dots = torch.einsum("bshc,btc->bsht", q.float(), keys.float()).relu()  # [B, S, Hi, T]
    w = head_weights.float() * heads**-0.5  # [B, S, Hi]
    return torch.einsum("bsht,bsh->bst", dots, w) * c**-0.5


def indexer_topk(scores: torch.Tensor, query_pos: torch.Tensor, ratio: int, topk: int) -> torch.Tensor:
    """The top-k visible entries per query by score: [B, S, min(k, T)] int64, -1 = none.

    scores: [B, S, T]; query_pos: [B, S].  Entries not yet closed for a query are never
    picked; when fewer than k are visible the remaining slots hold -1.  Equal scores (common:
    the ReLU makes many exactly 0) go to the lower entry number, so a query's picks depend on
    the entries it sees only, not on how many later ones the step's tensor holds (a chunked
    prefill or a verify block picks what token-by-token decoding picks).

    Example:
        >>> indexer_topk(torch.tensor([[[1.0, 5.0, 9.0]]]), torch.tensor([[3]]), 2, 3)  # entry 2 not closed
        tensor([[[ 1,  0, -1]]])
    """
    k = min(topk, scores.shape[-1])
    masked = scores + compressed_causal_bias(query_pos, scores.shape[-1], ratio)  # [B, S, T]
    values, idx = masked.sort(dim=-1, descending=True, stable=True)  # ties: lower index first
    values, idx = values[..., :k], idx[..., :k]  # [B, S, k]
    return idx.masked_fill(values == float("-inf"), -1)


def selected_entries_bias(indices: torch.Tensor, n_entries: int) -> torch.Tensor:
    """0 at each selected entry, -inf elsewhere: [B, S, n_entries] from indices [B, S, k] (-1 = none).

    Example:
        >>> selected_entries_bias(torch.tensor([[[2, -1]]]), 3)
        tensor([[[-inf, -inf, 0.]]])
    """
    bias = torch.full((*indices.shape[:-1], n_entries + 1), float("-inf"), device=indices.device)
    # -1 lands in the spare last column, which is dropped.
    bias.scatter_(-1, indices.masked_fill(indices < 0, n_entries), 0.0)
    return bias[..., :n_entries]
