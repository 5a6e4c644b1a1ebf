"""The parallel test run (conftest: two workers, Ray modules on one) knows every module that
starts a Ray cluster; a new one missing from the list could start a second cluster beside the
first on a two-core host."""

from __future__ import annotations

from pathlib import Path

from conftest import RAY_MODULES, work_scope

TESTS = Path(__file__).resolve().parents[1]


def test_every_module_that_starts_ray_is_scheduled_with_the_others():
    starts_ray = {
        f"tests/{p.relative_to(TESTS).as_posix()}"
        for p in TESTS.rglob("test_*.py")
        if p != Path(__file__).resolve()
        if any(s in p.read_text() for s in ("LocalCluster(", "ray.init(", "serve.run("))
    }
    assert starts_ray == RAY_MODULES
    assert work_scope("tests/cluster/test_faults.py::test_api_key_http_and_grpc") == "ray"
    assert work_scope("tests/kernels/test_sampling.py::test_top_k[1]") == "tests/kernels/test_sampling.py"
