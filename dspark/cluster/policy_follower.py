"""How a verifier group follows the policy the scheduler publishes for it, through Redis outages."""

from __future__ import annotations

import logging

from dspark.cluster.redis_keys import check_name
from dspark.cluster.redis_state import RedisState, RedisUnavailable
from dspark.workers.scheduling import VerifyPolicy

log = logging.getLogger(__name__)

__all__ = ["PolicyFollower"]


class PolicyFollower:
    """A verifier group's view of its policy that survives Redis outages.

    `current` starts as `default` (a safe VerifyPolicy) and changes only when
    refresh() reads a different published version; while Redis is
    unreachable it keeps the last policy and `stale` is True. A version
    lower than the current one means Redis lost its data and the scheduler
    started over, so any differing version is adopted.
    """

    def __init__(self, state: RedisState, group: str, default: VerifyPolicy | None = None) -> None:
        self._state = state
        self.group = check_name("group", group)
        self.current: VerifyPolicy = default or VerifyPolicy()
        self.stale = False

    async def refresh(self) -> VerifyPolicy:
        """Poll Redis (one GET, plus one HGETALL on change); return the policy to use."""
        try:
            version = await self._state.get_policy_version(self.group)
            if version and version != self.current.version:
                policy = await self._state.get_policy(self.group)
                if policy is not None:
                    if policy.version < self.current.version:
                        log.warning(
                            "policy version for %s went back from %d to %d (redis reset); adopting it",
                            self.group, self.current.version, policy.version,
                        )  # fmt: skip
                    self.current = policy
        except RedisUnavailable:
            if not self.stale:
                log.warning("keeping policy v%d for %s: redis unreachable", self.current.version, self.group)
            self.stale = True
        except ValueError as exc:
            log.warning("keeping policy v%d for %s: %s", self.current.version, self.group, exc)
        else:
            self.stale = False
        return self.current
