"""How OpenMP worker threads wait between parallel regions, chosen per role.

Between two parallel regions (two matmuls of a decode step) torch's OpenMP threads either spin
or sleep.  Measured on a 2-core host, bf16, batch 1, one decode step of the default model
(``docs/BENCHMARKS.md``, "OpenMP wait policy"):

    =====================  =============  ==================================
    waits                  process alone  two processes on the same cores
    =====================  =============  ==================================
    sleep (PASSIVE)        44 ms          40 ms
    bounded spin (10,000)  23 ms          76 ms
    libgomp default        22 ms          390 ms
    spin forever (ACTIVE)  22 ms          730 ms
    =====================  =============  ==================================

No spin count gives both columns' best (1,000 spins is as slow as sleeping alone, 3,000 half
way), so the policy follows the role:

* ``spin`` (a bounded spin of ``SPIN_COUNT``): a process that owns its cores, such as the
  in-process engine of ``dspark generate``, ``train-draft`` and the in-process benchmarks, or
  a verifier pod with its own CPU limit.  If the assumption is wrong it costs 2x, not 10x.
* ``passive`` (sleep): processes that share the cores, such as the roles of the local
  cluster (router, verifier, draft workers, Ray) on one host, and the test suite.

An operator overrides the role's choice with ``DSPARK_OMP_WAIT=spin|passive``; an explicit
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the environment wins over both.  The policy must be
in the environment before torch loads its OpenMP runtime, so commands call :func:`configure`
before importing torch, and pass :func:`child_env` to the processes they start.
"""

from __future__ import annotations

import os
import sys

ENV = "DSPARK_OMP_WAIT"
SPIN_COUNT = 10_000
POLICIES: dict[str, dict[str, str]] = {
    "spin": {"GOMP_SPINCOUNT": str(SPIN_COUNT)},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
_OPENMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

# Set by the environment this process started with (an operator, or a parent that chose for it).
_inherited = any(os.environ.get(k) for k in _OPENMP_KEYS)
_applied: str | None = None


def choose(role_default: str) -> str:
    """The policy for a role: ``DSPARK_OMP_WAIT`` if set, else the role's default.

    >>> os.environ.pop(ENV, None) and None
    >>> choose("spin")
    'spin'
    """
    policy = (os.environ.get(ENV) or role_default).strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"{ENV} must be one of {', '.join(POLICIES)}, not {policy!r}")
    return policy


def configure(role_default: str) -> str:
    """Put the role's wait policy into this process's environment; returns what is in force.

    Returns ``"inherited"`` when the environment already named OpenMP's own settings.  Once
    torch has loaded, OpenMP has read its settings and a different choice cannot take effect:
    the policy applied before stays, and is returned.
    """
    global _applied
    policy = choose(role_default)
    if _inherited:
        return "inherited"
    if "torch" in sys.modules and _applied is not None:
        return _applied
    for k in _OPENMP_KEYS:
        os.environ.pop(k, None)
    os.environ.update(POLICIES[policy])
    _applied = policy
    return policy


def child_env(role_default: str) -> dict[str, str]:
    """Environment entries that give a child process the role's policy (e.g. a Ray worker).

    An operator's explicit OpenMP settings are passed on unchanged.
    """
    if _inherited:
        return {k: os.environ[k] for k in _OPENMP_KEYS if os.environ.get(k)}
    return dict(POLICIES[choose(role_default)])


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: the CPUs it may run on, capped by its cgroup's CPU quota.

    In a container ``os.cpu_count()`` is the node's count: a pod limited to 4 CPUs on a 64-core
    node would start 63 threads per process and spend its quota in throttled bursts.  The quota
    is cgroup v2's ``cpu.max`` or v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up
    (a limit of 2.5 CPUs runs 3 threads); no quota, no cap.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def _cgroup_quota(root: str) -> int | None:
    """The cgroup's CPU limit in whole CPUs (rounded up), or None when it sets none."""

    def read(path: str) -> list[str] | None:
        try:
            with open(os.path.join(root, path)) as f:
                return f.read().split()
        except OSError:
            return None

    v2 = read("cpu.max")  # "max 100000" or "<quota> <period>", microseconds
    v1 = (read("cpu/cpu.cfs_quota_us") or []) + (read("cpu/cpu.cfs_period_us") or [])
    for fields in (v2, v1):
        if fields and len(fields) == 2 and fields[0] not in ("max", "-1"):
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                continue
            if quota > 0 and period > 0:
                return -(-quota // period)
    return None
