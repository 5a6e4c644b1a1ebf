"""The graph-safe step: decode and verification steps from fixed-shape device tensors, so that
a CUDA graph captured once per bucket replays them.

The regular step (:func:`dspark.models.kv_cache.make_batch`) describes its attention with host
lists (each request's start and query length, masks built per step), which a graph cannot hold.
Here a step is four tensors of one token bucket T: token ids, positions, each token's cache slot,
and (derived on the device) each token's visible keys among the first K positions of its slot,
K a key bucket.  A step of n tokens is padded to the smallest token bucket >= n; the padding
tokens write their keys and values into a scratch slot of the cache that no request is given
(:meth:`dspark.models.kv_cache.KVCache.add_scratch_slot`), at position 0, and their outputs are
dropped.  The key bucket is the smallest >= the step's longest context.

Buckets: token counts ``TOKEN_BUCKETS``; key spans the powers of two from ``KEY_BLOCK`` up to the
cache's ``max_seq`` (the last one is ``max_seq``).  A step fits when every request feeds at most
``MAX_Q`` tokens (decode tokens, verification blocks; a prefill chunk does not), the step has at
most the largest token bucket and its contexts fit the largest key bucket; the runner takes the
regular path for the rest (and for early exit, the deterministic mode, other model families).

One code path on CPU and CUDA: :class:`GraphStep` copies a step into its static input buffers,
then on CUDA replays the bucket's graph and on CPU runs the same forward eagerly on the same
buffers (what the tests check against the regular path), and copies the wanted rows out.

Graphs are captured with ``torch.cuda.CUDAGraph`` sharing one memory pool, largest bucket first,
rather than ``torch.compile(mode="reduce-overhead")``: the step writes into the KV cache, an input
that inductor's graph trees skip capturing unless it is marked static, and capturing the eager
forward keeps the path the CPU tests run the one the GPU replays.
"""

from __future__ import annotations

import logging
import time

import torch

from dspark.kernels.attention import KEY_BLOCK, SPAN_MAX_Q, visible
from dspark.models.compiled import step_context
from dspark.models.kv_cache import KVCache, StaticBatch, step_starts
from dspark.models.llama import ForwardOutput, Transformer

# Up to 512 tokens: 64 requests verifying blocks of 4 drafts (5 tokens each) fit.
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Attention gathers each token's key span: a (T, K) bucket holds T x K keys and values per layer
# at once (for an 8-KV-head, 128-lane bf16 model, 4 KiB per token-key: 2 GiB at this budget).
# Buckets past it take the regular path instead of a graph whose temporaries outgrow the cache.
MAX_TOKEN_KEYS = 2**19
MAX_Q = SPAN_MAX_Q  # most tokens one request feeds in a graph-safe step
log = logging.getLogger(__name__)


def key_buckets(max_seq: int, smallest: int = KEY_BLOCK) -> tuple[int, ...]:
    """Key spans: powers of two from ``smallest`` below ``max_seq``, then ``max_seq``.

    >>> key_buckets(1000), key_buckets(64)
    ((64, 128, 256, 512, 1000), (64,))
    """
    out, k = [], smallest
    while k < max_seq:
        out.append(k)
        k *= 2
    return (*out, max_seq)


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n, None when n exceeds them all.

    >>> bucket(3, (1, 2, 4, 8)), bucket(9, (1, 2, 4, 8))
    (4, None)
    """
    return next((b for b in buckets if b >= n), None)


def static_forward(
    model: Transformer,
    cache: KVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    key_span: int,
    feature_layers: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder blocks on one padded step; every input a device tensor, no host reads.

    tokens/positions/slots: [T] int64.  Returns the last block's output [T, D] and the feature
    layers' outputs [T, len(feature_layers) * D] (None without feature layers).  The LM head
    runs outside, on the rows whose logits are wanted (a graph's outputs stay small).
    """
    x = model.tok_embeddings(tokens)  # [T, D]
    cos, sin = model.rope(positions)
    keys = torch.arange(key_span, device=positions.device)
    batch = StaticBatch(slots, positions, visible(keys.view(1, -1), positions.view(-1, 1), None), model.args.n_rep)
    with step_context(cache, batch):  # the compiled model's attention op reads the batch there
        outs = model._blocks(x, cos, sin, cache, batch, len(model.layers))
    features = torch.cat([outs[i] for i in feature_layers], dim=-1) if feature_layers else None
    return outs[-1], features


class GraphStep:
    """Decode and verification steps through static buffers, one CUDA graph per bucket.

    ``capture``: record CUDA graphs (default: on a CUDA model); without, each step runs eagerly
    on the static buffers.  The cache gains a scratch slot; on CUDA it is reserved to
    ``max_seq`` at once, so the graphs' pointers into it stay valid.
    """

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        token_buckets: tuple[int, ...] = TOKEN_BUCKETS,
        key_spans: tuple[int, ...] | None = None,
        capture: bool | None = None,
        max_token_keys: int = MAX_TOKEN_KEYS,
    ) -> None:
        if type(model) is not Transformer:
            raise ValueError(f"the graph-safe step serves Llama-family decoders, not {type(model).__name__}")
        if type(cache) is not KVCache:
            raise ValueError("the graph-safe step needs the slot KV layout")
        if model.tp.world_size != 1:
            raise ValueError("the graph-safe step runs on one device (no tensor parallelism)")
        self.model, self.cache = model, cache
        self.token_buckets = tuple(sorted(token_buckets))
        self.key_spans = tuple(sorted(key_spans or key_buckets(cache.max_seq)))
        if self.key_spans[-1] > cache.max_seq:
            raise ValueError(f"key bucket {self.key_spans[-1]} > max_seq {cache.max_seq}")
        self.max_token_keys = max_token_keys
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.scratch = cache.add_scratch_slot()
        if self.capture:
            cache.reserve(cache.max_seq)
        # tokens, positions, slots of the largest bucket; a bucket reads the first T columns.
        self.ids = torch.zeros(3, self.token_buckets[-1], dtype=torch.long, device=model.device)
        self._graphs: dict[tuple[int, int, tuple[int, ...]], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._pool = None
        self._cache_ptr = self._cache_tensors()
        self.served = 0  # steps run through the graph-safe path (what the checks count)

    def _cache_tensors(self) -> tuple[int, int]:
        return self.cache.k.data_ptr(), self.cache.v.data_ptr()

    def fits(self, starts: list[int], q_lens: list[int]) -> tuple[int, int] | None:
        """(token bucket, key bucket) of a step, None when it takes the regular path."""
        if max(q_lens) > MAX_Q:
            return None
        tb = bucket(sum(q_lens), self.token_buckets)
        kb = bucket(max(s + q for s, q in zip(starts, q_lens)), self.key_spans)
        if tb is None or kb is None or tb * kb > self.max_token_keys:
            return None
        return tb, kb

    @torch.inference_mode()
    def run(
        self,
        tokens: list[int],
        slots: list[int],
        starts: list[int],
        q_lens: list[int],
        logits_rows: list[int] | None = None,
        feature_layers: tuple[int, ...] = (),
    ) -> ForwardOutput:
        """One step (it must fit a bucket): request i appends ``q_lens[i]`` tokens to
        ``slots[i]`` at ``starts[i]`` (the cache's lengths move to ``starts[i] + q_lens[i]``)."""
        buckets = self.fits(starts, q_lens)
        if buckets is None:
            raise ValueError(f"a step of query lengths {q_lens} fits no graph bucket")
        tb, kb = buckets
        for s, st in zip(slots, starts):
            self.cache.lengths[s] = st
        step_starts(self.cache, slots, q_lens)  # well formed and within max_seq
        self.cache.reserve(kb)  # CPU: the cache grows as the regular path's does; CUDA: reserved
        for s, st, q in zip(slots, starts, q_lens):
            self.cache.lengths[s] = st + q
        n, pad = len(tokens), tb - len(tokens)
        positions = [p for st, q in zip(starts, q_lens) for p in range(st, st + q)]
        tok_slots = [s for s, q in zip(slots, q_lens) for _ in range(q)]
        host = torch.tensor([tokens + [0] * pad, positions + [0] * pad, tok_slots + [self.scratch] * pad])
        hidden, features = self._outputs(tb, kb, tuple(feature_layers), host)
        self.served += 1
        # The outputs belong to the graph (the next replay overwrites them): the head and the
        # features' clone read them now, and padding rows (n and past) are never read.
        if logits_rows is None:
            logits = self.model.lm_head(hidden[:n])
        elif logits_rows:
            logits = self.model.lm_head(hidden[torch.tensor(logits_rows, dtype=torch.long, device=hidden.device)])
        else:
            logits = None
        return ForwardOutput(logits=logits, features=None if features is None else features[:n].clone())

    def _outputs(self, tb: int, kb: int, feature_layers: tuple[int, ...], host: torch.Tensor):
        """Load the step into the static buffers and run the bucket: replay on CUDA, eager otherwise."""
        if not self.capture:
            self.ids[:, :tb].copy_(host)
            return self._forward(tb, kb, feature_layers)
        if self._cache_tensors() != self._cache_ptr:  # the cache was replaced: the graphs point at the old one
            self._graphs.clear()
            self._cache_ptr = self._cache_tensors()
        key = (tb, kb, feature_layers)
        if key not in self._graphs:
            self._capture(*key)
        graph, out = self._graphs[key]
        self.ids[:, :tb].copy_(host, non_blocking=True)
        graph.replay()
        return out

    def _forward(self, tb: int, kb: int, feature_layers: tuple[int, ...]):
        ids = self.ids[:, :tb]
        return static_forward(self.model, self.cache, ids[0], ids[1], ids[2], kb, feature_layers)

    def _capture(self, tb: int, kb: int, feature_layers: tuple[int, ...]) -> None:
        """Record the bucket's graph from padding inputs (the warm-up runs write only the scratch slot)."""
        self.ids[0].zero_()
        self.ids[1].zero_()
        self.ids[2].fill_(self.scratch)
        side = torch.cuda.Stream(device=self.model.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # kernels pick their workspaces before capture
            for _ in range(2):
                self._forward(tb, kb, feature_layers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(tb, kb, feature_layers)
        self._pool = graph.pool()
        self._graphs[(tb, kb, feature_layers)] = (graph, out)

    @torch.inference_mode()
    def capture_all(self, feature_layers: tuple[int, ...] = ()) -> float:
        """Capture every (token, key) bucket now, largest first (smaller ones reuse the pool's
        memory); returns the seconds it took.  Nothing to do without capture."""
        if not self.capture:
            return 0.0
        t0 = time.perf_counter()
        for kb in reversed(self.key_spans):
            for tb in reversed(self.token_buckets):
                if tb * kb <= self.max_token_keys and (tb, kb, feature_layers) not in self._graphs:
                    self._capture(tb, kb, feature_layers)
        torch.cuda.synchronize(self.model.device)
        seconds = time.perf_counter() - t0
        log.info("captured %d CUDA graphs in %.1f s", len(self._graphs), seconds)
        return seconds

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)
