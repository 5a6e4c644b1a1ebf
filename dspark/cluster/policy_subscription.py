"""Pub/sub pokes that announce a new policy version for one verifier group.

Nothing in the serving path subscribes: a poke can be lost (e.g. while Redis is down), so
verifier groups poll the version instead (:class:`~dspark.cluster.policy_follower.PolicyFollower`).
The channel is for operators' tools and for the tests that check publish_policy pokes.
"""

from __future__ import annotations

import logging
import time

from dspark.cluster.redis_keys import check_name
from dspark.cluster.redis_state import RedisState, redis_errors

log = logging.getLogger(__name__)

__all__ = ["PolicySubscription"]


class PolicySubscription:
    """Receives the version numbers published for one group.

        async with PolicySubscription(state, "vg0") as sub:
            version = await sub.get(timeout_s=1.0)   # None if nothing came
    """

    def __init__(self, state: RedisState, group: str) -> None:
        self._state = state
        self.channel = state.keys.policy_channel(check_name("group", group))
        self._pubsub = None

    async def __aenter__(self) -> "PolicySubscription":
        await self._subscribe()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _subscribe(self) -> None:
        if self._pubsub is None:
            self._pubsub = self._state.pubsub()
        pubsub = self._pubsub
        await self._state.run("subscribe", lambda: pubsub.subscribe(self.channel))

    async def get(self, timeout_s: float = 1.0) -> int | None:
        """The next poked version, or None if none arrived within timeout_s."""
        if self._pubsub is None:
            await self._subscribe()
        pubsub = self._pubsub
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            msg = await self._state.run(
                "policy subscription", lambda: pubsub.get_message(timeout=remaining)
            )
            if msg is not None and msg.get("type") == "message":
                try:
                    return int(msg["data"])
                except (TypeError, ValueError):
                    log.warning("ignoring malformed policy poke %r", msg.get("data"))
            if time.monotonic() >= deadline:
                return None

    async def close(self) -> None:
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except redis_errors():
                pass
            self._pubsub = None
