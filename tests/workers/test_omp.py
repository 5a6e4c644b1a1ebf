"""The OpenMP wait policy is chosen per role, before torch loads (dspark/omp.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

OPENMP = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "DSPARK_OMP_WAIT")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in OPENMP}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env},
                          timeout=120)


SHOW = "import os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def test_importing_dspark_sleeps_by_default():
    out = _run("import dspark; " + SHOW)
    assert out.stdout.split() == ["PASSIVE", "None"], out.stderr


def test_a_role_that_owns_the_cores_spins_a_bounded_count_before_torch_loads():
    code = ("import sys, dspark; from dspark import omp; print(omp.configure('spin')); import torch; "
            "print(omp.configure('passive')); " + SHOW)
    lines = _run(code).stdout.splitlines()
    # spin is applied; once torch has loaded OpenMP the choice cannot change any more
    assert lines == ["spin", "spin", f"None {10_000}"]


def test_the_operator_overrides_the_role_and_openmp_settings_win():
    assert _run("import dspark; from dspark import omp; print(omp.configure('spin'))",
                DSPARK_OMP_WAIT="passive").stdout.strip() == "passive"
    out = _run("import dspark; from dspark import omp; print(omp.configure('spin'), omp.child_env('spin')); " + SHOW,
               OMP_WAIT_POLICY="ACTIVE")
    assert out.stdout.splitlines() == ["inherited {'OMP_WAIT_POLICY': 'ACTIVE'}", "ACTIVE None"]


def test_child_processes_get_the_role_policy():
    from dspark import omp

    if omp._inherited:  # the suite runs with OMP_WAIT_POLICY set: that is what children get
        assert omp.child_env("spin") == {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    out = _run("import dspark; from dspark import omp; print(omp.child_env('spin'), omp.child_env('passive'))")
    assert out.stdout.strip() == "{'GOMP_SPINCOUNT': '10000'} {'OMP_WAIT_POLICY': 'PASSIVE'}"


def test_a_bad_policy_is_a_one_line_cli_error():
    out = subprocess.run([sys.executable, "-m", "dspark.cli", "generate", "hi", "--max-tokens", "1"],
                         capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if k not in OPENMP}, "DSPARK_OMP_WAIT": "fast"})
    assert out.returncode == 2
    assert "DSPARK_OMP_WAIT must be one of spin, passive, not 'fast'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("policy", ["spin", "passive"])
def test_choose_accepts_the_two_policies_in_any_case(policy, monkeypatch):
    from dspark import omp

    monkeypatch.setenv("DSPARK_OMP_WAIT", policy.upper())
    assert omp.choose("spin") == policy


def _cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return str(tmp_path)


def test_usable_cpus_follow_the_containers_cpu_limit(tmp_path):
    """A pod limited to 1.5 CPUs uses 2 threads' worth, not the node's cores; no limit, no cap.
    Both cgroup versions' files, as the kernel writes them."""
    import os

    from dspark.omp import usable_cpus

    mine = len(os.sched_getaffinity(0))
    assert usable_cpus(_cgroup(tmp_path / "v2", {"cpu.max": "150000 100000\n"})) == min(mine, 2)
    assert usable_cpus(_cgroup(tmp_path / "v2max", {"cpu.max": "max 100000\n"})) == mine
    v1 = {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert usable_cpus(_cgroup(tmp_path / "v1", v1)) == 1
    v1_off = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert usable_cpus(_cgroup(tmp_path / "v1off", v1_off)) == mine
    assert usable_cpus(str(tmp_path / "none")) == mine  # no cgroup files: the CPUs we may run on
    assert usable_cpus(_cgroup(tmp_path / "bad", {"cpu.max": "garbage\n"})) == mine
