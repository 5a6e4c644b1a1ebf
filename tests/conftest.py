"""Shared pytest fixtures. Several areas add fixtures here; keep each block
self-contained and its heavy imports inside the fixture.

Tests live in one folder per layer of the package: kernels/, models/, proto/, workers/,
train/, cluster/ (in-process servers, Redis, Ray Serve end to end), deploy/ (the
manifests) and bench/ (benchmark code that runs only elsewhere, exercised here on CPU). Helpers that tests in several folders use are modules of helpers/, imported as
``helpers.<module>`` (pyproject.toml puts tests/ on pytest's pythonpath)."""

from __future__ import annotations

import os
import uuid

# Tests run servers, Ray workers and the suite itself on the same cores: sleeping OpenMP waits,
# set before anything loads torch's OpenMP runtime (see dspark/omp.py for why).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The Triton parity tests run the kernels under Triton's interpreter, which must be chosen before
# anything imports triton (its standard library is jit-decorated at import): other test modules
# import transformers models that load triton. Only on hosts without CUDA, where nothing else
# could use Triton anyway (no GPU: the interpreter is the only way it runs here).
import torch  # noqa: E402  (after the OpenMP policy above; torch itself does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# ------------------------------------------------------------------ Parallel runs
# `make test` runs two pytest-xdist workers.  Each module goes to one worker whole (its module
# fixtures are built once, and its tests run in file order), and the modules that start a Ray
# cluster all go to the same worker, one after another: two Ray clusters never run at once.
# tests/cluster/test_ray_modules.py checks this list against the modules that start one.
RAY_MODULES = frozenset({
    "tests/cluster/test_cluster.py",
    "tests/cluster/test_deepseek_v4_serve.py",
    "tests/cluster/test_faults.py",
    "tests/cluster/test_local_start.py",
    "tests/cluster/test_published_checkpoints.py",
    "tests/cluster/test_router_hardening.py",
})


def work_scope(nodeid: str) -> str:
    """The unit of work a worker takes whole: the module, or "ray" for every Ray module."""
    path = nodeid.split("::", 1)[0]
    return "ray" if path in RAY_MODULES else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") not in ("load", "loadscope"):  # another --dist asked for: xdist's own
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if "ray" in self.workqueue:  # the longest unit first, so it does not end the run alone
                self.workqueue.move_to_end("ray", last=False)
            super()._assign_work_unit(node)

    return ByModule(config, log)


# ------------------------------------------------------------------ Redis
# A real redis-server on a free 127.0.0.1 port, started by the tests
# themselves (nothing on disk, gone when the session ends).


def _start_redis():
    from dspark.cluster.redis_server import RedisServer, RedisServerError

    try:
        return RedisServer().start()
    except RedisServerError as exc:
        pytest.fail(f"redis-server is required (make test installs it): {exc}")


@pytest.fixture(scope="session")
def redis_server():
    """One local redis-server shared by the whole session. Do not kill it:
    tests that crash Redis use `private_redis_server`."""
    server = _start_redis()
    yield server
    server.close()


@pytest.fixture
def private_redis_server():
    """A redis-server owned by one test, free to kill() and restart()."""
    server = _start_redis()
    yield server
    server.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to the test, so tests sharing a server never collide."""
    return f"test-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------ Model
# The real default model (SmolLM2-135M-Instruct GGUF), loaded once per session.


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_fp32():
    """LoadedModel (fp32, CPU) of the default checkpoint, shared read-only by tests."""
    from dspark.models.loader import load_model

    return load_model(dtype="fp32", progress=False)


@pytest.fixture(scope="session")
def hf_model():
    """Hugging Face transformers' reading of the same GGUF file (fp32), the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from dspark.models.loader import default_model_path

    p = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer():
    """Hugging Face transformers' tokenizer read from the same GGUF file (parsing it takes seconds)."""
    from transformers import AutoTokenizer

    from dspark.models.loader import default_model_path

    p = default_model_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="session")
def prompts20():
    """20 chat prompts from the shared data, alternating WizardLM and MBPP+."""
    from dspark.datasets import load_prompts

    return [p.text for p in load_prompts("all", limit=20)]
