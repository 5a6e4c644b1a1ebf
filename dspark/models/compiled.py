"""The compiled step: the decoder blocks of one varlen step through ``torch.compile``.

Inductor (C++/OpenMP on CPU, Triton on CUDA) fuses what lies between the matrix products:
norms, RoPE, the SwiGLU gate, residual adds.  Two operations stay opaque to it, as custom ops
with a torch implementation:

* ``dspark::packed_linear``: the oneDNN product with pre-packed bf16 weights
  (:mod:`dspark.models.packing`); inductor's own lowering of that op wants frozen weights.
* ``dspark::cache_attention``: write the step's keys and values into the cache and attend
  (on CPU our kernel, :mod:`dspark.kernels.short_attention`, for decode tokens and
  verification blocks; :func:`dspark.kernels.attention.varlen_attention` otherwise).  The cache and the step's attention plan
  (host lists the compiler should not see) come from the step context that :func:`step_context`
  sets around the compiled call.

Shapes: the token axis is dynamic, so one graph serves every step of 2 or more tokens (prefill
chunks, verification blocks, decode batches) and one more serves one-token steps (the compiler
specialises size 1).  The graphs return every block's output, so the drafter's feature layers
are picked outside them; an early-exit depth (layer-skip drafting) is a constant of its graphs
and compiles its own pair.  Compiled code is cached on disk
(``TORCHINDUCTOR_CACHE_DIR``, by default under the user's cache folder), so a second start
of the same model loads it instead of compiling.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import torch

from dspark.kernels.attention import static_attention, varlen_attention
from dspark.kernels.paged_attention import paged_attention, paged_row_invariant_attention, paged_write
from dspark.kernels.short_attention import attend, kernel_chosen, kernel_step, short_plan
from dspark.models.kv_cache import StaticBatch

_STEP = threading.local()

# The two ops are declared with torch.library's low-level registration rather than
# ``torch.library.custom_op``: that wrapper checks every call's outputs for aliasing and enters
# and leaves two Python layers, about 7 us a call, and a step makes about 150 of these calls
# (1 ms of a 21 ms batch-1 step).  Each kernel runs with dynamo disabled, as custom_op's would
# (``torch._disable_dynamo``, which imports the compiler at its first call: an eager process that
# imports this module still never loads it).
_LIB = torch.library.Library("dspark", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features, int row_block) -> Tensor")
_LIB.define("cache_attention(Tensor q, Tensor k, Tensor v, int layer) -> Tensor")


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int, row_block: int
) -> torch.Tensor:
    """x: [T, in] bf16; packed: a weight from ``mkldnn._reorder_linear_weight``.  Returns [T, out],
    contiguous (the compiled code does not check: see :func:`compile_blocks`)."""
    from dspark.models.packing import packed_product

    return packed_product(x, packed, bias, row_block).contiguous()


@torch.library.register_fake("dspark::packed_linear")
def _packed_linear_shape(x, packed, bias, out_features: int, row_block: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def write_and_attend(q, k, v, k_cache, v_cache, batch) -> torch.Tensor:
    """Store the step's keys/values at their positions, then attend.  Returns [T, n_heads, hd].

    q: [T, n_heads, hd]; k/v: [T, n_kv, hd]; k_cache/v_cache: one layer, [S, n_kv, max_seq, hd]
    (a paged cache: the layer's pools, [n_kv, n_blocks, block, hd]).  ``batch`` is a
    :class:`~dspark.models.kv_cache.VarlenBatch` or, for the graph-safe step, a
    :class:`~dspark.models.kv_cache.StaticBatch`.
    """
    if isinstance(batch, StaticBatch):  # the graph-safe step: device tensors only
        k_cache[batch.slots, :, batch.positions] = k
        v_cache[batch.slots, :, batch.positions] = v
        return static_attention(q, k_cache, v_cache, batch.slots, batch.visible, batch.n_rep)
    if batch.plan.kernel:  # the short queries in our kernel, on CPU
        return attend(q, k, v, k_cache, v_cache, batch)
    if batch.paged is not None:
        paged_write(k_cache, v_cache, k, v, batch.paged)
        if batch.plan.row_invariant:
            return paged_row_invariant_attention(q, k_cache, v_cache, batch.plan, batch.paged)
        return paged_attention(q, k_cache, v_cache, batch.paged, batch.plan.n_rep, batch.plan.scale)
    k_cache[batch.token_slots, :, batch.positions] = k
    v_cache[batch.token_slots, :, batch.positions] = v
    return varlen_attention(q, k_cache, v_cache, batch.plan)


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """:func:`write_and_attend` on layer ``layer`` of the step context's cache.

    The cache is not an argument: the compiler sees an op from (q, k, v) to the output, and the
    cache writes stay the op's own business (declared as mutated arguments, the compiler's
    functional rewrite of a view of the cache lost them).  Each layer's op reads only what it
    wrote itself or what earlier steps wrote, so no ordering beyond the data flow is needed.
    """
    step = getattr(_STEP, "step", None)
    if step is None:
        raise RuntimeError("dspark::cache_attention runs only inside step_context()")
    cache, batch, layer_batches = step
    if layer_batches is not None:  # layers of several attention kinds (Gemma 4): each its own plan
        batch = layer_batches[layer]
    n = batch.num_tokens  # rows past it repeat the last token (a one-token step padded to two)
    out = write_and_attend(q[:n], k[:n], v[:n], cache.k[layer], cache.v[layer], batch)
    if q.shape[0] > n:
        out = torch.cat((out, out[-1:].expand(q.shape[0] - n, *out.shape[1:])))
    return out.contiguous()  # as the fake below says (the compiled code does not check)


@torch.library.register_fake("dspark::cache_attention")
def _cache_attention_shape(q, k, v, layer: int) -> torch.Tensor:
    return torch.empty_like(q)


_LIB.impl("packed_linear", torch._disable_dynamo(packed_linear), "CompositeExplicitAutograd")
_LIB.impl("cache_attention", torch._disable_dynamo(cache_attention), "CompositeExplicitAutograd")


def attention_op(device: torch.device):
    """The attention op the compiled step calls on ``device``: on a CPU where our attention
    kernel serves, its C++ op (``dspark_attn::cache_attention``: no Python between the compiled
    code and the kernel, for steps the kernel serves whole; it hands any other step to the
    Python op); elsewhere ``dspark::cache_attention``."""
    if torch.device(device).type == "cpu" and kernel_chosen():
        return torch.ops.dspark_attn.cache_attention
    return torch.ops.dspark.cache_attention


def _enter_kernel_step(cache, batch, layer_batches) -> None:
    """Tell the C++ op about the step: the kernel serves it whole (every query short, one
    attention kind, caches as one tensor), or the Python op does."""
    ours = (layer_batches is None and not isinstance(batch, StaticBatch) and batch.plan.kernel
            and isinstance(cache.k, torch.Tensor) and cache.k.dim() == 5)
    if not ours or short_plan(batch).has_long:
        torch.ops.dspark_attn.enter_other_step()
        return
    torch.ops.dspark_attn.enter_step(cache.k, cache.v, *kernel_step(batch, cache.k.shape[-1]), batch.num_tokens)


@contextlib.contextmanager
def step_context(cache, batch, layer_batches=None):
    """Make ``cache`` and ``batch`` (a :class:`~dspark.models.kv_cache.VarlenBatch`) the step
    the ops see; ``layer_batches``, when given, is one batch per layer (the same step with the
    attention plan of that layer's kind: sliding window, head grouping, scale)."""
    prev = getattr(_STEP, "step", None)
    _STEP.step = (cache, batch, layer_batches)
    kernel = batch.positions.device.type == "cpu" and kernel_chosen()  # the C++ op serves CPU steps only
    try:
        if kernel:
            _enter_kernel_step(cache, batch, layer_batches)
        try:
            yield
        finally:
            if kernel:
                torch.ops.dspark_attn.leave_step()
    finally:
        _STEP.step = prev


def default_cache_dir() -> Path:
    base = os.environ.get("DSPARK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dspark")
    return Path(base) / "inductor"


def use_disk_cache() -> str:
    """Point inductor's on-disk cache at ours unless the operator chose one; returns the folder."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir()))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


@contextlib.contextmanager
def compiler_without_triton():
    """Keep ``triton`` out of a process whose torch has no GPU while the compiler is first
    imported and compiles: torch's compiler imports it only to ask whether it is there (66 MB
    of LLVM code resident, 72 MB of the process in all), and its CPU code generation never uses
    it.  Once the compiler is loaded, ``import triton`` works again (our own kernels run it on
    GPUs and under ``TRITON_INTERPRET=1``); a process that has imported it already keeps it."""
    import sys

    hide = not torch.cuda.is_available() and "triton" not in sys.modules
    if hide:
        sys.modules["triton"] = None  # an import of it now raises ImportError
    try:
        yield
    finally:
        if hide and "triton" in sys.modules and sys.modules["triton"] is None:
            del sys.modules["triton"]


def compile_blocks(fn):
    """``torch.compile`` for the decoder blocks: dynamic token axis, inductor.

    Without inductor's size asserts: the generated code would check the sizes and strides of
    every graph input and of every output of the two custom ops, about 330 checks a step for
    the default model (dynamo's guards already check the inputs, and both ops return
    contiguous tensors of the shape their fakes declare).  Measured in one process, plain
    decoding at batch 1: 45.7 against 44.1 tok/s with the checks (10 paired rounds)."""
    use_disk_cache()
    return torch.compile(fn, dynamic=True, options={"size_asserts": False})
