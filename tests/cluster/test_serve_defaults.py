"""`dspark serve` / `demo` option defaults that depend on the model: the compiled step is on by
default, except for DeepSeek-V4 folders (eager only), where an explicit --compile is a one-line
usage error before anything starts.  CUDA graphs are on by default on CUDA only, off for what
the graph-safe step does not serve, and refused by name when asked for there."""

from __future__ import annotations

import click
import pytest

from dspark.cluster.commands import make_config
from helpers.tiny_deepseek_v4 import write_tiny_folder

VOCAB = 300

BASE = dict(dtype="fp32", device="cpu", tp=1, draft_workers=0, draft="none", block_len=4,
            verify_policy="fixed", n_slots=2)


@pytest.fixture(scope="module")
def v4_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4") / "tiny-v4"
    write_tiny_folder(path, VOCAB, 1)
    return str(path)


def test_compile_is_on_by_default_for_llama_family_models():
    assert make_config(model=None, compile=None, **BASE).compile is True
    assert make_config(model=None, compile=False, **BASE).compile is False


def test_deepseek_v4_runs_eager_by_default_and_refuses_compile(v4_folder):
    assert make_config(model=v4_folder, compile=None, **BASE).compile is False
    with pytest.raises(click.UsageError, match="--compile is not supported for DeepSeek-V4"):
        make_config(model=v4_folder, compile=True, **BASE)


def test_cuda_graphs_default_to_the_device_and_are_refused_where_unsupported(v4_folder):
    cuda = dict(BASE, device="cuda")
    assert make_config(model=None, cuda_graphs=None, **cuda).cuda_graphs is True
    assert make_config(model=None, cuda_graphs=False, **cuda).cuda_graphs is False
    assert make_config(model=None, cuda_graphs=None, **BASE).cuda_graphs is False  # CPU
    assert make_config(model=None, cuda_graphs=None, kv_layout="paged", **cuda).cuda_graphs is False
    assert make_config(model=v4_folder, cuda_graphs=None, **cuda).cuda_graphs is False
    with pytest.raises(click.UsageError, match="--cuda-graphs serves one rank on the slot KV layout"):
        make_config(model=None, cuda_graphs=True, kv_layout="paged", **cuda)


def test_serve_defaults_to_the_hybrid_drafter_and_adaptive_verification():
    """What a user gets without options: the drafter and policy that `bench load` measured ahead
    of plain decoding and of every fixed depth at concurrency 1-64 (docs/BENCHMARKS.md)."""
    from dspark.cluster.commands import demo, serve
    from dspark.models.dspark_head import default_head_path
    from dspark.models.loader import DEFAULT_MODEL_NAME

    assert default_head_path(DEFAULT_MODEL_NAME).exists()  # the head ships with the project
    for command in (serve, demo):
        opts = {p.name: p.default for p in command.params}
        assert opts["verify_policy"] == "adaptive", command.name
        assert opts["draft"] is None, command.name  # filled in by make_config
    kw = dict(BASE, draft=None, verify_policy="adaptive")
    cfg = make_config(model=None, **kw)
    assert (cfg.draft, cfg.verify_policy) == ("hybrid", "adaptive")


def test_torch_threads_option_sets_each_compute_process_threads():
    """`--torch-threads N` pins the threads of the verifier ranks and draft workers; 0 divides the host."""
    from click.testing import CliRunner

    from dspark.cluster.commands import serve
    from dspark.omp import usable_cpus
    from dspark.cluster.config import ClusterConfig

    assert {p.name: p.default for p in serve.params}["torch_threads"] == 0
    assert make_config(model=None, torch_threads=3, **BASE).threads() == 3
    assert make_config(model=None, torch_threads=0, **BASE).threads() == max(1, usable_cpus() - 1)  # a core for the rest
    with pytest.raises(ValueError, match="torch_threads >= 0"):
        ClusterConfig.from_args({"torch_threads": -1})
    out = CliRunner().invoke(serve, ["--torch-threads", "-1"])
    assert out.exit_code == 2 and "Invalid value for '--torch-threads'" in out.output


@pytest.mark.parametrize("cpus, tp, workers, want", [(2, 1, 0, 1), (2, 1, 1, 1), (1, 1, 0, 1), (8, 1, 2, 2),
                                                     (16, 1, 0, 15), (16, 2, 1, 5)])
def test_compute_processes_share_the_cores_but_one(monkeypatch, cpus, tp, workers, want):
    """The roles around the compute processes (router, proxy, event loops) keep a core: on two
    cores a lone verifier with both decoded one request 1.2-1.6x slower than with one."""
    import dspark.omp
    from dspark.cluster.config import ClusterConfig

    monkeypatch.setattr(dspark.omp, "usable_cpus", lambda: cpus)
    assert ClusterConfig(draft="ngram" if workers else "none", draft_workers=workers, tp=tp).threads() == want


def test_local_draft_below_option():
    """`--local-draft-below N`: requests that find the verifier holding fewer than N are drafted in
    its own process (default 1: a lone request; 0: every request on the draft workers)."""
    from click.testing import CliRunner

    from dspark.cluster.commands import serve
    from dspark.cluster.config import ClusterConfig

    assert {p.name: p.default for p in serve.params}["local_draft_below"] == 1 == ClusterConfig().local_draft_below
    assert make_config(model=None, local_draft_below=0, **BASE).local_draft_below == 0
    with pytest.raises(ValueError, match="local_draft_below >= 0"):
        ClusterConfig.from_args({"local_draft_below": -1})
    out = CliRunner().invoke(serve, ["--local-draft-below", "-1"])
    assert out.exit_code == 2 and "Invalid value for '--local-draft-below'" in out.output
