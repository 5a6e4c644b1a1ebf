"""Resident memory of a serving process, each case in a fresh interpreter (a process's peak only
ever rises, and the test process has imported everything already).

* The slot KV cache grows without holding the old and the new cache side by side: the peak
  while a 30-layer cache grows from 256 to 320 positions per slot stays within a few layers of
  the grown cache, where a plain copy holds the whole new key tensor beside the old cache (90
  MB above the grown cache here).
* The KV caches are lazily zeroed: resident memory follows the positions written, not the
  capacity, also after the slot cache grows.
* Loading and running the model eager never imports torch's compiler (``torch._dynamo``, which
  imports ``triton``: 140 MB resident), and compiling on a CPU-only torch leaves ``triton``
  unimported (72 MB) while ``import triton`` still works afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CODE = """
import json, torch
from dspark.models.kv_cache import KVCache

def status_mb(field):  # this process's own figures (ru_maxrss would carry the parent's peak over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024

cache = KVCache(30, 32, 3, 1024, 64, torch.bfloat16, "cpu", initial_seq=256)
cache.k.fill_(1.0)
cache.v.fill_(2.0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current resident memory
cache.reserve(300)
after, peak = status_mb("VmRSS"), status_mb("VmHWM")
ok = bool((cache.k[..., :256, :] == 1).all() and (cache.v[..., :256, :] == 2).all()
          and (cache.k[..., 256:, :] == 0).all() and (cache.v[..., 256:, :] == 0).all())
layer_mb = cache.k[0].numel() * cache.k.element_size() / 2**20
print(json.dumps({"ok": ok, "capacity": cache.capacity, "after": after, "peak": peak, "layer_mb": layer_mb}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are handed back on Linux only")
def test_growing_the_cache_peaks_near_the_grown_cache():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ok"] and r["capacity"] >= 300, r
    # One layer of keys is 3.8 MB here; the whole-tensor copy peaked 90 MB above the grown cache.
    assert r["peak"] - r["after"] < 4 * r["layer_mb"], r


LAZY = """
import json, torch
from dspark.models.kv_cache import KVCache
from dspark.models.paged_cache import PagedKVCache

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

base = rss_mb()
cache = KVCache(30, 32, 3, 1024, 64, torch.bfloat16, "cpu", initial_seq=256)  # 2 x 94 MB
created = rss_mb() - base
for s in range(32):  # 64 of each slot's 256 positions written: a quarter of the pages
    cache.k[:, s, :, :64] = 1.0
    cache.v[:, s, :, :64] = 2.0
written = rss_mb() - base
cache.reserve(300)
ok = bool((cache.k[..., :64, :] == 1).all() and (cache.v[..., :64, :] == 2).all()
          and (cache.k[..., 64:, :] == 0).all() and (cache.v[..., 64:, :] == 0).all())
grown = rss_mb() - base
del cache
pool = PagedKVCache(30, 8, 3, 1024, 64, torch.bfloat16, "cpu", block=16, initial_blocks=512)  # 2 x 94 MB
pool_mb = rss_mb() - base
print(json.dumps({"created": created, "written": written, "grown": grown, "ok": ok, "pool": pool_mb}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lazily zeroed pages are a Linux mapping")
def test_cache_memory_follows_the_positions_written():
    """A 32-slot cache of 256 positions per slot (189 MB of keys and values, all zero) takes its
    pages only as positions are written: 64 positions a slot hold 47 MB, and growing to 320
    positions copies only those (``torch.zeros`` kept every page: 189 MB, and the whole copy
    of a growth 236 MB).  An empty paged pool of 189 MB takes nothing."""
    r = json.loads(_run(LAZY))
    assert r["ok"], r
    assert r["created"] < 20, r
    assert 35 < r["written"] < 90, r
    assert r["grown"] < 110, r
    assert r["pool"] < 40, r


EAGER = """
import sys
from dspark.workers.factory import EngineSpec, build_engine
from dspark.workers.request import SamplingParams
from dspark.workers.runner import RunnerConfig
built = build_engine(EngineSpec(dtype="bf16", runner=RunnerConfig(n_slots=2, max_seq=128)), progress=False)
built.engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=3, ignore_eos=True))
print(sorted(m for m in ("torch._dynamo", "triton") if m in sys.modules))
"""

COMPILER = """
import sys, torch
from dspark.models.compiled import compiler_without_triton
with compiler_without_triton():
    f = torch.compile(lambda x: (x * 2).sin(), dynamic=True)
    f(torch.randn(8))
hidden = "triton" not in sys.modules
import triton
print(hidden)
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_the_eager_engine_never_imports_the_compiler():
    assert _run(EAGER) == "[]"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="triton is kept where torch has a GPU")
def test_compiling_on_cpu_leaves_triton_unimported():
    assert _run(COMPILER) == "True"


TIED = """
import json, sys
import dspark.models.packing as packing
if sys.argv[1] == "keep":
    packing.share_tied_matrix = lambda model: False  # the runner imports it when it builds
from dspark.workers.runner import LocalRunner, RunnerConfig
from dspark.models.loader import load_model
runner = LocalRunner(load_model(None, dtype="bf16", progress=False).model, RunnerConfig(n_slots=1, max_seq=64))
with open("/proc/self/status") as f:
    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
print(json.dumps({"rss": rss, "embedding": type(runner.model.tok_embeddings).__name__}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are handed back on Linux only")
def test_a_tied_embedding_is_held_once():
    """The default model's embedding is tied to its LM head, which the runner packs for oneDNN
    (bf16 on CPU): the packed head then serves the embedding's rows and the plain [49152, 576]
    matrix (54 MB) leaves the process."""
    from dspark.models.packing import packing_supported

    if not packing_supported(__import__("torch").device("cpu"), __import__("torch").bfloat16):
        pytest.skip("no oneDNN bf16 products on this CPU")
    shared, kept = (json.loads(subprocess.run([sys.executable, "-c", TIED, how], capture_output=True, text=True,
                                              timeout=300, check=True).stdout.strip().splitlines()[-1])
                    for how in ("share", "keep"))
    assert shared["embedding"] == "PackedEmbedding" and kept["embedding"] == "Embedding"
    assert kept["rss"] - shared["rss"] > 40, (shared, kept)
