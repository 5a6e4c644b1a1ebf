"""Model runners: execute one flattened varlen step on one device or a tensor-parallel group.

The engine owns request bookkeeping (which slot, how many tokens are valid); a runner only runs
``StepInput`` -> ``ForwardOutput``.  Because every step carries each request's current length
(``starts``), truncation after rejected drafts needs no message to the other ranks: the next
step simply writes over the stale positions (a paged cache also releases the blocks past them).

The target's cache has one of two layouts (``RunnerConfig.kv_layout``): ``slot``, one region
per request (:mod:`dspark.models.kv_cache`), or ``paged``, blocks from a shared pool
(:mod:`dspark.models.paged_cache`), whose block operations (reuse, naming, release) rank 0
broadcasts like the prefix copy, so every rank holds the same block tables.

Tensor parallel group: rank 0 lives in the driver process (the engine); ranks 1..N-1 run
:func:`tp_rank_loop`, receiving each step by broadcast (plain int64 tensors, never pickles) and
joining the collectives inside the forward pass.  The same loop runs in spawned processes
(:class:`TPGroup`) or in Ray actors (the cluster's verifier group).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from dspark.models.graph_step import GraphStep
from dspark.models.kv_cache import KVCache, make_batch
from dspark.models.llama import ForwardOutput, Shard, Transformer
from dspark.models.packing import return_freed_memory
from dspark.models.paged_cache import PagedKVCache
from dspark.models.target import TargetModel
from dspark.net import free_port

CMD_STEP, CMD_STOP, CMD_COPY = 1, 2, 3
CMD_REUSE, CMD_NAME, CMD_RELEASE = 4, 5, 6  # paged cache: (slot, number of names), then the names
KV_LAYOUTS = ("slot", "paged")
log = logging.getLogger(__name__)


@dataclass
class StepInput:
    """One step: request i appends ``q_lens[i]`` tokens to ``slots[i]`` at ``starts[i]``."""

    tokens: list[int]
    slots: list[int]
    starts: list[int]
    q_lens: list[int]
    logits_rows: list[int] | None = None  # flat rows whose logits are wanted (None: all)
    feature_layers: tuple[int, ...] = ()
    n_layers: int | None = None  # early exit (layer-skip drafting); None = full depth

    def __post_init__(self) -> None:
        if sum(self.q_lens) != len(self.tokens):
            raise ValueError("q_lens do not add up to the number of tokens")


# A CPU step that fed more tokens than this (a prefill chunk, never a decode or verification step
# of up to 64 requests x 8 tokens) hands the heap pages its temporaries freed back to the system
# (malloc_trim, about a millisecond): the C heap keeps them otherwise, and the prefill of a
# batch-32 start left ~20 MB of the process's peak resident memory that way.
TRIM_AFTER_TOKENS = 512


@dataclass
class RunnerConfig:
    """How a runner sizes its cache and rounds."""

    n_slots: int = 32  # concurrent requests one runner holds
    max_seq: int = 2048  # longest request (prompt + output + one draft block)
    # Row-invariant kernels: a request's logits are bitwise the same whatever the step's row count
    # and neighbours, so greedy speculative output equals plain decoding in bf16 too.
    deterministic: bool = False
    # The decoder blocks run through torch.compile (dspark/models/compiled.py); eager otherwise.
    compile: bool = False
    # The target's KV cache: "slot" (one region per request) or "paged" (blocks from one pool,
    # memory follows the tokens held, prefixes shared by block; dspark/models/paged_cache.py).
    kv_layout: str = "slot"
    kv_block: int = 16  # positions per block of the paged layout
    # Decode and verification steps through the graph-safe step (dspark/models/graph_step.py):
    # replayed from CUDA graphs on CUDA, run eagerly from the same static buffers on CPU.
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, not {self.kv_layout!r}")
        if self.cuda_graphs and self.kv_layout != "slot":
            raise ValueError("CUDA graphs serve the slot KV layout; drop --kv-layout paged or pass --no-cuda-graphs")
        if self.cuda_graphs and self.deterministic:
            raise ValueError("CUDA graphs do not run the deterministic mode's kernels; pass --no-cuda-graphs")


def deterministic_default(dtype: str, device: str, model: str | None = None) -> bool:
    """Whether the commands turn the deterministic mode on when neither flag is given.

    On for bf16 on CPU, where its start-up check passes: there it makes greedy speculative output
    plain decoding's text bit for bit, at a cost of 1.2-1.3x per compiled step (under 10% eager;
    docs/ARCHITECTURE.md, "Cost and default").  Off elsewhere: fp32 refuses it (MKL's
    float32 products round by row count) and needs it least; fp16 passes the check but its cost
    is unmeasured, and so is everything on GPUs.  Off for a model (``model``) whose family has no
    row-invariant kernels (DeepSeek-V4: the model refuses the mode when asked).
    """
    from dspark.models.loader import family_of

    family = family_of(model)
    if family is not None and not family.row_invariant:
        return False
    return dtype == "bf16" and device == "cpu"


def compile_default(model: str | None = None) -> bool:
    """Whether `dspark serve` / `demo` compile the verifier's step when neither flag is given: yes,
    except for a model (``model``) whose family runs eager only (DeepSeek-V4: it refuses
    ``--compile`` by name)."""
    from dspark.models.loader import family_of

    family = family_of(model)
    return family is None or family.compiles


def cuda_graphs_default(device: str, model: str | None = None, kv_layout: str = "slot",
                        deterministic: bool = False, tp: int = 1) -> bool:
    """Whether `dspark serve` / `demo` capture CUDA graphs when neither flag is given: on CUDA,
    for the Llama family on the slot layout, one rank, without the deterministic mode (what the
    graph-safe step serves); off everywhere else."""
    from dspark.models.loader import family_of

    family = family_of(model)
    llama = family is None or family.decoder == "llama"
    return str(device).startswith("cuda") and llama and kv_layout == "slot" and not deterministic and tp == 1


class LocalRunner:
    """Runs the (possibly TP-sharded) model of this process on its own KV cache."""

    def __init__(self, model: TargetModel, cfg: RunnerConfig = RunnerConfig()) -> None:
        from dspark.models.packing import pack_linears, share_tied_matrix

        if pack_linears(model):  # CPU + bf16 only; a no-op elsewhere and when already packed
            return_freed_memory()  # first, so that the probes below do not add to the peak
            if share_tied_matrix(model):  # a tied embedding reads the packed head: one copy, not two
                return_freed_memory()
        model.num.row_invariant = cfg.deterministic
        self.model = model
        self.cfg = cfg
        self.cache: KVCache | PagedKVCache = (self._paged_cache(model, cfg) if cfg.kv_layout == "paged"
                                              else model.make_cache(cfg.n_slots, cfg.max_seq))
        self.n_rep = model.args.n_rep
        self.compile_s = 0.0  # start-up seconds spent compiling (or loading compiled code)
        self.graphs: GraphStep | None = None
        self.graph_s = 0.0  # start-up seconds spent capturing CUDA graphs
        if cfg.cuda_graphs:  # before compiling: the cache gains its scratch slot first
            if type(self.cache) is not KVCache:
                raise ValueError(f"CUDA graphs serve the slot KV layout of Llama-family decoders, "
                                 f"not {type(model).__name__}; pass --no-cuda-graphs")
            self.graphs = GraphStep(model, self.cache)
        if cfg.compile:
            self._compile()
        if self.graphs is not None:
            self.graph_s = self.graphs.capture_all()
        if cfg.deterministic and model.tp.world_size == 1 and cfg.n_slots >= 2:
            self._check_row_invariance()

    @staticmethod
    def _paged_cache(model: Transformer, cfg: RunnerConfig) -> PagedKVCache:
        if type(model) is not Transformer:  # per-layer shapes, windows or own state: not paged
            raise ValueError(f"the paged KV layout serves Llama-family decoders, not {type(model).__name__}")
        attn = model.layers[0].attention
        return PagedKVCache(len(model.layers), cfg.n_slots, attn.n_kv_heads, cfg.max_seq, attn.head_dim,
                            model.dtype, model.device, block=cfg.kv_block)

    @torch.inference_mode()
    def _compile(self) -> None:
        """Compile the step's graphs now rather than on the first requests: a prefill chunk
        and a one-token step (every rank of a tensor-parallel group runs the same, in step)."""
        import time

        from dspark.models.compiled import compiler_without_triton

        t0 = time.perf_counter()
        vocab = self.model.args.vocab_size
        dev = self.device
        with compiler_without_triton():
            self.model.enable_compile()
            for q_len in (8, 1):
                batch = make_batch(self.cache, [0], [q_len], self.n_rep, row_invariant=self.cfg.deterministic)
                self.model(torch.arange(q_len, device=dev) % vocab, self.cache, batch)
        self._set_length(0, 0)
        return_freed_memory()  # what compiling allocated and let go (about 20 MB)
        self.compile_s = time.perf_counter() - t0
        log.info("compiled the step in %.1f s", self.compile_s)

    @torch.inference_mode()
    def _check_row_invariance(self) -> None:
        """Refuse the deterministic mode where this device's kernels break it.

        Four one-token steps and one four-token verification pass (beside another request) must
        give bitwise the same logits, and so must a 40-token prefill in one pass and in chunks
        of 10 and 30 (products above ``Numerics.ROW_BLOCK`` rows).  A tensor-parallel group
        skips the check (its ranks would have to join it); the test suite covers the
        single-device path.
        """
        vocab = self.model.args.vocab_size
        ids = [(i * 7919 + 13) % vocab for i in range(64)]
        dev = self.device

        def run(slots: list[int], q_lens: list[int], tokens: list[int]) -> torch.Tensor:
            batch = make_batch(self.cache, slots, q_lens, self.n_rep, row_invariant=True)
            return self.model(torch.tensor(tokens, device=dev), self.cache, batch).logits

        run([0], [16], ids[:16])
        alone = torch.cat([run([0], [1], [t]) for t in ids[16:20]])
        self.cache.truncate(0, 16)
        together = run([1, 0], [3, 4], ids[20:23] + ids[16:20])[3:]
        self._set_length(0, 0)
        self._set_length(1, 0)
        whole = run([0], [40], ids[24:64])[-1]
        self._set_length(0, 0)
        run([0], [10], ids[24:34])
        chunked = run([0], [30], ids[34:64])[-1]
        self._set_length(0, 0)
        if not (torch.equal(alone, together) and torch.equal(whole, chunked)):  # refused like an unsupported option
            raise ValueError(
                f"deterministic mode is not supported for {self.model.dtype} on {dev}: a verification pass "
                "rounds differently from one-token steps here; run without --deterministic"
            )

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _set_length(self, slot: int, length: int) -> None:
        """The request's cached length before a step (a paged cache releases the blocks past it;
        other caches, DeepSeek-V4's state among them, keep a plain length)."""
        if isinstance(self.cache, PagedKVCache):
            self.cache.set_length(slot, length)
        else:
            self.cache.lengths[slot] = length

    @torch.inference_mode()
    def forward(self, step: StepInput) -> ForwardOutput:
        if self.graphs is not None and step.n_layers is None and self.graphs.fits(step.starts, step.q_lens):
            return self.graphs.run(step.tokens, step.slots, step.starts, step.q_lens, step.logits_rows,
                                   step.feature_layers)
        for s, st in zip(step.slots, step.starts):
            self._set_length(s, st)
        batch = make_batch(self.cache, step.slots, step.q_lens, self.n_rep, row_invariant=self.cfg.deterministic)
        dev = self.device
        tokens = torch.tensor(step.tokens, dtype=torch.long, device=dev)
        rows = None if step.logits_rows is None else torch.tensor(step.logits_rows, dtype=torch.long, device=dev)
        out = self.model(
            tokens,
            self.cache,
            batch,
            logits_index=rows,
            feature_layers=step.feature_layers,
            n_layers=step.n_layers,
        )
        if len(step.tokens) > TRIM_AFTER_TOKENS and dev.type == "cpu":
            return_freed_memory()
        return out

    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` cached positions of slot ``src`` into slot ``dst`` (every layer)."""
        self.cache.copy_prefix(src, dst, n)

    # -- paged cache: the block operations of prefix reuse (workers/prefix_cache.BlockStore) -----
    def reuse_blocks(self, slot: int, names: list[int], keys: list[tuple] | None = None) -> int:
        return self.cache.reuse(slot, names, keys)

    def name_blocks(self, slot: int, names: list[int], keys: list[tuple] | None = None) -> None:
        self.cache.name(slot, names, keys)

    def release_slot(self, slot: int) -> None:
        self.cache.release(slot)

    def block_stats(self) -> dict:
        return self.cache.stats()

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Tensor-parallel plumbing
# --------------------------------------------------------------------------------------------
class _Header(NamedTuple):
    """The fixed-size int64 message that opens every broadcast from rank 0: what follows."""

    # CMD_STEP, CMD_STOP, CMD_COPY (then the next three fields are src, dst, n), or a paged
    # cache's CMD_REUSE / CMD_NAME / CMD_RELEASE (then slot, number of names; the names follow)
    command: int
    n_requests: int  # B: the payload starts with B slots, B starts, B q_lens
    n_tokens: int  # T tokens follow them
    n_rows: int  # then this many logits rows; -1: all rows (none sent)
    n_features: int  # then the feature layers
    n_layers: int  # early-exit depth; -1: the full model

    def payload_len(self) -> int:
        return 3 * self.n_requests + self.n_tokens + max(self.n_rows, 0) + self.n_features


HEADER_LEN = len(_Header._fields)
_STOP = _Header(CMD_STOP, 0, 0, 0, 0, 0)


def _encode(step: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
    rows = step.logits_rows
    header = _Header(
        command=CMD_STEP,
        n_requests=len(step.slots),
        n_tokens=len(step.tokens),
        n_rows=-1 if rows is None else len(rows),
        n_features=len(step.feature_layers),
        n_layers=-1 if step.n_layers is None else step.n_layers,
    )
    payload = torch.tensor(
        [*step.slots, *step.starts, *step.q_lens, *step.tokens, *(rows or []), *step.feature_layers], dtype=torch.long
    )
    return torch.tensor(header, dtype=torch.long), payload


def _decode(h: _Header, payload: torch.Tensor) -> StepInput:
    B, T = h.n_requests, h.n_tokens
    p = payload.tolist()
    o = 0
    slots, o = p[o : o + B], o + B
    starts, o = p[o : o + B], o + B
    q_lens, o = p[o : o + B], o + B
    tokens, o = p[o : o + T], o + T
    rows = None
    if h.n_rows >= 0:
        rows, o = p[o : o + h.n_rows], o + h.n_rows
    feats = tuple(p[o : o + h.n_features])
    return StepInput(tokens, slots, starts, q_lens, rows, feats, None if h.n_layers < 0 else h.n_layers)


def _comm_device(backend: str, local: torch.device) -> torch.device:
    return local if backend == "nccl" else torch.device("cpu")


class TPDriver(LocalRunner):
    """Rank 0 of a tensor-parallel group: broadcasts each step, then runs its own shard."""

    def __init__(self, model: TargetModel, cfg: RunnerConfig, backend: str, group=None) -> None:
        super().__init__(model, cfg)
        self.backend = backend
        self.group = group
        self._comm = _comm_device(backend, model.device)

    def forward(self, step: StepInput) -> ForwardOutput:
        header, payload = _encode(step)
        dist.broadcast(header.to(self._comm), src=0, group=self.group)
        dist.broadcast(payload.to(self._comm), src=0, group=self.group)
        return super().forward(step)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        # A copy travels in the header's request/token fields: (src, dst, n), no payload.
        header = torch.tensor(_Header(CMD_COPY, src, dst, n, 0, 0), dtype=torch.long)
        dist.broadcast(header.to(self._comm), src=0, group=self.group)
        super().copy_prefix(src, dst, n)

    def _block_command(self, command: int, slot: int, names: list[int]) -> None:
        header = torch.tensor(_Header(command, slot, len(names), 0, 0, 0), dtype=torch.long)
        dist.broadcast(header.to(self._comm), src=0, group=self.group)
        if names:
            dist.broadcast(torch.tensor(names, dtype=torch.long).to(self._comm), src=0, group=self.group)

    def reuse_blocks(self, slot: int, names: list[int], keys: list[tuple] | None = None) -> int:
        # Rank 0 alone keeps the keys: it confirms the hits, and the ranks reuse what it sends.
        if keys is not None:
            names = names[: self.cache.matching(names, keys)]
        self._block_command(CMD_REUSE, slot, names)
        return super().reuse_blocks(slot, names)

    def name_blocks(self, slot: int, names: list[int], keys: list[tuple] | None = None) -> None:
        self._block_command(CMD_NAME, slot, names)
        super().name_blocks(slot, names, keys)

    def release_slot(self, slot: int) -> None:
        self._block_command(CMD_RELEASE, slot, [])
        super().release_slot(slot)

    def close(self) -> None:
        try:
            dist.broadcast(torch.tensor(_STOP, dtype=torch.long, device=self._comm), src=0, group=self.group)
        except Exception:  # peers already gone: nothing left to stop
            pass


def tp_rank_loop(runner: LocalRunner, backend: str, group=None) -> None:
    """Ranks 1..N-1: mirror every step rank 0 broadcasts until it says stop."""
    comm = _comm_device(backend, runner.device)
    header = torch.zeros(HEADER_LEN, dtype=torch.long, device=comm)
    while True:
        dist.broadcast(header, src=0, group=group)
        h = _Header(*header.tolist())
        if h.command == CMD_STOP:
            return
        if h.command == CMD_COPY:
            runner.copy_prefix(h.n_requests, h.n_tokens, h.n_rows)
            continue
        if h.command in (CMD_REUSE, CMD_NAME, CMD_RELEASE):
            slot, n = h.n_requests, h.n_tokens
            names = []
            if n:
                buf = torch.empty(n, dtype=torch.long, device=comm)
                dist.broadcast(buf, src=0, group=group)
                names = buf.tolist()
            if h.command == CMD_REUSE:
                runner.reuse_blocks(slot, names)
            elif h.command == CMD_NAME:
                runner.name_blocks(slot, names)
            else:
                runner.release_slot(slot)
            continue
        payload = torch.empty(h.payload_len(), dtype=torch.long, device=comm)
        dist.broadcast(payload, src=0, group=group)
        runner.forward(_decode(h, payload.cpu()))


def default_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class TPSpec:
    """What every rank needs to build its shard."""

    model_path: str | None
    dtype: str = "bf16"
    device: str = "cpu"  # "cuda" -> each rank takes cuda:<rank>
    world_size: int = 1
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    threads_per_rank: int = 0  # 0: leave torch's default


def build_rank(spec: TPSpec, rank: int, init_method: str) -> tuple[LocalRunner, str]:
    """Join the process group as ``rank`` and build this rank's sharded model + cache."""
    from dspark.models.loader import load_model
    from dspark.models.tp import apply_tp

    device = torch.device(f"cuda:{rank}" if spec.device == "cuda" else spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if spec.threads_per_rank:
        torch.set_num_threads(spec.threads_per_rank)
    backend = default_backend(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=spec.world_size)
    # A family that loads per rank (DeepSeek-V4) reads only this rank's slices; apply_tp then
    # installs the collectives (the Llama family loads whole and apply_tp cuts it).
    shard = Shard(rank, spec.world_size)
    lm = load_model(spec.model_path, dtype=spec.dtype, device=device, progress=(rank == 0), shard=shard)
    model = apply_tp(lm.model, rank, spec.world_size)
    runner = TPDriver(model, spec.runner, backend) if rank == 0 else LocalRunner(model, spec.runner)
    return runner, backend


def _spawned_rank(spec: TPSpec, rank: int, init_method: str) -> None:
    runner, backend = build_rank(spec, rank, init_method)
    try:
        tp_rank_loop(runner, backend)
    finally:
        dist.destroy_process_group()


class TPGroup:
    """A tensor-parallel group on this host: rank 0 here, ranks 1.. in spawned processes."""

    def __init__(self, spec: TPSpec) -> None:
        import torch.multiprocessing as mp

        self.spec = spec
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=_spawned_rank, args=(spec, r, init_method), daemon=True)
            for r in range(1, spec.world_size)
        ]
        for p in self.procs:
            p.start()
        self.driver, _ = build_rank(spec, 0, init_method)

    def close(self) -> None:
        self.driver.close()
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
