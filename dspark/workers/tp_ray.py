"""Tensor-parallel ranks as Ray actors in a placement group (the cluster's verifier groups).

The verifier replica is rank 0: it drives the engine and owns the group's KV cache bookkeeping.
Ranks 1..N-1 are actors pinned to bundles 1..N-1 of the replica's placement group (one GPU each
on GPU nodes, gloo over CPU here); each runs :func:`dspark.workers.runner.tp_rank_loop` until
rank 0 broadcasts stop.  Ray is imported lazily: nothing else in ``workers`` needs it.
"""

from __future__ import annotations

import logging

from dspark import omp
from dspark.net import free_port
from dspark.workers.runner import TPSpec, build_rank, tp_rank_loop

log = logging.getLogger(__name__)


class _Rank:
    def __init__(self, spec: TPSpec, rank: int, init_method: str) -> None:
        self.spec, self.rank, self.init_method = spec, rank, init_method

    def run(self) -> int:
        import torch.distributed as dist

        runner, backend = build_rank(self.spec, self.rank, self.init_method)
        try:
            tp_rank_loop(runner, backend)
        finally:
            dist.destroy_process_group()
        return self.rank


class RayTPGroup:
    """Rank 0 here; ranks 1.. as Ray actors (in ``placement_group`` bundles 1.. when given)."""

    def __init__(self, spec: TPSpec, placement_group=None, num_cpus: float = 0.5, num_gpus: float = 0) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.spec = spec
        host = ray.util.get_node_ip_address() if placement_group is not None else "127.0.0.1"
        init_method = f"tcp://{host}:{free_port(host)}"  # free where the group listens
        actor_cls = ray.remote(_Rank)
        self.actors, self.loops = [], []
        for r in range(1, spec.world_size):
            opts = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 1,
                    "runtime_env": {"env_vars": omp.child_env("passive")}}
            if placement_group is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=r
                )
            actor = actor_cls.options(**opts).remote(spec, r, init_method)
            self.actors.append(actor)
            self.loops.append(actor.run.remote())
        # Joining the group blocks until every rank has joined.
        self.driver, _ = build_rank(spec, 0, init_method)

    def close(self) -> None:
        import ray
        import torch.distributed as dist

        self.driver.close()
        try:
            ray.get(self.loops, timeout=30)
        except Exception:
            log.warning("TP ranks did not stop cleanly; killing them")
        for a in self.actors:
            ray.kill(a)
        if dist.is_initialized():
            dist.destroy_process_group()
