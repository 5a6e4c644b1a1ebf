"""Send each new request to the verifier group with the most headroom.

Each Verifier replica (one verifier group) reports ``record_routing_stats()``: its request
capacity under the scheduler's current policy minus what it is already running or queuing.  The
router ranks replicas by that headroom, refreshed every second, and falls back to Serve's own
queue-length information for replicas that have not reported yet.
"""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, RequestRouter


class HeadroomRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        def headroom(replica) -> float:
            stats = getattr(replica, "routing_stats", None) or {}
            if "headroom" in stats:
                return float(stats["headroom"])
            # No report yet: assume the capacity Serve allows minus what it has in flight.
            in_flight = self.replica_queue_len_cache.get(replica.replica_id) or 0
            return float(replica.max_ongoing_requests - in_flight)

        ranked = sorted(candidate_replicas, key=headroom, reverse=True)
        return [[r] for r in ranked]
