"""Our C++ kernels: built once per host with the system's C++ compiler, loaded as torch ops.

* ``q4_amx.cpp`` multiplies 4-bit block weights (and the 8-bit LM head) on Intel AMX tiles
  (``dspark.models.q4``);
* ``short_attention.cpp`` attends a step's short queries (decode tokens, verification
  blocks) straight from the KV cache on AVX-512 (``dspark.kernels.attention``);
* ``markov_chain.cpp`` runs a greedy DSpark block's Markov loop in one call on AVX-512 BF16
  (``dspark.kernels.markov``).

A library is compiled on first use into ``<cache>/kernels/`` (``dspark.models.loader.cache_dir``),
named by a hash of its source, the compiler flags and torch's version, so that a changed source
or torch builds a new one and processes on one host share it; a file lock keeps concurrent
first uses (test workers, the roles of a local cluster) from building it twice.  ``make setup``
builds them ahead (``python -m dspark.kernels.native``).

The block products carry a fake (shape-only) implementation, so ``torch.compile`` traces
through it and calls the C++ code as an opaque kernel; the attention runs inside an op the
compiler already treats as opaque (``dspark::cache_attention``).

Example:
    >>> from dspark.kernels.native import amx_usable, short_attention_usable
    >>> isinstance(amx_usable(), bool), isinstance(short_attention_usable(), bool)
    (True, True)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["NativeBuildError", "amx_int8_usable", "amx_usable", "build_q4_amx", "cpu_has_amx", "cpu_has_amx_int8", "cpu_has_avx512", "cpu_has_avx512_bf16",
           "load_markov_chain", "load_q4_amx", "load_short_attention", "markov_chain_usable", "short_attention_usable"]


@dataclass(frozen=True)
class Kernel:
    """One C++ source built into its own library: ``name`` is its file's stem, ``what`` how
    messages name it."""

    name: str
    what: str
    flags: tuple[str, ...]

    @property
    def source(self) -> Path:
        return Path(__file__).with_name(f"{self.name}.cpp")


_COMMON = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w")
Q4_AMX = Kernel("q4_amx", "4-bit AMX kernel", _COMMON + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                                                         "-mf16c", "-mfma", "-mamx-tile", "-mamx-bf16",
                                                         "-mamx-int8"))
SHORT_ATTENTION = Kernel("short_attention", "attention kernel",
                         _COMMON + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"))
MARKOV_CHAIN = Kernel("markov_chain", "Markov head kernel",
                      _COMMON + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile",
                                 "-mamx-bf16"))


class NativeBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded here (no compiler, a failed build)."""


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles and AVX-512 bf16 (what the kernel is compiled for)."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return all(p is not None and p() for p in probes)


def cpu_has_avx512() -> bool:
    """Whether this CPU has the AVX-512 subsets the attention kernel is compiled for (torch's own
    kernels then run at that level too)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_has_amx_int8() -> bool:
    """Whether this CPU has AMX tiles with int8 products (Linux lists ``amx_int8`` among its flags)."""
    if not cpu_has_amx():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:
        return False


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has AVX-512 BF16 dot products (what the Markov head kernel is compiled for)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return probe is not None and probe() and cpu_has_avx512()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _library_path(kernel: Kernel) -> Path:
    from dspark.models.loader import cache_dir

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    headers = b"".join(h.read_bytes() for h in sorted(kernel.source.parent.glob("*.h")))  # what the sources include
    key = hashlib.sha256(kernel.source.read_bytes() + headers + repr((kernel.flags, abi, torch.__version__,
                                                                     sys.version_info[:2], _compiler())).encode())
    return cache_dir() / "kernels" / f"{kernel.name}-{key.hexdigest()[:16]}.so"


def build(kernel: Kernel) -> Path:
    """The built library's path, compiling it first if this host has none (NativeBuildError)."""
    from torch.utils import cpp_extension

    target = _library_path(kernel)
    if target.exists():
        return target
    compiler = _compiler()
    if compiler is None:
        raise NativeBuildError(f"no C++ compiler (g++) to build dspark's {kernel.what}; `make setup` installs one")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # another process built it while this one waited
            return target
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        libs = cpp_extension.library_paths()
        cmd = [compiler, *kernel.flags, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{p}" for p in cpp_extension.include_paths()), str(kernel.source), "-o", str(tmp),
               *(f"-L{p}" for p in libs), "-lc10", "-ltorch_cpu", *(f"-Wl,-rpath,{p}" for p in libs)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # $CXX names no program
            raise NativeBuildError(f"cannot run the C++ compiler {compiler!r}: {e}") from e
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise NativeBuildError(f"building dspark's {kernel.what} failed: {last}")
        tmp.replace(target)
    return target


def build_q4_amx() -> Path:
    """:func:`build` of the 4-bit AMX kernel."""
    return build(Q4_AMX)


_LOAD_LOCK = threading.Lock()


@lru_cache(maxsize=None)
def _load(kernel: Kernel) -> None:
    torch.ops.load_library(str(build(kernel)))
    if kernel is Q4_AMX:

        for op in ("dspark_q4::amx_mm", "dspark_q4::amx_mm8"):

            @torch.library.register_fake(op)
            def _(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
                return x.new_empty((x.shape[0], out_features))

        @torch.library.register_fake("dspark_q4::i8_amx_mm")
        def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, wsum: torch.Tensor) -> torch.Tensor:
            return x.new_empty((x.shape[0], scale.shape[0]))

    if kernel is SHORT_ATTENTION:

        @torch.library.register_fake("dspark_attn::cache_attention")
        def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
            return torch.empty_like(q)


def load(kernel: Kernel) -> None:
    """Loads ``kernel``'s ops into this process, once (also when two threads ask at the same time)."""
    with _LOAD_LOCK:
        _load(kernel)


def load_q4_amx() -> None:
    """Loads the 4-bit AMX ops (``torch.ops.dspark_q4``)."""
    load(Q4_AMX)


def load_markov_chain() -> None:
    """Loads the Markov head op (``torch.ops.dspark_markov.greedy_chain``)."""
    load(MARKOV_CHAIN)


def load_short_attention() -> None:
    """Loads the attention op (``torch.ops.dspark_attn.short_attention``)."""
    load(SHORT_ATTENTION)


def _probe() -> None:
    """One small product: a CPU that lists AMX but whose kernel or hypervisor does not grant the
    tile state fails here, at choice time, rather than in the first step."""
    codes = torch.zeros(16, 32, dtype=torch.uint8)
    ones = torch.ones(16, 1, dtype=torch.float16)
    packed = torch.ops.dspark_q4.amx_pack(codes + 1, ones, ones)
    y = torch.ops.dspark_q4.amx_mm(torch.ones(1, 32, dtype=torch.bfloat16), packed, 16)
    if not torch.equal(y, torch.full((1, 16), 64.0, dtype=torch.bfloat16)):
        raise RuntimeError(f"the probe product gave {y[0, :4].tolist()}, not 64s")


def _usable(kernel: Kernel, cpu_ok: bool, probe, instead: str) -> bool:
    """Whether ``kernel`` builds, loads and passes ``probe`` on a CPU that has what it needs;
    says on stderr why not (what serves ``instead``)."""
    if not cpu_ok:
        return False
    try:
        load(kernel)
        probe()
    except (NativeBuildError, OSError, RuntimeError) as e:
        print(f"dspark: {kernel.what} unavailable, using {instead} ({e})", file=sys.stderr)
        return False
    return True


@lru_cache(maxsize=None)
def amx_usable() -> bool:
    """Whether this host's CPU has AMX tiles and the kernel builds, loads and runs here.  A host
    without them multiplies 4-bit weights with torch's int4 kernel instead."""
    return _usable(Q4_AMX, cpu_has_amx(), _probe, "torch's int4 kernel")


def _probe_int8() -> None:
    """One int8 product: a row of 0, 1, ..., 63 against 16 outputs of ones (scale 1) is 2016 each."""
    packed = torch.ops.dspark_q4.i8_amx_pack(torch.ones(16, 64, dtype=torch.int8))
    y = torch.ops.dspark_q4.i8_amx_mm(torch.arange(64.0).view(1, 64), packed, torch.ones(16), torch.full((16,), 64.0))
    if not torch.equal(y, torch.full((1, 16), 2016.0)):
        raise RuntimeError(f"the int8 probe product gave {y[0, :4].tolist()}, not 2016s")


@lru_cache(maxsize=None)
def amx_int8_usable() -> bool:
    """Whether this host's CPU has AMX int8 tiles and the kernel's int8 product runs here.  A
    host without them multiplies a drafter's int8 layers with torch's fbgemm kernel instead."""
    return amx_usable() and _usable(Q4_AMX, cpu_has_amx_int8(), _probe_int8, "torch's fbgemm int8 kernel")


def _probe_attention() -> None:
    """One token attending to itself: the output is its value, exactly."""
    v = torch.arange(64, dtype=torch.bfloat16).view(1, 1, 64)
    cache = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)
    out = torch.empty_like(v)
    zero = torch.zeros(1, dtype=torch.long)
    torch.ops.dspark_attn.short_attention(v, v, v, cache, cache.clone(), zero, zero, torch.tensor([[0, 1, 0]]),
                                          zero.view(1, 1), False, 1, 0.125, -1, out)
    if not torch.equal(out, v):
        raise RuntimeError(f"the probe gave {out[0, 0, :4].tolist()}, not 0, 1, 2, 3")


@lru_cache(maxsize=None)
def short_attention_usable() -> bool:
    """Whether this host's CPU has AVX-512 and the attention kernel builds, loads and runs here.
    Elsewhere the short queries go through torch's attention (``dspark.kernels.attention``)."""
    return _usable(SHORT_ATTENTION, cpu_has_avx512(), _probe_attention, "torch's attention")


def _probe_markov() -> None:
    """Two positions over three columns, the second drawn to column 2 by W2: tokens 1 then 2."""
    base = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])
    w1 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)
    w2p = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]]], dtype=torch.bfloat16)  # W2 [2, 3] packed [1, 3, 2]
    tokens, _ = torch.ops.dspark_markov.greedy_chain(base, torch.tensor([0]), w1, w2p, torch.empty(0, dtype=torch.long))
    if tokens.tolist() != [[1, 2]]:
        raise RuntimeError(f"the probe drafted {tokens.tolist()}, not [[1, 2]]")


@lru_cache(maxsize=None)
def markov_chain_usable() -> bool:
    """Whether this host's CPU has AVX-512 BF16 and the Markov head kernel builds, loads and
    runs here.  Elsewhere a greedy block's Markov loop runs as torch operations."""
    return _usable(MARKOV_CHAIN, cpu_has_avx512_bf16(), _probe_markov, "torch's operations")


def _build_ahead(kernel: Kernel, cpu_ok: bool, missing: str, instead: str) -> None:
    if not cpu_ok:
        print(f"{kernel.what}: this CPU has no {missing}; {instead}")
        return
    try:
        print(f"{kernel.what}: {build(kernel)}")
    except (NativeBuildError, OSError) as e:
        print(f"{kernel.what}: {e}; {instead}")


if __name__ == "__main__":  # make setup: build ahead where the CPU can use them; never fails setup
    _build_ahead(Q4_AMX, cpu_has_amx(), "AMX tiles", "torch's int4 kernel serves --weights q4")
    _build_ahead(SHORT_ATTENTION, cpu_has_avx512(), "AVX-512", "torch's attention serves every step")
    _build_ahead(MARKOV_CHAIN, cpu_has_avx512_bf16(), "AVX-512 BF16", "torch's operations run the Markov loop")
