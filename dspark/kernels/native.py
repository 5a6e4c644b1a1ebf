"""Our C++ kernels: built once per host with the system's C++ compiler, loaded as torch ops.

``q4_amx.cpp`` multiplies 4-bit block weights on Intel AMX tiles (``dspark.models.q4``).  The
library is compiled on first use into ``<cache>/kernels/`` (``dspark.models.loader.cache_dir``),
named by a hash of its source, the compiler flags and torch's version, so that a changed source
or torch builds a new one and processes on one host share it; a file lock keeps concurrent
first uses (test workers, the roles of a local cluster) from building it twice.  ``make setup``
builds it ahead (``python -m dspark.kernels.native``).

The ops carry a fake (shape-only) implementation, so ``torch.compile`` traces through them and
calls the C++ code as an opaque kernel.

Example:
    >>> from dspark.kernels.native import amx_usable
    >>> isinstance(amx_usable(), bool)
    True
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["NativeBuildError", "amx_usable", "build_q4_amx", "cpu_has_amx", "load_q4_amx"]

_SOURCE = Path(__file__).with_name("q4_amx.cpp")
_FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512bf16", "-mf16c", "-mfma", "-mamx-tile", "-mamx-bf16", "-w")


class NativeBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded here (no compiler, a failed build)."""


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles and AVX-512 bf16 (what the kernel is compiled for)."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return all(p is not None and p() for p in probes)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _library_path() -> Path:
    from dspark.models.loader import cache_dir

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(_SOURCE.read_bytes() + repr((_FLAGS, abi, torch.__version__, sys.version_info[:2],
                                                      _compiler())).encode())
    return cache_dir() / "kernels" / f"q4_amx-{key.hexdigest()[:16]}.so"


def build_q4_amx() -> Path:
    """The built library's path, compiling it first if this host has none (NativeBuildError)."""
    from torch.utils import cpp_extension

    target = _library_path()
    if target.exists():
        return target
    compiler = _compiler()
    if compiler is None:
        raise NativeBuildError("no C++ compiler (g++) to build dspark's 4-bit AMX kernel; `make setup` installs one")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # another process built it while this one waited
            return target
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        libs = cpp_extension.library_paths()
        cmd = [compiler, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{p}" for p in cpp_extension.include_paths()), str(_SOURCE), "-o", str(tmp),
               *(f"-L{p}" for p in libs), "-lc10", "-ltorch_cpu", *(f"-Wl,-rpath,{p}" for p in libs)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # $CXX names no program
            raise NativeBuildError(f"cannot run the C++ compiler {compiler!r}: {e}") from e
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise NativeBuildError(f"building dspark's 4-bit AMX kernel failed: {last}")
        tmp.replace(target)
    return target


_LOAD_LOCK = threading.Lock()


@lru_cache(maxsize=None)
def _load() -> None:
    torch.ops.load_library(str(build_q4_amx()))

    @torch.library.register_fake("dspark_q4::amx_mm")
    def _(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], out_features))


def load_q4_amx() -> None:
    """Loads the 4-bit AMX ops (``torch.ops.dspark_q4``) into this process, once (also when two
    threads ask at the same time)."""
    with _LOAD_LOCK:
        _load()


def _probe() -> None:
    """One small product: a CPU that lists AMX but whose kernel or hypervisor does not grant the
    tile state fails here, at choice time, rather than in the first step."""
    codes = torch.zeros(16, 32, dtype=torch.uint8)
    ones = torch.ones(16, 1, dtype=torch.float16)
    packed = torch.ops.dspark_q4.amx_pack(codes + 1, ones, ones)
    y = torch.ops.dspark_q4.amx_mm(torch.ones(1, 32, dtype=torch.bfloat16), packed, 16)
    if not torch.equal(y, torch.full((1, 16), 64.0, dtype=torch.bfloat16)):
        raise RuntimeError(f"the probe product gave {y[0, :4].tolist()}, not 64s")


@lru_cache(maxsize=None)
def amx_usable() -> bool:
    """Whether this host's CPU has AMX tiles and the kernel builds, loads and runs here.  A host
    without them multiplies 4-bit weights with torch's int4 kernel instead."""
    if not cpu_has_amx():
        return False
    try:
        load_q4_amx()
        _probe()
    except (NativeBuildError, OSError, RuntimeError) as e:
        print(f"dspark: 4-bit AMX kernel unavailable, using torch's int4 kernel ({e})", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":  # make setup: build ahead where the CPU can use it; never fails setup
    if not cpu_has_amx():
        print("4-bit AMX kernel: this CPU has no AMX tiles; torch's int4 kernel serves --weights q4")
    else:
        try:
            print(f"4-bit AMX kernel: {build_q4_amx()}")
        except (NativeBuildError, OSError) as e:
            print(f"4-bit AMX kernel: {e}; torch's int4 kernel serves --weights q4")
